"""The OpenAPI description names exactly the routes the gateway serves, and a
property-based fuzz run of it against the live gateway (real Redis, PostgreSQL) finds no
5xx and no answer that breaks the description: status codes, content types, bodies.

CI runs a short form (FUZZ_EXAMPLES cases per operation, 15); a longer run:
`FUZZ_EXAMPLES=200 .venv/bin/pytest tests/test_openapi.py -k fuzz`."""

from __future__ import annotations

import dataclasses
import os
from datetime import UTC, datetime, timedelta

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance
from support import Resident, release_definition

from release_service.core.errors import InvalidInput
from release_service.core.settings import Settings
from release_service.gateway.app import create_app
from release_service.gateway.openapi import DEFINITION_EXAMPLE, DOCUMENT, EXAMPLES
from release_service.people.tokens import PersonGrant, TokenCodec
from release_service.releases.definition import parse_definition

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "15"))

# The live-figures stream never ends by itself; it has a test of its own (test_ops_page).
schema = schemathesis.openapi.from_dict(DOCUMENT).exclude(path="/ops/stream")
# Invalid data must get a 4xx, whichever: a too large body (413) or a closed release (410)
# may be what a request meets before its fields are validated.
schema.config.checks.negative_data_rejection.expected_statuses = ["4XX"]


def test_the_description_names_every_route_and_only_those():
    app = create_app(dataclasses.replace(Settings(), token_secret="t" * 32))
    served = {(route.method.lower(), route.resource.canonical)
              for route in app.router.routes()
              if route.method != "HEAD" and route.resource is not None}
    described = {(method, path) for path, ops in DOCUMENT["paths"].items() for method in ops}
    assert served == described


@pytest.mark.parametrize("change", [
    {"cancellation": {"day_before_at": 0}}, {"cancellation": {"hours_before": "24"}},
    {"opens_at": 1_790_000_000}, {"waves": [{"opens_at": DEFINITION_EXAMPLE["opens_at"],
                                             "share": "1"}]},
    {"eligibility": {"sex": "female"}}, {"dose": 1.0},
])
def test_a_definition_with_a_value_the_description_refuses_is_refused(change):
    """Found by the fuzz run: numbers were taken for times and strings for numbers."""
    parse_definition(DEFINITION_EXAMPLE)
    with pytest.raises(InvalidInput):
        parse_definition({**DEFINITION_EXAMPLE, **change})


@pytest.fixture(scope="module")
def fuzz_headers(stack_settings):
    """A resident who holds the description's example person, and the admin."""
    codec = TokenCodec(stack_settings.token_secret, stack_settings.token_ttl_seconds)
    resident = Resident("a_fuzz", EXAMPLES["person_id"], codec.issue(
        "a_fuzz", [PersonGrant(EXAMPLES["person_id"], 19950101, "F")]))
    return {"resident": resident.headers,
            "admin": {"Authorization": f"Bearer {stack_settings.admin_token}"}}


@pytest.fixture
async def example_release(api):
    """The description's example release, open, with its example slot: generated
    requests with the example values reach the winning path and the 200 answers."""
    start = (datetime.now(UTC) + timedelta(days=7)).replace(minute=0, second=0,
                                                           microsecond=0)
    slot = {"slot_id": EXAMPLES["slot_id"], "starts_at": start.isoformat(),
            "ends_at": (start + timedelta(hours=1)).isoformat(), "capacity": 5}
    await api.create_release(release_definition([], release_id=EXAMPLES["release_id"],
                                                slots=[slot]))


@schema.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_fuzz_against_the_description(case, gateway_url, fuzz_headers, example_release):
    security = case.operation.definition.raw.get("security") or [{}]
    headers = {}
    for scheme in security[0]:
        headers = fuzz_headers[scheme]
    # Schema-valid is not always valid: ID checksums, ages, times in order, stock and
    # limits decide too, so a refused schema-valid request is no failure here.
    case.call_and_validate(base_url=gateway_url, headers=headers,
                           excluded_checks=[positive_data_acceptance])
