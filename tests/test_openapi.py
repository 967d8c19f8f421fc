"""The OpenAPI description names exactly the routes the gateway serves, and a
property-based fuzz run of it against the live gateway (real Redis, PostgreSQL) finds no
5xx and no answer that breaks the description: status codes, content types, bodies."""

from __future__ import annotations

import dataclasses

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance
from support import residents

from release_service.gateway.app import create_app
from release_service.gateway.openapi import DOCUMENT
from release_service.settings import Settings

# The live-figures stream never ends by itself; it has a test of its own (test_ops_page).
schema = schemathesis.openapi.from_dict(DOCUMENT).exclude(path="/ops/stream")


def test_the_description_names_every_route_and_only_those():
    app = create_app(dataclasses.replace(Settings(), token_secret="t" * 32))
    served = {(route.method.lower(), route.resource.canonical)
              for route in app.router.routes()
              if route.method != "HEAD" and route.resource is not None}
    described = {(method, path) for path, ops in DOCUMENT["paths"].items() for method in ops}
    assert served == described


@pytest.fixture(scope="module")
def fuzz_headers(stack_settings):
    resident = residents(stack_settings, 1)[0]
    return {"resident": {"Authorization": f"Bearer {resident.token}"},
            "admin": {"Authorization": f"Bearer {stack_settings.admin_token}"}}


@schema.parametrize()
@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_fuzz_against_the_description(case, gateway_url, fuzz_headers):
    security = case.operation.definition.raw.get("security") or [{}]
    headers = {}
    for scheme in security[0]:
        headers = fuzz_headers[scheme]
    # Schema-valid is not always valid: ID checksums, ages, times in order, stock and
    # limits decide too, so a refused schema-valid request is no failure here.
    case.call_and_validate(base_url=gateway_url, headers=headers,
                           excluded_checks=[positive_data_acceptance])
