"""Chaos runs: faults injected during a release spike, then the promises counted.

    python loadtest/chaos.py [--scenarios all|NAME,...] [--residents 3000] [--stock 600]
                             [--mode first_come|queue] [--appendfsync everysec|always]
                             [--json chaos.json]

Starts its own stack (Redis with an append-only file, the broker, PostgreSQL) in a
scratch folder, a gateway with two processes, the relay and both consumers. For each
scenario it creates a release, lets every resident claim at once (each with its own
Idempotency-Key, retrying connection failures and 503s as a phone app would), injects
the scenario's faults a moment into the spike, starts again whatever was killed, and
waits until the pipeline has caught up. Then it counts, per scenario:

  acknowledged  claims answered 201
  persisted     booking rows of the release
  sms           confirmation SMS sent
  oversold      rows beyond the stock (must be 0)
  duplicated    codes or persons booked twice (must be 0)
  lost          acknowledged claims without a booking row (must be 0)
  recover_s     seconds from the last restart until every acknowledged claim is
                persisted and has its SMS

With --mode queue the release is a waiting room: every resident joins before the
opening, polls its standing (as a phone app would, retrying connection failures and 503s)
until admitted or told it is sold out, then claims with its admission token (retried as
above); the faults come a moment after the opening. Counted besides:

  admitted      admissions given in Redis (the release's q:jtis hash)
  adm_persisted admission rows of the release in PostgreSQL
  adm_lost      admissions in Redis without a row (must be 0)
  adm_twice     persons admitted more than once, in Redis or PostgreSQL (must be 0)
  unadmitted    bookings whose person has no spent admission in Redis or no admission
                row (must be 0; redis-os-crash: see Outcome.broken)

Traffic goes to 127.0.0.1 only; every run is bounded in time and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from bench import children_of, free_port, stop_process, wait_http
from redis.asyncio import Redis
from tqdm import tqdm

from release_service.core import keys
from release_service.core.settings import Settings, load_settings, write_settings_file
from release_service.devtools.seed import seed_users
from release_service.devtools.stack import SENTINEL_FAILOVER_TIMEOUT_MS, Stack
from release_service.scripts.client import redis_client, reply_hash

BIN = Path(sys.executable).parent / "release-service"
SETTLE_SECONDS = 120.0
ROLES = ("relay", "bookings", "sms")
MODES = ("first_come", "queue")
QUEUE_LEAD_SECONDS = 3.0  # the queue release opens this long after its residents joined
POLL_SECONDS = 0.5  # a waiting app's polling interval



@dataclass
class Outcome:
    scenario: str
    injected: str
    residents: int
    stock: int
    acknowledged: int
    persisted: int
    sms: int
    oversold: int
    duplicated: int
    lost: int
    recover_s: float
    lost_claims: list[str]
    mode: str = "first_come"
    # Claims refused for good, by status and problem code (sold out, ...).
    refused: dict[str, int] = field(default_factory=dict)
    # From the fault to the first 201 answered to a request sent after it (None: none
    # was; every claim had its answer before).
    resumed_s: float | None = None
    admitted: int = 0
    admissions_persisted: int = 0
    admissions_lost: int = 0
    admitted_twice: int = 0
    unadmitted: int = 0

    @property
    def broken(self) -> bool:
        """A promise broken. What an OS crash takes is measured, not promised: claims
        answered 201 in its last second, and the spending of the admissions of claims
        reconcile writes back (the room replays from before the crash and admits their
        persons again, with the same admission ids)."""
        crash = self.scenario == OS_CRASH
        return bool(self.oversold or self.duplicated or self.admissions_lost
                    or self.admitted_twice or ((self.lost or self.unadmitted) and not crash))


class Chaos:
    """One stack and one set of service processes, shared by the scenarios."""

    def __init__(self, folder: Path, appendfsync: str, redis_replicas: int = 0,
                 partition_proxy: bool = False) -> None:
        self.folder = folder
        self.stack = Stack(folder / "stack", appendfsync=appendfsync,
                           redis_replicas=redis_replicas, partition_proxy=partition_proxy)
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.partitioned_at = 0.0

    # -- processes ---------------------------------------------------------------------
    def setup(self, residents: int) -> None:
        values = self.stack.up()
        # Every replica in sync and known to every sentinel before the first fault.
        self.stack.wait_replicated(replicas=self.stack.redis_replicas)
        self.settings: Settings = load_settings(environ={
            f"RELEASE_SERVICE_{k.upper()}": v for k, v in values.items()})
        self.port = free_port()
        self.settings_file = self.folder / "chaos.env"
        write_settings_file(self.settings_file, {
            **values, "http_port": self.port, "gateway_processes": 2, "log_level": "WARNING",
            "sms_sink_path": str(self.folder / "sms-sink.jsonl"),
            "reconcile_grace_seconds": 3.0, "relay_takeover_seconds": 2.0})
        # Real accounts (the SMS needs their phones), reused by every scenario: the
        # releases lift the per-person limits.
        out = self.folder / "residents.jsonl"
        asyncio.run(seed_users(self.settings, residents, out))
        self.people = [(row["person_ids"][0], row["token"]) for row in
                       map(json.loads, out.read_text().splitlines())]
        for role in ("gateway", *ROLES):
            self.start(role)
        wait_http(f"http://127.0.0.1:{self.port}/healthz")

    def start(self, role: str) -> None:
        argv = {"gateway": ["gateway"], "relay": ["relay"],
                "bookings": ["consume", "bookings"], "sms": ["consume", "sms"]}[role]
        log = (self.folder / f"{role}.log").open("ab")
        self.processes[role] = subprocess.Popen(
            [str(BIN), *argv], stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            env={**os.environ, "RELEASE_SERVICE_SETTINGS_FILE": str(self.settings_file)})

    def signal(self, role: str, sig: int) -> None:
        process = self.processes[role]
        if process.poll() is None:
            process.send_signal(sig)
            if sig == signal.SIGKILL:
                process.wait()

    def stop(self, role: str) -> None:
        stop_process(self.processes[role], timeout=20)

    def gateway_child(self) -> int:
        """One of the gateway's serving processes (not its resource tracker)."""
        for pid in children_of(self.processes["gateway"].pid):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"resource_tracker" not in cmdline:
                return pid
        raise RuntimeError("the gateway has no serving child")

    def close(self) -> None:
        for role in list(self.processes):
            self.stop(role)
        self.stack.down()

    # -- one scenario ------------------------------------------------------------------
    async def run(self, name: str, stock: int, mode: str = "first_come") -> Outcome:
        injected, inject, restore = SCENARIOS[name]
        if name == PARTITIONED:  # the proxied node must be the primary when it is cut off
            await asyncio.to_thread(self.make_primary, "redis")
        base = f"http://127.0.0.1:{self.port}"
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=500)) as session:
            if mode == "queue":
                opens_in = QUEUE_LEAD_SECONDS + len(self.people) / 500
                release_id = await self.create_release(session, base, stock, mode, opens_in)
                opens = time.monotonic() + opens_in
                await asyncio.gather(*(join(session, base, release_id, token, person)
                                       for person, token in self.people))
                self.aof_mark = self._aof_size()
                spike = asyncio.gather(*(queued_claim(session, base, release_id, token, person)
                                         for person, token in self.people))
                await asyncio.sleep(max(0.0, opens - time.monotonic()))
            else:
                release_id = await self.create_release(session, base, stock)
                # The AOF's size before the spike: where a simulated OS crash cuts it back to.
                self.aof_mark = self._aof_size()
                spike = asyncio.gather(*(claim(session, base, release_id, token, person)
                                         for person, token in self.people))
            await asyncio.sleep(0.15)  # a moment into the spike
            injected_at = time.monotonic()
            # On a thread: a fault that takes seconds (two failovers) must not stop the
            # residents' requests meanwhile.
            await asyncio.to_thread(inject, self)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(restore, self)
            restored = time.monotonic()
            answers = await spike
        acknowledged = {a["claim_id"]: a["code"] for a in answers if a is not None}
        refused = dict(REFUSED)
        REFUSED.clear()
        after = [a["answered"] for a in answers if a is not None and a["sent"] > injected_at]
        outcome = await self.count(name, injected, release_id, len(self.people), stock,
                                   acknowledged, restored, mode)
        outcome.resumed_s = round(min(after) - injected_at, 1) if after else None
        outcome.refused = refused
        return outcome

    def _aof_size(self) -> int:
        """The first Redis node's AOF size (what an OS crash cuts back to); 0 with replicas,
        where the primary moves and that scenario does not run."""
        return 0 if self.stack.redis_replicas else \
            self.stack.redis_aof_tail().stat().st_size

    def primary(self) -> str:
        """The stack component that is the Redis primary now."""
        node = self.stack.primary_node()
        if node is None:
            raise RuntimeError("no sentinel names a Redis primary")
        return node

    def make_primary(self, node: str, timeout: float = 30.0) -> None:
        """Fail over to `node` (the sentinels prefer the replica of the lowest priority
        number), and wait until every replica follows it in sync."""
        if self.primary() == node:
            return
        ports = self.stack._ports()
        node_cli = ["redis-cli", "-p", str(ports[node])]
        subprocess.run([*node_cli, "config", "set", "replica-priority", "1"], check=True,
                       capture_output=True)
        sentinel_cli = ["redis-cli", "-p", str(ports[self.stack.sentinels[0]])]
        try:
            # The sentinels read a replica's priority from its INFO, every ten seconds.
            deadline = time.monotonic() + timeout
            while not self._priority_seen(sentinel_cli, self.stack.reach_port(node)):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the sentinels never saw {node}'s priority")
                time.sleep(0.2)
            subprocess.run([*sentinel_cli, "sentinel", "failover", "release"], check=True,
                           capture_output=True)
            deadline = time.monotonic() + timeout
            while self.primary() != node:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{node} was not promoted within {timeout:.0f} s")
                time.sleep(0.1)
        finally:
            subprocess.run([*node_cli, "config", "set", "replica-priority", "100"],
                           check=True, capture_output=True)
        self.stack.wait_replicated(replicas=self.stack.redis_replicas)
        # Sentinel starts no failover of the same primary name within twice the failover
        # timeout of the last one: the fault must not fall into that pause.
        time.sleep(2 * SENTINEL_FAILOVER_TIMEOUT_MS / 1000)

    @staticmethod
    def _priority_seen(sentinel_cli: list[str], port: int) -> bool:
        out = subprocess.run([*sentinel_cli, "sentinel", "replicas", "release"],
                             capture_output=True, check=False, text=True).stdout.split("\n")
        for i, line in enumerate(out):
            if line == "port" and out[i + 1] == str(port):
                at = out.index("slave-priority", i)  # this entry's: it comes before the next
                return out[at + 1] == "1"
        return False

    def lose(self, node: str) -> None:
        """The machine is gone: SIGKILL, and its data folder emptied."""
        self.stack.stop(node, signal.SIGKILL)
        for item in self.stack.data_dir(node).iterdir():
            if item.name != "redis.conf":
                shutil.rmtree(item) if item.is_dir() else item.unlink()

    def wait_promoted(self, old: str, timeout: float = 30.0) -> str:
        """Wait until the sentinels name a primary other than `old`; returns it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError):
                if (now := self.primary()) != old:
                    return now
            time.sleep(0.1)
        raise RuntimeError(f"no replica was promoted within {timeout:.0f} s of losing {old}")

    async def create_release(self, session: aiohttp.ClientSession, base: str, stock: int,
                             mode: str = "first_come", opens_in: float = -60.0) -> str:
        release_id = f"chaos-{secrets.token_hex(4)}"
        day = datetime.now(UTC) + timedelta(days=10)
        slots = [{"slot_id": f"s{i}", "starts_at": day.replace(hour=1 + i).isoformat(),
                  "ends_at": day.replace(hour=2 + i).isoformat(), "capacity": part}
                 for i, part in enumerate((stock // 2, stock - stock // 2))]
        now = datetime.now(UTC)
        definition = {"release_id": release_id, "vaccine": "HPV9", "dose": 1,
                      "clinic_id": "chaos-01", "department": "vaccination",
                      "opens_at": (now + timedelta(seconds=opens_in)).isoformat(),
                      "closes_at": (now + timedelta(hours=1)).isoformat(), "slots": slots,
                      "limits": {"same_day_clinic": -1, "per_day": -1, "per_7_days": -1,
                                 "per_3_months": -1}}
        if mode == "queue":
            # Admissions spread over about two seconds, so the faults meet them.
            definition |= {"mode": "queue", "queue": {
                "admit_factor": 1.5, "max_admit_per_second": max(10, stock * 3 // 4),
                "token_seconds": 60}}
        deadline = time.monotonic() + 30
        while True:  # as an operator's tool would: a 503 (Redis failing over) is retried
            async with session.post(f"{base}/v1/admin/releases", json=definition, headers={
                    "Authorization": f"Bearer {self.settings.admin_token}"}) as response:
                if response.status == 201:
                    return release_id
                if response.status != 503 or time.monotonic() > deadline:
                    raise RuntimeError(f"release not created: {await response.text()}")
            await asyncio.sleep(0.2)

    async def count(self, name: str, injected: str, release_id: str, residents: int,
                    stock: int, acknowledged: dict[str, str], restored: float,
                    mode: str = "first_come") -> Outcome:
        db = await asyncpg.connect(self.settings.database_url)
        redis = redis_client(self.settings)
        assert isinstance(redis, Redis)  # the stack this harness starts runs one Redis
        jtis_key = keys.queue_keys(release_id)["jtis"]
        try:
            deadline = time.monotonic() + SETTLE_SECONDS
            while True:
                rows = await db.fetch("SELECT claim_id, code, person_id FROM bookings "
                                      "WHERE release_id = $1", release_id)
                sent = await db.fetchval(
                    "SELECT count(*) FROM sms_messages m JOIN bookings b USING (claim_id) "
                    "WHERE b.release_id = $1 AND m.kind = 'confirmation' "
                    "AND m.status = 'sent'", release_id)
                persisted = {r["claim_id"] for r in rows}
                given: dict[str, str] = {}
                stored: dict[str, str] = {}
                if mode == "queue":
                    given = reply_hash(await redis.hgetall(jtis_key))
                    stored = {r["admission_id"]: r["person_id"] for r in await db.fetch(
                        "SELECT admission_id, person_id FROM admissions WHERE release_id = $1",
                        release_id)}
                if (set(acknowledged) <= persisted and sent >= len(rows)
                        and set(given) <= set(stored)) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.25)
        finally:
            await db.close()
            await redis.aclose(close_connection_pool=True)  # its own pool
        recover = time.monotonic() - restored
        duplicated = (len(rows) - len({r["code"] for r in rows})) + \
            (len(rows) - len({r["person_id"] for r in rows}))
        outcome = Outcome(name, injected, residents, stock, len(acknowledged), len(rows),
                          sent, max(0, len(rows) - stock), duplicated,
                          len(set(acknowledged) - persisted), round(recover, 1),
                          sorted(set(acknowledged) - persisted), mode)
        if mode == "queue":
            booked = [r["person_id"] for r in rows]
            count_admissions(outcome, given, stored, booked)
        return outcome


def count_admissions(outcome: Outcome, given: dict[str, str], stored: dict[str, str],
                     booked: list[str]) -> None:
    """The admission columns of a queue-mode outcome. `given`: the release's q:jtis hash
    (jti -> person, "u:" person once spent, "x:" person once expired); `stored`: its
    admission rows (admission_id -> person); `booked`: the persons of its booking rows."""
    holder = {jti: person.split(":", 1)[-1] for jti, person in given.items()}
    admissions_of: dict[str, set[str]] = {}
    for jti, person in {**holder, **stored}.items():
        admissions_of.setdefault(person, set()).add(jti)
    spent = {person for person in given.values() if person.startswith("u:")}
    outcome.admitted = len(given)
    outcome.admissions_persisted = len(stored)
    outcome.admissions_lost = len(set(given) - set(stored))
    outcome.admitted_twice = sum(1 for jtis in admissions_of.values() if len(jtis) > 1)
    outcome.unadmitted = sum(1 for person in booked
                             if f"u:{person}" not in spent or person not in stored.values())


async def join(session: aiohttp.ClientSession, base: str, release_id: str, token: str,
               person: str) -> bool:
    """A resident's app joins the waiting room (retried on connection failures and 503):
    whether it is in (False: sold out, or refused for good)."""
    headers = {"Authorization": f"Bearer {token}"}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            async with session.post(f"{base}/v1/releases/{release_id}/queue",
                                    json={"person_id": person}, headers=headers) as response:
                if response.status in (200, 201):
                    return True
                if response.status not in (503, 429):
                    return False
        except (TimeoutError, aiohttp.ClientError):
            pass
        await asyncio.sleep(0.2)
    return False


async def admission(session: aiohttp.ClientSession, base: str, release_id: str, token: str,
                    person: str) -> str | None:
    """Poll the standing as a waiting app does until admitted (its admission token) or told
    the release is over or the turn gone (None). Not in the queue (a join lost): join again."""
    headers = {"Authorization": f"Bearer {token}"}
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            async with session.get(f"{base}/v1/releases/{release_id}/queue/{person}",
                                   headers=headers) as response:
                body = await response.json() if response.content_type.endswith("json") else {}
                if response.status == 200:
                    if body["status"] == "admitted":
                        return str(body["admission_token"])
                    if body["status"] in ("used", "expired") or \
                            body["release_status"] in ("sold_out", "closed"):
                        return None
                elif response.status == 404:
                    if not await join(session, base, release_id, token, person):
                        return None
                elif response.status not in (503, 429):
                    return None  # sold out or closed (the standing's refusals)
        except (TimeoutError, aiohttp.ClientError):
            pass
        await asyncio.sleep(POLL_SECONDS * (0.5 + secrets.randbelow(1000) / 1000))
    return None


async def queued_claim(session: aiohttp.ClientSession, base: str, release_id: str,
                       token: str, person: str) -> dict[str, Any] | None:
    """A queued resident's app: wait for the admission, then claim with it."""
    admission_token = await admission(session, base, release_id, token, person)
    if admission_token is None:
        return None
    return await claim(session, base, release_id, token, person,
                       {"admission_token": admission_token})


