"""Capture core, end to end against a real server: workload → slot → daemon → store."""

from __future__ import annotations

import json
import random
from typing import Any

import psycopg
import pytest

from tests.capture_env import CaptureEnv, rebuild, source_rows, table_id

TABLES = ("public.items", "public.pairs", "public.loose")


def create_tables(conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        "CREATE TABLE items (id int PRIMARY KEY, name text, qty int, price numeric(40,10), tags text[])"
    )
    conn.execute("CREATE TABLE pairs (a int, b text, v jsonb, PRIMARY KEY (a, b))")
    conn.execute("CREATE TABLE loose (x int, y text)")
    conn.execute("ALTER TABLE loose REPLICA IDENTITY FULL")


def random_workload(conn: psycopg.Connection[Any], rng: random.Random, transactions: int) -> None:
    for _ in range(transactions):
        rollback = rng.random() < 0.1
        with conn.transaction(force_rollback=rollback):
            for _ in range(rng.randint(1, 6)):
                action = rng.random()
                item = rng.randint(1, 60)
                if action < 0.3:
                    conn.execute(
                        "INSERT INTO items VALUES (%s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE "
                        "SET name = EXCLUDED.name, qty = items.qty + 1",
                        (
                            item,
                            f"item {item} ü",
                            rng.randint(0, 9),
                            f"{rng.randint(0, 10**28)}.0000000001",
                            ["a", "b,c"],
                        ),
                    )
                elif action < 0.45:
                    conn.execute("UPDATE items SET qty = qty + 1, price = price + 0.5 WHERE id = %s", (item,))
                elif action < 0.52:
                    # Key change: move the row to a free id.
                    conn.execute(
                        "UPDATE items SET id = id + 1000 WHERE id = %s AND NOT EXISTS "
                        "(SELECT 1 FROM items WHERE id = %s)",
                        (item, item + 1000),
                    )
                elif action < 0.6:
                    conn.execute("DELETE FROM items WHERE id = %s OR id = %s", (item, item + 1000))
                elif action < 0.72:
                    conn.execute(
                        "INSERT INTO pairs VALUES (%s, %s, %s) ON CONFLICT (a, b) DO UPDATE SET v = EXCLUDED.v",
                        (item % 7, f"k{item % 5}", json.dumps({"n": item, "deep": [1.5, None]})),
                    )
                elif action < 0.78:
                    try:  # may collide with an existing key: a savepoint that rolls back
                        with conn.transaction():
                            conn.execute(
                                "UPDATE pairs SET b = b || 'x' WHERE a = %s AND length(b) < 6", (item % 7,)
                            )
                    except psycopg.errors.UniqueViolation:
                        pass
                elif action < 0.82:
                    conn.execute("DELETE FROM pairs WHERE a = %s", (item % 7,))
                elif action < 0.92:
                    conn.execute(
                        "INSERT INTO loose VALUES (%s, %s)", (item % 4, rng.choice(["p", "q", None]))
                    )
                elif action < 0.96:
                    conn.execute("UPDATE loose SET y = 'u' WHERE ctid = (SELECT ctid FROM loose LIMIT 1)")
                elif action < 0.985:
                    conn.execute("DELETE FROM loose WHERE ctid = (SELECT ctid FROM loose LIMIT 1)")
                else:
                    conn.execute(rng.choice(["TRUNCATE pairs", "TRUNCATE loose", "TRUNCATE items, loose"]))


def assert_rebuilt(env: CaptureEnv, tables: tuple[str, ...] = TABLES) -> None:
    for table in tables:
        assert rebuild(env, table) == source_rows(env, table), f"{table} differs"


