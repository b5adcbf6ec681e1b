"""Request records derived from transactions, context changes and reported errors (store format
2), and how readers show what the store could not keep (oversize values, incomplete images)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner

from cdc.cli_readers import state, why
from cdc.query import Store
from cdc.render import describe_mutation, why_lines
from tests.store_builder import INT8, MAYBE_INCOMPLETE, TEXT, StoreBuilder, oversize

SESSION = {"db_user": "app", "backend_pid": 77, "client_addr": "10.0.0.9"}


@pytest.fixture(scope="module")
def b(pg: Any) -> Iterator[StoreBuilder]:
    name = f"t_{uuid.uuid4().hex[:8]}"
    b = StoreBuilder(pg.create_database(name))
    b.table("docs", {"id": INT8, "title": TEXT, "body": TEXT})
    with b.txn("2026-06-01 10:00", "req-outer", actor="api", context=SESSION) as t:
        t.insert("docs", {"id": 1, "title": "a", "body": "x"})
        t.insert("docs", {"id": 2, "title": "b", "body": "y"}, request_id="req-nested")
        t.insert("docs", {"id": 3, "title": "c", "body": "z"})
    with b.txn("2026-06-01 10:01", "req-failed", actor="api", context=SESSION, status="rolled_back",
               flags=MAYBE_INCOMPLETE) as t:  # fmt: skip
        t.update("docs", 1, {"title": "never"})
    b.request_error("req-failed", "ValueError", "bad title", "docs.py:9")  # from the same session
    b.request_error("req-failed", "Forged", "not me", None, db_user="mallory", backend_pid=666)
    b.request_error("req-ghost", "Timeout", "no changes at all", None, db_user="app", backend_pid=77)
    with b.txn("2026-06-01 10:02", "req-partly", actor="api", context=SESSION) as t:
        t.update("docs", 2, {"title": "kept"})
        t.update("docs", 3, {"title": "undone"}, rolled_back=True)
    with b.txn("2026-06-01 10:03", "req-big", context=SESSION) as t:
        t.update("docs", 1, {"body": oversize("x" * 1000)})
        t.update("docs", 2, {"title": "toast"}, unknown=("body",))
    b.finish(baseline=0x1_0000_0000)
    yield b
    b.close()
    pg.drop_database(name)


@pytest.fixture
def store(b: StoreBuilder) -> Iterator[Store]:
    with Store(b.dsn) as s:
        yield s


def test_nested_requests_get_their_own_changes(store: Store) -> None:
    outer = store.request("req-outer")
    assert [m.key for m in outer.mutations] == [{"id": 1}, {"id": 3}] and outer.mutation_count == 2
    nested = store.request("req-nested")
    assert [m.key for m in nested.mutations] == [{"id": 2}] and nested.outcome == "committed"
    assert nested.transactions == outer.transactions  # the same transaction
    assert [m.key for m in store.mutation_log(request_id="req-nested").mutations] == [{"id": 2}]
    assert {m.request_id for m in store.row_history("docs", 2)} >= {"req-nested"}
    assert len(store.mutation_log(actor="api").mutations) == 6


def test_an_error_is_the_root_cause_only_from_the_request_session(store: Store) -> None:
    record = store.request("req-failed")
    assert record.outcome == "rolled_back"
    assert (record.error_type, record.error_message, record.error_location) == (
        "ValueError",
        "bad title",
        "docs.py:9",
    )
    assert [(e.error_type, e.attributed) for e in record.errors] == [("ValueError", True), ("Forged", False)]
    assert record.possibly_incomplete and record.transactions[0].possibly_incomplete
    text = "\n".join(why_lines(record))
    assert "ROOT CAUSE   ValueError: bad title" in text
    assert (
        "ERROR        Forged: not me  (reported by another session (db_user mallory, pid 666): not attributed)"
        in text
    )
    assert "REPORTED BY  db_user app, pid 77" in text
    assert "NOTE" in text and "may be missing" in text and "(possibly incomplete)" in text
    data = record.to_json()
    assert data["possibly_incomplete"] is True and data["transactions"][0]["possibly_incomplete"] is True
    assert data["incomplete_note"] == "capture was behind; some attempted changes may be missing"
    # each change read carries its transaction's flag
    assert [m.possibly_incomplete for m in record.mutations] == [True]
    assert [m["possibly_incomplete"] for m in data["mutations"]] == [True]
    assert [e["attributed"] for e in data["errors"]] == [True, False]


def test_an_error_without_a_context_of_the_request_is_not_its_cause(store: Store) -> None:
    ghost = store.request("req-gh")  # a prefix: found through request_errors alone
    assert ghost.request_id == "req-ghost" and ghost.outcome == "unknown" and ghost.transactions == []
    assert ghost.error_type is None and [e.attributed for e in ghost.errors] == [False]
    # Its reporter wrote no verified context of this request (and proved none): not attributed.
    assert (
        ghost.error_attribution == "no_captured_session" and ghost.to_json()["error"]["attributed"] is False
    )
    assert ghost.first_seen_at is not None


def test_partly_rolled_back(store: Store) -> None:
    record = store.request("req-partly")
    assert (record.committed_count, record.rolled_back_count, record.outcome) == (1, 1, "partly_rolled_back")
    assert [m.status for m in record.mutations] == ["committed", "rolled_back"]
    assert not record.possibly_incomplete and not any(m.possibly_incomplete for m in record.mutations)


def test_oversize_and_incomplete_images(store: Store) -> None:
    big, toast = store.request("req-big").mutations
    assert big.after is not None and big.after["body"]["$cdc"] == "oversize" and big.changed == ("body",)
    assert "body: x → (oversize value: 1000 bytes, sha256 " in describe_mutation(big)
    assert toast.incomplete and toast.unknown == ("body",) and "body" not in (toast.after or {})
    assert toast.changed == ("title",)
    assert describe_mutation(toast).endswith("(incomplete image: body unknown)")
    assert store.row_at("docs", 2, store.current_version() or 0) == {"id": 2, "title": "toast"}


def test_cli_why_and_history(b: StoreBuilder) -> None:
    env = {"TZ": "UTC", "CDC_STORE_DSN": b.dsn, "CDC_CONFIG": None}
    out = CliRunner().invoke(why, ["req-failed"], env=env)
    assert out.exit_code == 0 and "reported by another session (db_user mallory, pid 666)" in out.stdout
    history = CliRunner().invoke(state, ["history", "docs", "--id", "1"], env=env)
    assert history.exit_code == 0 and "(oversize value: 1000 bytes" in history.stdout
    assert "title: a → never  (rolled back; attempt possibly incomplete)" in history.stdout
    note = "note: capture was behind; some attempted changes may be missing (req:req-fail"
    assert history.stdout.rstrip().splitlines()[-1].startswith(f"  {note}")