async def claim(session: aiohttp.ClientSession, base: str, release_id: str, token: str,
                person: str, extra: dict[str, str] | None = None) -> dict[str, Any] | None:
    """A resident's app: one Idempotency-Key, retried on connection failures and 503."""
    headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": secrets.token_hex(8)}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        sent = time.monotonic()
        try:
            async with session.post(f"{base}/v1/releases/{release_id}/claims",
                                    json={"person_id": person, **(extra or {})},
                                    headers=headers) as response:
                if response.status == 201:
                    body = await response.json()
                    return {"claim_id": body["claim_id"], "code": body["code"],
                            "sent": sent, "answered": time.monotonic()}
                if response.status not in (503, 429):
                    # sold out, or refused for good
                    REFUSED[f"{response.status} {await _problem_code(response)}"] += 1
                    return None
        except (TimeoutError, aiohttp.ClientError):
            pass
        await asyncio.sleep(0.2)
    return None


# The final refusals of the claims of the current scenario, by status and problem code.
REFUSED: Counter[str] = Counter()


async def _problem_code(response: aiohttp.ClientResponse) -> str:
    try:
        return str((await response.json(content_type=None)).get("code", "?"))
    except ValueError:
        return "?"


def _kill(*roles: str) -> Callable[[Chaos], None]:
    def inject(chaos: Chaos) -> None:
        for role in roles:
            if role == "gateway-child":
                os.kill(chaos.gateway_child(), signal.SIGKILL)
            elif role in ("redis", "kafka"):
                chaos.stack.stop(role, signal.SIGKILL)
            else:
                chaos.signal(role, signal.SIGKILL)
    return inject


