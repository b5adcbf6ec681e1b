"""cdc revert / cdc restore against real capture: the undo matches time travel."""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner

from cdc import client
from cdc.cli_revert import restore, revert
from cdc.history import History
from cdc.lsn import format_lsn
from cdc.query import Store
from cdc.revert import (
    RedactedValuesError,
    RevertApplyError,
    RevertConflictError,
    apply_plan,
    plan_restore,
    plan_revert,
)
from tests.capture_env import CaptureEnv, source_rows, stored_mutations
from tests.integration.test_capture import ALL_TYPES, TYPED_ROWS

SCHEMA = """
CREATE TABLE items (id int PRIMARY KEY, name text, qty int, price numeric(20,6), data bytea, doc json,
                    meta jsonb, tags text[], at timestamptz, twice int GENERATED ALWAYS AS (id * 2) STORED);
CREATE TABLE pairs (a int, b text, v text, PRIMARY KEY (a, b));
CREATE TABLE loose (x int, y text, j json);
ALTER TABLE loose REPLICA IDENTITY FULL;
CREATE TABLE serial_ids (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, label text);
INSERT INTO items VALUES
  (1, 'one', 1, 1.500000, '\\x00ff', '{"a": 1.10,  "b": [1, 2]}', '{"k": "v"}', '{a,"b,c"}',
   '2026-03-10 12:00+05:30'),
  (2, 'two', 2, 99999999999999.123456, NULL, NULL, NULL, NULL, NULL),
  (3, E'it''s "three" \\\\ back', 3, -0.000001, '\\xdeadbeef', '[null, "x"]',
   '{"big": 12345678901234567890.5}', '{}', '-infinity');
INSERT INTO pairs VALUES (1, 'x', 'p1'), (1, 'y', 'p2');
INSERT INTO loose VALUES (1, 'dup', '{"z":  1}'), (1, 'dup', '{"z":  1}'), (2, NULL, NULL);
INSERT INTO serial_ids (label) VALUES ('first'), ('second');
"""
TABLES = ("public.items", "public.pairs", "public.loose", "public.serial_ids")


def start(capture: CaptureEnv, schema: str = SCHEMA) -> int:
    with capture.source() as conn:
        conn.execute(schema)
    capture.setup()
    capture.start()
    return capture.wait_caught_up()


def rows_at(capture: CaptureEnv, table: str, version: int) -> Counter[str]:
    with History(capture.store_dsn, schema=capture.schema) as h:
        rows = h.at(version=version).table(table).collect()
    assert rows is not None
    return Counter(json.dumps(r, sort_keys=True) for r in rows)


def source_now(capture: CaptureEnv, table: str) -> Counter[str]:
    """The table's rows on the source as cdc stores them (the stored generated column is captured
    from PostgreSQL 18 on)."""
    out: Counter[str] = Counter()
    for text, count in source_rows(capture, table).items():
        row = json.loads(text)
        if capture.pg.version < 18:
            row.pop("twice", None)
        out[json.dumps(row, sort_keys=True)] += count
    return out


def store(capture: CaptureEnv) -> Store:
    return Store(capture.store_dsn, schema=capture.schema)


def the_request(conn: psycopg.Connection[Any]) -> None:
    with client.request(conn, "req-main", actor="app"):
        conn.execute(
            "INSERT INTO items (id, name, qty, price, data, doc) VALUES (100, 'new', 1, 0.1, '\\x01', '{}')"
        )
        conn.execute(
            "UPDATE items SET name = %s, price = 2.000001, data = NULL, doc = '{\"changed\":  true}' "
            "WHERE id = 1",
            ('O\'Brien \\ "q"',),
        )
        conn.execute("UPDATE items SET id = 20, qty = qty + 10 WHERE id = 2")  # key change
        conn.execute("DELETE FROM items WHERE id = 3")
        conn.execute("UPDATE pairs SET b = 'z', v = 'moved' WHERE a = 1 AND b = 'x'")
        conn.execute("DELETE FROM pairs WHERE a = 1 AND b = 'y'")
        conn.execute("INSERT INTO pairs VALUES (2, 'w', NULL)")
        conn.execute("DELETE FROM loose WHERE ctid = (SELECT ctid FROM loose WHERE y = 'dup' LIMIT 1)")
        conn.execute("UPDATE loose SET y = 'set' WHERE x = 2")
        conn.execute("INSERT INTO loose VALUES (3, 'new', '[1,  2]')")
        conn.execute("INSERT INTO serial_ids (label) VALUES ('third')")
        conn.execute("UPDATE serial_ids SET label = 'FIRST' WHERE id = 1")
        conn.execute("DELETE FROM serial_ids WHERE id = 2")


