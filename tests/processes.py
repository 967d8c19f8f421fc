"""Start the service's own commands as child processes, as an operator would."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import orjson

from release_service.core.settings import Settings, write_settings_file

BIN = Path(sys.executable).parent / "release-service"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceProcess:
    """`release-service ARGS` with the test stack's settings; stopped by its own PID."""

    def __init__(self, settings: Settings, folder: Path, *args: str, name: str,
                 **overrides: object) -> None:
        self.settings_file = folder / f"{name}.env"
        values = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
        values.update(overrides)
        for setting in overrides:  # NAME_FILE=path stands in for NAME
            if setting.endswith("_file"):
                values.pop(setting[:-5], None)
        write_settings_file(self.settings_file, values)
        self.args = [str(BIN), *args]
        self.log_path = folder / f"{name}.log"
        self.name = name
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELEASE_SERVICE_")}
        env["RELEASE_SERVICE_SETTINGS_FILE"] = str(self.settings_file)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(self.args, env=env, stdout=log, stderr=log,
                                        stdin=subprocess.DEVNULL)
        return self

    def wait_http(self, url: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None and self.process.poll() is None, self.log()
            try:
                with urllib.request.urlopen(url, timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"{self.name} did not answer {url}:\n{self.log()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:  # never leave a process behind
                self.process.kill()
                self.process.wait()
                raise

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""


def stop_all(processes: Iterable[ServiceProcess]) -> None:
    """Stop every process, even when one of them will not stop (then raise its error once
    the others are stopped: a process left running would outlive the test)."""
    failures = []
    for process in processes:
        try:
            process.stop()
        except Exception as exc:
            failures.append(exc)
    if failures:
        raise failures[0]


class Pipeline:
    """Relay and both consumers as child processes; the SMS sink in `folder`."""

    def __init__(self, stack_settings: Settings, folder: Path) -> None:
        self.sink = folder / "sms-sink.jsonl"
        options = {"sms_sink_path": str(self.sink), "reconcile_grace_seconds": 3.0,
                   "relay_takeover_seconds": 2.0}
        self.processes = {
            "relay": ServiceProcess(stack_settings, folder, "relay", name="relay", **options),
            "bookings": ServiceProcess(stack_settings, folder, "consume", "bookings",
                                       name="bookings", **options),
            "sms": ServiceProcess(stack_settings, folder, "consume", "sms", name="sms",
                                  **options),
        }

    def start(self) -> None:
        for process in self.processes.values():
            process.start()

    def stop(self) -> None:
        stop_all(self.processes.values())

    def sms_lines(self) -> list[dict[str, str]]:
        if not self.sink.exists():
            return []
        return [orjson.loads(line) for line in self.sink.read_text().splitlines() if line]
