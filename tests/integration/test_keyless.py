"""Tables without a replica identity (docs/baseline.md "Keyless tables"): cdc never makes an
application's UPDATE or DELETE on them fail, whether they existed at setup or were created later,
and says which tables are not fully captured and why."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest

from cdc.capture import checks
from cdc.publications import uninstall_publications
from cdc.setup import setup
from cdc.status import collect_status
from tests.capture_env import CaptureEnv, rebuild, source_rows, table_id


def writes_work(env: CaptureEnv, table: str) -> None:
    """The application's UPDATE and DELETE on ``table`` succeed."""
    with psycopg.connect(env.source_dsn, autocommit=True) as conn:
        conn.execute(f"UPDATE {table} SET b = b || '!' WHERE a = 1")
        conn.execute(f"DELETE FROM {table} WHERE a = 2")


def ops(env: CaptureEnv, table: str) -> dict[str, int]:
    with env.store() as conn:
        rows = conn.execute(
            "SELECT op, count(*) FROM changes WHERE table_id = %s AND flags & 1 = 0 GROUP BY op",
            (table_id(env, table),),
        ).fetchall()
    return {str(op): int(n) for op, n in rows}


def partial(env: CaptureEnv) -> dict[str, str]:
    return {p["table"]: p["reason"] for p in collect_status(env.config).partial}


def test_default_captures_inserts_only_and_never_breaks_writes(capture: CaptureEnv) -> None:
    with capture.source() as conn:
        conn.execute("CREATE TABLE keyed (id int PRIMARY KEY, v text)")
        conn.execute("CREATE TABLE bag (a int, b text)")
        conn.execute("INSERT INTO bag VALUES (1, 'x'), (2, 'y'), (3, 'z')")
        conn.execute("INSERT INTO keyed VALUES (1, 'a')")
    report_warnings = setup(capture.config).warnings
    assert not any("FAIL" in w for w in report_warnings), report_warnings
    capture.start()
    writes_work(capture, "bag")  # existed at setup
    with capture.source() as conn:
        conn.execute("INSERT INTO bag VALUES (4, 'w')")
        # Created while the daemon runs: a keyless table, and a keyed one.
        conn.execute("CREATE TABLE later_bag (a int, b text)")
        conn.execute("INSERT INTO later_bag VALUES (1, 'x'), (2, 'y')")
        conn.execute("CREATE TABLE later_keyed (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO later_keyed VALUES (1, 'a'), (2, 'b')")
        conn.execute("UPDATE later_keyed SET v = 'c' WHERE id = 1")
        conn.execute("DELETE FROM later_keyed WHERE id = 2")
    writes_work(capture, "later_bag")
    # A table that loses its key: its writes keep working (it moves to the inserts publication).
    with capture.source() as conn:
        conn.execute("ALTER TABLE keyed DROP CONSTRAINT keyed_pkey")
        conn.execute("UPDATE keyed SET v = 'b' WHERE id = 1")
        conn.execute("DELETE FROM keyed WHERE id = 1")
        conn.execute("INSERT INTO keyed VALUES (5, 'e')")
    capture.wait_caught_up()
    assert ops(capture, "bag") == {"S": 3, "I": 1}
    assert ops(capture, "later_bag") == {"I": 2}
    assert rebuild(capture, "public.later_keyed") == source_rows(capture, "public.later_keyed")
    assert ops(capture, "later_keyed") == {"I": 2, "U": 1, "D": 1}
    assert ops(capture, "keyed")["I"] == 1
    found = partial(capture)
    assert found == {
        "public.bag": "inserts_only",
        "public.later_bag": "inserts_only",
        "public.keyed": "inserts_only",
    }
    status = collect_status(capture.config)
    assert status.healthy  # the configured choice, reported, is not a failure
    assert capture.stop() == 0


def test_full_sets_replica_identity_and_captures_everything(capture: CaptureEnv) -> None:
    capture.extra_env["CDC_SOURCE__KEYLESS_TABLES"] = "full"
    with capture.source() as conn:
        conn.execute("CREATE TABLE bag (a int, b text)")
        conn.execute("INSERT INTO bag VALUES (1, 'x'), (2, 'y'), (2, 'y'), (3, 'z')")
    report = setup(capture.config)
    assert any("REPLICA IDENTITY FULL set" in s for s in report.steps), report.steps
    capture.start()
    writes_work(capture, "bag")
    with capture.source() as conn:
        conn.execute("CREATE TABLE later_bag (a int, b text)")
        conn.execute("INSERT INTO later_bag VALUES (1, 'x'), (2, 'y'), (3, 'q')")
        identity = conn.execute("SELECT relreplident FROM pg_class WHERE relname = 'later_bag'").fetchone()
    assert identity == ("f",)
    writes_work(capture, "later_bag")
    capture.wait_caught_up()
    for table in ("public.bag", "public.later_bag"):
        assert rebuild(capture, table) == source_rows(capture, table), table
    assert partial(capture) == {}
    assert capture.stop() == 0