def _restart(*roles: str) -> Callable[[Chaos], None]:
    def restore(chaos: Chaos) -> None:
        for role in roles:
            if role in ("redis", "kafka"):
                chaos.stack.start(role)  # Redis from its append-only file
                if role == "kafka":
                    chaos.stack.up()  # the topics again: the broker keeps no data
            elif role == "gateway-child":
                chaos.stop("gateway")  # its other process served meanwhile
                chaos.start("gateway")
                wait_http(f"http://127.0.0.1:{chaos.port}/healthz")
            else:
                chaos.start(role)
    return restore


def _os_crash(chaos: Chaos) -> None:
    """Redis killed, and its AOF cut back to its size before the spike: the writes an
    operating-system crash takes under appendfsync everysec (up to the last second; here
    the 0.15 s since the spike began). Meaningless under always: Redis fsyncs before it
    answers, so such a crash takes nothing acknowledged."""
    chaos.stack.stop("redis", signal.SIGKILL)
    os.truncate(chaos.stack.redis_aof_tail(), chaos.aof_mark)


def _stall(role: str) -> tuple[Callable[[Chaos], None], Callable[[Chaos], None]]:
    def send(chaos: Chaos, sig: int) -> None:
        if role == "redis":  # a stack component: its recorded PID
            pid = chaos.stack.pid("redis")
            if pid is None:
                raise RuntimeError("Redis has no recorded PID")
            os.kill(pid, sig)
        else:
            chaos.signal(role, sig)
    return (lambda chaos: send(chaos, signal.SIGSTOP),
            lambda chaos: send(chaos, signal.SIGCONT))


