"""The release-spike scenario operators run before a big release.

    LOCUST_ADMIN_TOKEN="$ADMIN" locust -f loadtest/locustfile.py \\
        --host http://127.0.0.1:8080 --headless --users 2000 --spawn-rate 500 --run-time 60s \\
        --users-file users.jsonl --create-release 500 \\
        --csv loadtest/results/spike --html loadtest/results/spike.html

Residents (from a `release-service seed-users` file) wait for the opening, claim (some for
a family member, some retrying with the same Idempotency-Key as a flaky phone would),
look up their booking, and some cancel; browsers poll the release page. The release's
mode decides the residents' way in: `first_come` claims at once; `queue` joins the
waiting room, polls the standing (the events' polling form) until admitted and claims
with the admission token; `lottery` enters the draw. At the end the invariants are
checked through the admin API (claimed + remaining = capacity, every 201 a distinct
code, no 5xx; a drawn lottery booked its winners, min(stock, entries not skipped)) and
the exit code says whether they held; in a distributed run the master checks them with
what every worker reported. `--create-release N --mode queue|lottery` creates a release
of that mode.
"""

from __future__ import annotations

import itertools
import random
import secrets
import threading
import time
import urllib.request
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import orjson
from locust import FastHttpUser, between, events, task
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

CLAIM = "/v1/releases/[id]/claims"


class Shared:
    """What every simulated user of this process shares."""

    accounts: ClassVar[list[dict[str, Any]]] = []
    next_account = itertools.count()
    release_id = ""
    mode = "first_come"
    capacity = 0
    codes: ClassVar[dict[str, str]] = {}  # code -> claim id, to find double-issued codes
    entered: ClassVar[set[str]] = set()  # persons whose lottery entry was accepted
    answers: ClassVar[Counter[str]] = Counter()  # claim answers: "409 sold_out" -> count
    duplicate_codes = 0
    lock = threading.Lock()
    # On a worker: what was recorded since its last report to the master.
    unsent: ClassVar[dict[str, Any]] = {"answers": Counter(), "codes": {}, "entered": []}


def record(answers: dict[str, int] | None = None, codes: dict[str, str] | None = None,
           entered: list[str] | None = None) -> None:
    """Count claim answers, issued codes (code -> claim id) and accepted lottery entries,
    here and, on a worker, for its next report: the master checks the whole run."""
    with Shared.lock:
        Shared.answers.update(answers or {})
        Shared.unsent["answers"].update(answers or {})
        for code, claim_id in (codes or {}).items():
            if Shared.codes.setdefault(code, claim_id) != claim_id:
                Shared.duplicate_codes += 1
            Shared.unsent["codes"][code] = claim_id
        Shared.entered.update(entered or [])
        Shared.unsent["entered"] += entered or []


@events.report_to_master.add_listener
def _report(data: dict[str, Any], **_: Any) -> None:
    with Shared.lock:
        data["release_service"] = {**Shared.unsent, "answers": dict(Shared.unsent["answers"])}
        Shared.unsent = {"answers": Counter(), "codes": {}, "entered": []}


@events.worker_report.add_listener
def _worker_report(data: dict[str, Any], **_: Any) -> None:
    if "release_service" in data:
        record(**data["release_service"])


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--users-file", default="users.jsonl",
                        help="seed-users output: one account per line")
    parser.add_argument("--release-id", default="", help="the release under test")
    parser.add_argument("--admin-token", default="", is_secret=True,
                        env_var="LOCUST_ADMIN_TOKEN",
                        help="admin token: creates the release and checks the invariants "
                             "(better from LOCUST_ADMIN_TOKEN: a command line is visible to "
                             "every user of the machine)")
    parser.add_argument("--create-release", type=int, default=0,
                        help="create a release with this many slots of stock, opening in "
                             "--opens-in seconds")
    parser.add_argument("--opens-in", type=float, default=5.0,
                        help="seconds from the start until the created release opens")
    parser.add_argument("--cancel-share", type=float, default=0.05,
                        help="share of winners who cancel again")
    parser.add_argument("--mode", default="first_come",
                        choices=["first_come", "queue", "lottery"],
                        help="mode of the created release (a given release has its own)")
    parser.add_argument("--window", type=float, default=3600.0,
                        help="seconds the created release stays open (a lottery's entry "
                             "window: it is drawn when the window ends)")


def _parsed(environment: Environment) -> Any:
    """The command line's options: locust parses them before any event or user runs."""
    assert environment.parsed_options is not None
    return environment.parsed_options


def _admin(environment: Environment) -> dict[str, str]:
    return {"Authorization": f"Bearer {_parsed(environment).admin_token}"}


def _accounts(users_file: str) -> list[dict[str, Any]]:
    try:
        lines = Path(users_file).read_bytes().splitlines()
    except OSError as exc:
        raise SystemExit(f"--users-file: {exc.strerror}: {users_file}") from None
    return [orjson.loads(line) for line in lines if line.strip()]


