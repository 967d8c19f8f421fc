"""Sign-in by one-time SMS code, and the account's persons (family members)."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from ..people import accounts
from ..people.accounts import Person
from .appkeys import DATABASE, OTP, REDIS, TOKENS
from .auth import resident
from .bodies import read_json_object
from .limits import client_of

JSON = "application/json"


def _answer(request: web.Request, account_id: str, persons: list[Person],
            status: int = 200, **extra: Any) -> web.Response:
    # A new token with every change: the token carries the persons the claim path trusts.
    token = request.app[TOKENS].issue(account_id, [p.grant for p in persons])
    body = {"account_id": account_id, "token": token,
            "persons": [p.public() for p in persons], **extra}
    return web.Response(status=status, body=orjson.dumps(body), content_type=JSON)


async def post_otp(request: web.Request) -> web.Response:
    data = await read_json_object(request)
    phone = accounts.check_phone(data.get("phone"))
    await request.app[OTP].send(phone, client_of(request))
    return web.Response(status=202, content_type=JSON,
                        body=orjson.dumps({"sent": True, "expires_in": accounts.OTP_SECONDS}))


async def post_session(request: web.Request) -> web.Response:
    data = await read_json_object(request)
    phone = accounts.check_phone(data.get("phone"))
    await request.app[OTP].check(phone, data.get("code"))
    account_id, persons, created = await accounts.sign_in(
        request.app[DATABASE], phone, data.get("real_name"), data.get("id_number"))
    return _answer(request, account_id, persons, status=201 if created else 200,
                   registered=created)


async def list_persons(request: web.Request) -> web.Response:
    principal = resident(request)
    async with request.app[DATABASE].acquire() as conn:
        persons = await accounts.persons_of(conn, principal.account_id)
    return web.Response(body=orjson.dumps([p.public() for p in persons]), content_type=JSON)


async def add_person(request: web.Request) -> web.Response:
    principal = resident(request)
    data = await read_json_object(request)
    person, persons = await accounts.add_person(
        request.app[DATABASE], principal.account_id, data.get("real_name"),
        data.get("id_number"))
    return _answer(request, principal.account_id, persons, status=201,
                   person=person.public())


async def delete_person(request: web.Request) -> web.Response:
    principal = resident(request)
    persons = await accounts.remove_person(request.app[DATABASE], request.app[REDIS],
                                           principal.account_id,
                                           request.match_info["person_id"])
    return _answer(request, principal.account_id, persons)
