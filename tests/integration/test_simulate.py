"""cdc.simulate: dry-run of a mutation on a real server; deltas, rollback, errors, nesting, async."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from cdc import client
from cdc.devdb import LocalPostgres
from cdc.dryrun import (
    Delta,
    asimulate,
    install_simulate,
    parse_record,
    simulate,
    simulate_tables,
    uninstall_simulate,
)
from cdc.errors import SetupError, UsageError
from tests.capture_env import CaptureEnv, stored_mutations
from tests.integration.test_capture import ALL_TYPES, TYPED_ROWS


def without_generated(deltas: list[Delta], server_version: int) -> list[Delta]:
    """The deltas without the stored generated column ``twice``, checked where it is captured
    (PostgreSQL 18 publishes stored generated columns: docs/ddl.md)."""
    out = []
    for d in deltas:
        images = []
        for image in (d.before, d.after):
            if image is not None and "twice" in image:
                assert server_version >= 180000 and image["twice"] == image["id"] * 2
            images.append(None if image is None else {k: v for k, v in image.items() if k != "twice"})
        out.append(dataclasses.replace(d, before=images[0], after=images[1]))
    return out


TABLES = [("public", "items"), ("public", "pairs"), ("public", "loose")]

SCHEMA = """
CREATE TABLE items (id int PRIMARY KEY, name text, price numeric(12,4), ts timestamptz, data bytea,
                    doc json, tags text[], ok bool, twice int GENERATED ALWAYS AS (id * 2) STORED);
CREATE TABLE pairs (a int, b text, v jsonb, PRIMARY KEY (a, b));
CREATE TABLE loose (x int, y text);
ALTER TABLE loose REPLICA IDENTITY FULL;
INSERT INTO items VALUES (1, 'one', 12.5, '2026-03-10 12:00:00+05:30', '\\x00ff', '{"a": 1.10}',
                          '{a,"b,c"}', true);