@events.test_start.add_listener
def _start(environment: Environment, **_: Any) -> None:
    options, runner = _parsed(environment), environment.runner
    if not isinstance(runner, MasterRunner):  # the master runs no users
        Shared.accounts = _accounts(options.users_file)
        if isinstance(runner, WorkerRunner) and options.expect_workers > 1:
            # Workers get the master's options, so one file: each takes every n-th line.
            n = options.expect_workers
            Shared.accounts = Shared.accounts[runner.worker_index % n::n]
    Shared.release_id = options.release_id
    if options.create_release:
        opens = datetime.now(UTC) + timedelta(seconds=options.opens_in)
        day = datetime.now(UTC) + timedelta(days=7)
        slots = [{"slot_id": f"slot-{i}", "starts_at": (day + timedelta(hours=i)).isoformat(),
                  "ends_at": (day + timedelta(hours=i + 1)).isoformat(),
                  "capacity": options.create_release // 4 + (i < options.create_release % 4)}
                 for i in range(4)]
        definition = {"release_id": f"locust-{secrets.token_hex(4)}", "vaccine": "HPV9",
                      "dose": 1, "clinic_id": "locust-clinic", "department": "vaccination",
                      "opens_at": opens.isoformat(), "mode": options.mode,
                      "closes_at": (opens + timedelta(seconds=options.window)).isoformat(),
                      "slots": slots}
        request = urllib.request.Request(
            f"{environment.host}/v1/admin/releases", data=orjson.dumps(definition),
            headers={**_admin(environment), "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            Shared.release_id = orjson.loads(response.read())["release_id"]
        # A master sends its options to the workers as they start: all use this release.
        options.release_id, options.create_release = Shared.release_id, 0
    if not Shared.release_id:
        raise SystemExit("give --release-id or --create-release N")
    with urllib.request.urlopen(f"{environment.host}/v1/releases/{Shared.release_id}",
                                timeout=10) as response:
        Shared.mode = orjson.loads(response.read()).get("mode", "first_come")


class Resident(FastHttpUser):
    """One account: waits for the opening, claims once, looks the booking up."""

    weight = 9
    wait_time = between(0.05, 0.3)

    def on_start(self) -> None:
        index = next(Shared.next_account)
        if index >= len(Shared.accounts):
            raise SystemExit("more users than accounts in --users-file")
        self.account = Shared.accounts[index]
        self.headers = {"Authorization": f"Bearer {self.account['token']}"}
        self.done = False

    @task
    def book(self) -> None:
        if self.done:
            self.look_up_or_idle()
            return
        if not hasattr(self, "person"):
            persons = self.account["person_ids"]
            self.person = random.choice(persons) \
                if len(persons) > 1 and random.random() < 0.3 else persons[0]
        claim: dict[str, str] = {"person_id": self.person}
        if Shared.mode == "lottery":
            self.enter_lottery()
            return
        if Shared.mode == "queue":
            token = self.admission()
            if not token:
                return
            claim["admission_token"] = token
        headers = dict(self.headers)
        flaky = random.random() < 0.2
        if flaky:
            headers["Idempotency-Key"] = secrets.token_hex(8)
        for attempt in range(2 if flaky else 1):  # a flaky phone sends it twice
            with self.client.post(f"/v1/releases/{Shared.release_id}/claims",
                                  json=claim, headers=headers, name=CLAIM,
                                  catch_response=True) as response:
                self.on_claim(response, replay=attempt == 1)

    def admission(self) -> str:
        """Queue mode: join once, then poll the standing; the admission token once
        admitted ("" meanwhile, or when told the stock is gone)."""
        path = f"/v1/releases/{Shared.release_id}/queue"
        if not getattr(self, "queued", False):
            with self.client.post(path, json={"person_id": self.person}, headers=self.headers,
                                  name="/v1/releases/[id]/queue",
                                  catch_response=True) as response:
                self.queued = response.status_code in (200, 201)
                if response.status_code in (409, 410):  # sold out or closed: told at once
                    self.finish(response, "")
                elif response.status_code in (425, 429) or self.queued:
                    response.success()
                    time.sleep(float(response.headers.get("Retry-After", "1")))
                else:
                    response.failure(f"queue join answered {response.status_code}")
            return ""
        with self.client.get(f"{path}/{self.person}", headers=self.headers,
                             name="/v1/releases/[id]/queue/[person]",
                             catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"standing answered {response.status_code}")
                return ""
            standing = response.json()
            if standing.get("admission_token"):
                return str(standing["admission_token"])
            if standing["release_status"] in ("sold_out", "closed") or \
                    standing["status"] in ("used", "expired"):
                self.finish(response, "")
            else:
                time.sleep(1.0)  # the events' polling form: once a second
        return ""

    def enter_lottery(self) -> None:
        with self.client.post(f"/v1/releases/{Shared.release_id}/lottery/entries",
                              json={"person_id": self.person}, headers=self.headers,
                              name="/v1/releases/[id]/lottery/entries",
                              catch_response=True) as response:
            if response.status_code in (200, 201):
                record(entered=[self.person])
                self.finish(response, "")
            elif response.status_code in (425, 429):
                response.success()
                time.sleep(min(float(response.headers.get("Retry-After", "1")), 2.0))
            elif response.status_code in (403, 410):
                self.finish(response, "")
            else:
                response.failure(f"lottery entry answered {response.status_code}")

    def finish(self, response: Any, code: str) -> None:
        response.success()
        self.done = True
        self.code = code

    def on_claim(self, response: Any, replay: bool) -> None:
        status = response.status_code
        answer = str(status)
        if response.headers.get("Content-Type", "").startswith("application/problem+json"):
            answer += " " + str(response.json().get("code", ""))
        record(answers={answer: 1})
        if status == 201:
            body = response.json()
            record(codes={body["code"]: body["claim_id"]})
            self.finish(response, body["code"])
        elif status == 425:  # not open yet: wait as a phone would, then try again
            response.success()
            time.sleep(min(float(response.headers.get("Retry-After", "1")), 2.0))
        elif status in (409, 403, 410):  # sold out, limits, closed: an answer, not a failure
            self.finish(response, "")
        elif status == 429:
            response.success()
            time.sleep(float(response.headers.get("Retry-After", "1")))
        else:
            response.failure(f"claim answered {status}")

    def look_up_or_idle(self) -> None:
        if not self.code:
            self.stop()
            return
        self.client.get(f"/v1/bookings/{self.code}", headers=self.headers,
                        name="/v1/bookings/[code]")
        if random.random() < _parsed(self.environment).cancel_share:
            self.client.post(f"/v1/bookings/{self.code}/cancel", headers=self.headers,
                             name="/v1/bookings/[code]/cancel")
        self.stop()


class Browser(FastHttpUser):
    """Somebody refreshing the release page."""

    weight = 1
    wait_time = between(0.5, 2)

    @task
    def page(self) -> None:
        self.client.get(f"/v1/releases/{Shared.release_id}", name="/v1/releases/[id]")


@events.quitting.add_listener
def _check_invariants(environment: Environment, **_: Any) -> None:
    """Set the exit code: 1 when any invariant does not hold."""
    problems = []
    total = environment.stats.total
    if Shared.duplicate_codes:
        problems.append(f"{Shared.duplicate_codes} codes issued twice")
    if _parsed(environment).admin_token:
        request = urllib.request.Request(
            f"{environment.host}/v1/admin/releases/{Shared.release_id}",
            headers=_admin(environment))
        with urllib.request.urlopen(request, timeout=10) as response:
            view = orjson.loads(response.read())
        for slot in view["slots"]:
            if slot["claimed"] + slot["remaining"] != slot["capacity"] or slot["remaining"] < 0:
                problems.append(f"slot {slot['slot_id']} does not add up: {slot}")
        if view["remaining"] == 0 and view["claimed"] != view["capacity"]:
            problems.append("sold out but claimed differs from capacity")
        print(f"release {Shared.release_id} ({Shared.mode}): capacity {view['capacity']}, "
              f"claimed {view['claimed']}, cancelled {view['cancelled']}, "
              f"remaining {view['remaining']}")
        if Shared.mode == "lottery":
            problems += _lottery_problems(environment, view)
    if total.num_failures:
        problems.append(f"{total.num_failures} failed requests (5xx or unexpected answers)")
    print(f"requests: {total.num_requests}, failures: {total.num_failures}, "
          f"distinct codes: {len(Shared.codes)}")
    print("claim answers:", ", ".join(f"{answer} x{count}" for answer, count
                                      in Shared.answers.most_common()) or "none")
    for problem in problems:
        print("INVARIANT BROKEN:", problem)
    environment.process_exit_code = 1 if problems else 0


def _lottery_problems(environment: Environment, view: dict[str, Any]) -> list[str]:
    """Every accepted entry counted; once drawn, winners = min(entries, stock), each booked."""
    with urllib.request.urlopen(
            f"{environment.host}/v1/releases/{Shared.release_id}/lottery",
            timeout=10) as response:
        result = orjson.loads(response.read())
    print(f"lottery: {result['entries']} entries ({len(Shared.entered)} accepted in this "
          f"run), state {result['state']}")
    problems = []
    if result["entries"] < len(Shared.entered):
        problems.append(f"{len(Shared.entered)} entries accepted, {result['entries']} counted")
    if result["state"] == "drawn":
        # An entry refused by the person's limits or eligibility is skipped, not booked,
        # and the draw goes on to the next one.
        winners, skipped = len(result["winners"]), len(result.get("skipped", []))
        if winners != min(result["entries"] - skipped, view["capacity"]):
            problems.append(f"{winners} winners ({skipped} skipped) for "
                            f"{result['entries']} entries and {view['capacity']} slots")
        if view["claimed"] != len(result["winners"]):
            problems.append(f"{len(result['winners'])} winners but {view['claimed']} claimed")
    return problems
