"""The HTTP API of `cdc serve` (cdc.web) against a real history store, through Starlette's TestClient."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import structlog
from click.testing import CliRunner
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter
from starlette.testclient import TestClient

from cdc.devdb import LocalPostgres
from cdc.errors import ConfigError
from cdc.lsn import format_lsn
from cdc.query import Store
from cdc.web import create_app
from cdc.web.api import openapi_document
from cdc.web.serve import serve
from tests.store_builder import (
    INT4,
    REQ_FAILED,
    REQ_INSERT,
    REQ_NAME,
    REQ_ORDER,
    REQ_PLAN,
    TEXT,
    StoreBuilder,
    build_seed_000,
)

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REQ_BULK = "abc00001-5555-4555-8555-555555555555"
REQ_EDIT = "abc00002-6666-4666-8666-666666666666"
XSS = "<script>alert(1)</script>"

#: The exported form of a mutation (DESIGN.md) plus the X/Y spellings of its LSNs and whether it
#: is an attempt capture could not show it saw whole.
MUTATION_FIELDS = {
    "version", "version_lsn", "lsn", "lsn_text", "xid", "committed_at", "table", "key", "op", "before",
    "after", "changed", "request_id", "context", "status", "possibly_incomplete",
}  # fmt: skip


# ============================================================================ the store


def build_web_seed(b: StoreBuilder) -> None:
    """Seed 000 (users 42, orders 81b2, the rolled-back request 550e8400) and, for the web:
    more users (pages), a key with a slash, a composite key, a keyless table, a deleted row,
    HTML in a value and in an actor, and two requests sharing the prefix ``abc0000``."""
    build_seed_000(b)
    b.table("items", {"order_id": TEXT, "n": INT4, "qty": INT4}, key=["order_id", "n"])
    b.table("events", {"kind": TEXT, "payload": TEXT}, key=[])
    with b.txn("2026-03-11 09:00", REQ_BULK, actor="importer") as t:
        for i in range(100, 105):
            t.insert("users", {"id": i, "email": f"u{i}@example.org", "name": None, "plan": "free"})
        t.insert("orders", {"id": "x/y", "status": "new", "total": "1.00"})
        t.insert("items", {"order_id": "81b2", "n": 1, "qty": 2})
        t.insert("events", {"kind": "ping", "payload": "a"})
        t.insert("events", {"kind": "ping", "payload": "a"})
    with b.txn("2026-03-11 10:00", REQ_EDIT, actor="<b>mallory</b>") as t:
        t.update("items", {"order_id": "81b2", "n": 1}, {"qty": 3})
        t.update("users", 101, {"name": XSS})
        t.delete("users", 104)


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
def client(seed: StoreBuilder) -> Iterator[TestClient]:
    app = create_app(seed.dsn, token=TOKEN)
    with TestClient(app, headers=AUTH) as c:
        yield c


def get(client: TestClient, url: str, status: int = 200, **kwargs: Any) -> Any:
    response = client.get(url, **kwargs)
    assert response.status_code == status, (url, response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    if status >= 400:
        assert set(body) == {"error"}, body
        assert {"code", "message"} <= set(body["error"]), body
        assert "Traceback" not in response.text
    return body


def error(client: TestClient, url: str, status: int, code: str, *needles: str) -> str:
    body = get(client, url, status)
    assert body["error"]["code"] == code, body
    message = str(body["error"]["message"])
    for needle in needles:
        assert needle in message, message
    return message


def row_url(table: str, key: str, suffix: str = "") -> str:
    return f"/api/v1/tables/{quote(table, safe='')}/rows/{quote(key, safe='')}{suffix}"


# ============================================================================ tables and versions


def test_tables(client: TestClient) -> None:
    tables = {t["name"]: t for t in get(client, "/api/v1/tables")["tables"]}
    assert set(tables) == {"public.users", "public.orders", "public.items", "public.events"}
    assert tables["public.users"] == {
        "name": "public.users",
        "key_columns": ["id"],
        "columns": ["id", "email", "name", "plan"],
        "keyless": False,
        "dropped": False,
        "former_names": [],
    }
    assert tables["public.items"]["key_columns"] == ["order_id", "n"]
    assert tables["public.events"]["keyless"] is True


def test_versions(client: TestClient, seed: StoreBuilder) -> None:
    body = get(client, "/api/v1/versions")
    assert body["current"] == seed.position and body["current_lsn"] == format_lsn(seed.position)
    assert body["earliest"] == body["floor"] == 0x1_0000_0000
    assert body["floor_lsn"] == "1/0"
    assert body["current_at"] == "2026-03-11T10:00:00+00:00"
    assert "at" not in body

    at = get(client, "/api/v1/versions?at=2026-03-10T14:21:30Z")
    assert at["version_at"] == seed.positions[2] and at["version_at_lsn"] == format_lsn(seed.positions[2])
    assert at["at"] == "2026-03-10T14:21:30+00:00"
    naive = get(client, "/api/v1/versions?at=2026-03-10T14:21:30")  # naive times are UTC
    assert naive["version_at"] == seed.positions[2]
    assert get(client, "/api/v1/versions?at=2020-01-01")["version_at"] is None
    assert get(client, "/api/v1/versions?at=now")["version_at"] == seed.position
    error(client, "/api/v1/versions?at=yesterday-ish", 400, "bad_request", "at:")
    error(client, "/api/v1/versions?at=99999999999d", 400, "bad_request")


# ============================================================================ one row


def test_row_history_is_the_seed_scenario(client: TestClient, seed: StoreBuilder) -> None:
    body = get(client, row_url("users", "42", "/history"))
    assert body["table"] == "public.users" and body["key"] == {"id": 42}
    mutations = body["mutations"]
    assert [set(m) for m in mutations] == [MUTATION_FIELDS] * 4
    assert [m["op"] for m in mutations] == ["INSERT", "UPDATE", "UPDATE", "UPDATE"]
    assert [m["request_id"] for m in mutations] == [REQ_INSERT, REQ_NAME, REQ_PLAN, REQ_FAILED]
    assert [m["status"] for m in mutations] == ["committed"] * 3 + ["rolled_back"]
    assert [m["changed"] for m in mutations[1:]] == [["name"], ["plan"], ["plan"]]
    assert mutations[2]["before"]["plan"] == "free" and mutations[2]["after"]["plan"] == "pro"
    failed = mutations[3]
    assert failed["version"] is None and failed["version_lsn"] is None
    assert failed["after"] == {"id": 42, "email": "a@b.com", "name": "Alice Smith", "plan": None}
    assert failed["context"]["actor"] == "alice@example.com"
    assert failed["context"]["extra"] == {"route": "/pay"}
    assert mutations[0]["version"] == seed.positions[1]
    assert mutations[0]["version_lsn"] == format_lsn(seed.positions[1])
    assert all(m["committed_at"].endswith("+00:00") for m in mutations)  # UTC
    assert mutations[0]["committed_at"] == "2026-03-10T12:00:00+00:00"


def test_row_history_filters(client: TestClient) -> None:
    url = row_url("users", "42", "/history")
    since = get(client, url + "?since=2026-03-10T14:00")["mutations"]
    assert [m["request_id"] for m in since] == [REQ_NAME, REQ_PLAN, REQ_FAILED]
    between = get(client, url + "?since=2026-03-10T14:00&until=2026-03-10T14:22")["mutations"]
    assert [m["request_id"] for m in between] == [REQ_NAME]
    day = get(client, url + "?since=2026-03-10&until=2026-03-10")["mutations"]  # a date alone: its end
    assert len(day) == 4
    committed = get(client, url + "?committed_only=true")["mutations"]
    assert [m["status"] for m in committed] == ["committed"] * 3
    assert get(client, url + "?since=2030-01-01")["mutations"] == []
    error(client, url + "?committed_only=maybe", 400, "bad_request", "committed_only")
    error(client, url + "?since=soon", 400, "bad_request", "since")
    error(client, url + "?version=1", 400, "bad_request", "unknown query parameter 'version'")


def test_row_blame(client: TestClient) -> None:
    body = get(client, row_url("users", "42", "/blame"))
    columns = {c["column"]: c for c in body["columns"]}
    assert list(columns) == ["email", "name", "plan"]
    assert columns["email"]["request_id"] == REQ_INSERT and columns["email"]["op"] == "INSERT"
    assert columns["name"]["value"] == "Alice Smith" and columns["name"]["request_id"] == REQ_NAME
    plan = columns["plan"]
    assert plan["value"] == "pro" and plan["request_id"] == REQ_PLAN
    assert plan["rolled_back"] is True and plan["rolled_back_request_id"] == REQ_FAILED
    assert plan["committed_at"] == "2026-03-10T14:22:00+00:00"
    error(client, row_url("users", "104", "/blame"), 404, "not_found", "does not exist now")


def test_row_at_version(client: TestClient, seed: StoreBuilder) -> None:
    now = get(client, row_url("users", "42"))
    assert now["row"] == {"id": 42, "email": "a@b.com", "name": "Alice Smith", "plan": "pro"}
    assert now["version"] == seed.position and now["exact"] is True

    after_insert = seed.positions[1]
    for version in (str(after_insert), format_lsn(after_insert)):
        body = get(client, row_url("users", "42") + f"?version={quote(version, safe='')}")
        assert body["row"] == {"id": 42, "email": "a@b.com", "name": None, "plan": "free"}
        assert body["version"] == after_insert and body["version_lsn"] == format_lsn(after_insert)
    at = get(client, row_url("users", "42") + "?at=2026-03-10T14:21:30Z")
    assert at["row"]["name"] == "Alice Smith" and at["row"]["plan"] == "free"

    # Absent at a valid version (before its INSERT): 200 with a null row.
    before = get(client, row_url("users", "42") + f"?version={seed.positions[0]}")
    assert before["row"] is None and before["exact"] is True
    # Deleted now.
    assert get(client, row_url("users", "104"))["row"] is None
    # Below the history floor: nothing is read (like the Python API), not an error.
    floor = get(client, row_url("users", "42") + "?version=5")
    assert floor["row"] is None and floor["exact"] is False
    # Before anything was stored.
    early = get(client, row_url("users", "42") + "?at=2001-01-01")
    assert early == {"table": "public.users", "key": {"id": 42}, "version": None, "version_lsn": None,
                     "exact": False, "row": None}  # fmt: skip

    error(client, row_url("users", "42") + f"?version={seed.position + 1}", 409, "version_ahead", "ahead")
    error(client, row_url("users", "42") + "?version=1&at=now", 400, "bad_request", "at most one")
    error(client, row_url("users", "42") + "?version=-1", 400, "bad_request", "version")
    error(client, row_url("users", "42") + "?version=%2042", 400, "bad_request", "version")
    error(client, row_url("users", "42") + "?version=1%2FZZ", 400, "bad_request", "version")
    error(client, row_url("users", "43"), 404, "not_found", "no history for public.users id=43")
    error(client, row_url("nope", "42"), 404, "not_found", "no history for table public.nope")
    error(client, row_url("users", "abc"), 400, "bad_request", "invalid key value")


def test_keys_in_paths(client: TestClient) -> None:
    # a key holding a slash, URL-encoded
    body = get(client, row_url("orders", "x/y"))
    assert body["key"] == {"id": "x/y"} and body["row"]["status"] == "new"
    assert get(client, row_url("orders", "x/y", "/history"))["mutations"][0]["request_id"] == REQ_BULK
    # a composite key as URL-encoded JSON, in any column order
    for key in ('{"order_id":"81b2","n":1}', '{"n": 1, "order_id": "81b2"}'):
        composite = get(client, row_url("items", key))
        assert composite["key"] == {"order_id": "81b2", "n": 1} and composite["row"]["qty"] == 3
    blame = get(client, row_url("items", '{"order_id":"81b2","n":1}', "/blame"))
    assert [(c["column"], c["request_id"]) for c in blame["columns"]] == [("qty", REQ_EDIT)]
    # a keyless table: the whole row is the key
    events = get(client, row_url("events", '{"kind":"ping","payload":"a"}'))
    assert events["row"] == {"kind": "ping", "payload": "a"}
    # the table spelled with its schema
    assert get(client, row_url("public.users", "42"))["table"] == "public.users"
    error(client, row_url("items", "81b2"), 400, "bad_request", "composite key")
    error(client, row_url("items", '{"order_id":"81b2"}'), 400, "bad_request", "key columns")
    error(client, row_url("items", '{"order_id": '), 400, "bad_request", "not valid JSON")
    error(client, row_url("items", '{"n": 1e999, "order_id": "x"}'), 400, "bad_request", "not valid JSON")
    error(client, row_url("items", '["81b2", 1]'), 400, "bad_request")  # a JSON array is a scalar text
    error(client, row_url("users", "x" * 5000), 400, "bad_request", "longer than 4096")
    error(client, row_url("users", "4\x002"), 400, "bad_request", "NUL")
    error(client, row_url("items", '{"order_id":"\\u0000","n":1}'), 400, "bad_request", "NUL")
    error(client, row_url("users", " "), 400, "bad_request", "empty")
    error(client, "/api/v1/tables/users/rows/%FF%FE", 400, "bad_request", "UTF-8")
    error(client, "/api/v1/tables/users/rows/42/nope", 404, "not_found", "no such endpoint")
    error(client, "/api/v1/tables/users", 404, "not_found", "no such endpoint")
    error(client, "/api/v1/tables/bad%20name/rows/1", 400, "bad_request", "invalid table name")


# ============================================================================ whole tables


def test_table_at_version_pages(client: TestClient, seed: StoreBuilder) -> None:
    everything = get(client, "/api/v1/tables/users/rows")
    assert [r["id"] for r in everything["rows"]] == [42, 100, 101, 102, 103]
    assert everything["next"] is None and everything["exact"] is True
    assert everything["rows"][2]["name"] == XSS  # values as stored; escaping is the page's job

    seen: list[int] = []
    url = "/api/v1/tables/users/rows?limit=2"
    pages = 0
    while True:
        page = get(client, url)
        seen += [r["id"] for r in page["rows"]]
        pages += 1
        if page["next"] is None:
            break
        assert json.loads(page["next"]) == {"id": seen[-1]}
        url = f"/api/v1/tables/users/rows?limit=2&after={quote(page['next'], safe='')}"
    assert seen == [42, 100, 101, 102, 103] and pages == 3

    past = get(client, f"/api/v1/tables/users/rows?version={format_lsn(seed.positions[1])}")
    assert past["rows"] == [{"id": 42, "email": "a@b.com", "name": None, "plan": "free"}]
    assert get(client, "/api/v1/tables/users/rows?at=2026-03-10T14:21:30")["rows"][0]["plan"] == "free"
    below = get(client, "/api/v1/tables/users/rows?version=1")
    assert below["rows"] == [] and below["exact"] is False and below["next"] is None
    events = get(client, "/api/v1/tables/events/rows")["rows"]
    assert events == [{"kind": "ping", "payload": "a"}] * 2  # a multiset
    assert len(get(client, "/api/v1/tables/items/rows")["rows"]) == 1

    error(client, "/api/v1/tables/users/rows?limit=0", 400, "bad_request", "limit")
    error(client, "/api/v1/tables/users/rows?limit=1001", 400, "bad_request", "limit")
    error(client, "/api/v1/tables/users/rows?limit=ten", 400, "bad_request", "limit")
    error(client, "/api/v1/tables/users/rows?after=" + "9" * 20000, 400, "bad_request", "longer than")
    error(client, f"/api/v1/tables/users/rows?version={seed.position + 16}", 409, "version_ahead")
    error(client, "/api/v1/tables/nope/rows", 404, "not_found")


# ============================================================================ the mutation log


def test_mutation_log_pages_newest_first(client: TestClient, seed: StoreBuilder) -> None:
    everything = get(client, "/api/v1/mutations?limit=1000")
    assert everything["next"] is None
    mutations = everything["mutations"]
    assert len(mutations) == 18
    assert all(set(m) == MUTATION_FIELDS for m in mutations)
    times = [m["committed_at"] for m in mutations]
    assert times == sorted(times, reverse=True)
    assert mutations[-1]["request_id"] == REQ_ORDER

    walked: list[tuple[int, str]] = []
    url = "/api/v1/mutations?limit=5"
    while True:
        page = get(client, url)
        assert len(page["mutations"]) <= 5
        walked += [(m["lsn"], m["table"]) for m in page["mutations"]]
        if page["next"] is None:
            break
        url = f"/api/v1/mutations?limit=5&cursor={page['next']}"
    assert walked == [(m["lsn"], m["table"]) for m in mutations]
    assert get(client, "/api/v1/mutations")["next"] is None  # default limit 100

    error(client, "/api/v1/mutations?cursor=abc", 400, "bad_request", "cursor")
    error(client, "/api/v1/mutations?cursor=" + "1" * 100, 400, "bad_request", "cursor")
    error(client, "/api/v1/mutations?cursor=%2012-1", 400, "bad_request", "cursor")
    error(client, "/api/v1/mutations?limit=100000", 400, "bad_request", "limit")


def test_mutation_log_filters(client: TestClient) -> None:
    def ids(query: str) -> list[tuple[str, str | None]]:
        return [(m["table"], m["request_id"]) for m in get(client, f"/api/v1/mutations?{query}")["mutations"]]

    users_42 = ids("table=users&key=42")
    assert users_42 == [("public.users", r) for r in (REQ_FAILED, REQ_PLAN, REQ_NAME, REQ_INSERT)]
    assert ids("request=550e8400") == [("public.orders", REQ_FAILED), ("public.users", REQ_FAILED)]
    assert ids("request=" + REQ_FAILED) == ids("request=550e8400")
    assert {r for _, r in ids("actor=alice%40example.com")} == {REQ_NAME, REQ_FAILED}
    assert {r for _, r in ids("status=rolled_back")} == {REQ_FAILED}
    assert len(ids("status=committed")) == 16
    assert len(ids("op=INSERT")) == 11 and len(ids("op=DELETE")) == 1
    assert ids("table=orders&op=UPDATE") == [("public.orders", REQ_FAILED)]
    assert len(ids("since=2026-03-11")) == 12
    assert ids("until=2026-03-10T00:00Z") == [("public.orders", REQ_ORDER)]
    assert ids("since=2026-03-10T14:00Z&until=2026-03-10T14:22Z") == [("public.users", REQ_NAME)]
    composite = ids(f"table=items&key={quote(json.dumps({'order_id': '81b2', 'n': 1}))}")
    assert composite == [("public.items", REQ_EDIT), ("public.items", REQ_BULK)]
    assert ids("table=users&actor=nobody") == []
    assert len(ids("table=&key=&status=&op=&actor=")) == 18  # empty = absent (HTML forms)

    error(client, "/api/v1/mutations?key=42", 400, "bad_request", "needs a table")
    error(client, "/api/v1/mutations?status=maybe", 400, "bad_request", "status")
    error(client, "/api/v1/mutations?op=MERGE", 400, "bad_request", "op")
    error(client, "/api/v1/mutations?request=abc0000", 400, "bad_request", "ambiguous")
    error(client, "/api/v1/mutations?request=ffffffff", 404, "not_found", "no request")
    error(client, "/api/v1/mutations?table=nope", 404, "not_found", "no history for table")
    error(client, "/api/v1/mutations?tabel=users", 400, "bad_request", "unknown query parameter 'tabel'")
    error(client, "/api/v1/mutations?actor=" + "a" * 2000, 400, "bad_request", "longer than")


# ============================================================================ requests


def test_request(client: TestClient, seed: StoreBuilder) -> None:
    body = get(client, "/api/v1/requests/550e8400")
    assert body["request_id"] == REQ_FAILED and body["actor"] == "alice@example.com"
    assert body["outcome"] == "rolled_back"
    assert body["error"] == {
        "type": "TimeoutError",
        "message": "Stripe API timeout after 10s",
        "location": "payments/create.ts:42",
        "at": "2026-03-10T14:22:30+00:00",
        "attributed": True,
        "attribution": "own_session",
        "reported_by": {
            "db_user": "app",
            "backend_pid": 4242,
            "client_addr": None,
            "xid": None,
            "proven": True,
        },
    }
    assert body["context"]["client_addr"] == "10.0.0.5" and body["context"]["backend_pid"] == 4242
    assert [(t["status"], t["mutation_count"]) for t in body["transactions"]] == [("rolled_back", 2)]
    assert [(m["table"], m["status"]) for m in body["mutations"]] == [
        ("public.users", "rolled_back"),
        ("public.orders", "rolled_back"),
    ]
    assert body["mutation_count"] == 2 and body["next"] is None
    assert get(client, f"/api/v1/requests/{REQ_FAILED}")["request_id"] == REQ_FAILED

    ok = get(client, f"/api/v1/requests/{REQ_PLAN[:8]}")
    assert ok["outcome"] == "committed" and ok["error"] is None

    first = get(client, f"/api/v1/requests/{REQ_BULK}?limit=3")
    assert len(first["mutations"]) == 3 and first["mutation_count"] == 9 and first["next"] is not None
    rest = get(client, f"/api/v1/requests/{REQ_BULK}?limit=100&cursor={first['next']}")
    lsns = [m["lsn"] for m in first["mutations"] + rest["mutations"]]
    assert len(lsns) == 9 and lsns == sorted(lsns) and rest["next"] is None

    error(client, "/api/v1/requests/abc0000", 400, "bad_request", "ambiguous", REQ_BULK, REQ_EDIT)
    ambiguous = client.get("/api/v1/requests/abc0000").json()["error"]
    assert ambiguous["matches"] == sorted([REQ_BULK, REQ_EDIT]) and ambiguous["more_matches"] is False
    error(client, "/api/v1/requests/ffffffff", 404, "not_found", "no request 'ffffffff'")
    error(client, "/api/v1/requests/%20", 400, "bad_request")
    error(client, "/api/v1/requests/a/b", 404, "not_found")
    error(client, "/api/v1/requests/550e8400?limit=0", 400, "bad_request", "limit")


def test_times_are_utc_whatever_the_session_time_zone(seed: StoreBuilder) -> None:
    dsn = f"{seed.dsn} options='-c TimeZone=Asia/Kolkata'"
    with TestClient(create_app(dsn, token=TOKEN), headers=AUTH) as c:
        history = get(c, row_url("users", "42", "/history"))["mutations"]
        blame = get(c, row_url("users", "42", "/blame"))["columns"]
        request = get(c, "/api/v1/requests/550e8400")
        versions = get(c, "/api/v1/versions?at=2026-03-10T20:00:00%2B05:30")
        page = c.get("/tables/users/rows/42").text
    times = [m["committed_at"] for m in history] + [b["committed_at"] for b in blame]
    times += [b["rolled_back_at"] for b in blame if b["rolled_back_at"]]
    times += [request["first_seen_at"], request["last_seen_at"], request["error"]["at"]]
    times += [t["committed_at"] for t in request["transactions"]] + [versions["current_at"], versions["at"]]
    assert times and all(t.endswith("+00:00") for t in times), times
    assert history[0]["committed_at"] == "2026-03-10T12:00:00+00:00"
    assert versions["at"] == "2026-03-10T14:30:00+00:00"
    assert versions["version_at"] == seed.positions[3]
    assert "2026-03-10T12:00:00Z" in page and "+05:30" not in page


# ============================================================================ errors, limits, headers


def test_unknown_paths_and_methods_are_json(client: TestClient) -> None:
    error(client, "/api/v1/nothing", 404, "not_found")
    response = client.post("/api/v1/mutations", json={})
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"
    assert "GET" in response.headers["allow"]
    response = client.delete(row_url("users", "42"))
    assert response.status_code == 405


def test_security_headers(client: TestClient) -> None:
    response = client.get("/api/v1/tables")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["cache-control"] == "no-store"
    assert "server" not in response.headers or "uvicorn" not in response.headers["server"]


def test_unexpected_errors_are_a_json_500_without_values(
    seed: StoreBuilder, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(self: Store, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret row value a@b.com")

    monkeypatch.setattr(Store, "row_history", boom)
    with structlog.testing.capture_logs() as logs, TestClient(create_app(seed.dsn, token=TOKEN)) as c:
        response = c.get(row_url("users", "42", "/history"), headers=AUTH)
    assert response.status_code == 500
    body = response.json()
    assert body["error"]["code"] == "internal" and "a@b.com" not in response.text
    assert "Traceback" not in response.text
    errors = [e for e in logs if e["event"] == "http_unexpected_error"]
    assert len(errors) == 1 and errors[0]["error_type"] == "RuntimeError"
    assert errors[0]["error_id"] == body["error"]["id"] and errors[0]["route"] == "api_table"
    assert "a@b.com" not in repr(logs) and TOKEN not in repr(logs)


def test_store_unreachable_is_503(unused_port: int) -> None:
    app = create_app(f"host=127.0.0.1 port={unused_port} dbname=x user=x connect_timeout=2", open_access=True)
    with TestClient(app) as c:
        body = get(c, "/api/v1/tables", 503)
        assert body["error"]["code"] == "store_unavailable"
        assert "cannot connect to the history store" in body["error"]["message"]
        health = c.get("/healthz")
        assert health.status_code == 503 and health.json()["ok"] is False
        assert "127.0.0.1" not in health.text  # the open endpoints say nothing about the store
        assert c.get("/readyz").status_code == 503


def test_store_without_history_schema_is_503(seed: StoreBuilder) -> None:
    with TestClient(create_app(seed.dsn, schema="no_such_schema", open_access=True)) as c:
        body = get(c, "/api/v1/mutations", 503)
        assert "no history tables" in body["error"]["message"]


@pytest.fixture
def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ============================================================================ access


def test_token_required_on_the_api(seed: StoreBuilder) -> None:
    with TestClient(create_app(seed.dsn, token=TOKEN)) as c:
        missing = c.get("/api/v1/tables")
        assert missing.status_code == 401
        assert missing.json()["error"] == {
            "code": "unauthorized",
            "message": "missing token: send Authorization: Bearer <token>",
        }
        assert missing.headers["www-authenticate"].startswith("Bearer")
        for header in (f"Bearer {TOKEN}x", f"Basic {TOKEN}", "Bearer", TOKEN, f"Bearer {TOKEN[:-1]}"):
            wrong = c.get("/api/v1/tables", headers={"Authorization": header})
            assert wrong.status_code == 401, header
            assert TOKEN not in wrong.text
        assert c.get("/api/v1/tables", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
        assert c.get("/api/v1/tables", headers=AUTH).status_code == 200
        # unknown API paths are not revealed without the token either
        assert c.get("/api/v1/nothing").status_code == 401
        # the page cookie does not open the API
        c.get(f"/login?token={TOKEN}", follow_redirects=False)
        assert c.cookies.get("cdc_token")
        assert c.get("/api/v1/tables").status_code == 401


def test_open_endpoints_need_no_token(seed: StoreBuilder) -> None:
    with TestClient(create_app(seed.dsn, token=TOKEN)) as c:
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/static/style.css", "/login"):
            assert c.get(path).status_code == 200, path


def test_token_is_never_logged(seed: StoreBuilder) -> None:
    with structlog.testing.capture_logs() as logs, TestClient(create_app(seed.dsn, token=TOKEN)) as c:
        c.get("/api/v1/tables", headers=AUTH)
        c.get(f"/login?token={TOKEN}", follow_redirects=False)
        c.get("/login?token=wrong", follow_redirects=False)
        c.get(row_url("users", "42"), headers=AUTH)
    assert logs and TOKEN not in repr(logs)
    assert "42" not in repr([e.get("route") for e in logs])  # routes are labels, not paths


def test_no_token_needs_open_access(seed: StoreBuilder) -> None:
    with pytest.raises(ConfigError) as raised:
        create_app(seed.dsn)
    assert "server.token" in str(raised.value) and "--open" in str(raised.value)
    with pytest.raises(ConfigError):
        create_app(seed.dsn, token="")
    with pytest.raises(ConfigError) as bad:
        create_app(seed.dsn, token="has space")
    assert "printable ASCII" in str(bad.value)
    with pytest.raises(ConfigError) as no_store:
        create_app("", token=TOKEN)
    assert "store.dsn" in str(no_store.value)
    with pytest.raises(ConfigError) as bad_dsn:
        create_app("host=x password=hunter2 nonsense", token=TOKEN)
    assert "invalid DSN" in str(bad_dsn.value) and "hunter2" not in str(bad_dsn.value)
    with TestClient(create_app(seed.dsn, open_access=True)) as c:
        assert c.get("/api/v1/tables").status_code == 200
        spec = c.get("/openapi.json").json()
        assert "security" not in spec and "401" not in json.dumps(spec["paths"])


# ============================================================================ health and metrics


def test_metrics_expose_the_registry(seed: StoreBuilder) -> None:
    registry = CollectorRegistry()
    Counter("cdc_mutations_total", "Row mutations written", ["table"], registry=registry).labels("users").inc(
        7
    )
    with TestClient(create_app(seed.dsn, token=TOKEN, registry=registry)) as c:
        c.get("/api/v1/tables", headers=AUTH)
        response = c.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    assert 'cdc_mutations_total{table="users"} 7.0' in response.text
    assert 'cdc_http_requests_total{method="GET",route="api_tables",status="200"} 1.0' in response.text
    assert "cdc_http_request_duration_seconds_bucket" in response.text


def test_default_registry_has_process_metrics(seed: StoreBuilder) -> None:
    with TestClient(create_app(seed.dsn, open_access=True)) as c:
        text = c.get("/metrics").text
    assert "process_cpu_seconds_total" in text and "cdc_http_requests_total" in text


def test_healthz_follows_the_heartbeat(seed: StoreBuilder) -> None:
    state: dict[str, Any] = {"ok": True, "heartbeat_age_seconds": 0.5}

    def health() -> dict[str, Any]:
        return dict(state)

    ready = {"value": False}
    app = create_app(seed.dsn, token=TOKEN, health=health, ready=lambda: ready["value"])
    with TestClient(app) as c:
        fresh = c.get("/healthz")
        assert fresh.status_code == 200
        assert fresh.json() == {"ok": True, "heartbeat_age_seconds": 0.5, "status": "ok"}
        state.update(ok=False, heartbeat_age_seconds=120.0)
        stale = c.get("/healthz")
        assert stale.status_code == 503 and stale.json()["status"] == "unavailable"
        assert stale.json()["heartbeat_age_seconds"] == 120.0
        assert c.get("/readyz").status_code == 503
        ready["value"] = True
        assert c.get("/readyz").json() == {"status": "ok", "ok": True}


def test_probes_in_the_daemons_shape(seed: StoreBuilder) -> None:
    """``Daemon.health``/``Daemon.ready`` return ``(ok, detail)``: they can be passed as they are."""
    beat = {"age": 0.2}

    def health() -> tuple[bool, dict[str, Any]]:
        return beat["age"] <= 30, {"heartbeat_age_seconds": beat["age"], "standby": False}

    def ready() -> tuple[bool, dict[str, Any]]:
        ok, detail = health()
        return ok, {**detail, "streaming": True, "acked_lsn": "0/16B3748"}

    with TestClient(create_app(seed.dsn, token=TOKEN, health=health, ready=ready)) as c:
        assert c.get("/healthz").json() == {
            "heartbeat_age_seconds": 0.2, "standby": False, "status": "ok", "ok": True,
        }  # fmt: skip
        assert c.get("/readyz").json()["acked_lsn"] == "0/16B3748"
        beat["age"] = 95.0
        stale = c.get("/healthz")
        assert stale.status_code == 503 and stale.json()["heartbeat_age_seconds"] == 95.0
        assert c.get("/readyz").status_code == 503


def test_healthz_when_health_raises(seed: StoreBuilder) -> None:
    def health() -> dict[str, Any]:
        raise RuntimeError("loop gone")

    with TestClient(create_app(seed.dsn, open_access=True, health=health)) as c:
        response = c.get("/healthz")
    assert response.status_code == 503 and response.json() == {"status": "unavailable", "ok": False}


def test_healthz_without_daemon_asks_the_store(seed: StoreBuilder) -> None:
    with TestClient(create_app(seed.dsn, open_access=True)) as c:
        assert c.get("/healthz").json() == {"status": "ok", "ok": True, "store": "reachable"}
        assert c.get("/readyz").status_code == 200


# ============================================================================ the OpenAPI document


def test_openapi_describes_every_endpoint(client: TestClient) -> None:
    spec = get(client, "/openapi.json")
    assert spec["openapi"].startswith("3.1")
    assert set(spec["paths"]) == {
        "/api/v1/tables",
        "/api/v1/versions",
        "/api/v1/tables/{table}/rows",
        "/api/v1/tables/{table}/rows/{key}",
        "/api/v1/tables/{table}/rows/{key}/history",
        "/api/v1/tables/{table}/rows/{key}/blame",
        "/api/v1/mutations",
        "/api/v1/requests/{request_id}",
        "/api/v1/requests/{request_id}/revert",
        "/api/v1/tables/{table}/rows/{key}/restore",
        "/api/v1/tables/{table}/search",
        "/healthz",
        "/readyz",
        "/metrics",
    }
    assert spec["security"] == [{"bearerAuth": []}]
    assert spec["paths"]["/healthz"]["get"]["security"] == []
    log = spec["paths"]["/api/v1/mutations"]["get"]
    assert {p["name"] for p in log["parameters"]} == {
        "table", "key", "request", "actor", "since", "until", "status", "op", "cursor", "limit",
    }  # fmt: skip
    mutation = spec["components"]["schemas"]["Mutation"]
    assert set(mutation["required"]) == MUTATION_FIELDS
    for path, item in spec["paths"].items():
        responses = item["get"]["responses"]
        assert "200" in responses, path
        if path.startswith("/api/"):
            assert {"400", "401", "503"} <= set(responses), path
    assert openapi_document(secured=True) == spec


# ============================================================================ cdc serve


def run_serve(*args: str, env: dict[str, str | None] | None = None) -> Any:
    base: dict[str, str | None] = {"CDC_CONFIG": None, "CDC_STORE_DSN": None, "CDC_SERVER__TOKEN": None}
    base.update(env or {})
    return CliRunner().invoke(serve, list(args), env=base, catch_exceptions=False)


def one_line_error(result: Any, code: int, *needles: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.output)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_serve_refuses_without_token_or_open(seed: StoreBuilder) -> None:
    one_line_error(run_serve("--store", seed.dsn), 2, "server.token", "--open")


def test_serve_refuses_without_store() -> None:
    one_line_error(run_serve("--token", TOKEN), 2, "store.dsn")


def test_serve_refuses_a_bad_listen_address(seed: StoreBuilder) -> None:
    one_line_error(run_serve("--store", seed.dsn, "--open", "--listen", "nowhere"), 2, "listen")


def test_serve_reports_a_busy_port(seed: StoreBuilder) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_serve("--store", seed.dsn, "--open", "--listen", f"127.0.0.1:{port}")
    one_line_error(result, 9, f"cannot listen on 127.0.0.1:{port}")


def test_serve_runs_uvicorn_and_stops_on_sigterm(seed: StoreBuilder, unused_port: int) -> None:
    env = {**os.environ, "CDC_STORE_DSN": seed.dsn, "CDC_SERVER__TOKEN": TOKEN, "TZ": "UTC"}
    env.pop("CDC_CONFIG", None)
    env.pop("CDC_SOURCE_DSN", None)
    code = "import sys; from cdc.web.serve import serve; sys.exit(serve())"
    listen = f"127.0.0.1:{unused_port}"
    process = subprocess.Popen(  # --source: the undo previews read it (the seed's database here)
        [sys.executable, "-c", code, "--listen", listen, "--source", seed.dsn],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base = f"http://{listen}"
        wait_until(lambda: _answers(f"{base}/healthz"), timeout=20)
        assert httpx.get(f"{base}/api/v1/tables").status_code == 401
        tables = httpx.get(f"{base}/api/v1/tables", headers=AUTH)
        assert tables.status_code == 200 and len(tables.json()["tables"]) == 4
        page = httpx.get(f"{base}/", headers=AUTH)
        assert page.status_code == 200 and "server" not in page.headers
        revert = httpx.get(f"{base}/api/v1/requests/{REQ_PLAN}/revert", headers=AUTH)
        assert revert.status_code == 200 and revert.json()["command"] == f"cdc revert {REQ_PLAN}"
        assert httpx.get(f"{base}/docs/api").status_code == 200  # the API reference needs no token
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=20)
    assert process.returncode == 0, (out, err)
    assert "Traceback" not in err and TOKEN not in out + err


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.1)