def test_random_workload_rebuilds_every_table_exactly(capture: CaptureEnv) -> None:
    rng = random.Random(20261121)
    with capture.source() as conn:
        create_tables(conn)
        random_workload(conn, rng, 40)  # rows that exist before capture: the baseline
    capture.setup()
    with capture.store() as store:
        baseline = store.execute("SELECT count(*) FROM changes WHERE op = 'S'").fetchone()
        assert baseline is not None and baseline[0] > 0
    assert_rebuilt(capture)
    capture.start()
    with capture.source() as conn:
        random_workload(conn, rng, 300)
    capture.wait_caught_up()
    assert_rebuilt(capture)
    with capture.store() as store:
        ops = {r[0] for r in store.execute("SELECT DISTINCT op FROM changes").fetchall()}
        assert {"S", "I", "U", "D", "T"} <= ops
        moved = store.execute("SELECT count(*) FROM changes WHERE old_key_text IS NOT NULL").fetchone()
        assert moved is not None and moved[0] > 0
        # No image is left incomplete or with columns still to fill.
        unknown = store.execute(
            "SELECT count(*) FROM changes WHERE flags & 4 <> 0 OR pending IS NOT NULL"
        ).fetchone()
        assert unknown == (0,)
        # Every change belongs to a stored transaction, whose change count is right.
        counts = store.execute(
            "SELECT count(*) FROM transactions t WHERE change_count <> "
            "(SELECT count(*) FROM changes c WHERE c.position = t.position)"
        ).fetchone()
        assert counts == (0,)
        orphans = store.execute(
            "SELECT count(*) FROM changes c WHERE NOT EXISTS "
            "(SELECT 1 FROM transactions t WHERE t.position = c.position)"
        ).fetchone()
        assert orphans == (0,)
    assert capture.stop() == 0


def test_each_change_stores_its_image_and_key(capture: CaptureEnv) -> None:
    with capture.source() as conn:
        create_tables(conn)
        conn.execute("INSERT INTO items VALUES (1, 'one', 1, 1.5, '{}')")
    capture.setup()
    capture.start()
    with capture.source() as conn:
        conn.execute("UPDATE items SET qty = 2 WHERE id = 1")
        conn.execute("UPDATE items SET name = NULL, qty = 3 WHERE id = 1")
        conn.execute("UPDATE items SET id = 2 WHERE id = 1")
        conn.execute("DELETE FROM items WHERE id = 2")
    capture.wait_caught_up()
    with capture.store() as store:
        rows = store.execute(
            "SELECT op, key_text, old_key_text, image, before FROM changes WHERE table_id = %s "
            "ORDER BY position, ordinal",
            (table_id(capture, "items"),),
        ).fetchall()
    assert [r[0] for r in rows] == ["S", "U", "U", "U", "D"]
    assert [r[1] for r in rows] == ["[1]", "[1]", "[1]", "[2]", "[2]"]
    assert [r[2] for r in rows] == [None, None, None, "[1]", None]
    images = [json.loads(r[3]) for r in rows]
    assert images[0] == {"id": 1, "name": "one", "qty": 1, "price": "1.5000000000", "tags": "{}"}
    assert images[1]["qty"] == 2 and images[2]["name"] is None and images[2]["qty"] == 3
    assert images[3]["id"] == 2 and images[4] == {"id": 2}  # a DELETE under DEFAULT: the key
    assert all(r[4] is None for r in rows)  # the before image is derived on read


