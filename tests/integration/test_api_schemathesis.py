"""Fuzz the HTTP API from its own OpenAPI document (schemathesis, in-process over ASGI).

Every operation of /openapi.json gets its explicit examples, schemathesis' coverage cases
(boundaries, missing and malformed values, other methods) and a bounded number of generated
ones, against a real store holding the web seed. Checked: no 5xx, status codes, content types
and bodies as documented, the token enforced where declared, 405 with Allow for other methods.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks
from starlette.applications import Starlette
from starlette.testclient import TestClient

from cdc.devdb import LocalPostgres
from cdc.web import create_app
from cdc.web.api import openapi_document
from tests.integration.test_api import AUTH, TOKEN, build_web_seed
from tests.store_builder import StoreBuilder

EXAMPLES_PER_OPERATION = 25

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
    checks.ignored_auth,
    checks.unsupported_method,
]


@pytest.fixture(scope="module")
def seed(pg: LocalPostgres) -> Iterator[StoreBuilder]:
    name = f"t_{uuid.uuid4().hex[:8]}"
    b = StoreBuilder(pg.create_database(name))
    build_web_seed(b)
    b.finish(baseline=0x1_0000_0000)
    yield b
    b.close()
    pg.drop_database(name)


@pytest.fixture(scope="module")
def app(seed: StoreBuilder) -> Starlette:
    # The seed's own database stands for the source: the undo previews answer 200 (their plans refuse:
    # the seed's tables are not on it). Without a source they answer 503 no_source (test_web_undo.py).
    app = create_app(seed.dsn, token=TOKEN, source_dsn=seed.dsn)
    with TestClient(app) as client:  # the document fuzzed below is the one the app serves
        assert client.get("/openapi.json").json() == openapi_document(secured=True)
    APP.target = app
    return app


class AppProxy:
    """The ASGI app the cases go to: the `app` fixture's (one per PostgreSQL flavor)."""

    target: Starlette | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert self.target is not None
        await self.target(scope, receive, send)


# The document is built without a store (schemathesis' lazy fixture loader does not support this
# pytest); the cases go in-process to APP, as with schemathesis.openapi.from_asgi().
APP = AppProxy()
schema = schemathesis.openapi.from_dict(openapi_document(secured=True))
schema.app = APP


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_api_conforms_to_its_openapi(case: schemathesis.Case, app: Starlette) -> None:
    assert APP.target is app
    case.call_and_validate(headers=dict(AUTH), checks=CHECKS)
