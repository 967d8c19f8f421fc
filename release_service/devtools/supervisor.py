"""`release-service run`: the whole local system in one command.

Brings the stack up, then runs the gateway, relay and both consumers as child processes
with the stack's settings file, each line of their output prefixed with the role. A child
that exits is reported and not restarted. SIGINT, SIGTERM or SIGHUP stops the children
(SIGTERM, then SIGKILL after 10 s) and then the stack, unless `--keep-stack`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO

from ..core.settings import PREFIX, load_settings
from .stack import Stack, stack_dir

STOP_SECONDS = 10.0
GATEWAY_WAIT_SECONDS = 30.0
# role -> (arguments of `release-service`, module that must exist for the role to run)
ROLES: dict[str, tuple[list[str], str | None]] = {
    "gateway": (["gateway"], None),
    "relay": (["relay"], "release_service.pipeline.worker"),
    "bookings": (["consume", "bookings"], "consumers.bookings"),
    "sms": (["consume", "sms"], "consumers.sms"),
}


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # the parent package is missing
        return False


def _command() -> list[str]:
    script = shutil.which("release-service", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "release_service.cli"]


class Children:
    """The role processes, their prefixed output, and their orderly stop."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._reported: set[str] = set()
        self._pumps: list[threading.Thread] = []
        self._write = threading.Lock()

    def start(self, role: str, argv: list[str]) -> None:
        # Own process group: a terminal's Ctrl-C reaches only the supervisor, which then
        # stops the children once, in order, instead of each getting two signals.
        process = subprocess.Popen([*_command(), *argv], env=self.env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, process_group=0)
        self.processes[role] = process
        assert process.stdout is not None
        pump = threading.Thread(target=self._pump, args=(role, process.stdout),
                                name=f"output-{role}", daemon=True)
        pump.start()
        self._pumps.append(pump)

    def _pump(self, role: str, stream: IO[bytes]) -> None:
        for line in iter(stream.readline, b""):
            with self._write:
                sys.stdout.write(f"{role:>8} | {line.decode(errors='replace')}")
                sys.stdout.flush()
        stream.close()

    def newly_exited(self) -> list[tuple[str, int]]:
        exited = []
        for role, process in self.processes.items():
            code = process.poll()
            if code is not None and role not in self._reported:
                self._reported.add(role)
                exited.append((role, code))
        return exited

    def all_exited(self) -> bool:
        return all(p.poll() is not None for p in self.processes.values())

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + timeout
        for role, process in self.processes.items():
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"supervisor: {role} did not stop within {timeout:.0f} s; killing it",
                      file=sys.stderr)
                process.kill()
                process.wait()
        for pump in self._pumps:
            pump.join(timeout=2)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def cmd_run(args: argparse.Namespace) -> int:
    stop_requested = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        stop_requested.set()

    stack = Stack(stack_dir())
    children: Children | None = None
    failed = False
    try:
        stack.up()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, request_stop)
        env = {**os.environ, PREFIX + "SETTINGS_FILE": str(stack.settings_file),
               "PYTHONUNBUFFERED": "1"}
        settings = load_settings(env)
        children = Children(env)
        for role, (argv, module) in ROLES.items():
            if module is None or _module_exists(module):
                children.start(role, argv)
            else:
                print(f"supervisor: {role} not started ({module} does not exist yet)",
                      file=sys.stderr)
        url = f"http://{settings.http_host}:{settings.http_port}"
        announced, started = False, time.monotonic()
        while not stop_requested.wait(0.25):
            for role, code in children.newly_exited():
                failed = True
                print(f"supervisor: {role} exited with status {code}; not restarted",
                      file=sys.stderr, flush=True)
            if children.all_exited():
                break
            if not announced and _answers(url + "/healthz"):
                announced = True
                print(f"supervisor: gateway at {url}; admin token: {PREFIX}ADMIN_TOKEN in "
                      f"{stack.settings_file}; Ctrl-C stops everything", flush=True)
            elif not announced and time.monotonic() - started > GATEWAY_WAIT_SECONDS:
                announced = True
                print(f"supervisor: gateway does not answer {url}/healthz yet", file=sys.stderr)
    finally:
        if children is not None:
            print("supervisor: stopping the services", file=sys.stderr, flush=True)
            children.stop()
        if args.keep_stack:
            print(f"supervisor: stack left running; stop it with "
                  f"`release-service stack down --dir {stack.root}`", flush=True)
        else:
            stack.down()
    return 1 if failed else 0
