"""The pages of `cdc serve` (mutation log, row timeline, request) against a real store."""

from __future__ import annotations

import html
import re
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from starlette.testclient import TestClient

from cdc.devdb import LocalPostgres
from cdc.lsn import format_lsn
from cdc.web import create_app
from tests.integration.test_api import AUTH, REQ_BULK, REQ_EDIT, TOKEN, XSS, build_web_seed
from tests.store_builder import REQ_FAILED, REQ_INSERT, REQ_NAME, REQ_ORDER, REQ_PLAN, StoreBuilder


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


def page(client: TestClient, url: str, status: int = 200) -> str:
    response = client.get(url, headers={"Accept": "text/html"})
    assert response.status_code == status, (url, response.status_code, response.text[:2000])
    assert response.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in response.headers["content-security-policy"]
    assert "Traceback" not in response.text
    return response.text


def text_of(document: str) -> str:
    """The visible text: tags dropped, entities decoded, whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", document)).split())


def links(document: str) -> list[str]:
    return [html.unescape(h) for h in re.findall(r'href="([^"]*)"', document)]


# ============================================================================ the mutation log


def test_log_page_lists_mutations_newest_first(client: TestClient) -> None:
    document = page(client, "/")
    text = text_of(document)
    assert "Mutations" in text and "All times are UTC" in text
    order = [text.index(s) for s in ("2026-03-11T10:00:00Z", "2026-03-10T14:22:30Z", "2026-03-09T09:00:00Z")]
    assert order == sorted(order)
    assert "plan: pro → null" in text and "plan: free → pro" in text and "(rolled back)" in text
    assert "email=a@b.com, plan=free" in text
    hrefs = links(document)
    for request_id in (REQ_FAILED, REQ_PLAN, REQ_INSERT, REQ_ORDER):
        assert f"/requests/{request_id}" in hrefs
    assert "/tables/users/rows/42" in hrefs
    assert "/tables/orders/rows/x%2Fy" in hrefs  # a slash in a key stays in its segment
    assert "/tables/items/rows/" + quote('{"order_id":"81b2","n":1}', safe="") in hrefs
    assert "/tables/events/rows/" + quote('{"kind":"ping","payload":"a"}', safe="") in hrefs
    assert 'name="table"' in document and '<option value="users">' in document


def test_log_page_escapes_values_and_actors(client: TestClient) -> None:
    document = page(client, "/")
    assert "<script>" not in document and "<b>mallory</b>" not in document
    assert html.escape(XSS, quote=False) in document or "&lt;script&gt;" in document
    assert "&lt;b&gt;mallory&lt;/b&gt;" in document


def test_log_page_filters(client: TestClient) -> None:
    users = text_of(page(client, "/?table=users&key=42"))
    assert "id=42" in users and "id=81b2" not in users and "id=100" not in users
    rolled_back = text_of(page(client, "/?status=rolled_back"))
    assert rolled_back.count("(rolled back)") >= 2 and "committed" not in rolled_back.split("Status", 2)[-1]
    deletes = text_of(page(client, "/?op=DELETE"))
    assert "id=104" in deletes and "id=42" not in deletes
    by_request = page(client, "/?request=550e8400")
    assert f"/requests/{REQ_FAILED}" in links(by_request) and f"/requests/{REQ_PLAN}" not in links(by_request)
    actor = text_of(page(client, "/?actor=importer"))
    assert "id=100" in actor and "id=42" not in actor
    window = text_of(page(client, "/?since=2026-03-10T14:00&until=2026-03-10T14:22"))
    assert "name: null → Alice Smith" in window and "plan: free → pro" not in window
    empty = text_of(page(client, "/?table=users&actor=nobody"))
    assert "No mutations match these filters" in empty
    # every empty field of the form is ignored
    assert "id=81b2" in text_of(page(client, "/?table=&key=&request=&actor=&since=&until=&status=&op="))
    # the form keeps what was asked
    assert 'value="users"' in page(client, "/?table=users")


def test_log_page_shows_bad_filters_in_the_form(client: TestClient) -> None:
    document = page(client, "/?key=42", 400)
    assert "a key filter needs a table" in text_of(document) and 'name="table"' in document
    assert "no history for table" in text_of(page(client, "/?table=nope", 404))
    ambiguous = page(client, "/?request=abc0000", 400)
    assert "ambiguous" in text_of(ambiguous)
    for rid in (REQ_BULK, REQ_EDIT):  # every id the prefix matches, each a link to its request
        assert f'href="/requests/{rid}"' in ambiguous
    assert "since" in text_of(page(client, "/?since=whenever", 400))
    bad = page(client, "/?actor=%3Cscript%3Ealert(2)%3C/script%3E&since=%3Cscript%3E", 400)
    assert "<script>" not in bad


def test_log_page_pagination(client: TestClient) -> None:
    first = page(client, "/?limit=5")
    older = [h for h in links(first) if "cursor=" in h]
    assert len(older) == 1 and "limit=5" in older[0]
    second = page(client, older[0])
    assert "« Newest" in text_of(second)
    first_times = re.findall(r'<time datetime="([^"]+)"', first)
    second_times = re.findall(r'<time datetime="([^"]+)"', second)
    assert len(first_times) == 5 and second_times and max(second_times) <= min(first_times)
    # filters travel with the cursor
    filtered = page(client, "/?table=users&limit=2")
    next_link = next(h for h in links(filtered) if "cursor=" in h)
    assert "table=users" in next_link
    assert "orders" not in text_of(page(client, next_link)).split("Status", 1)[-1]


# ============================================================================ a row


def test_row_page_is_the_seed_timeline(client: TestClient) -> None:
    document = page(client, "/tables/users/rows/42")
    text = text_of(document)
    assert "users id=42" in text and "4 mutations" in text
    lines = ["email=a@b.com, plan=free", "name: null → Alice Smith", "plan: free → pro", "plan: pro → null"]
    positions = [text.index(line) for line in lines]
    assert positions == sorted(positions)  # oldest first
    timeline = text.split("Timeline", 1)[1]
    assert timeline.count("(rolled back)") == 1
    assert timeline.index("(rolled back)") > timeline.index("plan: pro → null")
    hrefs = links(document)
    for request_id in (REQ_INSERT, REQ_NAME, REQ_PLAN, REQ_FAILED):
        assert f"/requests/{request_id}" in hrefs
    # before/after diffs, the changed column highlighted
    assert re.search(r'<tr class="changed"><td class="col">plan</td>.*?free.*?pro', document, re.S)
    assert re.search(r'<tr class="added"><td class="col">email</td>', document)
    assert "3 unchanged columns" in text


def test_row_page_blame(client: TestClient) -> None:
    text = text_of(page(client, "/tables/users/rows/42"))
    blame = text.split("Blame", 1)[1].split("Timeline", 1)[0]
    assert "email a@b.com req:1a2b3c4d 2026-03-10T12:00:00Z" in blame
    assert "name Alice Smith req:a3c91ef0 2026-03-10T14:21:00Z" in blame
    assert "plan pro req:4f9a3b2c 2026-03-10T14:22:00Z UPDATE ✗ rolled back req:550e8400" in blame


def test_row_page_keys_and_values(client: TestClient) -> None:
    slash = text_of(page(client, "/tables/orders/rows/x%2Fy"))
    assert "orders id=x/y" in slash and "status=new, total=1.00" in slash
    composite = page(client, "/tables/items/rows/" + quote('{"order_id":"81b2","n":1}', safe=""))
    assert "qty: 2 → 3" in text_of(composite)
    keyless = text_of(page(client, "/tables/events/rows/" + quote('{"kind":"ping","payload":"a"}', safe="")))
    assert "2 mutations" in keyless
    xss = page(client, "/tables/users/rows/101")
    assert "<script>" not in xss and "&lt;script&gt;alert(1)&lt;/script&gt;" in xss
    deleted = text_of(page(client, "/tables/users/rows/104"))
    assert "does not exist now" in deleted and "DELETE" in deleted


def test_row_page_at_a_version(client: TestClient, seed: StoreBuilder) -> None:
    at = text_of(page(client, f"/tables/users/rows/42?version={format_lsn(seed.positions[1])}"))
    assert f"The row at version {format_lsn(seed.positions[1])}" in at and "plan free" in at
    absent = text_of(page(client, f"/tables/users/rows/42?version={seed.positions[0]}"))
    assert "The row was absent at version" in absent
    early = text_of(page(client, "/tables/users/rows/42?at=2001-01-01"))
    assert "no stored version at or before that time" in early
    below = text_of(page(client, "/tables/users/rows/42?version=5"))
    assert "below the history floor" in below
    assert "ahead" in text_of(page(client, f"/tables/users/rows/42?version={seed.position + 1}", 409))


def test_row_page_errors(client: TestClient) -> None:
    assert "no history for public.users id=43" in text_of(page(client, "/tables/users/rows/43", 404))
    assert "no history for table public.nope" in text_of(page(client, "/tables/nope/rows/1", 404))
    assert "invalid key value" in text_of(page(client, "/tables/users/rows/abc", 400))
    assert "no such page" in text_of(page(client, "/tables/users", 404))
    page(client, "/tables/users/rows/" + "9" * 5000, 400)
    page(client, "/nothing/here", 404)


# ============================================================================ a request


def test_request_page(client: TestClient) -> None:
    document = page(client, "/requests/550e8400")
    text = text_of(document)
    assert f"Request {REQ_FAILED}" in text
    assert "Outcome rolled back" in text
    assert "Root cause TimeoutError: Stripe API timeout after 10s" in text
    assert "Location payments/create.ts:42" in text
    assert "client address 10.0.0.5" in text and "route /pay" in text and "Actor alice@example.com" in text
    changes = text.split("Data changes", 1)[1]
    assert "users id=42 UPDATE plan: pro → null (rolled back)" in changes
    assert "orders id=81b2 UPDATE status: pending → null (rolled back)" in changes
    hrefs = links(document)
    assert "/tables/users/rows/42" in hrefs and "/tables/orders/rows/81b2" in hrefs


def test_request_page_committed_and_errors(client: TestClient) -> None:
    text = text_of(page(client, f"/requests/{REQ_EDIT}"))
    assert "Outcome committed" in text and "Root cause" not in text and "<b>mallory</b>" in text
    assert "DELETE" in text and "qty: 2 → 3" in text
    assert "9" in text_of(page(client, f"/requests/{REQ_BULK[:8]}")).split("Data changes", 1)[1]
    ambiguous = page(client, "/requests/abc0000", 400)
    assert "ambiguous" in text_of(ambiguous)
    for rid in (REQ_BULK, REQ_EDIT):
        assert f'href="/requests/{rid}"' in ambiguous and rid in text_of(ambiguous)
    assert f"<title>Request {REQ_EDIT} · cdc</title>" in page(client, f"/requests/{REQ_EDIT}")
    assert "no request" in text_of(page(client, "/requests/ffffffff", 404))


# ============================================================================ login


def test_pages_need_the_token_or_the_cookie(seed: StoreBuilder) -> None:
    with TestClient(create_app(seed.dsn, token=TOKEN)) as c:
        login = c.get("/tables/users/rows/42", headers={"Accept": "text/html"})
        assert login.status_code == 401 and 'type="password"' in login.text
        assert 'name="next" value="/tables/users/rows/42"' in login.text
        assert c.get("/", headers=AUTH).status_code == 200  # the Bearer header works for pages too

        refused = c.get("/login?token=wrong", follow_redirects=False)
        assert refused.status_code == 401 and "invalid token" in refused.text
        assert "cdc_token" not in refused.headers.get("set-cookie", "")

        ok = c.get(f"/login?token={TOKEN}&next=/requests/550e8400", follow_redirects=False)
        assert ok.status_code == 303 and ok.headers["location"] == "/requests/550e8400"
        cookie = ok.headers["set-cookie"]
        assert (
            "cdc_token=" in cookie
            and "HttpOnly" in cookie
            and "SameSite=strict" in cookie.replace("Strict", "strict")
        )
        assert TOKEN not in cookie  # the cookie is derived from the token, not the token
        assert c.get("/tables/users/rows/42").status_code == 200

        c.get("/logout", follow_redirects=False)
        c.cookies.clear()
        assert c.get("/").status_code == 401


def test_login_form_post_and_safe_redirects(seed: StoreBuilder) -> None:
    with TestClient(create_app(seed.dsn, token=TOKEN)) as c:
        posted = c.post("/login", data={"token": TOKEN, "next": "/?table=users"}, follow_redirects=False)
        assert posted.status_code == 303 and posted.headers["location"] == "/?table=users"
        for target in ("https://evil.example/", "//evil.example/", "/\\evil.example", "javascript:alert(1)"):
            response = c.get(f"/login?token={TOKEN}&next={quote(target, safe='')}", follow_redirects=False)
            assert response.headers["location"] == "/", target
        wrong = c.post("/login", data={"token": "nope"}, follow_redirects=False)
        assert wrong.status_code == 401
        forged = TestClient(create_app(seed.dsn, token=TOKEN), cookies={"cdc_token": TOKEN})
        assert forged.get("/").status_code == 401


def test_open_access_pages(seed: StoreBuilder) -> None:
    with TestClient(create_app(seed.dsn, open_access=True)) as c:
        assert c.get("/").status_code == 200
        assert "Log out" not in c.get("/").text
        assert c.get("/login", follow_redirects=False).status_code == 303


def test_static_css_is_local(client: TestClient) -> None:
    css = client.get("/static/style.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    for document in (css.text, page(client, "/"), page(client, "/tables/users/rows/42")):
        assert "http://" not in document and "https://" not in document and "<script" not in document
