"""`release-service run`: the whole local system in one command.

Brings the stack up, then runs the gateway, the relay and both consumers as child
processes with the stack's settings; Ctrl-C (or SIGTERM) stops the children, gives them
time to finish in-flight work, and stops the stack.
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

from .settings import DEFAULT_STACK_DIR, PREFIX, load_settings
from .stack import Stack

ROLES = {
    "gateway": ["gateway"],
    "relay": ["relay"],
    "bookings": ["consume", "bookings"],
    "sms": ["consume", "sms"],
}
STOP_SECONDS = 10.0


def cmd_run(args: argparse.Namespace) -> int:
    stack = Stack(Path(os.environ.get(PREFIX + "STACK_DIR", str(DEFAULT_STACK_DIR))),
                  os.environ.get(PREFIX + "REDIS_APPENDFSYNC", "everysec"))
    stack.up()
    env = {**os.environ, PREFIX + "SETTINGS_FILE": str(stack.settings_file)}
    settings = load_settings(env)
    binary = str(Path(sys.executable).parent / "release-service")
    children = {
        role: subprocess.Popen([binary, *argv], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        for role, argv in ROLES.items()
    }
    print(f"gateway: http://{settings.http_host}:{settings.http_port}  "
          f"(admin token in {stack.settings_file}; Ctrl-C stops everything)", flush=True)

    stopping = False

    def request_stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    selector = selectors.DefaultSelector()
    for role, child in children.items():
        assert child.stdout is not None
        os.set_blocking(child.stdout.fileno(), False)
        selector.register(child.stdout, selectors.EVENT_READ, role)
    exit_code = 0
    try:
        while not stopping:
            for key, _ in selector.select(timeout=0.5):
                for line in key.fileobj.readlines():  # type: ignore[union-attr]
                    sys.stdout.write(f"{key.data:>8} | {line.decode(errors='replace')}")
            sys.stdout.flush()
            dead = [role for role, child in children.items() if child.poll() is not None]
            if dead:
                print(f"stopping: {', '.join(dead)} exited", file=sys.stderr)
                exit_code = 1
                break
    finally:
        for child in children.values():
            if child.poll() is None:
                child.terminate()
        deadline = time.monotonic() + STOP_SECONDS
        for child in children.values():
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if not args.keep_stack:
            stack.down()
    return exit_code