ALL_TYPES = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE TYPE pt AS (x int, label text);
CREATE TABLE typed (
  id bigint PRIMARY KEY, i2 smallint, i4 int, n numeric, f8 float8, f4 real, t text, b bytea, ok bool,
  d date, tm time, ts timestamp, tz timestamptz, iv interval, u uuid, j json, jb jsonb, arr int[],
  tarr text[], m mood, dom posint, comp pt, ip inet, net cidr, cash money, r int4range, tsr tstzrange,
  ch char(3), vc varchar(5), bits bit varying(8), tsv tsvector
);
"""

TYPED_ROWS = [
    "(1, -32768, 2147483647, 1234567890123456789012345678901234567890.0123456789, 'NaN', 'Infinity', "
    "'héllo wörld ✓ 日本', '\\x00ff10', true, '2026-03-10', '12:34:56.789', '2026-03-10 12:00:00.123456', "
    "'2026-03-10 12:00:00+05:30', '1 year 2 mons 3 days 04:05:06.7', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', "
    '\'{"a": 1.10, "b": [1,2]}\', \'{"big": 12345678901234567890.5}\', \'{1,2,NULL}\', \'{"x,y","q\\"z"}\', '
    "'happy', 7, ROW(3, 'lbl'), '192.168.1.5/24', '10.0.0.0/8', 12.34, '[1,10)', "
    "'[2026-01-01 00:00+00,2026-02-01 00:00+00)', 'ab', 'abc', B'1011', 'fat:2 cat:1')",
    "(2, 0, 0, -0.000000000000000000000000000001, '-Infinity', -1.5e-30, '', '\\x', false, 'infinity', "
    "'00:00', '-infinity', 'epoch', '-1 days', '00000000-0000-0000-0000-000000000000', 'null', '[]', '{}', "
    "'{}', 'sad', 1, ROW(NULL, NULL), '::1', '::/0', -0.01, 'empty', '(,)', NULL, NULL, NULL, NULL)",
]


def test_every_builtin_type_round_trips_as_the_server_prints_it(capture: CaptureEnv) -> None:
    with capture.source() as conn:
        conn.execute(ALL_TYPES)
        conn.execute(f"INSERT INTO typed VALUES {TYPED_ROWS[0]}")  # in the baseline
    capture.setup()
    capture.start()
    with capture.source() as conn:
        conn.execute(f"INSERT INTO typed VALUES {TYPED_ROWS[1]}")  # streamed
        conn.execute("UPDATE typed SET t = t || '!' WHERE id = 1")
    capture.wait_caught_up()
    assert rebuild(capture, "public.typed") == source_rows(capture, "public.typed")
    with capture.store() as store:
        row = store.execute(
            "SELECT image FROM changes WHERE table_id = %s AND key_text = '[1]' "
            "ORDER BY position DESC, ordinal DESC LIMIT 1",
            (table_id(capture, "typed"),),
        ).fetchone()
    assert row is not None
    after = json.loads(row[0])
    assert after["n"] == "1234567890123456789012345678901234567890.0123456789"
    assert after["f8"] == "NaN" and after["f4"] == "Infinity"
    assert after["b"] == "\\x00ff10" and after["ok"] is True and after["i4"] == 2147483647
    assert after["tz"] == "2026-03-10 06:30:00+00"
    assert after["jb"] == '{"big": 12345678901234567890.5}'
    assert after["t"] == "héllo wörld ✓ 日本!"


@pytest.mark.parametrize("identity", ["default", "full"])
def test_unchanged_toast_value_is_kept_not_a_placeholder(capture: CaptureEnv, identity: str) -> None:
    big = "".join(random.Random(1).choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(1_000_000))
    with capture.source() as conn:
        conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text, n int)")
        conn.execute("ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL")
        if identity == "full":
            conn.execute("ALTER TABLE docs REPLICA IDENTITY FULL")
        conn.execute("INSERT INTO docs VALUES (1, %s, 0)", (big,))  # baseline row
    capture.setup()
    capture.start()
    with capture.source() as conn:
        conn.execute("INSERT INTO docs VALUES (2, %s, 0)", (big[::-1],))
        conn.execute("UPDATE docs SET n = n + 1")  # body left alone: sent as unchanged TOAST
        conn.execute("UPDATE docs SET n = n + 1 WHERE id = 2")
    capture.wait_caught_up()
    with capture.store() as store:
        rows = store.execute(
            "SELECT key_text, image, flags, pending FROM changes WHERE table_id = %s AND op = 'U' "
            "ORDER BY position, ordinal",
            (table_id(capture, "docs"),),
        ).fetchall()
    assert len(rows) == 3
    for key, image, flags, pending in rows:
        assert json.loads(image)["body"] == (big if key == "[1]" else big[::-1])
        assert flags & 4 == 0 and pending is None
    assert rebuild(capture, "public.docs") == source_rows(capture, "public.docs")


def test_add_and_drop_column_mid_stream(capture: CaptureEnv) -> None:
    with capture.source() as conn:
        conn.execute("CREATE TABLE evolving (id int PRIMARY KEY, a text)")
        conn.execute("INSERT INTO evolving VALUES (1, 'x')")
    capture.setup()
    capture.start()
    with capture.source() as conn:
        conn.execute("INSERT INTO evolving VALUES (2, 'y')")
        conn.execute("ALTER TABLE evolving ADD COLUMN b int DEFAULT 5")
        conn.execute("INSERT INTO evolving VALUES (3, 'z', 7)")
        conn.execute("UPDATE evolving SET b = 6 WHERE id = 1")
        conn.execute("ALTER TABLE evolving DROP COLUMN a")
        conn.execute("INSERT INTO evolving VALUES (4, 8)")
        conn.execute("UPDATE evolving SET b = 9 WHERE id = 2")
    capture.wait_caught_up()
    tid = table_id(capture, "evolving")
    with capture.store() as store:
        rows = [
            (op, json.loads(image))
            for op, image in store.execute(
                "SELECT op, image FROM changes WHERE table_id = %s AND op <> 'S' ORDER BY position, ordinal",
                (tid,),
            ).fetchall()
        ]
        schemas = store.execute("SELECT count(*) FROM table_schemas WHERE table_id = %s", (tid,)).fetchone()
    assert rows == [
        ("I", {"id": 2, "a": "y"}),
        ("I", {"id": 3, "a": "z", "b": 7}),
        ("U", {"id": 1, "a": "x", "b": 6}),
        ("I", {"id": 4, "b": 8}),
        ("U", {"id": 2, "b": 9}),
    ]
    assert schemas is not None and schemas[0] >= 3
    assert rebuild(capture, "public.evolving") == source_rows(capture, "public.evolving")


def test_large_transaction_is_spilled_and_captured_whole(capture: CaptureEnv) -> None:
    capture.extra_env["CDC_CAPTURE__MEMORY_LIMIT_BYTES"] = "1MiB"
    with capture.source() as conn:
        conn.execute("CREATE TABLE bulk (id int PRIMARY KEY, payload text)")
    capture.setup()
    daemon = capture.start()
    with capture.source() as conn:
        conn.execute("INSERT INTO bulk SELECT g, repeat('x', 100) FROM generate_series(1, 50000) g")
    capture.wait_caught_up()
    with capture.store() as store:
        row = store.execute(
            "SELECT count(*), count(DISTINCT position) FROM changes WHERE table_id = %s",
            (table_id(capture, "bulk"),),
        ).fetchone()
    assert row == (50000, 1)
    assert daemon.metrics.spilled_transactions._value.get() >= 0  # metric exists
    assert rebuild(capture, "public.bulk") == source_rows(capture, "public.bulk")


def test_daemon_resumes_without_loss_or_duplicates_after_stop(capture: CaptureEnv) -> None:
    with capture.source() as conn:
        create_tables(conn)
    capture.setup()
    rng = random.Random(7)
    for _ in range(3):
        capture.start()
        with capture.source() as conn:
            random_workload(conn, rng, 60)
        capture.wait_caught_up()
        assert capture.stop() == 0
        with capture.source() as conn:
            random_workload(conn, rng, 20)  # written while the daemon is down
    capture.start()
    capture.wait_caught_up()
    assert_rebuilt(capture)


def test_setup_is_idempotent_and_explains_missing_wal_level(capture: CaptureEnv) -> None:
    with capture.source() as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        conn.execute("INSERT INTO t VALUES (1)")
    capture.setup()
    capture.setup()  # second run changes nothing
    with capture.store() as store:
        assert store.execute("SELECT count(*) FROM changes").fetchone() == (1,)
        assert store.execute("SELECT count(*) FROM transactions").fetchone() == (1,)
