"""Search by a column's value: the query layer (Store.search_values), the API
(GET /api/v1/tables/{table}/search) and the /search page, against the web seed in a real store.
Redacted columns (hash, mask, exclude) are searched in test_web_undo.py, against real capture."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from cdc.devdb import LocalPostgres
from cdc.errors import NotFoundError, UsageError
from cdc.query import Store
from cdc.web import create_app
from tests.integration.test_api import AUTH, REQ_BULK, REQ_EDIT, TOKEN, XSS, build_web_seed, error, get
from tests.integration.test_pages import links, page, text_of
from tests.store_builder import REQ_FAILED, REQ_INSERT, REQ_NAME, REQ_PLAN, StoreBuilder


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
    with TestClient(create_app(seed.dsn, token=TOKEN), headers=AUTH) as c:
        yield c


def keys(body: dict[str, Any]) -> list[tuple[str, Any, str | None]]:
    return [(m["op"], m["key"], m["request_id"]) for m in body["mutations"]]


# ============================================================================ the query layer


def test_search_finds_the_writes_that_left_the_value(seed: StoreBuilder) -> None:
    with Store(seed.dsn) as store:
        found = store.search_values("users", "plan", "pro")
        # the UPDATE that set it, and the rolled-back attempt's image does not have it (plan: null)
        assert [(m.op, m.key, m.request_id) for m in found.mutations] == [("UPDATE", {"id": 42}, REQ_PLAN)]
        assert found.complete and found.next_cursor is None and found.policy is None
        assert found.scanned == 10  # the INSERTs and UPDATEs of users (not its DELETE)
        # every write whose row after it had the value, newest first, the unchanged column too
        email = store.search_values("users", "email", "a@b.com")
        assert [m.request_id for m in email.mutations] == [REQ_FAILED, REQ_PLAN, REQ_NAME, REQ_INSERT]
        assert email.mutations[0].rolled_back
        assert [m.request_id for m in store.search_values("users", "email", "a@b.com", status="committed").mutations] == [
            REQ_PLAN, REQ_NAME, REQ_INSERT,
        ]  # fmt: skip
        assert [m.op for m in store.search_values("users", "email", "a@b.com", op="INSERT").mutations] == [
            "INSERT"
        ]


def test_search_compares_values_as_text(seed: StoreBuilder) -> None:
    with Store(seed.dsn) as store:
        # an integer column: its digits (a JSON number in the image); a key column too
        assert [m.key for m in store.search_values("items", "qty", "3").mutations] == [
            {"order_id": "81b2", "n": 1}
        ]
        assert len(store.search_values("users", "id", "0042").mutations) == 4  # read as the integer 42
        with pytest.raises(UsageError, match=r"invalid value for public\.users\.id"):
            store.search_values("users", "id", "forty-two")
        # text is compared exactly, escapes included: HTML, quotes, a slash in a key
        assert [m.request_id for m in store.search_values("users", "name", XSS).mutations] == [REQ_EDIT]
        assert [m.key for m in store.search_values("orders", "id", "x/y").mutations] == [{"id": "x/y"}]
        assert (
            store.search_values("orders", "total", "12.5").mutations == []
        )  # numeric: as the server prints it
        assert len(store.search_values("orders", "total", "12.50").mutations) == 2  # its INSERT, the attempt
        # a keyless table
        assert len(store.search_values("events", "payload", "a").mutations) == 2


def test_search_is_bounded_and_says_so(seed: StoreBuilder) -> None:
    with Store(seed.dsn) as store:
        everything = [m.cursor for m in store.search_values("users", "plan", "free").mutations]
        assert len(everything) == 8
        # at most `scan` changes per call: the result says where it stopped, the cursor goes on
        seen: list[tuple[int, int]] = []
        cursor = None
        calls = 0
        while True:
            found = store.search_values("users", "plan", "free", scan_limit=3, before=cursor)
            calls += 1
            assert found.scanned <= 3 and found.scan_limit == 3
            seen.extend(m.cursor for m in found.mutations)
            if found.complete:
                assert found.next_cursor is None
                break
            assert found.next_cursor is not None and found.searched_to is not None
            cursor = found.next_cursor
        assert seen == everything and calls == 4  # 10 changes examined, 3 at a time
        # a page of matches stops the scan at its last match
        first = store.search_values("users", "plan", "free", limit=2)
        assert [m.cursor for m in first.mutations] == everything[:2]
        assert not first.complete and first.next_cursor == everything[1] and first.scanned == 2
        rest = store.search_values("users", "plan", "free", before=first.next_cursor)
        assert [m.cursor for m in rest.mutations] == everything[2:] and rest.complete
        # a time window: only its changes are examined
        window = store.search_values("users", "plan", "free", since=seed_time("2026-03-10T14:00"),
                                     until=seed_time("2026-03-11T00:00"))  # fmt: skip
        assert [m.request_id for m in window.mutations] == [REQ_NAME] and window.scanned == 3


def seed_time(text: str) -> Any:
    from datetime import UTC, datetime

    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_search_refuses_what_it_cannot_do(seed: StoreBuilder) -> None:
    with Store(seed.dsn) as store:
        with pytest.raises(NotFoundError, match="no column 'nope'"):
            store.search_values("users", "nope", "1")
        with pytest.raises(NotFoundError, match=r"no history for table public\.nope"):
            store.search_values("nope", "id", "1")
        with pytest.raises(UsageError, match="INSERT, UPDATE, SNAPSHOT"):
            store.search_values("users", "plan", "free", op="DELETE")
        with pytest.raises(UsageError, match="scan limit"):
            store.search_values("users", "plan", "free", scan_limit=50_001)


# ============================================================================ the API


def test_api_search(client: TestClient) -> None:
    body = get(client, "/api/v1/tables/users/search?column=plan&value=pro")
    assert body["table"] == "public.users" and body["column"] == "plan" and body["policy"] is None
    assert keys(body) == [("UPDATE", {"id": 42}, REQ_PLAN)]
    assert body["complete"] is True and body["next"] is None and body["scanned"] == 10
    assert body["scan_limit"] == 50_000 and body["searched_to"] == "2026-03-10T12:00:00+00:00"
    assert body["mutations"][0]["after"]["plan"] == "pro" and body["mutations"][0]["before"]["plan"] == "free"
    # pages of matches, and a bounded scan, both continue with `next`
    first = get(client, "/api/v1/tables/users/search?column=plan&value=free&limit=3")
    assert len(first["mutations"]) == 3 and first["complete"] is False and first["next"]
    second = get(client, f"/api/v1/tables/users/search?column=plan&value=free&cursor={first['next']}")
    assert len(second["mutations"]) == 5 and second["complete"] is True
    bounded = get(client, "/api/v1/tables/users/search?column=plan&value=free&scan=1")
    assert bounded["scanned"] == 1 and bounded["complete"] is False and bounded["next"]
    windowed = get(
        client,
        "/api/v1/tables/users/search?column=email&value=a@b.com&since=2026-03-10T14:21&until=2026-03-10T14:22",
    )
    assert keys(windowed) == [("UPDATE", {"id": 42}, REQ_NAME)]
    rolled_back = get(client, "/api/v1/tables/users/search?column=email&value=a@b.com&status=rolled_back")
    assert keys(rolled_back) == [("UPDATE", {"id": 42}, REQ_FAILED)]
    composite = get(client, "/api/v1/tables/items/search?column=order_id&value=81b2&op=UPDATE")
    assert keys(composite) == [("UPDATE", {"order_id": "81b2", "n": 1}, REQ_EDIT)]
    assert keys(get(client, "/api/v1/tables/%22public%22.users/search?column=id&value=104")) == [
        ("INSERT", {"id": 104}, REQ_BULK)
    ]


def test_api_search_errors(client: TestClient, seed: StoreBuilder) -> None:
    error(client, "/api/v1/tables/users/search?value=1", 400, "bad_request", "column")
    error(client, "/api/v1/tables/users/search?column=plan", 400, "bad_request", "value")
    error(client, "/api/v1/tables/users/search?column=plan&value=x&colour=red", 400, "bad_request", "colour")
    error(client, "/api/v1/tables/users/search?column=plan&value=x&op=DELETE", 400, "bad_request", "op")
    error(
        client,
        "/api/v1/tables/users/search?column=plan&value=x&scan=50001",
        400,
        "bad_request",
        "invalid scan",
    )
    error(
        client, "/api/v1/tables/users/search?column=plan&value=x&since=whenever", 400, "bad_request", "since"
    )
    error(client, "/api/v1/tables/users/search?column=id&value=x", 400, "bad_request", "invalid value")
    error(client, "/api/v1/tables/users/search?column=nope&value=x", 404, "not_found", "no column")
    error(client, "/api/v1/tables/nope/search?column=id&value=1", 404, "not_found", "no history for table")
    error(client, "/api/v1/tables/users/search?column=plan&value=" + "x" * 5000, 400, "bad_request", "longer")
    with TestClient(create_app(seed.dsn, token=TOKEN)) as anonymous:
        assert anonymous.get("/api/v1/tables/users/search?column=plan&value=pro").status_code == 401


# ============================================================================ the page


def test_search_page(client: TestClient) -> None:
    empty = page(client, "/search")
    assert 'name="column"' in empty and 'name="value"' in empty and '<option value="users">' in empty
    assert "Searched" not in text_of(empty)
    document = page(client, "/search?table=users&column=email&value=a%40b.com")
    text = text_of(document)
    assert "Searched every change of users: 10 examined, back to 2026-03-10T12:00:00Z" in text
    assert text.count("id=42") == 4 and "(rolled back)" in text and "plan: free → pro" in text
    hrefs = links(document)
    for request_id in (REQ_FAILED, REQ_PLAN, REQ_NAME, REQ_INSERT):
        assert f"/requests/{request_id}" in hrefs
    assert "/tables/users/rows/42" in hrefs
    assert 'value="a@b.com"' in document  # the form keeps what was asked


def test_search_page_goes_further_back(client: TestClient) -> None:
    first = page(client, "/search?table=users&column=plan&value=free&limit=3")
    assert "the search stopped there" in text_of(first)
    further = [h for h in links(first) if "cursor=" in h]
    assert len(further) == 1 and "column=plan" in further[0] and "limit=3" in further[0]
    second = page(client, further[0])
    assert "« Newest" in text_of(second)
    assert text_of(second).count("free") >= 3


def test_search_page_errors_and_escaping(client: TestClient) -> None:
    assert "no column 'nope'" in text_of(page(client, "/search?table=users&column=nope&value=1", 404))
    assert "give the table" in text_of(page(client, "/search?column=plan&value=1", 400))
    xss = page(client, "/search?table=users&column=name&value=" + "%3Cscript%3Ealert(1)%3C%2Fscript%3E")
    assert "<script>" not in xss and "&lt;script&gt;alert(1)&lt;/script&gt;" in xss
    assert "name: null → <script>alert(1)</script>" in text_of(xss)
    assert "No change matches" in text_of(page(client, "/search?table=users&column=plan&value=gold"))


# ============================================================================ the API reference page


def test_api_reference_page_is_the_openapi_document(client: TestClient, seed: StoreBuilder) -> None:
    document = client.get("/openapi.json").json()
    with TestClient(create_app(seed.dsn, token=TOKEN)) as anonymous:  # no token needed, like the document
        response = anonymous.get("/docs/api", headers={"Accept": "text/html"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in response.headers["content-security-policy"]
    html_text = response.text
    text = text_of(html_text)
    for path, item in document["paths"].items():
        operation = item["get"]
        assert f'id="{operation["operationId"]}"' in html_text, path
        assert path in text and operation["summary"] in text, path
        for param in operation["parameters"]:
            assert param["name"] in text, (path, param["name"])
    for name in document["components"]["schemas"]:
        assert f'id="schema-{name}"' in html_text and f'href="#schema-{name}"' in html_text, name
    assert html_text.count('<span class="badge">no token</span>') == 3  # /healthz, /readyz, /metrics
    assert "Authorization: Bearer <token>" in text
    assert "<code>cursor</code>" in html_text  # the document's `inline code`, rendered
    assert "http://" not in html_text and "https://" not in html_text and "<script" not in html_text
    assert 'href="/docs/api"' in page(client, "/")  # the header links to it
