"""Benchmark harness: one command, a few minutes, every figure measured in the same run.

    python loadtest/bench.py [--duration 8] [--rounds 3] [--connections 64] [--processes 1]

Starts its own stack (Redis, broker, PostgreSQL) in a scratch folder, then measures with
wrk (a non-Python load generator, so the generator is not the bottleneck) on loopback:

- minimal     the ceiling: the smallest aiohttp handler returning pre-encoded JSON
- reference_single, reference_batch
              the issue's reference designs (reference_server.py): the minimal handler
              plus one short claim script in Redis (stock, holders), one EVALSHA per
              request or one per event-loop tick for up to 32 requests; what a claim
              costs through Redis with none of our rules, measured on this machine
- claim_win   our claim endpoint on the winning path: full rules (token, reservation of
              per-person limits, eligibility, idempotency check, stock, code, outbox);
              every request is a different resident
- sold_out    our claim endpoint on a sold-out release (answered from the local view)
- not_open    our claim endpoint before the opening
- claim_win_replicated, claim_win_replica_ack
              claim_win with one Redis replica attached, acknowledged by the primary alone
              (k = 0), then only once the replica has the write (k = 1: WAIT 1 in the
              claim's round trip)
- naive_sql   the naive relational design: 50 clients, SELECT ... FOR UPDATE on the stock
              row, update, insert the booking, commit

The HTTP scenarios run `--rounds` times, interleaved (minimal, the references, claim_win,
sold_out, not_open, then again): this machine's speed drifts by 10-20% from one minute to
the next, so each ratio is taken within its round, against that round's minimal handler,
and the median round is reported with the spread of the rounds.

Then the pipeline: the bookings consumer's drain rate on the claims just made, and the
time from the last 201 of a spike to its last booking row. Prints a table, the ratios
against the minimal handler next to the issue's reference machine's (calibration: how far
this machine's ceiling and Redis designs sit from those figures), writes JSON (to compare
runs) and a PNG plot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
from tqdm import tqdm

from release_service.core.settings import Settings, load_settings, write_settings_file
from release_service.devtools.stack import Stack, redis_binary
from release_service.people.tokens import PersonGrant, TokenCodec

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent / "release-service"
WRK_SCRIPT = HERE / "wrk_claims.lua"
# The issue's figures on its 2-core reference machine (req/s): the same ratios measured
# here say how far this machine's ceiling and its Redis designs are from those.
ISSUE_REQUESTS_PER_S = {"minimal": 45_000, "reference_single": 9_700,
                        "reference_batch": 30_000}
REFERENCE_MODES = {"reference_single": "single", "reference_batch": "batch"}


@dataclass
class Row:
    name: str
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float | None = None
    redis_cpu_percent: float | None = None
    note: str = ""
    spread: str = ""  # the rounds' lowest and highest req/s


@dataclass
class Report:
    machine: str
    started_at: str
    settings: dict[str, object]
    rows: list[Row] = field(default_factory=list)  # every measurement, round by round
    summary: list[Row] = field(default_factory=list)  # per scenario: the median round
    pipeline: dict[str, float] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    targets: dict[str, bool] = field(default_factory=dict)
    # scenario -> {"here": req/s over minimal's in this run, "issue": on the issue's machine}
    calibration: dict[str, dict[str, float]] = field(default_factory=dict)
    persisted_timeline: list[tuple[float, int]] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of the processes and their children (clock ticks to seconds)."""
    total = 0
    for pid in pids:
        for task in [pid, *children_of(pid)]:
            try:
                fields = Path(f"/proc/{task}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def children_of(pid: int) -> list[int]:
    try:
        found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(c) for c in found]


