"""Honest attempts (docs/store.md "Transaction flags", MAYBE_INCOMPLETE): a failed request is
stored as possibly incomplete whenever the daemon cannot show that it decoded the transaction
while it was in progress, and every reader says so in words; one that failed while the daemon
streamed and was caught up is complete and unflagged.

PostgreSQL stops decoding a transaction it finds aborted, so one that failed while the daemon
was stopped arrives in part (or not at all). PostgreSQL 15 streams a transaction in progress
only past logical_decoding_work_mem (set to its 64kB minimum for the source database here), and
its Stream Abort carries no abort time: there every stored attempt is flagged.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient

from cdc import History, client
from cdc.cli import main as cli
from cdc.store.format import MAYBE_INCOMPLETE_NOTE, TxnFlag
from cdc.web import create_app
from tests.capture_env import CaptureEnv, rebuild, source_rows, stored_mutations

NOTE = "capture was behind; some attempted changes may be missing"
TOKEN = "test-token-attempts-0123456789"
#: Rows each failed request writes, and the size of each: over 64kB together, so PostgreSQL 15
#: streams the transaction while it is in progress (uncompressed: below the TOAST threshold).
ROWS, VALUE_BYTES = 60, 1500


class PaymentTimeout(Exception):  # noqa: N818 - the seed's error type
    pass


def prepare(capture: CaptureEnv) -> None:
    with capture.source() as conn:
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, body text)")
        conn.execute("INSERT INTO items VALUES (0, 'kept')")
        # The walsender of a database connection takes the database's settings.
        conn.execute(f"ALTER DATABASE {conn.info.dbname} SET logical_decoding_work_mem = '64kB'")
    capture.setup()


def write(conn: psycopg.Connection[Any], request_id: str) -> None:
    """ROWS inserts and an update of row 0: ROWS + 1 attempted changes."""
    for i in range(1, ROWS + 1):
        # md5 chains: text no compression shrinks below the streaming threshold
        conn.execute(
            "INSERT INTO items SELECT %s, string_agg(md5(%s || g::text), '') FROM generate_series(1, %s) g",
            (i, request_id, VALUE_BYTES // 32),
        )
    conn.execute("UPDATE items SET body = 'touched' WHERE id = 0")


def fail_request(capture: CaptureEnv, request_id: str) -> None:
    """A request (the client helper) that writes and then fails in the application."""
    with (
        psycopg.connect(capture.source_dsn, autocommit=True) as conn,
        pytest.raises(PaymentTimeout),
        client.request(conn, request_id, actor="billing"),
    ):
        write(conn, request_id)
        raise PaymentTimeout("Stripe API timeout after 10s")


def stored_transaction(capture: CaptureEnv, request_id: str) -> tuple[str, int, int] | None:
    """(status, flags, change_count) of the request's stored transaction."""
    with capture.store() as conn:
        row = conn.execute(
            "SELECT status, flags, change_count FROM transactions WHERE request_id = %s", (request_id,)
        ).fetchone()
    return None if row is None else (str(row[0]), int(row[1]), int(row[2]))


def readers(capture: CaptureEnv, request_id: str) -> dict[str, Any]:
    """What each reader says of the request: CLI (`cdc why`, `cdc state history`), the Python
    API, the HTTP API (request and row history) and the web page."""
    args = ["--store", capture.store_dsn, "--schema", capture.schema]
    runner = CliRunner()
    why = runner.invoke(cli, ["why", request_id, *args])
    assert why.exit_code == 0, why.output
    why_json = runner.invoke(cli, ["why", request_id, *args, "--format", "json"])
    assert why_json.exit_code == 0, why_json.output
    history = runner.invoke(cli, ["state", "history", "--request", request_id, *args])
    assert history.exit_code == 0, history.output
    row = runner.invoke(cli, ["state", "history", "items", "--id", "0", *args])
    assert row.exit_code == 0, row.output
    h = History(capture.store_dsn, schema=capture.schema)
    try:
        record = h.request(request_id)
        row_mutations = h.row_history("items", 0)
    finally:
        h.close()
    app = create_app(capture.store_dsn, schema=capture.schema, token=TOKEN)
    with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as web:
        api = web.get(f"/api/v1/requests/{quote(request_id)}")
        assert api.status_code == 200, api.text
        api_row = web.get("/api/v1/tables/items/rows/0/history")
        assert api_row.status_code == 200, api_row.text
        page = web.get(f"/requests/{quote(request_id)}")
        assert page.status_code == 200, page.text
        row_page = web.get("/tables/items/rows/0")
        assert row_page.status_code == 200, row_page.text
    return {
        "why": why.output,
        "why_json": json.loads(why_json.output),
        "history": history.output,
        "row": row.output,
        "record": record,
        "row_mutations": row_mutations,
        "api": api.json(),
        "api_row": api_row.json(),
        "page": page.text,
        "row_page": row_page.text,
    }


