"""Who a resident's request acts for: the caller's account and one of its persons, named
by `person_id` in the body, under the caller's claim rate limit."""

from __future__ import annotations

from aiohttp import web

from ..core import errors
from ..people.tokens import PersonGrant, Principal
from .auth import resident
from .bodies import read_json_object, text_field
from .limits import limit


async def acting_person(request: web.Request) -> tuple[Principal, str, PersonGrant]:
    principal = resident(request)
    await limit(request, "claims", principal.account_id, message="too many requests")
    person_id = text_field(await read_json_object(request), "person_id", required=True)
    grant = principal.persons.get(person_id)
    if grant is None:
        raise errors.NotYourPerson("this account may not book for that person")
    return principal, person_id, grant
