"""The undo previews of `cdc serve` (revert on the request page, restore from a row's timeline, and
their API) and search by value of redacted columns, against real capture: a source with hashed,
masked and excluded columns, the daemon, `cdc serve`'s app with and without a source."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest
from starlette.testclient import TestClient

from cdc import client as cdc_client
from cdc.devdb import LocalPostgres
from cdc.lsn import format_lsn
from cdc.query import Store
from cdc.undo import plan_revert, script_text
from cdc.web import create_app
from tests.capture_env import CaptureEnv, new_env
from tests.integration.test_pages import links, page, text_of

HASH_KEY = "web-undo-test-hash-key-0123456789"
SCHEMA = """
CREATE TABLE accounts (id int PRIMARY KEY, email text, ssn text, secret text, plan text, n int NOT NULL DEFAULT 0);
INSERT INTO accounts VALUES (1, 'alice@example.net', '111-22-3333', 'hunter1', 'free', 0),
                            (2, 'bob@example.net', '222-33-4444', 'hunter2', 'free', 0);
"""
#: Clear values of redacted columns: none may ever reach a page or an answer (the store holds
#: digests, **** and nulls; the source holds these).
CLEAR = ("alice@example.net", "bob@example.net", "bobby@example.net", "carol@example.net", "111-22-3333",
         "222-33-4444", "333-44-5555", "hunter1", "hunter2", "hunter3")  # fmt: skip


@dataclass
class UndoEnv:
    capture: CaptureEnv
    v0: int  # before any request

    def app(self, *, source: bool = True, hash_key: bool = True) -> Any:
        config = self.capture.config
        return create_app(
            self.capture.store_dsn,
            schema=self.capture.schema,
            open_access=True,
            source_dsn=self.capture.source_dsn if source else None,
            policies=config.columns,
            hash_key=config.policies.hash_key_bytes() if hash_key else None,
        )

    def store(self) -> Store:
        return Store(self.capture.store_dsn, schema=self.capture.schema)

    def source_rows(self) -> list[tuple[Any, ...]]:
        with self.capture.source() as conn:
            return conn.execute("SELECT * FROM accounts ORDER BY id").fetchall()


def build_undo_env(pg: LocalPostgres) -> Iterator[UndoEnv]:
    """Capture of `accounts` (email hashed, ssn masked, secret excluded) and five requests."""
    capture = new_env(pg)
    capture.extra_env.update(
        {
            "CDC_COLUMNS__PUBLIC.ACCOUNTS__EMAIL": "hash",
            "CDC_COLUMNS__PUBLIC.ACCOUNTS__SSN": "mask",
            "CDC_COLUMNS__PUBLIC.ACCOUNTS__SECRET": "exclude",
            "CDC_POLICIES__HASH_KEY": HASH_KEY,
        }
    )
    try:
        with capture.source() as conn:
            conn.execute(SCHEMA)
        capture.setup()
        capture.start()
        v0 = capture.wait_caught_up()
        with capture.source() as conn:
            with cdc_client.request(conn, "r-clean", actor="ops"):
                conn.execute("UPDATE accounts SET plan = 'pro' WHERE id = 2")
            with cdc_client.request(conn, "r-plan", actor="billing"):
                conn.execute("UPDATE accounts SET plan = 'pro', n = 1 WHERE id = 1")
            with cdc_client.request(conn, "r-later", actor="support"):
                conn.execute("UPDATE accounts SET plan = 'gold' WHERE id = 1")
            with cdc_client.request(conn, "r-email", actor="alice"):
                conn.execute("UPDATE accounts SET email = 'bobby@example.net', n = 5 WHERE id = 2")
            with cdc_client.request(conn, "r-insert", actor="signup"):
                conn.execute(
                    "INSERT INTO accounts VALUES (3, 'carol@example.net', '333-44-5555', 'hunter3', 'free', 0)"
                )
        capture.wait_caught_up()
        capture.stop()
        yield UndoEnv(capture, v0)
    finally:
        capture.teardown()


@pytest.fixture(scope="module")
def undo_env(pg: LocalPostgres) -> Iterator[UndoEnv]:
    yield from build_undo_env(pg)


@pytest.fixture(scope="module")
def api(undo_env: UndoEnv) -> Iterator[TestClient]:
    with TestClient(undo_env.app()) as c:
        yield c


def no_clear_values(text: str) -> None:
    for value in CLEAR:
        assert value not in text, value


def preview(c: TestClient, url: str, status: int = 200) -> dict[str, Any]:
    response = c.get(url)
    assert response.status_code == status, (url, response.status_code, response.text)
    no_clear_values(response.text)
    assert "hmac-sha256:" not in response.text and "****" not in response.text  # no placeholder either
    body: dict[str, Any] = response.json()
    return body


# ============================================================================ revert


def test_revert_preview_is_the_plan_cdc_revert_prints(undo_env: UndoEnv, api: TestClient) -> None:
    before = undo_env.source_rows()
    body = preview(api, "/api/v1/requests/r-clean/revert")
    with undo_env.store() as store, undo_env.capture.source() as source:
        plan = plan_revert(store, source, "r-clean")
    header = [f"revert of request r-clean: {len(plan.statements)} statement(s), newest change first"]
    assert body["sql"] == script_text(plan, header=header)
    assert "UPDATE" in body["sql"] and "'free'::text" in body["sql"] and body["statements"] == 1
    assert body["kind"] == "revert" and body["target"] == "r-clean"
    assert body["conflicts"] == [] and body["refusal"] is None and body["keep_redacted"] is False
    assert body["command"] == "cdc revert r-clean" and body["apply_command"] == "cdc revert r-clean --apply"
    assert undo_env.source_rows() == before  # a preview never writes


def test_revert_preview_lists_conflicts(api: TestClient) -> None:
    body = preview(api, "/api/v1/requests/r-pla/revert")  # a unique prefix
    assert body["target"] == "r-plan"
    conflicts = {(c["column"], c["request_id"]) for c in body["conflicts"]}
    assert ("plan", "r-later") in conflicts
    assert body["sql"] is not None and body["apply_command"] == "cdc revert r-plan --apply --force"
    page_text = text_of(page(api, "/requests/r-plan"))
    assert "Revert preview" in page_text and "conflict" in page_text
    assert "cdc revert r-plan --apply --force" in page_text
    assert "/requests/r-later" in links(page(api, "/requests/r-plan"))


def test_revert_preview_never_writes_a_placeholder(api: TestClient) -> None:
    body = preview(api, "/api/v1/requests/r-email/revert")
    assert body["refusal"] is not None and body["refusal"]["columns"] == {
        "public.accounts": {"email": "hash"}
    }
    assert "--keep-redacted" in body["refusal"]["hint"]
    # the --keep-redacted plan: every other column goes back, the redacted one stays as it is
    assert body["keep_redacted"] is True and '"n" = 0' in body["sql"] and '"email"' not in body["sql"]
    assert body["apply_command"] == "cdc revert r-email --apply --keep-redacted"
    document = page(api, "/requests/r-email")
    no_clear_values(document)
    text = text_of(document)
    assert "Refused: the revert would write redaction placeholders" in text and "--keep-redacted" in text


def test_revert_preview_of_an_insert_and_errors(api: TestClient) -> None:
    body = preview(api, "/api/v1/requests/r-insert/revert")
    assert body["sql"] is not None and "DELETE FROM" in body["sql"] and body["refusal"] is None
    assert api.get("/api/v1/requests/nope/revert").json()["error"]["code"] == "not_found"
    assert api.get("/api/v1/requests/r-insert/revert?force=1").status_code == 400
    assert api.get("/api/v1/requests/r-/revert").json()["error"]["code"] == "bad_request"  # ambiguous


# ============================================================================ restore


def test_restore_preview_diff_is_redacted(undo_env: UndoEnv, api: TestClient) -> None:
    v0 = format_lsn(undo_env.v0)
    # row 3 did not exist at v0: a DELETE, its diff every current column, the redacted ones hidden
    body = preview(api, f"/api/v1/tables/accounts/rows/3/restore?version={v0}")
    assert body["kind"] == "restore" and body["target"] == f"public.accounts id=3 @ {v0}"
    assert "DELETE FROM" in body["sql"] and body["refusal"] is None
    diff = {d["column"]: d for d in body["diff"]}
    for column, policy in (("email", "hash"), ("ssn", "mask"), ("secret", "exclude")):
        assert diff[column]["redacted"] == policy and diff[column]["current"] is None, diff[column]
    assert diff["plan"] == {"column": "plan", "current": "free", "target": None, "current_present": True,
                            "target_present": False, "redacted": None}  # fmt: skip
    assert body["command"] == f"cdc restore accounts --id 3 --version {v0}"
    # row 2: its stored email (a digest) and ssn (****) differ from the source's: they cannot be
    # written back: refused, and the --keep-redacted plan restores the rest
    body = preview(api, f"/api/v1/tables/accounts/rows/2/restore?version={undo_env.v0}")
    assert body["refusal"]["columns"] == {"public.accounts": {"email": "hash", "ssn": "mask"}}
    assert body["keep_redacted"]
    assert "\"plan\" = 'free'" in body["sql"] and '"n" = 0' in body["sql"] and '"email"' not in body["sql"]
    assert {d["column"] for d in body["diff"]} == {"plan", "n"}


def test_restore_page_from_the_timeline(undo_env: UndoEnv, api: TestClient) -> None:
    row = page(api, "/tables/accounts/rows/2")
    restores = [h for h in links(row) if "/restore?version=" in h]
    assert len(restores) == 3, restores  # the baseline SNAPSHOT and its two committed updates
    no_clear_values(row)
    document = page(api, restores[0])  # back to the baseline
    no_clear_values(document)
    text = text_of(document)
    assert "Preview only: nothing is applied from this page" in text
    assert "Refused" in text and "--keep-redacted" in text and "UPDATE" in text
    assert "plan pro free" in text and "n 5 0" in text
    assert "cdc restore accounts --id 2 --version" in text
    deleted = text_of(page(api, f"/tables/accounts/rows/3/restore?version={undo_env.v0}"))
    assert "redacted (hash)" in deleted and "redacted (mask)" in deleted and "redacted (exclude)" in deleted
    assert "DELETE FROM" in deleted


def test_restore_preview_errors(undo_env: UndoEnv, api: TestClient) -> None:
    assert api.get("/api/v1/tables/accounts/rows/2/restore").status_code == 400
    assert api.get("/api/v1/tables/accounts/rows/2/restore?version=1&at=now").status_code == 400
    assert api.get("/api/v1/tables/accounts/rows/99/restore?version=" + str(undo_env.v0)).status_code == 404
    assert api.get("/api/v1/tables/nope/rows/1/restore?version=" + str(undo_env.v0)).status_code == 404
    assert api.get("/api/v1/tables/accounts/rows/2/restore?version=1").status_code == 404  # below the floor
    ahead = api.get(f"/api/v1/tables/accounts/rows/2/restore?version={undo_env.v0 + 10**12}")
    assert ahead.status_code == 409
    assert "below the history floor" in text_of(page(api, "/tables/accounts/rows/2/restore?version=1", 404))


# ============================================================================ without a source


def test_without_a_source_the_previews_say_so(undo_env: UndoEnv) -> None:
    with TestClient(undo_env.app(source=False)) as c:
        body = c.get("/api/v1/requests/r-clean/revert").json()
        assert body["error"]["code"] == "no_source" and "--source" in body["error"]["hint"]
        assert c.get(f"/api/v1/tables/accounts/rows/2/restore?version={undo_env.v0}").status_code == 503
        text = text_of(page(c, "/requests/r-clean"))
        assert "No preview: this server has no source database configured" in text
        assert "cdc revert r-clean" in text
        restore = text_of(page(c, f"/tables/accounts/rows/2/restore?version={undo_env.v0}"))
        assert "no source database configured" in restore and "cdc restore accounts --id 2" in restore


def test_an_unreachable_source_is_an_error_on_the_page_not_a_crash(undo_env: UndoEnv) -> None:
    app = create_app(
        undo_env.capture.store_dsn, schema=undo_env.capture.schema, open_access=True,
        source_dsn="host=127.0.0.1 port=1 dbname=nope user=nobody password=sekrit connect_timeout=2",
    )  # fmt: skip
    with TestClient(app) as c:
        response = c.get("/api/v1/requests/r-clean/revert")
        assert response.status_code == 503 and response.json()["error"]["code"] == "source_unavailable"
        assert "sekrit" not in response.text
        document = page(c, "/requests/r-clean")
        assert "No preview: cannot connect to the source" in text_of(document) and "sekrit" not in document


# ============================================================================ search and redaction


def test_search_of_redacted_columns(undo_env: UndoEnv, api: TestClient) -> None:
    # hashed: searched by the keyed digest of the clear value (the key of this server's config)
    body = api.get("/api/v1/tables/accounts/search?column=email&value=" + quote("bobby@example.net")).json()
    assert body["policy"] == "hash" and [m["request_id"] for m in body["mutations"]] == ["r-email"]
    assert "bobby@example.net" not in json.dumps(body)  # the answer holds the digest, never the value
    assert (
        api.get("/api/v1/tables/accounts/search?column=email&value=nobody@example.net").json()["mutations"]
        == []
    )
    digest = body["mutations"][0]["after"]["email"]
    assert digest.startswith("hmac-sha256:")  # the stored placeholder is not a value to search by
    assert (
        api.get(f"/api/v1/tables/accounts/search?column=email&value={quote(digest)}").json()["mutations"]
        == []
    )
    # masked and excluded: refused (nothing to compare); hashed without the key: refused
    for column, word in (("ssn", "masked"), ("secret", "excluded")):
        refused = api.get(f"/api/v1/tables/accounts/search?column={column}&value=333-44-5555")
        assert refused.status_code == 400 and word in refused.json()["error"]["message"]
    with TestClient(undo_env.app(hash_key=False)) as keyless:
        refused = keyless.get("/api/v1/tables/accounts/search?column=email&value=bobby%40example.net")
        assert refused.status_code == 400 and "policies.hash_key" in refused.json()["error"]["message"]
    # other columns as usual; the page says the hashed column was matched by its digest
    assert [
        m["request_id"]
        for m in api.get("/api/v1/tables/accounts/search?column=plan&value=gold").json()["mutations"]
    ] == ["r-later"]
    document = page(api, "/search?table=accounts&column=email&value=bobby%40example.net")
    assert "email is hashed: matched by the keyed digest of the value" in text_of(document)
    assert "/requests/r-email" in links(document)
    assert "masked" in text_of(page(api, "/search?table=accounts&column=ssn&value=x", 400))