def _lose_primary(times: int) -> tuple[Callable[[Chaos], None], Callable[[Chaos], None]]:
    """The Redis primary's machine lost `times` times in a row, each after the sentinels
    promoted a replica; the lost nodes come back empty, as replicas."""
    lost: list[str] = []

    def inject(chaos: Chaos) -> None:
        lost.clear()
        for i in range(times):
            node = chaos.primary()
            chaos.lose(node)
            lost.append(node)
            if i < times - 1:
                chaos.wait_promoted(node)
                chaos.stack.wait_replicated()

    def restore(chaos: Chaos) -> None:
        chaos.wait_promoted(lost[-1])
        for node in lost:
            chaos.stack.start(node)  # empty: a full resync from the new primary
        chaos.stack.wait_replicated(replicas=chaos.stack.redis_replicas)
    return inject, restore


# How long the first primary stays cut off: past the sentinels' failover and past
# min-replicas-max-lag, when it refuses writes by itself.
PARTITION_SECONDS = 8.0


def _partition(chaos: Chaos) -> None:
    chaos.stack.partition(True)
    chaos.partitioned_at = time.monotonic()


def _heal(chaos: Chaos) -> None:
    chaos.wait_promoted("redis")
    time.sleep(max(0.0, chaos.partitioned_at + PARTITION_SECONDS - time.monotonic()))
    chaos.stack.partition(False)  # the sentinels demote it: its lone writes are dropped
    port = chaos.stack._ports()["redis"]
    deadline = time.monotonic() + 30
    while subprocess.run(["redis-cli", "-p", str(port), "role"], capture_output=True,
                         check=False, text=True).stdout.split()[:1] != ["slave"]:
        if time.monotonic() > deadline:
            raise RuntimeError("the old primary did not become a replica after the heal")
        time.sleep(0.1)
    chaos.stack.wait_replicated(replicas=chaos.stack.redis_replicas)