INSERT INTO items VALUES (2, 'two', NULL, NULL, NULL, NULL, NULL, NULL);
INSERT INTO pairs VALUES (1, 'x', '{"n": 1}');
INSERT INTO loose VALUES (1, 'p'), (1, 'p'), (2, NULL);
"""


@pytest.fixture
def source(pg: LocalPostgres, fresh_dbname: str) -> Iterator[psycopg.Connection[Any]]:
    dsn = pg.create_database(fresh_dbname)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
        assert install_simulate(conn, TABLES) == []
        yield conn
    pg.drop_database(fresh_dbname)


def snapshot(conn: psycopg.Connection[Any]) -> dict[str, list[Any]]:
    return {
        t: conn.execute(f"SELECT t::text FROM {t} AS t ORDER BY 1").fetchall()
        for t in ("items", "pairs", "loose")
    }


def test_deltas_of_inserts_updates_deletes_and_nothing_changes(source: psycopg.Connection[Any]) -> None:
    before = snapshot(source)
    source.execute("SET TimeZone = 'America/New_York'")
    source.execute("SET DateStyle = 'SQL, DMY'")  # the session's own output settings do not leak in

    def fn(conn: psycopg.Connection[Any]) -> str:
        conn.execute(
            "INSERT INTO items (id, name, price, data, doc) "
            "VALUES (3, %s, 0.0001, '\\xdeadbeef', '[1, 2.50]')",
            ('it\'s "quoted" \\ back, (paren)',),
        )
        conn.execute("UPDATE items SET price = price + 1, name = NULL WHERE id = 1")
        conn.execute("UPDATE items SET id = 20 WHERE id = 2")  # key change
        conn.execute("DELETE FROM pairs WHERE a = 1")
        conn.execute("INSERT INTO pairs VALUES (2, 'y', '{\"big\": 12345678901234567890.5}')")
        conn.execute("DELETE FROM loose WHERE ctid = (SELECT ctid FROM loose WHERE x = 1 LIMIT 1)")
        conn.execute("UPDATE loose SET y = 'q' WHERE x = 2")
        return "done"

    result = simulate(source, fn)
    assert result.committed is False and result.error is None and result.result == "done"
    source.execute("RESET TimeZone")
    source.execute("RESET DateStyle")
    assert snapshot(source) == before
    assert source.info.transaction_status == psycopg.pq.TransactionStatus.IDLE and source.autocommit
    deltas = without_generated(result.deltas, source.info.server_version)
    one_before = {
        "id": 1,
        "name": "one",
        "price": "12.5000",
        "ts": "2026-03-10 06:30:00+00",
        "data": "\\x00ff",
        "doc": '{"a": 1.10}',
        "tags": '{a,"b,c"}',
        "ok": True,
    }
    assert deltas == [
        Delta(
            0,
            "public.items",
            3,
            "insert",
            None,
            {
                "id": 3,
                "name": 'it\'s "quoted" \\ back, (paren)',
                "price": "0.0001",
                "ts": None,
                "data": "\\xdeadbeef",
                "doc": "[1, 2.50]",
                "tags": None,
                "ok": None,
            },
        ),
        Delta(0, "public.items", 1, "update", one_before, {**one_before, "name": None, "price": "13.5000"}),
        Delta(
            0,
            "public.items",
            20,
            "update",
            {
                "id": 2,
                "name": "two",
                "price": None,
                "ts": None,
                "data": None,
                "doc": None,
                "tags": None,
                "ok": None,
            },
            {
                "id": 20,
                "name": "two",
                "price": None,
                "ts": None,
                "data": None,
                "doc": None,
                "tags": None,
                "ok": None,
            },
        ),
        Delta(0, "public.pairs", {"a": 1, "b": "x"}, "delete", {"a": 1, "b": "x", "v": '{"n": 1}'}, None),
        Delta(
            0,
            "public.pairs",
            {"a": 2, "b": "y"},
            "insert",
            None,
            {"a": 2, "b": "y", "v": '{"big": 12345678901234567890.5}'},
        ),
        Delta(0, "public.loose", {"x": 1, "y": "p"}, "delete", {"x": 1, "y": "p"}, None),
        Delta(0, "public.loose", {"x": 2, "y": "q"}, "update", {"x": 2, "y": None}, {"x": 2, "y": "q"}),
    ]
    as_dict = result.as_dict()
    assert set(as_dict) == {"committed", "deltas", "result", "error"}
    assert as_dict["deltas"][0]["operation"] == "insert" and as_dict["deltas"][0]["version"] == 0
    json.dumps(as_dict)  # JSON-ready


def test_failing_callback_returns_its_error_and_the_deltas_before_it(source: psycopg.Connection[Any]) -> None:
    before = snapshot(source)

    def python_error(conn: psycopg.Connection[Any]) -> None:
        conn.execute("UPDATE items SET name = 'changed' WHERE id = 1")
        raise ValueError("payment provider timed out")

    result = simulate(source, python_error)
    assert result.error == "payment provider timed out" and result.result is None
    assert [(d.table, d.key, d.operation) for d in result.deltas] == [("public.items", 1, "update")]

    def database_error(conn: psycopg.Connection[Any]) -> None:  # aborts the transaction
        conn.execute("INSERT INTO items (id, name) VALUES (5, 'five')")
        conn.execute("DELETE FROM loose WHERE x = 2")
        conn.execute("INSERT INTO items (id) VALUES (1)")  # duplicate key

    result = simulate(source, database_error)
    assert result.error is not None and "duplicate key" in result.error
    assert [(d.table, d.key, d.operation) for d in result.deltas] == [
        ("public.items", 5, "insert"),
        ("public.loose", {"x": 2, "y": None}, "delete"),
    ]
    assert result.deltas[0].after is not None and result.deltas[0].after["name"] == "five"
    assert snapshot(source) == before
    assert source.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_rolled_back_savepoint_and_truncate(source: psycopg.Connection[Any]) -> None:
    def fn(conn: psycopg.Connection[Any]) -> None:
        conn.execute("UPDATE items SET name = 'kept' WHERE id = 1")
        conn.execute("SAVEPOINT s")
        conn.execute("DELETE FROM items WHERE id = 2")
        conn.execute("ROLLBACK TO SAVEPOINT s")
        conn.execute("TRUNCATE loose")
        conn.execute("SAVEPOINT t")
        conn.execute("DELETE FROM pairs")
        conn.execute("ROLLBACK TO SAVEPOINT t")

    result = simulate(source, fn)
    assert result.error is None
    assert [(d.table, d.operation, d.before) for d in result.deltas] == [
        ("public.items", "update", result.deltas[0].before),
        ("public.loose", "delete", {"x": 1, "y": "p"}),
        ("public.loose", "delete", {"x": 1, "y": "p"}),
        ("public.loose", "delete", {"x": 2, "y": None}),
    ]
    assert result.deltas[0].after is not None and result.deltas[0].after["name"] == "kept"
    assert source.execute("SELECT count(*) FROM loose").fetchone() == (3,)


def test_open_transaction_and_nesting_fail_clearly(source: psycopg.Connection[Any]) -> None:
    with source.transaction(), pytest.raises(UsageError, match="cannot run inside an open transaction"):
        simulate(source, lambda conn: None)

    def opens_transaction(conn: psycopg.Connection[Any]) -> None:
        conn.execute("UPDATE items SET name = 'x' WHERE id = 1")
        with conn.transaction():
            conn.execute("UPDATE items SET name = 'y' WHERE id = 1")

    def commits(conn: psycopg.Connection[Any]) -> None:
        conn.execute("UPDATE items SET name = 'x' WHERE id = 1")
        conn.commit()

    def swallows(conn: psycopg.Connection[Any]) -> None:
        with contextlib.suppress(UsageError):
            conn.rollback()

    def simulates_again(conn: psycopg.Connection[Any]) -> None:
        simulate(conn, lambda inner: None)

    for fn in (opens_transaction, commits, swallows, simulates_again):
        with pytest.raises(UsageError, match="nested transactions are not supported inside simulate"):
            simulate(source, fn)
        assert source.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert "transaction" not in source.__dict__  # the connection is itself again
    assert source.execute("SELECT name FROM items WHERE id = 1").fetchone() == ("one",)
    with source.transaction():  # and works normally
        source.execute("SELECT 1")


def test_a_raw_commit_cannot_escape_the_simulation(source: psycopg.Connection[Any]) -> None:
    def raw_commit(conn: psycopg.Connection[Any]) -> None:
        conn.execute("UPDATE items SET name = 'committed?' WHERE id = 1")
        with contextlib.suppress(psycopg.Error):
            conn.execute("COMMIT")
        conn.execute("UPDATE items SET name = 'after commit' WHERE id = 2")

    with pytest.raises(UsageError, match="ended the simulation's transaction"):
        simulate(source, raw_commit)
    assert source.execute("SELECT id, name FROM items ORDER BY id").fetchall() == [(1, "one"), (2, "two")]
    assert source.autocommit


def test_non_autocommit_connection_and_client_request_inside(source: psycopg.Connection[Any]) -> None:
    from cdc.source_context import install_context

    install_context(source, [("public", "items")])  # the client helper needs cdc.emit_context()
    with psycopg.connect(source.info.dsn, password=source.info.password) as conn:  # autocommit off
        assert not conn.autocommit

        def fn(c: psycopg.Connection[Any]) -> int:
            with client.request(c, "req-preview", actor="ui"):
                c.execute("UPDATE items SET name = 'preview' WHERE id = 1")
            return 7

        result = simulate(conn, fn)
        assert result.result == 7 and result.error is None
        assert [d.after["name"] for d in result.deltas if d.after] == ["preview"]
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE and not conn.autocommit
        assert conn.execute("SELECT name FROM items WHERE id = 1").fetchone() == ("one",)
        conn.rollback()


def test_async_form(source: psycopg.Connection[Any]) -> None:
    async def main() -> Any:
        aconn = await psycopg.AsyncConnection.connect(source.info.dsn, autocommit=True)
        async with aconn:

            async def afn(c: psycopg.AsyncConnection[Any]) -> str:
                await c.execute("DELETE FROM items WHERE id = 2")
                await c.execute("INSERT INTO pairs VALUES (9, 'z', NULL)")
                return "ok"

            ok = await asimulate(aconn, afn)

            async def fails(c: psycopg.AsyncConnection[Any]) -> None:
                await c.execute("UPDATE items SET name = 'n' WHERE id = 1")
                await c.execute("SELECT 1/0")

            failed = await asimulate(aconn, fails)

            async def nests(c: psycopg.AsyncConnection[Any]) -> None:
                async with c.transaction():
                    pass

            with pytest.raises(UsageError, match="nested transactions"):
                await asimulate(aconn, nests)
            async with aconn.transaction():
                with pytest.raises(UsageError, match="open transaction"):
                    await asimulate(aconn, afn)
            cur = await aconn.execute("SELECT count(*) FROM items")
            count = await cur.fetchone()
            return ok, failed, count, aconn.autocommit

    ok, failed, count, autocommit = asyncio.run(main())
    assert ok.result == "ok" and ok.error is None
    assert [(d.table, d.key, d.operation) for d in ok.deltas] == [
        ("public.items", 2, "delete"),
        ("public.pairs", {"a": 9, "b": "z"}, "insert"),
    ]
    assert failed.error is not None and "division by zero" in failed.error
    assert [(d.key, d.operation) for d in failed.deltas] == [(1, "update")]
    assert count == (2,) and autocommit


def test_install_is_idempotent_and_uninstall(source: psycopg.Connection[Any]) -> None:
    assert install_simulate(source, TABLES) == []
    assert simulate_tables(source) == sorted(TABLES)
    source.execute("CREATE TABLE later (id int PRIMARY KEY)")  # the event trigger attaches it (superuser)
    assert ("public", "later") in simulate_tables(source)
    with pytest.raises(SetupError, match="no such table"):
        install_simulate(source, [("public", "missing")])
    uninstall_simulate(source)
    uninstall_simulate(source)
    assert simulate_tables(source) == []
    with pytest.raises(SetupError, match="cdc setup"):
        simulate(source, lambda conn: None)
    assert source.info.transaction_status == psycopg.pq.TransactionStatus.IDLE and source.autocommit


def test_parse_record() -> None:
    assert parse_record('(1,,"","a ""b""","x\\\\y")', 5) == [
        "1",
        None,
        "",
        'a "b"',
        "x\\y",
    ]
    assert parse_record("()", 1) == [None]
    assert parse_record("()", 0) == []
    assert parse_record('("(1,2)",)', 2) == ["(1,2)", None]