def test_a_request_failed_while_the_daemon_was_stopped_is_possibly_incomplete(capture: CaptureEnv) -> None:
    prepare(capture)
    fail_request(capture, "req-while-stopped")  # no daemon: cdc.await_capture() returns at once
    capture.start()
    capture.wait_caught_up()

    stored = stored_transaction(capture, "req-while-stopped")
    assert stored is not None, "the failed request's transaction was not stored"
    status, flags, count = stored
    assert status == "r" and flags & TxnFlag.MAYBE_INCOMPLETE, stored
    # PostgreSQL stopped decoding it at some point: part of it, perhaps nothing but its context.
    assert count <= ROWS + 1
    said = readers(capture, "req-while-stopped")
    assert NOTE in said["why"] and "(possibly incomplete)" in said["why"]
    assert said["why_json"]["possibly_incomplete"] is True and said["why_json"]["incomplete_note"] == NOTE
    record = said["record"]
    assert record.possibly_incomplete and record.incomplete_note == NOTE == MAYBE_INCOMPLETE_NOTE
    assert record.outcome == "rolled_back" and record.error_type == "PaymentTimeout"
    assert all(m.possibly_incomplete and m.incomplete_note == NOTE for m in record.mutations)
    assert said["api"]["possibly_incomplete"] is True and said["api"]["incomplete_note"] == NOTE
    assert said["api"]["transactions"][0]["possibly_incomplete"] is True
    assert all(m["possibly_incomplete"] for m in said["api"]["mutations"])
    assert NOTE in said["page"]
    if record.mutations:  # what arrived is marked where it is listed
        assert f"note: {NOTE} (req:req-while-stopped)" in said["history"]
        assert "attempt possibly incomplete" in said["history"]
    touched = [m for m in said["row_mutations"] if m.request_id == "req-while-stopped"]
    assert all(m.possibly_incomplete for m in touched)
    if touched:  # the row's history: the attempt on it, and the note under it
        assert NOTE in said["row"] and NOTE in said["row_page"]
        assert any(m["possibly_incomplete"] for m in said["api_row"]["mutations"])
    # Attempts never change the rebuilt state.
    assert rebuild(capture, "public.items") == source_rows(capture, "public.items")
    assert capture.stop() == 0


def test_a_request_failed_while_streaming_is_complete(capture: CaptureEnv) -> None:
    prepare(capture)
    capture.start()
    capture.wait_caught_up()
    fail_request(capture, "req-while-streaming")  # waits until the daemon has decoded its changes
    capture.wait_caught_up()

    stored = stored_transaction(capture, "req-while-streaming")
    mutations = [m for m in stored_mutations(capture) if m.request_id == "req-while-streaming"]
    if capture.pg.version < 16:
        # PostgreSQL 15 streams it in segments, drops the last one at the abort, and tells no
        # abort time: never shown as complete.
        assert stored is not None and stored[0] == "r" and stored[1] & TxnFlag.MAYBE_INCOMPLETE, stored
        said = readers(capture, "req-while-streaming")
        assert NOTE in said["why"] and said["api"]["incomplete_note"] == NOTE and NOTE in said["page"]
        assert all(m.possibly_incomplete for m in mutations) and len(mutations) <= ROWS + 1
        assert capture.stop() == 0
        return
    assert stored == ("r", int(TxnFlag.STREAMED), ROWS + 1), stored
    assert [(m.op, m.status, m.key) for m in mutations] == [
        *(("INSERT", "rolled_back", {"id": i}) for i in range(1, ROWS + 1)),
        ("UPDATE", "rolled_back", {"id": 0}),
    ]
    assert not any(m.possibly_incomplete for m in mutations)
    said = readers(capture, "req-while-streaming")
    for text in ("why", "history", "row", "page", "row_page"):
        assert NOTE not in said[text], text
        assert "possibly incomplete" not in said[text], text
    assert "DATA CHANGES" in said["why"] and "(rolled back)" in said["why"]
    record = said["record"]
    assert not record.possibly_incomplete and record.incomplete_note is None
    assert record.mutation_count == ROWS + 1 and record.error_type == "PaymentTimeout"
    assert said["api"]["possibly_incomplete"] is False and said["api"]["incomplete_note"] is None
    assert not any(m["possibly_incomplete"] for m in said["api"]["mutations"])
    assert said["why_json"]["incomplete_note"] is None
    assert rebuild(capture, "public.items") == source_rows(capture, "public.items")
    assert capture.stop() == 0


def test_a_rollback_capture_decoded_after_it_happened_says_so(capture: CaptureEnv) -> None:
    """Without the client helper nothing waits for capture: the transaction's last changes reach
    the WAL on disk, and the walsender, only with the abort. PostgreSQL happened to send them
    (its caches were warm), but capture cannot show that: flagged, and every reader says so
    where the attempts are listed. Never unflagged with a change missing."""
    prepare(capture)
    capture.start()
    with capture.source() as conn:  # the walsender's caches know the table
        conn.execute("UPDATE items SET body = 'warm' WHERE id = 0")
    capture.wait_caught_up()
    with psycopg.connect(capture.source_dsn) as conn:
        conn.execute("SET LOCAL cdc.request_id = 'req-rollback'")
        write(conn, "req-rollback")
        conn.rollback()
    capture.wait_caught_up()

    stored = stored_transaction(capture, "req-rollback")
    mutations = [m for m in stored_mutations(capture) if m.request_id == "req-rollback"]
    assert stored is not None and stored[0] == "r", stored
    if not stored[1] & TxnFlag.MAYBE_INCOMPLETE:  # shown decoded in progress: then it is whole
        assert stored[2] == len(mutations) == ROWS + 1, stored
        return
    assert all(m.possibly_incomplete for m in mutations)
    said = readers(capture, "req-rollback")
    assert NOTE in said["why"] and NOTE in said["page"] and said["api"]["incomplete_note"] == NOTE
    if any(m.key == {"id": 0} for m in mutations):
        assert f"note: {NOTE} (req:req-roll" in said["row"]  # the id's shortest unique prefix
        assert "attempt possibly incomplete" in said["row"] and NOTE in said["row_page"]
        assert [m["possibly_incomplete"] for m in said["api_row"]["mutations"]][-1] is True
    if mutations:
        assert said["history"].rstrip().endswith(f"note: {NOTE} (req:req-rollback)")
    assert rebuild(capture, "public.items") == source_rows(capture, "public.items")
    assert capture.stop() == 0