def _lose_replica(chaos: Chaos) -> None:
    primary = chaos.primary()
    replica = next(n for n in chaos.stack.redis_nodes if n != primary)
    chaos.stack.stop(replica, signal.SIGKILL)


def _restart_replicas(chaos: Chaos) -> None:
    for node in chaos.stack.redis_nodes:
        chaos.stack.start(node)
    chaos.stack.wait_replicated(replicas=chaos.stack.redis_replicas)


PARTITIONED = "redis-partitioned-primary"
# Scenarios of the high-availability stack (a primary, replicas and sentinels).
HA_SCENARIOS = {
    "redis-primary-lost": ("SIGKILL the Redis primary and empty its data folder (the machine "
                           "is gone); a replica is promoted", *_lose_primary(1)),
    "redis-replica-lost": ("SIGKILL one Redis replica", _lose_replica, _restart_replicas),
    "redis-failover-twice": ("lose the Redis primary, then the new primary",
                             *_lose_primary(2)),
    PARTITIONED: ("cut the Redis primary off from its replicas and the sentinels (its "
                  f"clients still reach it) for {PARTITION_SECONDS:.0f} s", _partition,
                  _heal),
}

# Acknowledged claims this scenario loses are measured and named, not a broken promise:
# appendfsync everysec does not promise to survive an OS crash.
OS_CRASH = "redis-os-crash"