def stop_process(process: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL after `timeout`; waits either way."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(url)


def wrk(url: str, duration: float, connections: int, env: dict[str, str]) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{int(duration)}s", "-s", str(WRK_SCRIPT), url],
        capture_output=True, text=True, check=True, env={**os.environ, **env},
        cwd=HERE).stdout
    match = re.search(r"WRK_JSON (\{.*\})", out)
    if not match:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    data: dict[str, float] = json.loads(match[1])
    return data


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.folder = Path(tempfile.mkdtemp(prefix="release-bench-"))
        self.folder.chmod(0o755)  # PostgreSQL runs as another user when we are root
        self.stack = Stack(self.folder / "stack")
        self.processes: list[subprocess.Popen[bytes]] = []
        self.report = Report(
            machine=f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
                    f"Python {platform.python_version()}",
            started_at=datetime.now(UTC).isoformat(timespec="seconds"),
            settings={"duration_s": args.duration, "connections": args.connections,
                      "gateway_processes": args.processes})

    # -- processes -------------------------------------------------------------------------
    def start(self, *argv: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = (self.folder / f"{argv[0].split('/')[-1]}-{len(self.processes)}.log").open("wb")
        process = subprocess.Popen(list(argv), stdout=log, stderr=log,
                                   env={**os.environ, **(env or {})})
        self.processes.append(process)
        return process

    def close(self) -> None:
        for process in self.processes:
            stop_process(process)
        self.stack.down()
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- set-up ----------------------------------------------------------------------------
    def setup(self) -> None:
        print("starting the stack…", file=sys.stderr)
        values = self.stack.up()
        self.settings: Settings = load_settings(environ={}, **values)
        self.settings_file = self.folder / "bench.env"
        self.gateway_values = {
            **values, "http_port": free_port(), "gateway_processes": self.args.processes,
            "log_level": "WARNING", "reconcile_grace_seconds": 3600}
        write_settings_file(self.settings_file, self.gateway_values)
        self.env = {"RELEASE_SERVICE_SETTINGS_FILE": str(self.settings_file)}
        self.port = int(load_settings({"RELEASE_SERVICE_SETTINGS_FILE":
                                       str(self.settings_file)}).http_port)
        self.gateway = self.start(str(BIN), "gateway", env=self.env)
        self.base = f"http://127.0.0.1:{self.port}"
        self.minimal_port = free_port()
        self.minimal = self.start(sys.executable, str(HERE / "minimal_server.py"),
                                  str(self.minimal_port), str(self.args.processes))
        self.references: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
        for name, mode in REFERENCE_MODES.items():
            port = free_port()
            self.references[name] = (self.start(
                sys.executable, str(HERE / "reference_server.py"), str(port), mode,
                self.settings.redis_url, str(self.args.processes)), port)
        wait_http(self.base + "/healthz")
        wait_http(f"http://127.0.0.1:{self.minimal_port}/")
        for _, port in self.references.values():
            wait_http(f"http://127.0.0.1:{port}/healthz")

    def residents_file(self, count: int, name: str) -> Path:
        codec = TokenCodec(self.settings.token_secret, 3600)
        path = self.folder / f"{name}.txt"
        with path.open("w") as out:
            for _ in tqdm(range(count), desc=f"tokens for {name}", unit="resident",
                          file=sys.stderr, leave=False):
                person = "p" + secrets.token_hex(6)
                token = codec.issue("a" + person, [PersonGrant(person, 19950101, "F")])
                out.write(f"{token} {person}\n")
        return path

    def create_release(self, capacity: int, opens_in: float = -60) -> str:
        release_id = f"bench-{secrets.token_hex(4)}"
        now = datetime.now(UTC)
        day = now + timedelta(days=10)
        definition = {
            "release_id": release_id, "vaccine": "HPV9", "dose": 1, "clinic_id": "bench",
            "opens_at": (now + timedelta(seconds=opens_in)).isoformat(),
            "closes_at": (now + timedelta(hours=6)).isoformat(),
            "slots": [{"slot_id": "s0", "starts_at": day.isoformat(),
                       "ends_at": (day + timedelta(hours=1)).isoformat(), "capacity": capacity}],
        }
        request = urllib.request.Request(
            self.base + "/v1/admin/releases", data=json.dumps(definition).encode(),
            headers={"Authorization": f"Bearer {self.settings.admin_token}",
                     "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10):
            pass
        time.sleep(0.5)  # every gateway process's view has it
        return release_id

    def admin_view(self, release_id: str) -> dict[str, object]:
        request = urllib.request.Request(
            f"{self.base}/v1/admin/releases/{release_id}",
            headers={"Authorization": f"Bearer {self.settings.admin_token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            data: dict[str, object] = json.loads(response.read())
            return data

    # -- scenarios -------------------------------------------------------------------------
    def settle(self, timeout: float = 60) -> None:
        """Wait out a background AOF rewrite or snapshot of Redis: the forked child would
        take one of the two cores from whatever is measured next."""
        import redis

        client = redis.Redis.from_url(self.settings.redis_url)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                info = client.info("persistence")
                if not info["aof_rewrite_in_progress"] and not info["rdb_bgsave_in_progress"]:
                    return
                time.sleep(0.2)
        finally:
            client.close()

    def measure(self, name: str, url: str, env: dict[str, str], pids: list[int],
                note: str = "") -> Row:
        self.settle()
        redis_pid = self.stack.pid("redis") or 0
        cpu_before, redis_before = cpu_seconds(pids), cpu_seconds([redis_pid])
        result = wrk(url, self.args.duration, self.args.connections, env)
        cpu_after, redis_after = cpu_seconds(pids), cpu_seconds([redis_pid])
        seconds = result["duration_us"] / 1e6
        row = Row(name, result["requests"] / seconds, result["p50_us"] / 1000,
                  result["p99_us"] / 1000,
                  (cpu_after - cpu_before) / max(result["requests"], 1) * 1e6,
                  (redis_after - redis_before) / seconds * 100, note)
        print(f"  {name}: {row.requests_per_s:,.0f} req/s, p99 {row.p99_ms:.1f} ms",
              file=sys.stderr)
        self.report.rows.append(row)
        return row

    def restart_gateway(self, **changes: object) -> None:
        stop_process(self.gateway)
        self.gateway_values.update(changes)
        write_settings_file(self.settings_file, self.gateway_values)
        self.gateway = self.start(str(BIN), "gateway", env=self.env)
        wait_http(self.base + "/healthz")

    def limits_cost(self, win_file: Path) -> Report:
        """claim_win with both claim counters spent by every claim (none refused: every
        request is a new account, the address limit is out of reach), then with the claim
        limits off; new residents for the second (per-person limits span releases)."""
        files = [win_file, self.residents_file(int(self.args.duration * 12_000) + 10_000,
                                               "winners-2")]
        for (name, limit), claims in zip((("claim_win_limited", 10**9),
                                          ("claim_win_unlimited", 0)), files, strict=True):
            self.restart_gateway(rate_limit_exempt_addresses="",
                                 rate_claims_per_address_per_minute=limit,
                                 rate_claims_per_account_per_minute=limit and 30)
            release = self.create_release(1_000_000)
            self.measure(name, self.base, {
                "CLAIMS_FILE": str(claims), "CLAIM_PATH": f"/v1/releases/{release}/claims"},
                [self.gateway.pid], "counters on" if limit else "limits off")
        rows = {r.name: r for r in self.report.rows}
        on, off = rows["claim_win_limited"], rows["claim_win_unlimited"]
        self.report.ratios = {"req/s limited / unlimited": on.requests_per_s / off.requests_per_s,
                              "CPU/req limited / unlimited": (on.cpu_us_per_request or 0)
                              / (off.cpu_us_per_request or 1)}
        return self.report

    def run(self) -> Report:
        self.setup()
        expected = int(self.args.duration * 12_000) + 10_000
        win_file = self.residents_file(expected, "winners")
        if self.args.limits_cost:
            return self.limits_cost(win_file)
        if self.args.replica_cost:
            for _ in range(self.args.rounds):
                self.replica_ack()
            return self.replica_cost()
        spike_file = self.residents_file(20_000, "spike")
        pids = [self.gateway.pid]
        sold_out = self.create_release(0)
        not_open = self.create_release(10, opens_in=3600)
        claimed: dict[str, int] = {}  # release -> claims taken, for the pipeline
        # Unmeasured: the first measurement of a run was 30-40% slow here without it.
        for url in (f"http://127.0.0.1:{self.minimal_port}/", self.base + "/healthz"):
            wrk(url, 2, self.args.connections, {})
        for turn in range(self.args.rounds):
            print(f"round {turn + 1} of {self.args.rounds}", file=sys.stderr)
            if turn:  # per-person limits span releases: every round has new residents
                win_file = self.residents_file(expected, f"winners-{turn}")
            self.measure("minimal", f"http://127.0.0.1:{self.minimal_port}/", {},
                         [self.minimal.pid], "aiohttp + uvloop, pre-encoded JSON")
            self.reference_designs(win_file)
            win = self.create_release(1_000_000)
            row = self.measure("claim_win", self.base, {
                "CLAIMS_FILE": str(win_file), "CLAIM_PATH": f"/v1/releases/{win}/claims"},
                pids)
            claimed[win] = int(self.admin_view(win)["claimed"])  # type: ignore[call-overload]
            row.note = f"{claimed[win]:,} claims taken, all 201"
            self.measure("sold_out", self.base, {
                "CLAIMS_FILE": str(spike_file),
                "CLAIM_PATH": f"/v1/releases/{sold_out}/claims"}, pids,
                "409 from the local view")
            self.measure("not_open", self.base, {
                "CLAIMS_FILE": str(spike_file),
                "CLAIM_PATH": f"/v1/releases/{not_open}/claims"}, pids,
                "425 from the local view")
        for process, _ in self.references.values():
            stop_process(process)  # idle from here on: leave the cores to the rest
        claimed.update(self.fsync_always(pids))
        claimed.update(self.replica_ack())
        asyncio.run(self.naive_sql())
        self.pipeline(claimed, spike_file)
        self.ratios()
        return self.report

    def reference_designs(self, residents: Path) -> None:
        """The issue's reference designs, with the same requests as claim_win (token
        header and body; the token is not read), on a stock that never runs out."""
        import redis
        from reference_server import STOCK, STOCK_KEY

        client = redis.Redis.from_url(self.settings.redis_url)
        try:
            for name, (process, port) in self.references.items():
                client.set(STOCK_KEY, STOCK)
                row = self.measure(name, f"http://127.0.0.1:{port}/", {
                    "CLAIMS_FILE": str(residents), "CLAIM_PATH": "/claims"}, [process.pid],
                    "one EVALSHA per request" if name == "reference_single"
                    else "one EVALSHA per tick, up to 32 claims")
                taken = STOCK - int(client.get(STOCK_KEY) or 0)
                row.note += f"; {taken:,} taken"
        finally:
            client.close()

    def fsync_always(self, pids: list[int]) -> dict[str, int]:
        """The winning path again with `appendfsync always` (an fsync per write: an OS
        crash then loses no acknowledged claim), set on the running Redis and put back."""
        import redis

        client = redis.Redis.from_url(self.settings.redis_url)
        winners = self.residents_file(int(self.args.duration * 12_000) + 10_000, "always")
        release = self.create_release(1_000_000)
        client.config_set("appendfsync", "always")
        try:
            self.measure("claim_win_fsync_always", self.base, {
                "CLAIMS_FILE": str(winners), "CLAIM_PATH": f"/v1/releases/{release}/claims"},
                pids, "appendfsync always: no claim lost even on an OS crash")
        finally:
            client.config_set("appendfsync", "everysec")
            client.close()
        return {release: int(self.admin_view(release)["claimed"])}  # type: ignore[call-overload]

    def replica_cost(self) -> Report:
        """--replica-cost: k = 1 against k = 0, the median of the rounds."""
        rounds: dict[str, list[Row]] = {}
        for row in self.report.rows:
            rounds.setdefault(row.name, []).append(row)
        self.report.summary = [median_row(measured) for measured in rounds.values()]
        self.report.ratios = {"claim_win_replica_ack / claim_win_replicated": statistics.median(
            a.requests_per_s / b.requests_per_s for a, b in zip(
                rounds["claim_win_replica_ack"], rounds["claim_win_replicated"], strict=True))}
        return self.report

    def replica_ack(self) -> dict[str, int]:
        """The winning path with one replica attached: acknowledged by the primary alone
        (k = 0), then only once the replica has the write (k = 1); the replica is
        detached again afterwards."""
        import redis

        primary = redis.Redis.from_url(self.settings.redis_url)
        port = free_port()
        folder = Path(tempfile.mkdtemp(prefix="replica-", dir=self.folder))
        replica = self.start(redis_binary(), "--bind", "127.0.0.1", "--port", str(port),
                             "--dir", str(folder), "--appendonly", "yes", "--save", "",
                             "--protected-mode", "no", "--replicaof", "127.0.0.1",
                             str(primary.connection_pool.connection_kwargs["port"]))
        taken: dict[str, int] = {}
        try:
            deadline = time.monotonic() + 60
            while primary.info("replication").get("slave0", {}).get("state") != "online":
                if time.monotonic() > deadline:
                    raise RuntimeError("the replica did not come online")
                time.sleep(0.1)
            for name, k in (("claim_win_replicated", 0), ("claim_win_replica_ack", 1)):
                self.restart_gateway(redis_min_replicas=k)
                winners = self.residents_file(int(self.args.duration * 12_000) + 10_000,
                                              name)
                release = self.create_release(1_000_000)
                self.measure(name, self.base, {
                    "CLAIMS_FILE": str(winners),
                    "CLAIM_PATH": f"/v1/releases/{release}/claims"}, [self.gateway.pid],
                    f"one replica attached, k = {k}")
                taken[release] = int(self.admin_view(release)["claimed"])  # type: ignore[call-overload]
        finally:
            self.restart_gateway(redis_min_replicas=0)
            stop_process(replica)
            primary.close()
        return taken

    async def naive_sql(self, clients: int = 50) -> None:
        """SELECT ... FOR UPDATE on the stock row, update, insert the booking, commit."""
        pool = await asyncpg.create_pool(self.settings.database_url, min_size=clients,
                                         max_size=clients)
        assert pool is not None
        await pool.execute("CREATE TABLE IF NOT EXISTS naive_stock (id int PRIMARY KEY, "
                           "remaining int NOT NULL)")
        await pool.execute("CREATE TABLE IF NOT EXISTS naive_bookings (id bigserial "
                           "PRIMARY KEY, person text NOT NULL, at timestamptz DEFAULT now())")
        await pool.execute("INSERT INTO naive_stock VALUES (1, 100000000) ON CONFLICT (id) "
                           "DO UPDATE SET remaining = 100000000")
        done = 0
        latencies: list[float] = []
        deadline = time.monotonic() + self.args.duration

        async def client() -> None:
            nonlocal done
            while time.monotonic() < deadline:
                started = time.perf_counter()
                async with pool.acquire() as conn, conn.transaction():
                    left = await conn.fetchval(
                        "SELECT remaining FROM naive_stock WHERE id = 1 FOR UPDATE")
                    if left > 0:
                        await conn.execute(
                            "UPDATE naive_stock SET remaining = remaining - 1 WHERE id = 1")
                        await conn.execute("INSERT INTO naive_bookings (person) VALUES ($1)",
                                           secrets.token_hex(6))
                done += 1
                latencies.append(time.perf_counter() - started)

        started = time.monotonic()
        await asyncio.gather(*(client() for _ in range(clients)))
        seconds = time.monotonic() - started
        await pool.close()
        latencies.sort()
        row = Row("naive_sql", done / seconds, latencies[len(latencies) // 2] * 1000,
                  latencies[int(len(latencies) * 0.99)] * 1000,
                  note=f"{clients} clients, row lock per claim")
        print(f"  naive_sql: {row.requests_per_s:,.0f} claims/s", file=sys.stderr)
        self.report.rows.append(row)

    def pipeline(self, claimed: dict[str, int], spike_file: Path) -> None:
        """Drain rate of the bookings consumer on the claims of every round (release ->
        claims taken), then last-201-to-last-row of a spike."""
        asyncio.run(self._pipeline(claimed, spike_file))

    async def _pipeline(self, claimed_by_release: dict[str, int], spike_file: Path) -> None:
        from redis.asyncio import Redis

        from release_service.core import keys

        redis = Redis.from_url(self.settings.redis_url)
        db = await asyncpg.connect(self.settings.database_url)
        relay = self.start(str(BIN), "relay", env=self.env)
        claimed, releases = sum(claimed_by_release.values()), list(claimed_by_release)
        # 1. The relay moves the outboxes into Kafka first: the consumer then has a backlog.
        bar = tqdm(total=claimed, desc="relay to Kafka", unit="event", file=sys.stderr)
        while True:
            groups = [await redis.xinfo_groups(keys.outbox_key(r)) for r in releases]
            left = sum(int(g[0]["lag"] or 0) + int(g[0]["pending"]) if g
                       else claimed_by_release[r] for r, g in zip(releases, groups, strict=True))
            bar.n = min(claimed, max(0, claimed - left))
            bar.refresh()
            if not left:
                break
            await asyncio.sleep(0.2)
        bar.close()
        # 2. The consumer drains the backlog: its own rate.
        started = time.monotonic()
        consumer = self.start(str(BIN), "consume", "bookings", env=self.env)
        bar = tqdm(total=claimed, desc="bookings persisted", unit="row", file=sys.stderr)
        first_row_at = None
        while True:
            count = await db.fetchval(
                "SELECT count(*) FROM bookings WHERE release_id = ANY($1)", releases)
            elapsed = time.monotonic() - started
            self.report.persisted_timeline.append((round(elapsed, 2), count))
            if count and first_row_at is None:
                first_row_at = time.monotonic()
            bar.n = count
            bar.refresh()
            if count >= claimed or elapsed > 300:
                break
            await asyncio.sleep(0.2)
        bar.close()
        drain_seconds = time.monotonic() - (first_row_at or started)
        self.report.pipeline["bookings_drained"] = count
        self.report.pipeline["consumer_rows_per_s"] = count / max(drain_seconds, 1e-6)
        self.report.pipeline["consumer_start_to_first_row_s"] = (first_row_at or started) \
            - started

        # 3. A spike with everything running: last 201 to last booking row.
        spike = self.create_release(1_000_000)
        await asyncio.to_thread(wrk, self.base, min(3.0, self.args.duration),
                                self.args.connections,
                                {"CLAIMS_FILE": str(spike_file),
                                 "CLAIM_PATH": f"/v1/releases/{spike}/claims"})
        last_201 = time.monotonic()
        spike_claimed = int(self.admin_view(spike)["claimed"])  # type: ignore[call-overload]
        while True:
            count = await db.fetchval("SELECT count(*) FROM bookings WHERE release_id = $1",
                                      spike)
            if count >= spike_claimed or time.monotonic() - last_201 > 120:
                break
            await asyncio.sleep(0.05)
        self.report.pipeline["spike_claims"] = spike_claimed
        self.report.pipeline["last_201_to_last_row_s"] = time.monotonic() - last_201
        stop_process(consumer)
        stop_process(relay)
        await db.close()
        await redis.aclose()

    def ratios(self) -> None:
        rounds: dict[str, list[Row]] = {}
        for row in self.report.rows:
            rounds.setdefault(row.name, []).append(row)
        self.report.summary = [median_row(measured) for measured in rounds.values()]
        rows = {r.name: r for r in self.report.summary}

        def per_round(name: str, base: str = "minimal") -> float:
            """The median over rounds of name's req/s over base's in the same round."""
            return statistics.median(a.requests_per_s / b.requests_per_s
                                     for a, b in zip(rounds[name], rounds[base], strict=True))

        win = rows["claim_win"]
        batch = rows["reference_batch"]
        ratios = {
            "claim_win / minimal": per_round("claim_win"),
            "reference_single / minimal": per_round("reference_single"),
            "reference_batch / minimal": per_round("reference_batch"),
            # What our full rules cost against the bare batched design, same machine:
            "claim_win / reference_batch": per_round("claim_win", "reference_batch"),
            "claim_win CPU/req / reference_batch CPU/req":
            (win.cpu_us_per_request or 0) / (batch.cpu_us_per_request or 1),
            "sold_out / minimal": per_round("sold_out"),
            "not_open / minimal": per_round("not_open"),
            "claim_win / naive_sql": win.requests_per_s / rows["naive_sql"].requests_per_s,
            "claim_win_fsync_always / claim_win":
            rows["claim_win_fsync_always"].requests_per_s / win.requests_per_s,
            "consumer rows/s / claim_win": self.report.pipeline["consumer_rows_per_s"]
            / win.requests_per_s,
            "claim_win_replica_ack / claim_win_replicated":
            rows["claim_win_replica_ack"].requests_per_s
            / rows["claim_win_replicated"].requests_per_s,
        }
        self.report.ratios = ratios
        self.report.targets = {
            "claim_win >= 0.7 x minimal": ratios["claim_win / minimal"] >= 0.7,
            "claim_win p99 < 5 ms": win.p99_ms < 5,
            "sold_out >= 0.9 x minimal": ratios["sold_out / minimal"] >= 0.9,
            "not_open >= 0.9 x minimal": ratios["not_open / minimal"] >= 0.9,
            "claim_win >= 40 x naive_sql": ratios["claim_win / naive_sql"] >= 40,
            "Redis CPU < 25% at claim_win": (win.redis_cpu_percent or 0) < 25,
            "consumer >= 3 x claim_win": ratios["consumer rows/s / claim_win"] >= 3,
            "k = 1 >= 0.85 x k = 0": ratios["claim_win_replica_ack / claim_win_replicated"]
            >= 0.85,
        }
        issue_ceiling = ISSUE_REQUESTS_PER_S["minimal"]
        self.report.calibration = {
            name: {"here": per_round(name),
                   "issue": ISSUE_REQUESTS_PER_S.get(name, 0) / issue_ceiling}
            for name in ("minimal", "reference_single", "reference_batch", "claim_win")}


def median_row(rounds: list[Row]) -> Row:
    """One scenario's rounds as one row: the median of each figure, and the req/s range."""
    def median(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.median(known) if known else None

    rates = [r.requests_per_s for r in rounds]
    return Row(rounds[0].name, statistics.median(rates),
               statistics.median(r.p50_ms for r in rounds),
               statistics.median(r.p99_ms for r in rounds),
               median([r.cpu_us_per_request for r in rounds]),
               median([r.redis_cpu_percent for r in rounds]), rounds[-1].note,
               f"{min(rates):,.0f}-{max(rates):,.0f}" if len(rounds) > 1 else "")


def table(report: Report) -> str:
    lines = [f"machine: {report.machine}; {report.started_at}; {report.settings}", "",
             "| scenario | req/s | rounds' req/s | p50 ms | p99 ms | CPU µs/req | Redis CPU % "
             "| note |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in report.summary or report.rows:
        cpu = f"{r.cpu_us_per_request:.0f}" if r.cpu_us_per_request is not None else "-"
        redis = f"{r.redis_cpu_percent:.0f}" if r.redis_cpu_percent is not None else "-"
        lines.append(f"| {r.name} | {r.requests_per_s:,.0f} | {r.spread or '-'} | {r.p50_ms:.2f} | "
                     f"{r.p99_ms:.2f} | {cpu} | {redis} | {r.note} |")
    lines += ["", "| pipeline | value |", "| --- | ---: |"]
    lines += [f"| {k} | {v:,.2f} |" for k, v in report.pipeline.items()]
    lines += ["", "| ratio | value |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.2f} |" for k, v in report.ratios.items()]
    lines += ["", "| target | met |", "| --- | --- |"]
    lines += [f"| {k} | {'yes' if v else 'NO'} |" for k, v in report.targets.items()]
    if report.calibration:
        lines += ["", "| x minimal | here | issue's machine |", "| --- | ---: | ---: |"]
        for name, ratio in report.calibration.items():
            issue = f"{ratio['issue']:.2f}" if ratio["issue"] else "-"
            lines.append(f"| {name} | {ratio['here']:.2f} | {issue} |")
    return "\n".join(lines)


def plot(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (throughput, latency, drain) = plt.subplots(1, 3, figsize=(15, 4.5))
    rows = report.summary or report.rows
    names = [r.name for r in rows]
    rates = {name: [r.requests_per_s for r in report.rows if r.name == name] for name in names}
    medians = [r.requests_per_s for r in rows]
    throughput.bar(names, medians, color="#3b7dd8",
                   yerr=[[m - min(rates[n]) for n, m in zip(names, medians, strict=True)],
                         [max(rates[n]) - m for n, m in zip(names, medians, strict=True)]],
                   capsize=3)
    throughput.set_title("requests (claims) per second: median, rounds' range")
    throughput.tick_params(axis="x", rotation=30)
    positions = range(len(names))
    latency.bar([p - 0.2 for p in positions], [r.p50_ms for r in rows], 0.4, label="p50")
    latency.bar([p + 0.2 for p in positions], [r.p99_ms for r in rows], 0.4, label="p99")
    latency.set_xticks(list(positions), names, rotation=30)
    latency.set_yscale("log")
    latency.set_title("latency (ms, log scale)")
    latency.legend()
    if report.persisted_timeline:
        seconds, persisted = zip(*report.persisted_timeline, strict=True)
        drain.plot(seconds, persisted, color="#2a9d5c")
    drain.set_title("bookings persisted over time (backlog drain)")
    drain.set_xlabel("seconds since the consumer started")
    fig.suptitle(f"release-service benchmark — {report.started_at}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per scenario")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of the HTTP scenarios, interleaved; medians are reported")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections")
    parser.add_argument("--processes", type=int, default=1, help="gateway processes")
    parser.add_argument("--limits-cost", action="store_true",
                        help="only claim_win, with the claim rate limits and without")
    parser.add_argument("--replica-cost", action="store_true",
                        help="only claim_win with one Redis replica attached, acknowledged "
                             "by the primary alone and once the replica has it (k = 0, 1)")
    parser.add_argument("--out", type=Path, default=HERE / "results",
                        help="folder for bench.json and bench.png")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        print("bench: wrk is missing; install it with: apt-get install -y wrk",
              file=sys.stderr)
        return 2
    bench = Bench(args)
    try:
        report = bench.run()
    finally:
        bench.close()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.limits_cost or args.replica_cost:
        name = "limits-cost" if args.limits_cost else "replica-cost"
        (args.out / f"{name}.json").write_text(json.dumps(asdict(report), indent=2))
        print(table(report))
        return 0
    (args.out / "bench.json").write_text(json.dumps(asdict(report), indent=2))
    plot(report, args.out / "bench.png")
    print(table(report))
    print(f"\nwritten: {args.out / 'bench.json'}, {args.out / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