def test_revert_puts_every_touched_row_back_as_time_travel_shows(capture: CaptureEnv) -> None:
    before = start(capture)
    with capture.source() as conn:
        the_request(conn)
        with pytest.raises(RuntimeError), client.request(conn, "req-failed"):
            conn.execute("UPDATE items SET qty = 0")
            raise RuntimeError("rolled back: nothing to revert")
    after = capture.wait_caught_up()
    with store(capture) as st, capture.source() as conn:
        plan = plan_revert(st, conn, "req-ma")  # a unique prefix
        assert plan.conflicts == []
        assert plan.context_value == "req-main"
        assert len(plan.statements) == 13
        assert "'2.000001'::numeric(20,6)" not in plan.sql_text  # the inverse sets the before value
        assert "'1.500000'::numeric(20,6)" in plan.sql_text
        assert "OVERRIDING SYSTEM VALUE" in plan.sql_text
        assert plan.sql_text.index("serial_ids") < plan.sql_text.index('INSERT INTO "public"."items"')
        assert plan_revert(st, conn, "req-failed").statements == []
        new_id = apply_plan(conn, plan, actor="ops")
    reverted = capture.wait_caught_up()
    for table in TABLES:
        assert source_now(capture, table) == rows_at(capture, table, before), table
        assert rows_at(capture, table, reverted) == rows_at(capture, table, before), table
    assert rows_at(capture, "public.items", after) != rows_at(capture, "public.items", before)
    with History(capture.store_dsn, schema=capture.schema) as h:
        past, now = h.at(version=before), h.at(version=reverted)
        for key in (1, 2, 3, 20, 100):  # updated, moved away, deleted, moved to, inserted
            assert now.items.get(key) == past.items.get(key), key
        assert now.items.get(100) is None and now.items.get(20) is None and now.items.get(3) is not None
        for key in ({"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 1, "b": "z"}, {"a": 2, "b": "w"}):
            assert now.pairs.get(key) == past.pairs.get(key), key
        record = h.request(new_id)
    assert record.outcome == "committed" and record.mutation_count == 13
    assert record.actor == "ops"
    assert {m.context["extra"]["reverts"] for m in record.mutations if m.context} == {"req-main"}


def test_types_round_trip_through_the_generated_sql(capture: CaptureEnv) -> None:
    with capture.source() as conn:
        conn.execute(ALL_TYPES)
        conn.execute(f"INSERT INTO typed VALUES {TYPED_ROWS[0]}")
        conn.execute(f"INSERT INTO typed VALUES {TYPED_ROWS[1]}")
        conn.execute("CREATE TABLE blobs (k text PRIMARY KEY, b bytea, n numeric, j json)")
        conn.execute(
            "INSERT INTO blobs VALUES (E'key with '' and \\\\ and \"', '\\x000102ff', "
            "0.1000000000000000000001, '{\"spaces\":   [1.10, 2]}')"
        )
    capture.setup()
    capture.start()
    before = capture.wait_caught_up()
    with capture.source() as conn, client.request(conn, "req-types"):
        conn.execute(
            "UPDATE typed SET i2 = 1, i4 = 2, n = 3, f8 = 4, f4 = 5, t = 't', b = '\\x01', ok = NOT ok, "
            "d = '2000-01-01', tm = '01:02', ts = '2000-01-01', tz = '2000-01-01Z', iv = '1 day', "
            "u = gen_random_uuid(), j = '{}', jb = '{}', arr = '{}', tarr = '{}', m = 'ok', "
            "dom = 9, comp = ROW(1, 'x'), ip = '10.1.1.1', net = '10.1.0.0/16', cash = 1, r = '[3,4)', "
            "tsr = 'empty', ch = 'zz', vc = 'v', bits = B'1', tsv = 'a'"
        )
        conn.execute("DELETE FROM typed WHERE id = 1")
        conn.execute("DELETE FROM blobs")
    capture.wait_caught_up()
    with store(capture) as st, capture.source() as conn:
        conn.execute("SET search_path = nowhere")  # user types are schema-qualified in the SQL
        plan = plan_revert(st, conn, "req-types")
        assert plan.conflicts == []
        assert "public.mood" in plan.sql_text and "public.posint" in plan.sql_text
        apply_plan(conn, plan)
    reverted = capture.wait_caught_up()
    for table in ("public.typed", "public.blobs"):
        assert source_now(capture, table) == rows_at(capture, table, before), table
        assert rows_at(capture, table, reverted) == rows_at(capture, table, before), table


def test_conflicting_later_change_stops_the_revert(capture: CaptureEnv) -> None:
    start(capture)
    with capture.source() as conn:
        with client.request(conn, "req-a"):
            conn.execute("UPDATE items SET qty = 10, name = 'a' WHERE id = 1")
            conn.execute("UPDATE items SET qty = 20 WHERE id = 2")
        with client.request(conn, "req-b"):
            conn.execute("UPDATE items SET qty = 11 WHERE id = 1")  # same column: a conflict
            conn.execute("UPDATE items SET price = 5 WHERE id = 2")  # another column: fine
    capture.wait_caught_up()
    runner = CliRunner()
    env = {"CDC_SOURCE_DSN": capture.source_dsn, "CDC_STORE_DSN": capture.store_dsn}
    args = ["req-a", "--schema", capture.schema]
    result = runner.invoke(revert, args, env=env)
    assert result.exit_code == 8, result.output
    assert "1 conflict(s) stop the revert" in result.output
    assert re.search(
        r"public\.items id=1 column qty: changed later \(UPDATE\) \(by request req-b, version ", result.output
    )
    result = runner.invoke(revert, [*args, "--format", "json"], env=env)
    assert result.exit_code == 8
    assert [c["column"] for c in json.loads(result.stdout)["conflicts"]] == ["qty"]
    with capture.source() as conn:
        assert conn.execute("SELECT qty FROM items ORDER BY id").fetchall() == [(11,), (20,), (3,)]
        with store(capture) as st:
            plan = plan_revert(st, conn, "req-a")
            assert [(c.table, c.key, c.column, c.request_id) for c in plan.conflicts] == [
                ("public.items", {"id": 1}, "qty", "req-b")
            ]
            with pytest.raises(RevertConflictError):
                apply_plan(conn, plan)
    result = runner.invoke(revert, [*args, "--force", "--apply", "--format", "json"], env=env)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["applied_request_id"] and len(data["conflicts"]) == 1
    with capture.source() as conn:
        assert conn.execute("SELECT qty, name FROM items ORDER BY id").fetchall() == [
            (1, "one"),
            (2, "two"),
            (3, 'it\'s "three" \\ back'),
        ]
    capture.wait_caught_up()
    with store(capture) as st:
        record = st.request(data["applied_request_id"])
        assert {m.context["extra"]["reverts"] for m in record.mutations if m.context} == {"req-a"}
        assert record.actor is not None and record.actor.startswith("cdc")


def test_change_not_yet_captured_is_a_conflict_and_apply_rechecks(capture: CaptureEnv) -> None:
    start(capture)
    with capture.source() as conn, client.request(conn, "req-a"):
        conn.execute("UPDATE items SET name = 'a' WHERE id = 1")
    capture.wait_caught_up()
    capture.stop()  # later changes stay out of the history for now
    with store(capture) as st, capture.source() as conn:
        plan = plan_revert(st, conn, "req-a")
        assert plan.conflicts == []
        conn.execute("UPDATE items SET name = 'b' WHERE id = 1")  # between plan and apply
        with pytest.raises(RevertConflictError, match="current value on the source differs"):
            apply_plan(conn, plan)
        assert conn.execute("SELECT name FROM items WHERE id = 1").fetchone() == ("b",)
        plan = plan_revert(st, conn, "req-a")
        assert [(c.column, c.request_id, c.version) for c in plan.conflicts] == [("name", None, None)]
        conn.execute("DELETE FROM items WHERE id = 1")
        with pytest.raises(RevertApplyError, match="changed 0 row"):
            apply_plan(conn, plan, force=True)


def test_cli_revert_plan_only_changes_nothing(capture: CaptureEnv) -> None:
    start(capture)
    with capture.source() as conn, client.request(conn, "req-plan"):
        conn.execute("UPDATE items SET qty = 7 WHERE id = 1")
    capture.wait_caught_up()
    env = {"CDC_SOURCE_DSN": capture.source_dsn, "CDC_STORE_DSN": capture.store_dsn}
    result = CliRunner().invoke(revert, ["req-plan", "--schema", capture.schema], env=env)
    assert result.exit_code == 0, result.output
    assert 'UPDATE "public"."items" SET "qty" = 1::integer WHERE "id" = 1::integer;' in result.output
    assert "BEGIN;" in result.output and "COMMIT;" in result.output
    with capture.source() as conn:
        assert conn.execute("SELECT qty FROM items WHERE id = 1").fetchone() == (7,)
        psql_like = result.output[result.output.index("BEGIN;") :]
        conn.execute(psql_like)  # the printed script runs as it is
        assert conn.execute("SELECT qty FROM items WHERE id = 1").fetchone() == (1,)
    result = CliRunner().invoke(revert, ["nope", "--schema", capture.schema], env=env)
    assert result.exit_code == 7 and "no request 'nope'" in result.output


def test_restore_one_row_to_a_version(capture: CaptureEnv) -> None:
    start(capture)
    with capture.source() as conn:
        conn.execute("UPDATE items SET name = 'v1', price = 1.25 WHERE id = 1")
        v1 = capture.wait_caught_up()
        conn.execute("UPDATE items SET name = NULL, qty = 99, meta = '{\"x\": 1}' WHERE id = 1")
        conn.execute("DELETE FROM items WHERE id = 3")
        conn.execute("INSERT INTO items (id, name) VALUES (4, 'born later')")
    capture.wait_caught_up()
    env = {"CDC_SOURCE_DSN": capture.source_dsn, "CDC_STORE_DSN": capture.store_dsn}
    runner = CliRunner()
    result = runner.invoke(
        restore, ["items", "--id", "1", "--version", str(v1), "--schema", capture.schema], env=env
    )
    assert result.exit_code == 0, result.output
    assert re.search(r"qty\s+99\s+1", result.output) and re.search(r"name\s+null\s+v1", result.output)
    with store(capture) as st, capture.source() as conn:
        plan = plan_restore(st, conn, "items", 1, version=v1)
        assert [d.column for d in plan.diff] == ["name", "qty", "meta"]
        new_id = apply_plan(conn, plan, actor="support")
        for key in (3, 4):
            apply_plan(conn, plan_restore(st, conn, "public.items", key, version=v1))
        assert plan_restore(st, conn, "items", 1, version=v1).statements == []
    restored = capture.wait_caught_up()
    with History(capture.store_dsn, schema=capture.schema) as h:
        for key in (1, 3, 4):
            assert h.at(version=restored).items.get(key) == h.at(version=v1).items.get(key), key
        assert h.at(version=restored).items.get(4) is None
        record = h.request(new_id)
    restores = {m.context["extra"]["restores"] for m in record.mutations if m.context}
    assert restores == {f"public.items id=1 @ {format_lsn(v1)}"}
    assert record.actor == "support"
    assert source_now(capture, "public.items") == rows_at(capture, "public.items", v1)
    # The CLI applies and prints the new request id; --at takes a time.
    with capture.source() as conn:
        conn.execute("UPDATE items SET qty = 5 WHERE id = 1")
    capture.wait_caught_up()
    result = runner.invoke(
        restore,
        ["items", "--id", "1", "--version", str(restored), "--apply", "--schema", capture.schema],
        env=env,
    )
    assert result.exit_code == 0, result.output
    assert re.search(r"-- applied as request [0-9a-f]{32}", result.output)
    with capture.source() as conn:
        assert conn.execute("SELECT qty FROM items WHERE id = 1").fetchone() == (1,)


FK_SCHEMA = """
CREATE TABLE customers (id int PRIMARY KEY, name text);
CREATE TABLE orders (id int PRIMARY KEY, customer int REFERENCES customers ON DELETE CASCADE, total numeric);
CREATE TABLE notes (id int PRIMARY KEY, customer int REFERENCES customers ON DELETE SET NULL, body text);
CREATE TABLE tree (id int PRIMARY KEY, parent int REFERENCES tree ON DELETE CASCADE);
INSERT INTO customers VALUES (1, 'ann'), (2, 'bob');
INSERT INTO orders VALUES (10, 1, 9.99), (11, 1, 0.01), (12, 2, 5);
INSERT INTO notes VALUES (20, 1, 'vip'), (21, 2, 'new');
INSERT INTO tree VALUES (1, NULL), (2, 1), (3, 2), (4, NULL);
"""


def test_revert_of_cascading_deletes_puts_parents_back_first(capture: CaptureEnv) -> None:
    before = start(capture, FK_SCHEMA)
    with capture.source() as conn, client.request(conn, "req-cascade"):
        conn.execute("DELETE FROM customers WHERE id = 1")  # cascades to orders, sets notes.customer NULL
        conn.execute("DELETE FROM tree WHERE id = 1")  # cascades down the tree
        conn.execute("UPDATE customers SET name = 'robert' WHERE id = 2")
    capture.wait_caught_up()
    with store(capture) as st, capture.source() as conn:
        plan = plan_revert(st, conn, "req-cascade")
        assert plan.conflicts == []
        assert "WITH" in plan.sql_text and "RETURNING 1" in plan.sql_text
        apply_plan(conn, plan)
    capture.wait_caught_up()
    for table in ("public.customers", "public.orders", "public.notes", "public.tree"):
        assert source_now(capture, table) == rows_at(capture, table, before), table


# ============================================================================ redacted columns

REDACTED_SCHEMA = """
CREATE TABLE users (id int PRIMARY KEY, secret text, n int);
CREATE TABLE strict (id int PRIMARY KEY, secret text NOT NULL, n int);
INSERT INTO users VALUES (1, 's1', 0), (2, 's2', 0), (3, 's3', 0);
INSERT INTO strict VALUES (1, 'x1', 0);
"""


def _refused(plan: Any, *columns: str) -> str:
    with pytest.raises(RedactedValuesError) as caught:
        plan()
    text = str(caught.value)
    for column in columns:
        assert column in text, text
    return text


@pytest.mark.parametrize("policy", ["hash", "mask", "exclude"])
def test_undo_never_writes_a_redacted_placeholder(capture: CaptureEnv, policy: str) -> None:
    """The issue's damage: revert/restore --apply wrote `hmac-sha256:...`, `****` or NULL (for an
    excluded column) over the live values. Each inverse (of an INSERT, UPDATE, DELETE), for revert
    and restore, with and without --keep-redacted."""
    capture.extra_env["CDC_COLUMNS__PUBLIC.USERS__SECRET"] = policy
    capture.extra_env["CDC_COLUMNS__PUBLIC.STRICT__SECRET"] = policy
    capture.extra_env["CDC_POLICIES__HASH_KEY"] = "revert-test-hash-key-0123456789"
    v0 = start(capture, REDACTED_SCHEMA)
    with capture.source() as conn:
        with client.request(conn, "r-ins"):
            conn.execute("INSERT INTO users VALUES (10, 's10', 0)")
        with client.request(conn, "r-upd"):
            conn.execute("UPDATE users SET secret = 'changed', n = 1 WHERE id = 1")
        with client.request(conn, "r-del"):
            conn.execute("DELETE FROM users WHERE id = 2")
        with client.request(conn, "r-del-strict"):
            conn.execute("DELETE FROM strict WHERE id = 1")
    capture.wait_caught_up()
    # what the store holds for the column: a placeholder, or nothing
    stored = [m.before for m in stored_mutations(capture) if m.request_id == "r-del" and m.op == "DELETE"]
    assert len(stored) == 1 and stored[0] is not None and stored[0].get("secret") != "s2"
    why = {"hash": "hash", "mask": "mask", "exclude": "exclude: never captured"}[policy]

    with store(capture) as st, capture.source() as source:
        # INSERT inverse: a DELETE, nothing written: never refused.
        assert "DELETE" in plan_revert(st, source, "r-ins").sql_text
        # UPDATE inverse: the hash placeholder would be written back. An excluded column is never
        # in a stored UPDATE (not captured), nor a masked one whose value stays non-NULL (both
        # images hold ****): nothing of it is written, and the plan says so.
        if policy in ("exclude", "mask"):
            plan = plan_revert(st, source, "r-upd")
            assert '"secret"' not in plan.sql_text and '"n" = 0' in plan.sql_text
            assert any("secret" in note and "not undone" in note for note in plan.notes), plan.notes
        else:
            text = _refused(lambda: plan_revert(st, source, "r-upd"), "public.users", f"secret ({why})")
            assert "--keep-redacted" in text
        kept = plan_revert(st, source, "r-upd", keep_redacted=True)
        assert '"secret"' not in kept.sql_text and '"n" = 0' in kept.sql_text
        # DELETE inverse: an INSERT of the stored row, placeholder (or nothing) in the column.
        _refused(lambda: plan_revert(st, source, "r-del"), "public.users", f"secret ({why})")
        reinsert = plan_revert(st, source, "r-del", keep_redacted=True)
        assert '"secret"' not in reinsert.sql_text and "INSERT" in reinsert.sql_text
        # ... and a NOT NULL column without a default cannot be left out even when asked.
        _refused(lambda: plan_revert(st, source, "r-del-strict"), "public.strict", "secret")
        required = _refused(
            lambda: plan_revert(st, source, "r-del-strict", keep_redacted=True), "public.strict", "secret"
        )
        assert "NOT NULL without a default" in required

        # Restore: an UPDATE back to v0 (row 1), an INSERT (row 2, deleted), a DELETE (row 10).
        if policy == "exclude":
            plan = plan_restore(st, source, "users", 1, version=v0)
            assert '"secret"' not in plan.sql_text and '"n" = 0' in plan.sql_text
        else:
            _refused(lambda: plan_restore(st, source, "users", 1, version=v0), "public.users", "secret")
        restored = plan_restore(st, source, "users", 1, version=v0, keep_redacted=True)
        assert '"secret"' not in restored.sql_text and all(d.column != "secret" for d in restored.diff)
        _refused(lambda: plan_restore(st, source, "users", 2, version=v0), "public.users", "secret")
        back = plan_restore(st, source, "users", 2, version=v0, keep_redacted=True)
        assert "INSERT" in back.sql_text and '"secret"' not in back.sql_text
        assert "DELETE" in plan_restore(st, source, "users", 10, version=v0).sql_text
        _refused(
            lambda: plan_restore(st, source, "strict", 1, version=v0, keep_redacted=True), "public.strict"
        )

        # Applied with --keep-redacted: every other column goes back, the redacted ones stay.
        for request_id in ("r-upd", "r-del", "r-ins"):
            apply_plan(source, plan_revert(st, source, request_id, keep_redacted=True))
    with capture.source() as conn:
        rows = conn.execute("SELECT id, secret, n FROM users ORDER BY id").fetchall()
    assert rows == [(1, "changed", 0), (2, None, 0), (3, "s3", 0)]
    assert not any(str(r[1]).startswith(("hmac-sha256:", "sha256:", "****")) for r in rows)

    # The CLI: exit code 2, naming the table and column; --keep-redacted goes through.
    env = {"CDC_SOURCE_DSN": capture.source_dsn, "CDC_STORE_DSN": capture.store_dsn, "CDC_CONFIG": ""}
    with capture.source() as conn, client.request(conn, "r-upd-2"):
        conn.execute("UPDATE users SET secret = 'again', n = 5 WHERE id = 3")
    capture.wait_caught_up()
    refused = CliRunner().invoke(revert, ["r-upd-2", "--schema", capture.schema, "--apply"], env=env)
    if policy in ("exclude", "mask"):
        assert refused.exit_code == 0, refused.output
    else:
        assert refused.exit_code == 8 and "public.users: secret" in refused.output, refused.output
        done = CliRunner().invoke(
            revert, ["r-upd-2", "--schema", capture.schema, "--apply", "--keep-redacted"], env=env
        )
        assert done.exit_code == 0, done.output
    with capture.source() as conn:
        assert conn.execute("SELECT secret, n FROM users WHERE id = 3").fetchone() == ("again", 0)
    # Row 2 is back as it was but for the column (NULL now): a restore would write the placeholder.
    args = ["users", "--id", "2", "--version", str(v0), "--schema", capture.schema]
    cli_restore = CliRunner().invoke(restore, args, env=env)
    if policy == "exclude":
        assert cli_restore.exit_code == 0 and "already equals" in cli_restore.output, cli_restore.output
    else:
        assert cli_restore.exit_code == 8 and "public.users: secret" in cli_restore.output, cli_restore.output
    kept_restore = CliRunner().invoke(restore, [*args, "--keep-redacted"], env=env)
    assert kept_restore.exit_code == 0 and "already equals" in kept_restore.output, kept_restore.output
    assert capture.stop() == 0
