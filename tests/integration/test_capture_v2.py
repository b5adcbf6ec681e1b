"""Capture into store format 2, end to end, checked on the tables themselves (docs/store.md):
request context per transaction, rolled-back attempts, table identity across renames and odd
names, and rows no index or jsonb limit may stop."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc import client
from tests.capture_env import CaptureEnv, rebuild, source_rows, table_id


class PaymentTimeout(Exception):  # noqa: N818 - the seed's error type
    pass


def query(env: CaptureEnv, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with env.store() as store:
        return store.execute(sql, params).fetchall()


def test_request_tagged_workload_with_rolled_back_attempts(capture: CaptureEnv) -> None:
    streams = capture.pg.version >= 16  # rolled-back attempts are decoded as they happen
    with capture.source() as conn:
        conn.execute("CREATE TABLE users (id int PRIMARY KEY, plan text)")
        conn.execute("CREATE TABLE orders (id text PRIMARY KEY, status text)")
        conn.execute("INSERT INTO orders VALUES ('81b2', 'pending')")
    capture.setup()
    capture.start()
    with psycopg.connect(capture.source_dsn) as conn:
        conn.execute("SET LOCAL cdc.request_id = 'req-a'")
        conn.execute("SET LOCAL cdc.actor = 'alice'")
        conn.execute("INSERT INTO users VALUES (1, 'free'), (2, 'free')")
        conn.execute("SET LOCAL cdc.request_id = 'req-b'")  # a nested request: a context change
        conn.execute("UPDATE users SET plan = 'pro' WHERE id = 1")
        conn.commit()
    with psycopg.connect(capture.source_dsn, autocommit=True) as conn:
        with pytest.raises(PaymentTimeout), client.request(conn, "req-c", actor="bob"):
            conn.execute("UPDATE users SET plan = NULL WHERE id = 2")
            conn.execute("UPDATE orders SET status = NULL WHERE id = '81b2'")
            raise PaymentTimeout("Stripe API timeout after 10s")
        with client.request(conn, "req-d", actor="alice"):
            conn.execute("INSERT INTO users VALUES (3, 'free')")
            with pytest.raises(psycopg.errors.UniqueViolation), conn.transaction():
                conn.execute("UPDATE users SET plan = 'x' WHERE id = 3")
                conn.execute("INSERT INTO users VALUES (1, 'dup')")  # the savepoint rolls back
    capture.wait_caught_up()

    txns = query(
        capture,
        "SELECT position, status, request_id, actor, actor_seq, context, change_count, flags "
        "FROM transactions WHERE request_id IS NOT NULL ORDER BY position",
    )
    by_request = {t[2]: t for t in txns}
    assert set(by_request) == ({"req-a", "req-c", "req-d"} if streams else {"req-a", "req-d"})
    a = by_request["req-a"]
    assert a[1:5] == ("c", "req-a", "alice", 1) and a[6] == 3
    assert json.loads(a[5])["source"] == "setting" and json.loads(a[5])["request_id"] == "req-a"
    changed = query(
        capture,
        "SELECT from_ordinal, request_id, actor, actor_seq FROM context_changes WHERE position = %s",
        (a[0],),
    )
    assert changed == [(2, "req-b", "alice", 3)]  # alice's changes 1, 2 (req-a) then 3 (req-b)
    d = by_request["req-d"]
    assert d[1] == "c" and d[3:5] == ("alice", 4) and json.loads(d[5])["source"] == "client"
    d_changes = query(
        capture, "SELECT op, key_text, flags & 1 FROM changes WHERE position = %s ORDER BY ordinal", (d[0],)
    )
    if streams:
        assert d_changes == [("I", "[3]", 0), ("U", "[3]", 1), ("I", "[1]", 1)]
        c = by_request["req-c"]
        assert c[1] == "r" and c[0] % 2 == 1  # a rolled-back position: abort LSN + 1
        c_changes = query(
            capture,
            "SELECT c.table_id, c.op, c.flags & 1 FROM changes c WHERE position = %s ORDER BY ordinal",
            (c[0],),
        )
        assert c_changes == [
            (table_id(capture, "users"), "U", 1),
            (table_id(capture, "orders"), "U", 1),
        ]
    else:  # PostgreSQL 15 decodes at commit and drops the aborted subtransaction
        assert d_changes == [("I", "[3]", 0)]
    errors = query(capture, "SELECT request_id, error_type, message FROM request_errors")
    assert errors == [("req-c", "PaymentTimeout", "Stripe API timeout after 10s")]
    assert query(capture, "SELECT actor, last_seq FROM actor_sequences ORDER BY 1")[0][0] == "alice"
    # Rolled-back attempts never change the state rebuilt from the history.
    for table in ("public.users", "public.orders"):
        assert rebuild(capture, table) == source_rows(capture, table)
    assert capture.stop() == 0


def test_renamed_table_keeps_one_identity(capture: CaptureEnv) -> None:
    with capture.source() as conn:
        conn.execute("CREATE TABLE before_name (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO before_name VALUES (1, 'a')")
    capture.setup()
    capture.start()
    with capture.source() as conn:
        conn.execute("UPDATE before_name SET v = 'b'")
        conn.execute("CREATE SCHEMA app")
        conn.execute("ALTER TABLE before_name RENAME TO after_name")
        conn.execute("ALTER TABLE after_name SET SCHEMA app")
        conn.execute("UPDATE app.after_name SET v = 'c'")
    capture.wait_caught_up()
    names = query(capture, "SELECT table_id, schema_name, table_name FROM table_names ORDER BY from_position")
    # Each DDL names the table from its own version (the event trigger: docs/ddl.md).
    assert [(s, n) for _, s, n in names] == [
        ("public", "before_name"),
        ("public", "after_name"),
        ("app", "after_name"),
    ]
    assert len({t for t, _, _ in names}) == 1 and query(capture, "SELECT count(*) FROM tables") == [(1,)]
    assert [r[0] for r in query(capture, "SELECT op FROM changes ORDER BY position, ordinal")] == [
        "S",
        "U",
        "U",
    ]
    # The new name holds from the version of the DDL that gave it (the event trigger), at or
    # before the first change under it; without the event trigger, from that change's LSN
    # (Relation messages have none: test_ddl.py covers that mode).
    ((from_position, lsn, position),) = query(
        capture,
        "SELECT n.from_position, c.lsn, c.position FROM table_names n, changes c "
        "WHERE n.schema_name = 'app' AND n.table_name = 'after_name' AND c.op = 'U' "
        "ORDER BY c.position DESC LIMIT 1",
    )
    assert from_position <= lsn < position
    assert rebuild(capture, "app.after_name") == source_rows(capture, "app.after_name")
    assert capture.stop() == 0


def test_dotted_names_stay_apart(capture: CaptureEnv) -> None:
    with capture.source() as conn:
        conn.execute('CREATE SCHEMA "a.b"')
        conn.execute("CREATE SCHEMA a")
        conn.execute('CREATE TABLE "a.b".c (id int PRIMARY KEY, v text)')
        conn.execute('CREATE TABLE a."b.c" (id int PRIMARY KEY, v text)')
        conn.execute("INSERT INTO \"a.b\".c VALUES (1, 'in a.b')")
    capture.setup()
    capture.start()
    with capture.source() as conn:
        conn.execute("INSERT INTO a.\"b.c\" VALUES (1, 'in a')")
        conn.execute("UPDATE \"a.b\".c SET v = 'still a.b'")
    capture.wait_caught_up()
    one, two = table_id(capture, '"a.b".c'), table_id(capture, 'a."b.c"')
    assert one != two
    assert rebuild(capture, '"a.b".c') == source_rows(capture, '"a.b".c')
    assert rebuild(capture, 'a."b.c"') == source_rows(capture, 'a."b.c"')
    assert capture.stop() == 0


def test_a_wide_keyless_row_is_captured(capture: CaptureEnv) -> None:
    """A 12 KB keyless REPLICA IDENTITY FULL row: its key (the whole row) is only hashed."""
    wide = "".join(random.Random(3).choice("abcdefghijklmnopqrstuvwxyz") for _ in range(12_000))
    with capture.source() as conn:
        conn.execute("CREATE TABLE loose (note text, n int)")
        conn.execute("ALTER TABLE loose REPLICA IDENTITY FULL")
    capture.setup()
    capture.start()
    with capture.source() as conn:
        conn.execute("INSERT INTO loose VALUES (%s, 1)", (wide,))
        conn.execute("UPDATE loose SET n = 2")
        conn.execute("INSERT INTO loose VALUES ('small', 3)")
        conn.execute("DELETE FROM loose WHERE n = 3")
    capture.wait_caught_up()
    rows = query(
        capture,
        "SELECT op, length(key_text), before IS NOT NULL, flags FROM changes WHERE table_id = %s "
        "ORDER BY position",
        (table_id(capture, "loose"),),
    )
    assert [(op, has_before) for op, _, has_before, _ in rows] == [
        ("I", False),
        ("U", True),
        ("I", False),
        ("D", False),
    ]
    assert rows[0][1] > 12_000
    assert rebuild(capture, "loose") == source_rows(capture, "loose")
    assert capture.stop() == 0


@pytest.mark.slow
def test_a_value_over_256_megabytes_is_stored_by_reference(capture: CaptureEnv) -> None:
    """Over capture.max_value_bytes (64 MiB) a value is stored by size and SHA-256; over
    jsonb's 256 MB it could not be stored any other way. Capture goes on after it."""
    size = 260 * 1024 * 1024
    with capture.source() as conn:
        conn.execute("CREATE TABLE blobs (id int PRIMARY KEY, body text, n int)")
    capture.setup()
    capture.start()
    with capture.source() as conn:
        conn.execute("INSERT INTO blobs SELECT 1, repeat('0123456789abcdef', %s), 0", (size // 16,))
        conn.execute("UPDATE blobs SET n = 1")  # body unchanged: filled from the stored image
        conn.execute("INSERT INTO blobs VALUES (2, 'after', 0)")
        digest = conn.execute(
            "SELECT encode(sha256(convert_to(body, 'UTF8')), 'hex') FROM blobs WHERE id = 1"
        )
        expected = digest.fetchone()
    capture.wait_caught_up(timeout=300)
    rows = query(
        capture,
        "SELECT op, key_text, flags, image FROM changes WHERE table_id = %s ORDER BY position, ordinal",
        (table_id(capture, "blobs"),),
    )
    assert [(op, key) for op, key, _, _ in rows] == [("I", "[1]"), ("U", "[1]"), ("I", "[2]")]
    reference = {"$cdc": "oversize", "bytes": size, "sha256": expected[0] if expected else None}
    assert json.loads(rows[0][3]) == {"id": 1, "body": reference, "n": 0}
    assert rows[0][2] & 8  # OVERSIZE
    assert json.loads(rows[1][3]) == {"id": 1, "body": reference, "n": 1} and rows[1][2] & 8
    assert json.loads(rows[2][3]) == {"id": 2, "body": "after", "n": 0}
    assert capture.stop() == 0


def test_the_daemon_refuses_a_format_1_store_and_names_setup(capture: CaptureEnv) -> None:
    """The daemon never writes into a format-1 store: `cdc setup` converts it first
    (tests/integration/test_migrate.py)."""
    from cdc.errors import SetupError
    from cdc.store.writer import StoreWriter

    v1_ddl = (Path(__file__).resolve().parents[1] / "data" / "store_v1.sql").read_text()
    with capture.store() as store:
        store.execute(f"CREATE SCHEMA {capture.schema}")
        store.execute(f"SET search_path = {capture.schema}")
        store.execute(v1_ddl.encode())
    writer = StoreWriter(capture.config.require_store(), capture.schema, capture.config.source.slot)
    with pytest.raises(SetupError, match="format 1") as refused:
        writer.connect()
    assert "cdc setup" in (refused.value.hint or "")
    with capture.store() as store:  # nothing of format 2 was created beside it
        assert store.execute(f"SELECT to_regclass('{capture.schema}.store_meta')").fetchone() == (None,)