SCENARIOS: dict[str, tuple[str, Callable[[Chaos], None], Callable[[Chaos], None]]] = {
    "gateway": ("SIGKILL one of two gateway processes", _kill("gateway-child"),
                _restart("gateway-child")),
    "relay": ("SIGKILL the relay", _kill("relay"), _restart("relay")),
    "bookings": ("SIGKILL the bookings consumer", _kill("bookings"), _restart("bookings")),
    "sms": ("SIGKILL the SMS consumer", _kill("sms"), _restart("sms")),
    "broker": ("SIGKILL the broker (memory only: topics and offsets gone)", _kill("kafka"),
               _restart("kafka")),
    "redis": ("SIGKILL Redis, restart from its AOF", _kill("redis"), _restart("redis")),
    "stall": ("SIGSTOP the relay for 1 s, then SIGCONT", *_stall("relay")),
    "stall-redis": ("SIGSTOP Redis for 1 s, then SIGCONT", *_stall("redis")),
    OS_CRASH: ("SIGKILL Redis and cut its AOF back to before the spike (an OS crash under "
               "appendfsync everysec)", _os_crash, _restart("redis")),
    "relay+bookings+redis": ("SIGKILL relay, bookings consumer and Redis at once",
                             _kill("relay", "bookings", "redis"),
                             _restart("redis", "relay", "bookings")),
    "broker+sms+gateway": ("SIGKILL broker, SMS consumer and a gateway process at once",
                           _kill("kafka", "sms", "gateway-child"),
                           _restart("kafka", "sms", "gateway-child")),
    **HA_SCENARIOS,
}