def test_deltas_match_what_capture_records(capture: CaptureEnv) -> None:
    """The same change simulated, then made for real: its deltas equal the captured mutations."""
    with capture.source() as conn:
        conn.execute(ALL_TYPES)
        conn.execute(f"INSERT INTO typed VALUES {TYPED_ROWS[0]}")
        conn.execute(f"INSERT INTO typed VALUES {TYPED_ROWS[1]}")
        install_simulate(conn, [("public", "typed")])
    capture.setup()
    capture.start()

    def change(conn: psycopg.Connection[Any]) -> None:
        conn.execute("UPDATE typed SET t = t || '!', n = n * 3, tz = tz + interval '1 hour' WHERE id = 1")
        conn.execute("DELETE FROM typed WHERE id = 2")

    with capture.source() as conn:
        conn.execute("SET TimeZone = 'Asia/Kolkata'")
        conn.execute("SET IntervalStyle = 'iso_8601'")
        conn.execute("SET extra_float_digits = 0")
        preview = simulate(conn, change)
        assert preview.error is None
        with conn.transaction():
            change(conn)
    capture.wait_caught_up()
    rows = [
        (m.op, m.key, m.before, m.after)
        for m in stored_mutations(capture, "typed")
        if m.op != "SNAPSHOT" and m.status == "committed"
    ]
    assert [(d.operation.upper(), {"id": d.key}, d.before, d.after) for d in preview.deltas] == [
        tuple(r) for r in rows
    ]
