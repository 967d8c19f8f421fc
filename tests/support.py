"""Helpers for tests that drive the real gateway over HTTP."""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import aiohttp

from release_service.core.settings import Settings
from release_service.people.tokens import PersonGrant, TokenCodec

_counter = itertools.count()
CLINIC_ZONE = timezone(timedelta(hours=8))


def at(seconds: float) -> str:
    """An RFC 3339 time `seconds` from now (negative: in the past), in UTC+8."""
    moment = datetime.now(UTC) + timedelta(seconds=seconds)
    return moment.astimezone(CLINIC_ZONE).isoformat()


def release_definition(
    capacities: list[int], *, opens_in: float = -1.0, closes_in: float = 3600.0,
    **fields: Any,
) -> dict[str, Any]:
    """A valid definition: slots a week from now, open `opens_in` seconds from now."""
    release_id = fields.pop("release_id", f"t-{next(_counter)}-{secrets.token_hex(3)}")
    day = datetime.now(UTC) + timedelta(days=7)
    slots = []
    for i, capacity in enumerate(capacities):
        start = day.replace(hour=1 + i, minute=0, second=0, microsecond=0)
        slots.append({
            "slot_id": f"s{i}", "starts_at": start.isoformat(),
            "ends_at": (start + timedelta(hours=1)).isoformat(), "capacity": capacity,
        })
    return {
        "release_id": release_id, "vaccine": "HPV9", "dose": 1, "clinic_id": "cd-wuhou-01",
        "department": "vaccination", "opens_at": at(opens_in), "closes_at": at(closes_in),
        "slots": slots, **fields,
    }


@dataclass
class Resident:
    account_id: str
    person_id: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def residents(
    settings: Settings, count: int, *, birth: int = 19950101, sex: str = "F"
) -> list[Resident]:
    """Accounts with one person each, as tokens signed with the server's secret."""
    codec = TokenCodec(settings.token_secret, settings.token_ttl_seconds)
    made = []
    for _ in range(count):
        account, person = f"a_{secrets.token_hex(6)}", f"p_{secrets.token_hex(6)}"
        made.append(Resident(account, person,
                             codec.issue(account, [PersonGrant(person, birth, sex)])))
    return made


class Api:
    """A thin client of the gateway: returns (status, headers, JSON body)."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, admin_token: str) -> None:
        self.session = session
        self.base_url = base_url
        self.admin_headers = {"Authorization": f"Bearer {admin_token}"}

    async def call(
        self, method: str, path: str, *, json: Any = None, data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, Any]:
        async with self.session.request(method, self.base_url + path, json=json, data=data,
                                        headers=headers) as response:
            body = await response.read()
            parsed = await response.json(content_type=None) if body else None
            return response.status, response.headers, parsed

    async def create_release(self, definition: dict[str, Any]) -> dict[str, Any]:
        status, _, body = await self.call("POST", "/v1/admin/releases", json=definition,
                                          headers=self.admin_headers)
        assert status == 201, body
        return body

    async def admin_release(self, release_id: str) -> dict[str, Any]:
        status, _, body = await self.call("GET", f"/v1/admin/releases/{release_id}",
                                          headers=self.admin_headers)
        assert status == 200, body
        return body

    async def claim(
        self, release_id: str, resident: Resident, *, slot_id: str | None = None,
        key: str | None = None, person_id: str | None = None,
    ) -> tuple[int, Any, Any]:
        body: dict[str, Any] = {"person_id": person_id or resident.person_id}
        if slot_id is not None:
            body["slot_id"] = slot_id
        headers = dict(resident.headers)
        if key is not None:
            headers["Idempotency-Key"] = key
        return await self.call("POST", f"/v1/releases/{release_id}/claims", json=body,
                               headers=headers)
