"""Every change linked to its request, end to end: SET LOCAL, application_name, the
client helper, mid-transaction context changes, rolled-back attempts and savepoints."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
import structlog
from click.testing import CliRunner

from cdc import client
from cdc.cli import main as cli
from cdc.query import Store
from tests.capture_env import CaptureEnv, rebuild, source_rows, stored_mutations

SHOP = """
CREATE TABLE users (id int PRIMARY KEY, email text NOT NULL, name text, plan text);
CREATE TABLE orders (id text PRIMARY KEY, user_id int, status text);
INSERT INTO orders VALUES ('81b2', 42, 'pending');
"""


class PaymentTimeout(Exception):  # noqa: N818 - the seed's error type
    pass


def streams_in_progress(env: CaptureEnv) -> bool:
    return env.pg.version >= 16


def rows(env: CaptureEnv) -> list[tuple[Any, ...]]:
    """(table, key, op, request_id, status, context, before, after) of every change but SNAPSHOTs."""
    return [
        (m.table, m.key, m.op, m.request_id, m.status, m.context, m.before, m.after)
        for m in stored_mutations(env)
        if m.op != "SNAPSHOT"
    ]


def test_seed_scenario_history_request_and_cause(capture: CaptureEnv) -> None:
    with capture.source() as conn:
        conn.execute(SHOP)
    capture.setup()
    capture.start()
    dsn = capture.source_dsn
    with psycopg.connect(dsn) as conn:
        conn.execute("SET LOCAL cdc.request_id = '1a2b3c4d'")
        conn.execute("SET LOCAL cdc.actor = 'signup'")
        conn.execute("INSERT INTO users (id, email, plan) VALUES (42, 'a@b.com', 'free')")
        conn.commit()
    with psycopg.connect(dsn, application_name="req:a3c91ef0") as conn:
        conn.execute("UPDATE users SET name = 'Alice Smith' WHERE id = 42")
        conn.commit()
    with psycopg.connect(dsn, autocommit=True) as conn:
        with client.request(conn, "4f9a3b2c", actor="billing"):
            conn.execute("UPDATE users SET plan = 'pro' WHERE id = 42")
        with pytest.raises(PaymentTimeout), client.request(conn, "550e8400", actor="billing"):
            conn.execute("UPDATE users SET plan = NULL WHERE id = 42")
            conn.execute("UPDATE orders SET status = NULL WHERE id = '81b2'")
            raise PaymentTimeout("Stripe API timeout after 10s")
    capture.wait_caught_up()

    history = [r for r in rows(capture) if r[0] == "public.users" and r[1] == {"id": 42}]
    expected = [("1a2b3c4d", "committed"), ("a3c91ef0", "committed"), ("4f9a3b2c", "committed")]
    if streams_in_progress(capture):
        expected.append(("550e8400", "rolled_back"))
    assert [(r[3], r[4]) for r in history] == expected
    assert history[0][5]["source"] == "setting" and history[0][5]["actor"] == "signup"
    assert history[1][5]["source"] == "application_name"
    assert history[2][5]["source"] == "client" and history[2][5]["actor"] == "billing"

    with Store(capture.store_dsn) as store:
        record = store.request("550e8400")
    assert record.error_type == "PaymentTimeout"
    assert record.error_message == "Stripe API timeout after 10s"
    assert record.error_location is not None and "test_requests.py:" in record.error_location
    if streams_in_progress(capture):
        touched = {(m.table, m.status) for m in record.mutations}
        assert touched == {("public.users", "rolled_back"), ("public.orders", "rolled_back")}
    # Rolled-back attempts never change the reconstructed state.
    assert rebuild(capture, "public.users") == source_rows(capture, "public.users")
    assert rebuild(capture, "public.orders") == source_rows(capture, "public.orders")

    result = CliRunner().invoke(
        cli, ["state", "history", "users", "--id", "42", "--store", capture.store_dsn, "--utc"]
    )
    assert result.exit_code == 0, result.output
    assert "(4 mutations)" in result.output or not streams_in_progress(capture)
    assert "req:1a2b3c4d" in result.output and "name: null → Alice Smith" in result.output
    why = CliRunner().invoke(cli, ["why", "550e8400", "--store", capture.store_dsn])
    assert why.exit_code == 0, why.output
    assert "Stripe API timeout after 10s" in why.output
    assert capture.stop() == 0


def test_failed_request_lists_every_attempted_change(capture: CaptureEnv) -> None:
    if not streams_in_progress(capture):
        pytest.skip("PostgreSQL < 16 does not stream in-progress transactions")
    with capture.source() as conn:
        conn.execute(SHOP)
        conn.execute("INSERT INTO users (id, email, plan) VALUES (42, 'a@b.com', 'free')")
    capture.setup()
    capture.start()
    with psycopg.connect(capture.source_dsn, autocommit=True) as conn:
        with client.request(conn, "4f9a3b2c", actor="billing"):
            conn.execute("UPDATE users SET plan = 'pro' WHERE id = 42")
        with pytest.raises(PaymentTimeout), client.request(conn, "550e8400", actor="billing"):
            conn.execute("UPDATE users SET plan = NULL WHERE id = 42")
            conn.execute("UPDATE orders SET status = NULL WHERE id = '81b2'")
            raise PaymentTimeout("Stripe API timeout after 10s")
    capture.wait_caught_up()
    with Store(capture.store_dsn) as store:
        record = store.request("550e8400")
    stored = [(m.table, m.status, m.op) for m in stored_mutations(capture) if m.request_id == "550e8400"]
    assert [(t, s) for t, s, _ in stored] == [
        ("public.users", "rolled_back"),
        ("public.orders", "rolled_back"),
    ], stored
    assert {(m.table, m.status) for m in record.mutations} == {
        ("public.users", "rolled_back"),
        ("public.orders", "rolled_back"),
    }
    assert capture.stop() == 0


def test_context_changing_mid_transaction_tags_each_statement(capture: CaptureEnv) -> None:
    with capture.source() as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    capture.setup()
    capture.start()
    with psycopg.connect(capture.source_dsn) as conn:
        conn.execute("SET LOCAL cdc.request_id = 'first'")
        conn.execute("SET LOCAL cdc.tenant = 'acme'")
        conn.execute("INSERT INTO t VALUES (1, 'a'), (2, 'b')")
        conn.execute("SET LOCAL cdc.request_id = 'second'")
        conn.execute("UPDATE t SET v = 'c' WHERE id = 1")
        conn.execute("RESET cdc.request_id")
        conn.execute("DELETE FROM t WHERE id = 2")
        conn.commit()
    with capture.source() as conn:  # no context at all: nothing breaks, none recorded
        conn.execute("INSERT INTO t VALUES (3, 'plain')")
    capture.wait_caught_up()
    found = rows(capture)
    assert [(r[2], r[3]) for r in found] == [
        ("INSERT", "first"),
        ("INSERT", "first"),
        ("UPDATE", "second"),
        ("DELETE", None),
        ("INSERT", None),
    ]
    assert found[0][5]["extra"] == {"tenant": "acme"}
    assert found[4][5]["source"] == "none" and found[4][5]["db_user"] == "postgres"
    assert capture.stop() == 0


def test_rolled_back_savepoint_inside_a_committed_transaction(capture: CaptureEnv) -> None:
    with capture.source() as conn:
        conn.execute("CREATE TABLE sp (id int PRIMARY KEY, v text)")
    capture.setup()
    capture.start()
    with psycopg.connect(capture.source_dsn) as conn:
        conn.execute("SET LOCAL cdc.request_id = 'sp1'")
        conn.execute("INSERT INTO sp VALUES (1, 'kept')")
        conn.execute("SAVEPOINT s")
        conn.execute("INSERT INTO sp VALUES (2, 'undone')")
        conn.execute("UPDATE sp SET v = 'undone too' WHERE id = 1")
        conn.execute("ROLLBACK TO SAVEPOINT s")
        conn.execute("INSERT INTO sp VALUES (3, 'kept too')")
        conn.commit()
    capture.wait_caught_up()
    found = [(r[2], r[1]["id"], r[4]) for r in rows(capture)]
    if streams_in_progress(capture):
        assert found == [
            ("INSERT", 1, "committed"),
            ("INSERT", 2, "rolled_back"),
            ("UPDATE", 1, "rolled_back"),
            ("INSERT", 3, "committed"),
        ]
    else:  # PostgreSQL 15 decodes at commit and drops the aborted subtransaction
        assert found == [("INSERT", 1, "committed"), ("INSERT", 3, "committed")]
    assert rebuild(capture, "public.sp") == source_rows(capture, "public.sp")
    undone = [
        ((m.before or {}).get("v"), (m.after or {}).get("v"))
        for m in stored_mutations(capture, "sp")
        if m.op == "UPDATE"
    ]
    if streams_in_progress(capture):
        assert undone == [("kept", "undone too")]
    assert capture.stop() == 0


def test_actor_sequence_orders_one_actors_changes(capture: CaptureEnv) -> None:
    with capture.source() as conn:
        conn.execute("CREATE TABLE a (id int PRIMARY KEY)")
    capture.setup()
    capture.start()
    with psycopg.connect(capture.source_dsn, autocommit=True) as conn:
        for i in range(5):
            with client.request(conn, f"r{i}", actor="alice" if i % 2 == 0 else "bob"):
                conn.execute("INSERT INTO a VALUES (%s)", (i,))
    capture.wait_caught_up()
    with capture.store() as store:
        # (format 2: a change's actor sequence number is its span's actor_seq + its place in it)
        seqs = store.execute(
            "SELECT t.actor, t.actor_seq + c.ordinal, c.key_text FROM transactions t "
            "JOIN changes c ON c.position = t.position AND c.committed_at = t.committed_at "
            "WHERE t.actor IS NOT NULL AND c.op <> 'S' ORDER BY 1, 2"
        ).fetchall()
    assert seqs == [
        ("alice", 1, "[0]"),
        ("alice", 2, "[2]"),
        ("alice", 3, "[4]"),
        ("bob", 1, "[1]"),
        ("bob", 2, "[3]"),
    ]
    assert capture.stop() == 0


def test_a_request_id_carried_over_by_a_session_level_set_is_logged_and_counted(capture: CaptureEnv) -> None:
    """`SET cdc.request_id` without LOCAL outlives its transaction (behind a pooler: another
    client's). Where PostgreSQL lets us see it (sql/context.sql, "SET or SET LOCAL?"), the context
    message says "session_level" and the daemon logs and counts it; SET LOCAL never does."""
    with capture.source() as conn:
        conn.execute("CREATE TABLE s (id int PRIMARY KEY, v text)")
    capture.setup()
    capture.start()
    with structlog.testing.capture_logs() as logs:
        with psycopg.connect(capture.source_dsn, autocommit=True) as conn:
            conn.execute("SET cdc.request_id = 'leaky'")
            for i in range(3):  # the first is the request's own; the next ones inherit it
                # no parameters: the simple query protocol, where the server lets us see it
                conn.execute(f"INSERT INTO s VALUES ({i}, 'x')")
            conn.execute("INSERT INTO s VALUES (%s, 'p')", (9,))  # extended protocol: not seen
        with psycopg.connect(capture.source_dsn) as conn:
            for i in range(3, 5):  # SET LOCAL, the same id in transactions in a row
                conn.execute("SET LOCAL cdc.request_id = 'tidy'")
                conn.execute("INSERT INTO s VALUES (%s, 'y')", (i,))
                conn.commit()
        capture.wait_caught_up()
    stored = [(m.request_id, (m.context or {}).get("session_level")) for m in stored_mutations(capture, "s")]
    assert stored == [
        ("leaky", None),
        ("leaky", True),
        ("leaky", True),
        ("leaky", None),
        ("tidy", None),
        ("tidy", None),
    ]
    assert capture.daemon is not None
    assert capture.daemon.metrics.registry.get_sample_value("cdc_session_level_request_ids_total") == 2
    warned = [e for e in logs if e["event"] == "request_id_from_session_setting"]
    assert len(warned) == 1, warned  # once per session and request id
    assert warned[0]["request_id"] == "leaky" and warned[0]["db_user"] == "postgres"
    assert set(warned[0]) == {"event", "log_level", "lsn", "request_id", "db_user", "backend_pid", "hint"}
    assert capture.stop() == 0