def table(outcomes: list[Outcome]) -> str:
    queued = any(o.mode == "queue" for o in outcomes)
    head = (f"{'scenario':<22}{'acked':>7}{'persisted':>10}{'sms':>6}{'oversold':>9}"
            f"{'dup':>5}{'lost':>6}{'recover_s':>10}{'resumed_s':>10}")
    if queued:
        head += (f"{'admitted':>9}{'adm_persisted':>14}{'adm_lost':>9}{'adm_twice':>10}"
                 f"{'unadmitted':>11}")
    lines = [head, "-" * len(head)]
    for o in outcomes:
        line = (f"{o.scenario:<22}{o.acknowledged:>7}{o.persisted:>10}{o.sms:>6}"
                f"{o.oversold:>9}{o.duplicated:>5}{o.lost:>6}{o.recover_s:>10.1f}"
                f"{'-' if o.resumed_s is None else o.resumed_s:>10}")
        if queued:
            line += (f"{o.admitted:>9}{o.admissions_persisted:>14}{o.admissions_lost:>9}"
                     f"{o.admitted_twice:>10}{o.unadmitted:>11}")
        lines.append(line)
    return "\n".join(lines)


def run(names: list[str], residents: int, stock: int, appendfsync: str,
        keep: bool = False, mode: str = "first_come", redis_replicas: int = 0,
        modes: Sequence[str] = ()) -> list[Outcome]:
    """Every scenario in `mode` (or in each of `modes`, on the same stack)."""
    on_ha = [n for n in names if n in HA_SCENARIOS]
    if on_ha and not redis_replicas:
        raise ValueError(f"{', '.join(on_ha)} need a stack with Redis replicas")
    if redis_replicas and OS_CRASH in names:
        raise ValueError(f"{OS_CRASH} runs on the single-Redis stack")
    folder = Path(tempfile.mkdtemp(prefix="release-chaos-"))
    folder.chmod(0o755)  # PostgreSQL runs as another user when we are root
    chaos = Chaos(folder, appendfsync, redis_replicas, partition_proxy=PARTITIONED in names)
    try:
        chaos.setup(residents)
        outcomes = []
        runs = [(name, m) for m in (modes or (mode,)) for name in names]
        for name, m in tqdm(runs, desc="chaos scenarios", unit="scenario", file=sys.stderr):
            outcomes.append(asyncio.run(chaos.run(name, stock, m)))
        return outcomes
    finally:
        chaos.close()
        if keep:
            print(f"logs kept in {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Inject faults (SIGKILL, SIGSTOP, broker and Redis restarts) during a "
                    "release spike on a scratch stack and count what was acknowledged, "
                    "persisted, sent, oversold, duplicated and lost.")
    parser.add_argument("--scenarios", default="all",
                        help=f"comma-separated, or all: {', '.join(SCENARIOS)}")
    parser.add_argument("--residents", type=int, default=3000, help="claimants per scenario")
    parser.add_argument("--stock", type=int, default=600, help="slots per release")
    parser.add_argument("--mode", choices=MODES, default="first_come",
                        help="first_come: everyone claims at once; queue: everyone joins a "
                             "waiting room, polls, and claims once admitted")
    parser.add_argument("--appendfsync", choices=("everysec", "always"), default="everysec",
                        help="Redis AOF fsync policy for the run")
    parser.add_argument("--redis-replicas", type=int, default=0, metavar="N",
                        help="run on the high-availability stack: a Redis primary, N "
                             "replicas, three sentinels, writes acknowledged on one replica "
                             f"(needed by {', '.join(HA_SCENARIOS)})")
    parser.add_argument("--runs", type=int, default=1, help="run the scenarios this often")
    parser.add_argument("--json", type=Path, help="also write the outcomes here")
    parser.add_argument("--keep", action="store_true",
                        help="keep the scratch folder (the processes' logs) afterwards")
    args = parser.parse_args()
    if args.scenarios == "all":
        names = list(HA_SCENARIOS) if args.redis_replicas else \
            [n for n in SCENARIOS if n not in HA_SCENARIOS]
    else:
        names = args.scenarios.split(",")
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(unknown)}")
    try:
        outcomes = run(names * args.runs, args.residents, args.stock, args.appendfsync,
                       args.keep, args.mode, args.redis_replicas)
    except ValueError as exc:
        parser.error(str(exc))
    print(table(outcomes))
    if args.json:
        args.json.write_text(json.dumps([asdict(o) for o in outcomes], indent=2))
    for o in outcomes:
        for claim_id in o.lost_claims:
            print(f"LOST in {o.scenario}: claim {claim_id} (answered 201, no booking)")
    broken = [o.scenario for o in outcomes if o.broken]
    if broken:
        print(f"PROMISES BROKEN in: {', '.join(broken)}", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
