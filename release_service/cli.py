"""The `release-service` command: parses arguments, loads settings, runs one command.

Each command lives in the module that owns it (`devtools.stack`, `gateway.server`,
`pipeline.worker`...);
this module only wires the argument parser to them and turns expected failures
(bad settings, a missing binary, a service that is down) into one clear line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .core.settings import SettingsError

EXIT_USAGE = 2


class CommandError(Exception):
    """An expected failure a user can act on: printed without a traceback."""


def _command(target: str) -> Callable[[argparse.Namespace], int | None]:
    """Lazy `module:function`, so `--help` and light commands import nothing heavy."""
    module_name, _, function = target.partition(":")

    def run(args: argparse.Namespace) -> int | None:
        module = importlib.import_module(f"release_service.{module_name}")
        result: int | None = getattr(module, function)(args)
        return result

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="release-service",
        description=(
            "Slot releases for vaccine appointments: an HTTP gateway that claims stock "
            "atomically in Redis, a relay to Kafka, consumers that persist bookings in "
            "PostgreSQL and send SMS. Settings come from RELEASE_SERVICE_* environment "
            "variables and the settings file written by `stack up` (.stack/settings.env)."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, target: str, help_text: str, **kw: Any) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text, **kw)
        sub.set_defaults(run=_command(target))
        return sub

    stack = commands.add_parser(
        "stack", help="start, stop or show the local Redis, Kafka-protocol broker and PostgreSQL",
        description="The local development stack: Redis (AOF), Tansu (Kafka protocol) and "
        "PostgreSQL on free loopback ports, data in a scratch folder (.stack/ by default).",
    )
    stack_commands = stack.add_subparsers(dest="stack_command", required=True, metavar="ACTION")
    for action, text in (
        ("up", "start what is not running, wait until ready, create topics, migrate, "
               "and write .stack/settings.env"),
        ("down", "stop exactly the processes `up` started"),
        ("status", "show each component, its PID, port and health"),
    ):
        sub = stack_commands.add_parser(action, help=text, description=text)
        sub.add_argument("--dir", type=Path, default=None,
                         help="stack folder (default: $RELEASE_SERVICE_STACK_DIR or .stack)")
        if action == "up":
            sub.add_argument(
                "--redis-replicas", type=int, default=None, metavar="N",
                help="run Redis as a primary, N replicas and three sentinels that fail "
                     "over to a replica (default: as the stack was, else 0: one Redis)")
            sub.add_argument(
                "--min-replicas", type=int, default=None, metavar="K",
                help="replicas a write must reach before it is acknowledged "
                     "(RELEASE_SERVICE_REDIS_MIN_REPLICAS; default 1 with replicas)")
        if action == "status":
            sub.add_argument("--json", action="store_true",
                             help="one JSON object per component: name, role, pid, port, "
                                  "data_dir, healthy, state")
        sub.set_defaults(run=_command(f"devtools.stack:cmd_{action}"))

    run = add("run", "devtools.supervisor:cmd_run",
              "bring up the stack, then run the gateway, relay and consumers until Ctrl-C")
    run.add_argument("--keep-stack", action="store_true",
                     help="leave Redis, the broker and PostgreSQL running afterwards")

    gateway = add("gateway", "gateway.server:cmd_gateway", "run the HTTP gateway")
    gateway.add_argument("--port", type=int, default=None, help="override HTTP port")
    gateway.add_argument("--processes", type=int, default=None,
                         help="gateway processes sharing the port (SO_REUSEPORT)")

    add("migrate", "core.db:cmd_migrate", "create or upgrade the database schema")

    seed = add("seed-users", "devtools.seed:cmd_seed_users",
               "create N accounts, each with one person eligible for every vaccine, and "
               "write one JSON line per account: account_id, token, person_ids")
    seed.add_argument("--count", type=int, required=True, help="how many accounts")
    seed.add_argument("--out", type=Path, required=True, help="output file (JSON lines)")
    seed.add_argument("--family", type=int, default=0,
                      help="extra family members per account (0-4)")

    add("relay", "pipeline.worker:cmd_relay",
        "publish the outbox streams of active releases to Kafka (and reconcile on a timer)")
    reconcile = add("reconcile", "pipeline.reconcile:cmd_reconcile",
                    "compare Redis claims and outbox, Kafka and PostgreSQL bookings and SMS; "
                    "publish again what is missing and trim what is persisted")
    reconcile.add_argument("--grace", type=float, default=None,
                           help="seconds an event may take to arrive before it counts as "
                                "missing (default: RELEASE_SERVICE_RECONCILE_GRACE_SECONDS)")
    consume = add("consume", "consumers_cli:cmd_consume",
                  "run a Kafka consumer: bookings (persist to PostgreSQL) or sms (send SMS)")
    consume.add_argument("name", choices=["bookings", "sms"], help="which consumer")

    no_shows = add("no-shows", "bookings.attendance:cmd_no_shows",
                   "mark past unattended bookings as no-shows and ban repeat no-shows "
                   "(also runs on a timer in the relay)")
    no_shows.add_argument("--now", default=None,
                          help="evaluate at this RFC 3339 time instead of now")

    token = add("issue-token", "devtools.seed:cmd_issue_token",
                "print a bearer token for an existing account (for curl and operators)")
    token.add_argument("account_id")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (SettingsError, CommandError) as exc:
        print(f"release-service: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # connection refused and friends: a service is not running
        print(f"release-service: cannot reach a service ({exc}); is the stack up? "
              "(release-service stack status)", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
