"""`cdc erase` on a format-2 store: a row's images leave every table of the store, under every
key it had; the erasure is recorded without them; a live row, an unchecked source and an unknown
row are refused.

History is written with tests/retention_store.py; the source check runs against a real source
database whose table the store knows by its relation oid.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result
from psycopg import sql

from cdc.cli_retention import erase
from cdc.config import RetentionConfig
from cdc.devdb import LocalPostgres
from cdc.errors import NotFoundError
from cdc.history import History
from cdc.store.erase import erase_row
from cdc.store.keys import key_text
from cdc.store.prune import Pruner
from cdc.store.table_refs import resolve_table
from tests.capture_env import CaptureEnv, table_id
from tests.retention_store import DAY, create_partitions, model, replay
from tests.store_builder import INT4, INT8, TEXT, StoreBuilder

SCHEMA = "cdc_history"
START = datetime(2026, 3, 1, tzinfo=UTC)
EMAIL = "zq-erase-me-7731@example.org"
NEW_EMAIL = "zq-erase-me-too-4410@example.org"
NOTE = "zq-note-secret-5519"
SECRETS = (EMAIL, NEW_EMAIL, NOTE)
USERS = {"id": INT8, "email": TEXT, "plan": TEXT}


def dump_schema(dsn: str) -> dict[str, str]:
    """Every table of the store schema (partitions, kept rows, erasures...) as text."""
    out: dict[str, str] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        names = conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind IN ('r', 'p') ORDER BY 1",
            (SCHEMA,),
        ).fetchall()
        for (name,) in names:
            rows = conn.execute(
                sql.SQL("SELECT t::text FROM {} t").format(sql.Identifier(SCHEMA, name))
            ).fetchall()
            out[name] = "\n".join(r[0] for r in rows)
    return out


def images_of(dsn: str, table_id: int, keys: list[int]) -> list[tuple[Any, ...]]:
    """Changes (partitions, kept rows, pending keyframes) naming one of ``keys``."""
    texts = [key_text([k]) for k in keys]
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(
            "SELECT 'changes', position, ordinal, op FROM cdc_history.changes WHERE table_id = %(t)s "
            "AND (key_text = ANY(%(k)s) OR old_key_text = ANY(%(k)s)) UNION ALL "
            "SELECT 'changes_keep', position, ordinal, op FROM cdc_history.changes_keep WHERE table_id = %(t)s "
            "AND (key_text = ANY(%(k)s) OR old_key_text = ANY(%(k)s))",
            {"t": table_id, "k": texts},
        ).fetchall()


@pytest.fixture
def store(pg: LocalPostgres) -> Iterator[StoreBuilder]:
    name = f"t_{uuid.uuid4().hex[:8]}"
    b = StoreBuilder(pg.create_database(name))
    create_partitions(b.conn, SCHEMA, START, 8)
    try:
        yield b
    finally:
        b.close()
        pg.drop_database(name)


def erase_forced(b: StoreBuilder, table: str, key: Any, **window: datetime) -> Any:
    with psycopg.connect(b.dsn, autocommit=True) as conn:
        info = resolve_table(conn, SCHEMA, table)
        text = info.key_text(key)
        return erase_row(
            conn, SCHEMA, info, text, actor="test", source_check="not_checked", forced=True, **window
        )


def moving_row(b: StoreBuilder, *, full: bool) -> None:
    """users 1 (an email to erase): INSERT, its email changed, its key changed to 2 then 3;
    users 7 beside it (a SNAPSHOT), untouched by the erasure."""
    b.table("users", USERS, replica_identity="f" if full else "d")
    with b.txn(START + timedelta(hours=1)) as t:
        t.insert("users", {"id": 1, "email": EMAIL, "plan": "free"})
        t.snapshot("users", {"id": 7, "email": "seven@example.org", "plan": "free"})
    with b.txn(START + timedelta(hours=2), "req-a") as t:
        t.update("users", 1, {"email": NEW_EMAIL})
    with b.txn(START + timedelta(hours=3), "req-b") as t:
        t.update("users", 1, {"id": 2})
    with b.txn(START + timedelta(hours=4), "req-c") as t:
        t.update("users", 2, {"plan": "pro"})
        t.update("users", 7, {"plan": "pro"})
    with b.txn(START + timedelta(hours=5), "req-d") as t:
        t.update("users", 2, {"id": 3})
    b.finish(baseline=b.positions[0])


@pytest.mark.parametrize(("named", "full"), [(3, False), (1, False), (3, True), (2, True)])
def test_erase_follows_the_row_through_its_key_changes(store: StoreBuilder, named: int, full: bool) -> None:
    b = store
    moving_row(b, full=full)
    users = b.table_id("users")
    assert len(images_of(b.dsn, users, [1, 2, 3])) == 5
    report = erase_forced(b, "users", named)
    assert report.mutations_removed == 5 and report.keyframes_removed == 0 and report.earlier_keys == 2
    assert report.key_sha256 == hashlib.sha256(key_text([named]).encode()).hexdigest()
    assert sorted(report.earlier_key_sha256) == sorted(
        hashlib.sha256(key_text([k]).encode()).hexdigest() for k in (1, 2, 3) if k != named
    )
    assert images_of(b.dsn, users, [1, 2, 3]) == []
    for table, text in dump_schema(b.dsn).items():
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} still in {table}"
    # The other row's history is whole; the erasure is recorded with digests and counts only.
    with psycopg.connect(b.dsn, autocommit=True) as conn:
        assert replay(conn, SCHEMA, users, False, b.position) == model(b, "users") - rows_with_id(b, 3)
        record = conn.execute(
            "SELECT actor, table_id, key_sha256, key_columns, earlier_keys, mutations_removed, keyframes_removed, "
            "source_check, forced FROM cdc_history.erasures"
        ).fetchall()
    assert record == [("test", users, report.key_sha256, ["id"], 2, 5, 0, "not_checked", True)]


def rows_with_id(b: StoreBuilder, key: int) -> Counter[str]:
    return Counter(json.dumps(r, sort_keys=True) for r in b.state("users") if r["id"] == key)


def test_a_key_reused_by_another_row_is_not_erased_with_the_row_that_left_it(store: StoreBuilder) -> None:
    b = store
    moving_row(b, full=False)
    with b.txn(START + timedelta(hours=6)) as t:
        t.insert("users", {"id": 1, "email": "someone-else@example.org", "plan": "free"})  # key 1 again
        t.insert("users", {"id": 2, "email": "another-one@example.org", "plan": "free"})  # key 2 again
    users = b.table_id("users")
    report = erase_forced(b, "users", 3)
    assert report.mutations_removed == 5 and report.earlier_keys == 2
    left = images_of(b.dsn, users, [1, 2, 3])
    assert [(r[0], r[3]) for r in left] == [("changes", "I"), ("changes", "I")]
    assert all(secret not in text for text in dump_schema(b.dsn).values() for secret in SECRETS)
    # Named by a key, an erasure takes all of that key: the later row at 2 goes.
    b2_report = erase_forced(b, "users", 2)
    assert b2_report.mutations_removed == 1 and b2_report.earlier_keys == 0


def test_keyframes_pending_keyframes_and_snapshots_of_the_row_go(store: StoreBuilder) -> None:
    b = store
    b.table("users", USERS, replica_identity="f")
    users = b.table_id("users")
    with b.txn(START + timedelta(hours=1)) as t:  # day 0: the baseline
        t.snapshot("users", {"id": 1, "email": EMAIL, "plan": "free"})
        t.snapshot("users", {"id": 7, "email": "seven@example.org", "plan": "free"})
    with b.txn(START + DAY + timedelta(hours=1)) as t:  # day 1
        t.update("users", 1, {"id": 2})
    with b.txn(START + 2 * DAY + timedelta(hours=1)) as t:  # day 2
        t.update("users", 2, {"email": NEW_EMAIL})
        t.update("users", 7, {"plan": "pro"})
    with b.txn(START + 3 * DAY + timedelta(hours=1)) as t:  # day 3
        t.update("users", 2, {"id": 3})
    b.finish(baseline=b.positions[0])
    config = RetentionConfig(default=timedelta(hours=2), partition_interval=DAY)
    with Pruner(b.dsn, SCHEMA, config) as pruner:
        first = pruner.prune(START + 2 * DAY + timedelta(hours=2))  # days 0 and 1 go: keyframes of 2 and 7
        assert first.keyframes == 2
        later = START + 3 * DAY + timedelta(hours=2)
        pruner.prepare(later)
        staged = pruner.stage(later)  # day 2 would go: pending keyframes of 2 (NEW_EMAIL) and 7
        assert staged is not None and staged["keyframes"] == 2
        report = erase_forced(b, "users", 3)
        # 3's change, the row at 2 (its keyframe, its update, the pending keyframe). The link
        # from 1 went with the pruned day: nothing of 1 is left to follow.
        assert (report.mutations_removed, report.keyframes_removed, report.earlier_keys) == (4, 2, 1)
        assert images_of(b.dsn, users, [1, 2, 3]) == []
        with psycopg.connect(b.dsn, autocommit=True) as conn:
            assert conn.execute("SELECT staged FROM cdc_history.retention_state").fetchone() == (None,)
        pruned = pruner.prune(later)  # staged again without the row
        assert pruned.staged and pruned.keyframes == 1
    assert all(secret not in text for text in dump_schema(b.dsn).values() for secret in SECRETS)
    with psycopg.connect(b.dsn, autocommit=True) as conn:
        assert replay(conn, SCHEMA, users, False, b.position) == rows_with_id(b, 7)


def test_erase_removes_keyframes_staged_for_the_next_prune_whatever_the_window(store: StoreBuilder) -> None:
    """Keyframes computed ahead of a prune (pending, above the floor) are images too: erasing
    the row removes them, whatever the window, and voids the staging (the prune recomputes)."""
    b = store
    b.table("users", {"id": INT8, "email": TEXT})
    with b.txn(START + timedelta(hours=1)) as t:
        t.insert("users", {"id": 42, "email": EMAIL})
        t.insert("users", {"id": 7, "email": "seven@example.org"})
    with b.txn(START + DAY + timedelta(hours=1)) as t:
        t.update("users", 7, {"email": "seven@example.net"})
    b.finish(baseline=b.positions[0])
    now = START + 2 * DAY + timedelta(hours=2)
    with Pruner(b.dsn, SCHEMA, RetentionConfig(default=DAY, partition_interval=DAY)) as pruner:
        pruner.prepare(now)
        staged = pruner.stage(now)
        assert staged is not None and staged["keyframes"] == 2
        # A window that holds none of the row's changes nor the keyframe's time (the horizon):
        # the pending keyframe goes all the same.
        report = erase_forced(b, "users", 42, since=START + 5 * DAY, until=START + 6 * DAY)
        assert report.keyframes_removed == 1 and report.mutations_removed == 1
        with psycopg.connect(b.dsn, autocommit=True) as conn:
            left = conn.execute(
                "SELECT count(*) FILTER (WHERE flags & 256 <> 0), (SELECT staged FROM cdc_history.retention_state) "
                "FROM cdc_history.changes_keep"
            ).fetchone()
        assert left == (1, None)
        # The row's own images go with a plain erasure; the prune then computes its keyframes.
        erase_forced(b, "users", 42)
        pruned = pruner.prune(now, stage=False)  # (prune() would stage again first)
    assert not pruned.staged and pruned.keyframes == 1
    assert all(EMAIL not in text for text in dump_schema(b.dsn).values())
    with psycopg.connect(b.dsn, autocommit=True) as conn:
        got = replay(conn, SCHEMA, b.table_id("users"), False, b.position)
    assert got == model(b, "users") - rows_with_email(b, EMAIL)


def rows_with_email(b: StoreBuilder, email: str) -> Counter[str]:
    return Counter(json.dumps(r, sort_keys=True) for r in b.state("users") if r["email"] == email)


def test_a_keyless_row_and_its_identical_copies_go_together(store: StoreBuilder) -> None:
    b = store
    b.table("notes", {"x": INT4, "y": TEXT}, key=[])
    notes = b.table_id("notes")
    with b.txn(START + timedelta(hours=1)) as t:
        for _ in range(3):
            t.snapshot("notes", {"x": 1, "y": NOTE})
        t.snapshot("notes", {"x": 2, "y": "public note"})
    with b.txn(START + DAY + timedelta(hours=1)) as t:
        t.update("notes", {"x": 1, "y": NOTE}, {"y": NOTE + "-b"})  # one copy changes value
    with b.txn(START + 2 * DAY + timedelta(hours=1)) as t:
        t.insert("notes", {"x": 3, "y": "another"})
    b.finish(baseline=b.positions[0])
    with Pruner(b.dsn, SCHEMA, RetentionConfig(default=DAY, partition_interval=DAY)) as pruner:
        report = pruner.prune(START + 2 * DAY + timedelta(hours=2))
    assert report.keyframes == 4  # three copies of NOTE, the public note
    # Named by its last value: the value it came from (and its identical copies) goes too.
    erased = erase_forced(b, "notes", {"x": 1, "y": NOTE + "-b"})
    assert (erased.mutations_removed, erased.keyframes_removed, erased.earlier_keys) == (4, 3, 1)
    assert all(NOTE not in text for text in dump_schema(b.dsn).values())
    with psycopg.connect(b.dsn, autocommit=True) as conn:
        rows = replay(conn, SCHEMA, notes, True, b.position)
    assert sorted(json.loads(r)["x"] for r in rows.elements()) == [2, 3]


def test_a_time_window_erases_only_its_images(store: StoreBuilder) -> None:
    b = store
    moving_row(b, full=False)
    users = b.table_id("users")
    with pytest.raises(NotFoundError, match="in that time window"):
        erase_forced(b, "users", 3, since=START + 5 * DAY, until=START + 6 * DAY)
    report = erase_forced(
        b, "users", 3, since=START + timedelta(minutes=30), until=START + timedelta(hours=2, minutes=30)
    )
    assert report.mutations_removed == 2  # the INSERT and the email change, under key 1
    assert len(images_of(b.dsn, users, [1, 2, 3])) == 3
    assert all(EMAIL not in text for text in dump_schema(b.dsn).values())


# ============================================================================ the command


@pytest.fixture
def source_and_store(pg: LocalPostgres) -> Iterator[tuple[str, StoreBuilder]]:
    names = [f"t_{uuid.uuid4().hex[:8]}" for _ in range(2)]
    source = pg.create_database(names[0])
    b = StoreBuilder(pg.create_database(names[1]))
    create_partitions(b.conn, SCHEMA, START, 8)
    try:
        yield source, b
    finally:
        b.close()
        for name in names:
            pg.drop_database(name)


def run_erase(store: str, source: str, *args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(
        erase,
        [*args, "--store", store, "--schema", SCHEMA, "--source", source],
        input=input,
        env={"CDC_CONFIG": "", "CDC_SOURCE_DSN": "", "CDC_STORE_DSN": ""},
        catch_exceptions=False,
    )


def test_cdc_erase_checks_the_source_under_every_key_the_row_had(
    source_and_store: tuple[str, StoreBuilder],
) -> None:
    source, b = source_and_store
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("CREATE TABLE users (id int8 PRIMARY KEY, email text, plan text)")
        conn.execute("INSERT INTO users VALUES (3, %s, 'pro'), (7, 'seven@example.org', 'pro')", (NEW_EMAIL,))
        oid = conn.execute("SELECT 'users'::regclass::oid").fetchone()
    assert oid is not None
    b.table("users", USERS, relation_oid=int(oid[0]))
    moving_row(b, full=False)
    before = dump_schema(b.dsn)
    # Still on the source under its last key, named by its first: refused, nothing changes.
    refused = run_erase(b.dsn, source, "users", "--id", "1", "--yes")
    assert refused.exit_code == 8, refused.output
    assert "still exists on the source" in refused.output and "--force" in refused.output
    assert NEW_EMAIL not in refused.output
    # The source cannot be reached: refused too.
    unreachable = run_erase(
        b.dsn, "host=127.0.0.1 port=1 dbname=x connect_timeout=2", "users", "--id", "3", "--yes"
    )
    assert unreachable.exit_code == 8 and "--force" in unreachable.output
    # No such row, no such table: refused.
    unknown = run_erase(b.dsn, source, "users", "--id", "999999", "--yes")
    assert unknown.exit_code == 7 and "no history" in unknown.output
    no_table = run_erase(b.dsn, source, "nobody", "--id", "1", "--yes")
    assert no_table.exit_code == 7 and "no captured table" in no_table.output
    assert dump_schema(b.dsn) == before

    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute("DELETE FROM users WHERE id = 3")
    # Asking for confirmation: "no" changes nothing.
    declined = run_erase(b.dsn, source, "users", "--id", "1", input="n\n")
    assert (
        declined.exit_code == 130 and "5 image(s)" in declined.output and "2 other key(s)" in declined.output
    )
    assert dump_schema(b.dsn) == before
    done = run_erase(b.dsn, source, "public.users", "--id", "1", "--yes", "--actor", "dpo@example.org")
    assert done.exit_code == 0, done.output
    assert "erased 5 image(s)" in done.output and "WAL" in done.output
    for table, text in dump_schema(b.dsn).items():
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} still in {table}"
    with psycopg.connect(b.dsn, autocommit=True) as conn:
        record = conn.execute(
            "SELECT actor, key_sha256, key_columns, earlier_keys, mutations_removed, source_check, forced "
            "FROM cdc_history.erasures"
        ).fetchall()
    assert record == [("dpo@example.org", hashlib.sha256(b"[1]").hexdigest(), ["id"], 2, 5, "absent", False)]
    again = run_erase(b.dsn, source, "users", "--id", "1", "--yes")
    assert again.exit_code == 7 and "no history" in again.output
    # --force and JSON: the other row, still live.
    forced = run_erase(b.dsn, source, "users", "--id", "7", "--yes", "--force", "--format", "json")
    assert forced.exit_code == 0, forced.output
    report = json.loads(forced.stdout)
    assert report["source_check"] == "live" and report["forced"] and report["mutations_removed"] == 2


def test_cdc_erase_of_a_keyless_row(source_and_store: tuple[str, StoreBuilder]) -> None:
    source, b = source_and_store
    with psycopg.connect(source, autocommit=True) as conn:
        conn.execute('CREATE TABLE "Notes" (x int4, y text)')
        conn.execute('ALTER TABLE "Notes" REPLICA IDENTITY FULL')
        conn.execute("""INSERT INTO "Notes" VALUES (2, 'public note')""")
        oid = conn.execute("""SELECT '"Notes"'::regclass::oid""").fetchone()
    assert oid is not None
    b.table('"Notes"', {"x": INT4, "y": TEXT}, key=[], relation_oid=int(oid[0]))
    with b.txn(START + timedelta(hours=1)) as t:
        for _ in range(3):
            t.snapshot('"Notes"', {"x": 1, "y": NOTE})
        t.snapshot('"Notes"', {"x": 2, "y": "public note"})
    with b.txn(START + timedelta(hours=2)) as t:
        for _ in range(3):
            t.delete('"Notes"', {"x": 1, "y": NOTE})
    b.finish(baseline=b.positions[0])
    wrong = run_erase(b.dsn, source, '"Notes"', "--id", "1", "--yes")
    assert wrong.exit_code == 6 and "has no key" in wrong.output
    live = run_erase(b.dsn, source, '"Notes"', "--id", json.dumps({"x": 2, "y": "public note"}), "--yes")
    assert live.exit_code == 8 and "still exists on the source" in live.output
    done = run_erase(
        b.dsn, source, '"Notes"', "--id", json.dumps({"x": 1, "y": NOTE}), "--yes", "--format", "json"
    )
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert report["mutations_removed"] == 6 and report["source_check"] == "absent"
    assert report["table"] == 'public."Notes"'
    assert all(NOTE not in text for text in dump_schema(b.dsn).values())
    with psycopg.connect(b.dsn, autocommit=True) as conn:
        assert conn.execute("SELECT key_columns FROM cdc_history.erasures").fetchone() == (["x", "y"],)


@pytest.mark.skip(reason="needs the daemon on a format-2 store: comes back when the capture side lands")
def test_erase_after_real_capture() -> None:
    """(format 1: tests/integration/test_erase.py at d084bf0) Rows captured by the daemon
    (SNAPSHOT at setup, updates, deletes; a keyless table under REPLICA IDENTITY FULL), pruned into
    keyframes, then erased: no value left in any table of the store, history consistent, capture
    goes on; --force with a window on a live row."""


def test_erase_follows_a_captured_row_through_its_key_changes(capture: CaptureEnv) -> None:
    """The issue's leftover, on the daemon's own history: images of the row under its earlier keys
    (its SNAPSHOT, the UPDATEs before the key changed) stayed after erasing it by its final key.
    A row that reused an earlier key afterwards is another row: its history stays."""
    name, other = "Zephyrine Quuxworth", "zq-other-row-that-reused-key-1@example.org"
    with capture.source() as conn:
        conn.execute("CREATE TABLE users (id int PRIMARY KEY, email text, name text)")
        conn.execute("INSERT INTO users VALUES (1, %s, NULL)", (EMAIL,))
    capture.setup()  # SNAPSHOT under key 1
    capture.start()
    with capture.source() as conn:
        conn.execute("UPDATE users SET name = %s WHERE id = 1", (name,))
        conn.execute("UPDATE users SET id = 2, name = %s WHERE id = 1", (name + " 2",))
        conn.execute("INSERT INTO users VALUES (1, %s, 'another row')", (other,))  # key 1 reused
        conn.execute("UPDATE users SET id = 3 WHERE id = 2")
        conn.execute("UPDATE users SET email = %s WHERE id = 3", (NOTE,))
        conn.execute("DELETE FROM users WHERE id = 3")
        conn.execute("DELETE FROM users WHERE id = 1")  # (the source check: no key of the chain is live)
    capture.wait_caught_up()
    users = table_id(capture, "users")
    with capture.store() as conn:
        keys = {
            r[0]
            for r in conn.execute(
                "SELECT DISTINCT key_text FROM changes_all WHERE table_id = %s AND image LIKE %s",
                (users, f"%{EMAIL}%"),
            ).fetchall()
        }
    assert keys == {"[1]", "[2]", "[3]"}  # the row's images under its three keys
    done = CliRunner().invoke(
        erase,
        ["users", "--id", "3", "--yes", "--format", "json", "--store", capture.store_dsn,
         "--schema", capture.schema, "--source", capture.source_dsn],
        env={"CDC_CONFIG": "", "CDC_SOURCE_DSN": "", "CDC_STORE_DSN": ""},
        catch_exceptions=False,
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    digests = {i: hashlib.sha256(key_text([i]).encode()).hexdigest() for i in (1, 2, 3)}
    assert report["key_sha256"] == digests[3] and report["source_check"] == "absent"
    assert sorted(report["earlier_key_sha256"]) == sorted((digests[1], digests[2]))
    assert report["earlier_keys"] == 2
    with capture.store() as conn:
        names = conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind IN ('r', 'p')",
            (capture.schema,),
        ).fetchall()
        for (relname,) in names:
            text = "\n".join(
                r[0]
                for r in conn.execute(
                    sql.SQL("SELECT t::text FROM {} t").format(sql.Identifier(capture.schema, relname))
                ).fetchall()
            )
            for secret in (EMAIL, NOTE, name):
                assert secret not in text, f"{secret!r} still in {relname}"
        recorded = conn.execute("SELECT key_sha256, earlier_keys FROM erasures").fetchall()
    assert recorded == [(digests[3], 2)]  # digests and counts, never a key
    with History(capture.store_dsn, schema=capture.schema) as h:
        history = h.row_history("users", 1)
        assert [m.op for m in history] == ["INSERT", "DELETE"]
        assert history[0].after == {"id": 1, "email": other, "name": "another row"}
    assert capture.stop() == 0