def test_skip_leaves_them_out(capture: CaptureEnv) -> None:
    capture.extra_env["CDC_SOURCE__KEYLESS_TABLES"] = "skip"
    with capture.source() as conn:
        conn.execute("CREATE TABLE keyed (id int PRIMARY KEY)")
        conn.execute("CREATE TABLE bag (a int, b text)")
        conn.execute("INSERT INTO bag VALUES (1, 'x'), (2, 'y')")
    report = setup(capture.config)
    assert any("skip" in w and "public.bag" in w for w in report.warnings), report.warnings
    capture.start()
    writes_work(capture, "bag")
    with capture.source() as conn:
        conn.execute("CREATE TABLE later_bag (a int, b text)")
        conn.execute("INSERT INTO later_bag VALUES (1, 'x'), (2, 'y')")
    writes_work(capture, "later_bag")
    assert partial(capture) == {"public.bag": "not_captured", "public.later_bag": "not_captured"}
    assert capture.stop() == 0


def test_an_all_tables_publication_is_made_safe(capture: CaptureEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installation set up before (FOR ALL TABLES, a keyless table whose UPDATE fails): `cdc
    setup` again, while the daemon runs, fixes it; the second publication, created after the
    slot, is streamed once the slot has passed its creation, and the table is backfilled."""
    monkeypatch.setattr(checks, "INTERVAL_SECONDS", 1.0)
    with capture.source() as conn:
        conn.execute("CREATE TABLE keyed (id int PRIMARY KEY, v text)")
        conn.execute("CREATE TABLE bag (a int, b text)")
        conn.execute("INSERT INTO bag VALUES (1, 'x'), (2, 'y'), (3, 'z')")
    capture.extra_env["CDC_SOURCE__KEYLESS_TABLES"] = "full"  # creates FOR ALL TABLES ...
    setup(capture.config)
    with capture.source() as conn:  # ... then undo what it did, as an earlier release left it
        uninstall_publications(conn, capture.slot)  # no event trigger, no second publication
        conn.execute("ALTER TABLE bag REPLICA IDENTITY DEFAULT")
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
            conn.execute("UPDATE bag SET b = 'broken' WHERE a = 1")
    with capture.store() as conn:
        conn.execute("DELETE FROM capture_publications")
    assert partial(capture) == {"public.bag": "updates_fail"}
    assert not collect_status(capture.config).healthy
    del capture.extra_env["CDC_SOURCE__KEYLESS_TABLES"]  # the default: inserts_only
    capture.start()
    reports: list[Any] = []
    thread = threading.Thread(target=lambda: reports.append(setup(capture.config)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while thread.is_alive():  # the backfill waits for the daemon to stream the new publication
        assert time.monotonic() < deadline, "the backfill did not end"
        with capture.source() as conn:
            conn.execute("SELECT pg_logical_emit_message(false, 'test', 'x')")
            conn.execute("CHECKPOINT")  # the slot's restart_lsn moves with running-xacts records
        time.sleep(0.5)
    assert reports, "setup failed"
    assert any("backfilled" in step for step in reports[0].steps), reports[0].steps
    writes_work(capture, "bag")
    assert partial(capture) == {"public.bag": "inserts_only"}
    with capture.source() as conn:
        conn.execute("INSERT INTO bag VALUES (7, 'late')")
        conn.execute("UPDATE keyed SET v = 'x'")  # keyed tables are captured as before
        conn.execute("INSERT INTO keyed VALUES (1, 'a')")
    with capture.store() as conn:
        row = conn.execute(
            "SELECT state FROM baselines WHERE table_id = %s", (table_id(capture, "bag"),)
        ).fetchone()
    assert row == ("done",)
    capture.wait_caught_up()
    rows = ops(capture, "bag")
    # its rows recorded afresh by the backfill (and by the REPLICA IDENTITY change above: a keyless
    # table's rows are recorded again after a change of its key, docs/ddl.md)
    assert rows["I"] >= 1 and rows["S"] >= 3 and rows.get("T", 0) >= 1
    assert rebuild(capture, "public.keyed") == source_rows(capture, "public.keyed")
    assert capture.stop() == 0


def status_lines(env: CaptureEnv) -> list[tuple[str, Any]]:
    from cdc.status import render_status

    return render_status(collect_status(env.config))
