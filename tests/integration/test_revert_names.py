"""cdc revert / restore write to the right table: by identity (the relation's oid), under its
current name as identifiers; never to a look-alike, a re-created or a dropped table.

The history is written by the store builder (in the source database's cdc_history schema) with
the source tables' real oids; the source rows are changed to match it by hand.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from cdc.errors import NotFoundError, RefusedError
from cdc.query import Store
from cdc.revert import apply_plan, plan_restore, plan_revert
from cdc.source_context import install_context
from tests.store_builder import INT4, TEXT, StoreBuilder, oversize

SOURCE = """
CREATE TABLE users (id int PRIMARY KEY, name text);
CREATE TABLE "Users" (id int PRIMARY KEY, name text);
CREATE TABLE "USERS" (id int PRIMARY KEY, name text);
CREATE SCHEMA "a.b";
CREATE TABLE "a.b".c (id int PRIMARY KEY, name text);
CREATE SCHEMA a;
CREATE TABLE a."b.c" (id int PRIMARY KEY, name text);
CREATE TABLE orders (id int PRIMARY KEY, name text);
CREATE TABLE blobs (id int PRIMARY KEY, name text);
"""
TABLES = ["users", '"Users"', '"USERS"', '"a.b".c', 'a."b.c"', "orders", "blobs"]
COLUMNS = {"id": INT4, "name": TEXT}


@pytest.fixture
def world(pg: Any) -> Iterator[tuple[StoreBuilder, psycopg.Connection[Any]]]:
    """Source tables with row 1 named "before" in each, and their history."""
    name = f"t_{uuid.uuid4().hex[:8]}"
    dsn = pg.create_database(name)
    source = psycopg.connect(dsn, autocommit=True)
    source.execute(SOURCE)
    install_context(source, [], attach_new_tables=False)  # apply_plan tags its request (cdc.emit_context)
    b = StoreBuilder(dsn)
    for table in TABLES:
        oid = source.execute("SELECT %s::regclass::oid::int8", [table]).fetchone()
        assert oid is not None
        b.table(table, COLUMNS, relation_oid=int(oid[0]))
        source.execute(f"INSERT INTO {table} VALUES (1, 'before')")
    with b.txn("2026-05-01 10:00") as t:
        for table in TABLES:
            t.insert(table, {"id": 1, "name": "before"})
    yield b, source
    source.close()
    b.close()
    pg.drop_database(name)


def change(b: StoreBuilder, source: psycopg.Connection[Any], request_id: str, *tables: str) -> None:
    """Request ``request_id`` sets name = 'after' in row 1 of ``tables``, on the source and in the history."""
    with b.txn("2026-05-01 11:00", request_id) as t:
        for table in tables:
            t.update(table, 1, {"name": "after"})
            source.execute(f"UPDATE {table} SET name = 'after' WHERE id = 1")


def names(source: psycopg.Connection[Any]) -> dict[str, str]:
    return {t: str(source.execute(f"SELECT name FROM {t} WHERE id = 1").fetchone()[0]) for t in TABLES}  # type: ignore[index]


def test_revert_writes_only_the_tables_of_the_request(world: Any) -> None:
    b, source = world
    change(b, source, "req-mixed", '"Users"', '"a.b".c')
    b.finish(baseline=0x1_0000_0000)
    with Store(b.dsn) as store:
        plan = plan_revert(store, source, "req-mixed")
        assert plan.conflicts == []
        assert 'UPDATE "a.b"."c" SET' in plan.sql_text and 'UPDATE "public"."Users" SET' in plan.sql_text
        assert '"public"."users"' not in plan.sql_text and '"a"."b.c"' not in plan.sql_text
        apply_plan(source, plan)
    assert set(names(source).values()) == {"before"}


def test_a_renamed_table_reverts_into_its_current_name(world: Any) -> None:
    b, source = world
    change(b, source, "req-orders", "orders")
    source.execute("ALTER TABLE orders RENAME TO orders_v2")
    b.rename("orders", "orders_v2")
    source.execute("CREATE TABLE orders (id int PRIMARY KEY, name text)")  # a look-alike of the old name
    source.execute("INSERT INTO orders VALUES (1, 'after')")
    b.finish(baseline=0x1_0000_0000)
    with Store(b.dsn) as store:
        plan = plan_revert(store, source, "req-orders")
        assert 'UPDATE "public"."orders_v2" SET "name"' in plan.sql_text
        assert '"public"."orders" ' not in plan.sql_text
        apply_plan(source, plan)
        assert source.execute("SELECT name FROM orders_v2").fetchone() == ("before",)
        assert source.execute("SELECT name FROM orders").fetchone() == ("after",)  # untouched
        # restore by the old name: the history of that table, written under its current name
        source.execute("UPDATE orders_v2 SET name = 'later'")
        restore = plan_restore(store, source, "orders", 1, version=b.positions[0])
        assert 'UPDATE "public"."orders_v2"' in restore.sql_text
        apply_plan(source, restore)
        assert source.execute("SELECT name FROM orders_v2").fetchone() == ("before",)


def test_never_a_table_the_history_does_not_know_under_that_name(world: Any) -> None:
    b, source = world
    change(b, source, "req-users", "users")
    b.finish(baseline=0x1_0000_0000)
    with Store(b.dsn) as store:
        source.execute("ALTER TABLE users RENAME TO people")  # not captured yet
        with pytest.raises(RefusedError, match=r"now named public\.people"):
            plan_revert(store, source, "req-users")
        source.execute("ALTER TABLE people RENAME TO users")
        plan = plan_revert(store, source, "req-users")
        source.execute("DROP TABLE users")
        source.execute("CREATE TABLE users (id int PRIMARY KEY, name text)")  # same name, another table
        source.execute("INSERT INTO users VALUES (1, 'after')")
        with pytest.raises(NotFoundError, match="does not exist on the source any more"):
            apply_plan(source, plan)
        with pytest.raises(NotFoundError, match="does not exist on the source any more"):
            plan_revert(store, source, "req-users")
        assert source.execute("SELECT name FROM users").fetchone() == ("after",)


def test_a_dropped_table_and_an_oversize_value_are_refused(world: Any) -> None:
    b, source = world
    change(b, source, "req-drop", '"USERS"')
    b.drop('"USERS"')
    with b.txn("2026-05-01 12:00") as t:
        t.update("blobs", 1, {"name": oversize("x" * 100)})
    with b.txn("2026-05-01 12:01", "req-blob") as t:
        t.update("blobs", 1, {"name": "small"})
    b.finish(baseline=0x1_0000_0000)
    with Store(b.dsn) as store:
        with pytest.raises(RefusedError, match=r'public\."USERS" was dropped'):
            plan_revert(store, source, "req-drop")
        with pytest.raises(RefusedError, match=r"over capture\.max_value_bytes"):
            plan_revert(store, source, "req-blob")
        with pytest.raises(RefusedError, match=r"over capture\.max_value_bytes"):
            plan_restore(store, source, "blobs", 1, version=b.positions[-2])
