"""Shared pytest fixtures."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from cdc.devdb import HINT_ANY, LocalPostgres, available_flavors, find_bindir, postgres_version
from cdc.errors import SetupError
from tests.capture_env import CaptureEnv, new_env

# ============================================================================ PostgreSQL servers (cdc.devdb)
#
# `pg`: one started throwaway server per PostgreSQL flavor, shared by the whole session.
# CDC_TEST_PG="embedded,system" picks the flavors (default: every flavor installed here);
# a flavor that cannot run fails the tests using it instead of skipping them.


def _pg_params() -> list[Any]:
    requested = os.environ.get("CDC_TEST_PG", "").strip()
    flavors = [f.strip() for f in requested.split(",") if f.strip()] if requested else available_flavors()
    if not flavors:
        error = SetupError("no PostgreSQL to test against (neither embedded nor system)", hint=HINT_ANY)
        return [pytest.param(error, id="no-postgres")]
    params, ids = [], set()
    for flavor in flavors:
        try:
            version = postgres_version(find_bindir(flavor))
        except SetupError as exc:
            where = "requested in CDC_TEST_PG" if requested else "found by available_flavors()"
            error = SetupError(
                f"PostgreSQL flavor {flavor!r} ({where}) cannot run: {exc.message}", hint=exc.hint
            )
            params.append(pytest.param(error, id=f"{flavor}-unavailable"))
            continue
        param_id = f"pg{version}" if f"pg{version}" not in ids else f"{flavor}-pg{version}"
        ids.add(param_id)
        params.append(pytest.param(flavor, id=param_id))
    return params


@pytest.fixture(scope="session", params=_pg_params())
def pg(request: pytest.FixtureRequest) -> Iterator[LocalPostgres]:
    """A started LocalPostgres (wal_level=logical), one per flavor, cleaned up at session end."""
    if isinstance(request.param, SetupError):
        pytest.fail(str(request.param), pytrace=False)
    server = LocalPostgres(flavor=request.param)
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def fresh_dbname() -> str:
    """A database name no other test uses (the database is not created)."""
    return f"t_{uuid.uuid4().hex[:8]}"


# ============================================================================ (fixtures below: lead engineer)


@pytest.fixture
def capture(pg: LocalPostgres) -> Iterator[CaptureEnv]:
    """Source and store databases on `pg`; call .setup() and .start() in the test."""
    env = new_env(pg)
    try:
        yield env
    finally:
        env.teardown()
