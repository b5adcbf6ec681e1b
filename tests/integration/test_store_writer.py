"""The write side of store format 2 against a real store: registry and writer, no source."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from cdc.capture.model import ColumnDesc, Kind, Policy, RelationDesc
from cdc.capture.registry import Registry
from cdc.devdb import LocalPostgres
from cdc.errors import SetupError
from cdc.setup import apply_store_schema
from cdc.store.writer import INCOMPLETE, StoreBatch, StoreWriter

SCHEMA = "cdc_history"
T0 = int(datetime(2026, 3, 10, 12, tzinfo=UTC).timestamp() * 1_000_000)
T0_TEXT = "2026-03-10 12:00:00.000000+00"


@pytest.fixture
def store_dsn(pg: LocalPostgres, fresh_dbname: str) -> Iterator[str]:
    dsn = pg.create_database(fresh_dbname)
    with psycopg.connect(dsn, autocommit=True) as conn:
        apply_store_schema(conn, SCHEMA)
        conn.execute(
            f"INSERT INTO {SCHEMA}.capture_state (slot_name, acked_lsn, baseline_done) VALUES ('cdc', 0, true)"
        )
    yield dsn


def q(dsn: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"SET search_path = {SCHEMA}")
        return conn.execute(query, params).fetchall()


def col(name: str, oid: int = 25, key: bool = False) -> ColumnDesc:
    return ColumnDesc(name, oid, -1, key)


def relation(
    oid: int, namespace: str, name: str, columns: tuple[ColumnDesc, ...], identity: str = "d", lsn: int = 100
) -> RelationDesc:
    return RelationDesc(oid, namespace, name, identity, columns, lsn)


# ============================================================================ registry


def test_registry_registers_once_and_follows_renames(store_dsn: str) -> None:
    registry = Registry(store_dsn, SCHEMA, policies={})
    cols = (col("id", 23, key=True), col("body"))
    info = registry.describe(relation(5001, "public", "docs", cols, lsn=100))
    assert info.key == (0,) and not info.keyless
    assert info.kinds == (Kind.INTEGER, Kind.TEXT)
    assert info.policies == (Policy.NONE, Policy.NONE)
    again = Registry(store_dsn, SCHEMA, policies={}).describe(relation(5001, "public", "docs", cols, lsn=100))
    assert (again.table_id, again.schema_id) == (info.table_id, info.schema_id)
    renamed = registry.describe(relation(5001, "app", "documents", cols, lsn=300))
    assert renamed.table_id == info.table_id and renamed.schema_id == info.schema_id
    # A session replaying from before the rename sees the old name again: nothing new.
    replay = Registry(store_dsn, SCHEMA, policies={})
    replay.describe(relation(5001, "public", "docs", cols, lsn=200))
    replay.describe(relation(5001, "app", "documents", cols, lsn=300))
    assert q(
        store_dsn, "SELECT table_id, schema_name, table_name, from_position FROM table_names ORDER BY 4"
    ) == [
        (info.table_id, "public", "docs", 100),
        (info.table_id, "app", "documents", 300),
    ]
    assert q(store_dsn, "SELECT count(*) FROM tables") == [(1,)]
    assert registry.table_name(info.table_id) == "app.documents"
    # A new column: a new shape, same table.
    wider = registry.describe(relation(5001, "app", "documents", (*cols, col("n", 20)), lsn=400))
    assert wider.table_id == info.table_id and wider.schema_id != info.schema_id
    columns = q(store_dsn, "SELECT columns FROM table_schemas WHERE schema_id = %s", (wider.schema_id,))[0][0]
    assert columns == [
        {"name": "id", "type_oid": 23, "type_modifier": -1, "key": True},
        {"name": "body", "type_oid": 25, "type_modifier": -1, "key": False},
        {"name": "n", "type_oid": 20, "type_modifier": -1, "key": False},
    ]


def test_dotted_names_stay_apart(store_dsn: str) -> None:
    registry = Registry(store_dsn, SCHEMA, policies={'"a.b".c': {"v": "mask"}})
    cols = (col("id", 23, key=True), col("v"))
    one = registry.describe(relation(6001, "a.b", "c", cols))
    two = registry.describe(relation(6002, "a", "b.c", cols))
    assert one.table_id != two.table_id
    assert one.policies == (Policy.NONE, Policy.MASK) and two.policies == (Policy.NONE, Policy.NONE)
    assert sorted(q(store_dsn, "SELECT schema_name, table_name FROM table_names")) == [
        ("a", "b.c"),
        ("a.b", "c"),
    ]


def test_keys_from_identity_primary_key_or_whole_row(
    pg: LocalPostgres, store_dsn: str, fresh_dbname: str
) -> None:
    source_dsn = pg.create_database(fresh_dbname + "_src")
    with psycopg.connect(source_dsn, autocommit=True) as source:
        source.execute("CREATE TABLE full_pk (a int, b text, c int, PRIMARY KEY (c, a))")
        source.execute("CREATE TABLE full_none (a int, b text)")
        oids = dict(
            source.execute(
                "SELECT relname, oid::int FROM pg_class WHERE relname IN ('full_pk', 'full_none')"
            ).fetchall()
        )
        registry = Registry(store_dsn, SCHEMA, policies={}, catalog=source)
        flagged = (col("a", 23, True), col("b", 25, True), col("c", 23, True))
        keyed = registry.describe(relation(oids["full_pk"], "public", "full_pk", flagged, identity="f"))
        assert keyed.key == (2, 0) and not keyed.keyless
        loose = registry.describe(
            relation(oids["full_none"], "public", "full_none", flagged[:2], identity="f")
        )
        assert loose.key == (0, 1) and loose.keyless
    key_columns = q(
        store_dsn, "SELECT key_columns FROM table_schemas WHERE schema_id = %s", (keyed.schema_id,)
    )
    assert key_columns == [(["c", "a"],)]


def test_policy_on_a_key_column_is_ignored_and_reported_once(store_dsn: str) -> None:
    reported: list[str] = []
    registry = Registry(
        store_dsn, SCHEMA, policies={"public.t": {"id": "hash", "secret": "exclude"}}, report=reported.append
    )
    cols = (col("id", 23, key=True), col("secret"))
    info = registry.describe(relation(7001, "public", "t", cols))
    registry.describe(relation(7001, "public", "t", (*cols, col("x")), lsn=200))
    assert info.policies == (Policy.NONE, Policy.EXCLUDE)
    assert len(reported) == 1 and "columns.public.t.id" in reported[0]
    columns = q(store_dsn, "SELECT columns FROM table_schemas WHERE schema_id = %s", (info.schema_id,))[0][0]
    assert "policy" not in columns[0] and columns[1]["policy"] == "exclude"


# ============================================================================ writer


def line(*fields: Any) -> bytes:
    out = []
    for value in fields:
        if value is None:
            out.append("\\N")
        elif isinstance(value, list):
            out.append("{" + ",".join(value) + "}")
        else:
            out.append(str(value).replace("\\", "\\\\"))
    return ("\t".join(out) + "\n").encode()


def change(
    position: int,
    ordinal: int,
    table_id: int,
    schema_id: int,
    op: str,
    key: str | None,
    image: dict[str, Any] | None,
    *,
    flags: int = 0,
    pending: list[str] | None = None,
    old_key: str | None = None,
) -> bytes:
    return line(
        position,
        ordinal,
        T0_TEXT,
        table_id,
        schema_id,
        op,
        flags,
        position - 10 + ordinal,
        None,
        key,
        json.dumps(image, separators=(",", ":")) if image is not None else None,
        None,
        old_key,
        pending,
    )


def txn_line(position: int, count: int, status: str = "c", request_id: str | None = None) -> bytes:
    context = json.dumps({"request_id": request_id}) if request_id else None
    return line(position, T0_TEXT, 700, position - 1, status, 0, None, count, request_id, None, None, context)


@pytest.fixture
def docs(store_dsn: str) -> tuple[int, int]:
    registry = Registry(store_dsn, SCHEMA, policies={})
    info = registry.describe(
        relation(9001, "public", "docs", (col("id", 23, True), col("body"), col("n", 23)))
    )
    registry.close()
    return info.table_id, info.schema_id


def batch(*lines: bytes, txns: tuple[bytes, ...] = (), ack: int | None = None, **kw: Any) -> StoreBatch:
    b = StoreBatch(changes=list(lines), transactions=list(txns), ack_lsn=ack, **kw)
    b.rows = sum(x.count(b"\n") for x in lines)
    b.span(T0)
    return b


def test_writer_fills_pending_columns_in_order_and_flags_what_it_cannot(
    store_dsn: str, docs: tuple[int, int]
) -> None:
    t, s = docs
    writer = StoreWriter(store_dsn, SCHEMA, "cdc")
    writer.connect()
    writer.write(
        batch(
            change(1000, 0, t, s, "I", "[1]", {"id": 1, "body": "long text", "n": 0}),
            txns=(txn_line(1000, 1),),
            ack=1000,
            fresh=[1000],
            max_position=1000,
        )
    )
    writer.write(
        batch(
            # body unchanged twice in a row: the second fill reads the first one's result
            change(2000, 0, t, s, "U", "[1]", {"id": 1, "n": 1}, pending=["body"]),
            change(2000, 1, t, s, "U", "[1]", {"id": 1, "n": 2}, pending=["body"]),
            # no previous image: the column is dropped and the change flagged INCOMPLETE
            change(2000, 2, t, s, "U", "[2]", {"id": 2, "n": 5}, pending=["body"]),
            txns=(txn_line(2000, 3, request_id="r1"),),
            ack=2000,
            fresh=[2000],
            pending=[2000],
            max_position=2000,
            actor_sequences={"alice": 7},
            request_errors=[
                {
                    "lsn": 1999,
                    "request_id": "r1",
                    "reported_at": "2026-03-10T12:00:00+00:00",
                    "error_type": "E",
                    "message": "m",
                }
            ],
        )
    )
    rows = q(
        store_dsn, "SELECT ordinal, image, pending, flags FROM changes WHERE position = 2000 ORDER BY ordinal"
    )
    assert [json.loads(r[1]) for r in rows] == [
        {"id": 1, "body": "long text", "n": 1},
        {"id": 1, "body": "long text", "n": 2},
        {"id": 2, "n": 5},
    ]
    assert [r[2] for r in rows] == [None, None, None]
    assert [r[3] for r in rows] == [0, 0, INCOMPLETE]
    assert q(store_dsn, "SELECT acked_lsn FROM capture_state") == [(2000,)]
    assert q(store_dsn, "SELECT last_seq FROM actor_sequences WHERE actor = 'alice'") == [(7,)]
    assert q(store_dsn, "SELECT request_id, message FROM request_errors") == [("r1", "m")]
    assert q(store_dsn, "SELECT request_id, change_count FROM transactions WHERE position = 2000") == [
        ("r1", 3)
    ]
    # The row index works: the key hash is computed by the store.
    assert q(store_dsn, "SELECT count(*) FROM changes WHERE key_hash = hashtextextended('[1]', 0)") == [(3,)]
    writer.close()


def test_replayed_transaction_replaces_what_a_crash_left(store_dsn: str, docs: tuple[int, int]) -> None:
    t, s = docs
    writer = StoreWriter(store_dsn, SCHEMA, "cdc")
    writer.connect()
    # The first half of a large transaction, then the daemon dies (no ack).
    first = [change(5000, i, t, s, "I", f"[{i}]", {"id": i, "body": "x", "n": i}) for i in range(3)]
    writer.write(batch(*first, fresh=[5000], max_position=5000))
    writer.close()
    writer = StoreWriter(store_dsn, SCHEMA, "cdc")
    writer.connect()
    whole = [change(5000, i, t, s, "I", f"[{i}]", {"id": i, "body": "x", "n": i}) for i in range(5)]
    writer.write(batch(*whole[:2], fresh=[5000], max_position=5000))
    writer.write(batch(*whole[2:], txns=(txn_line(5000, 5),), ack=5000, max_position=5000))
    assert q(store_dsn, "SELECT count(*), count(DISTINCT ordinal) FROM changes WHERE position = 5000") == [
        (5, 5)
    ]
    writer.close()


def test_a_huge_value_is_filled_without_jsonb(store_dsn: str, docs: tuple[int, int]) -> None:
    t, s = docs
    big = "y" * (1 << 20)
    writer = StoreWriter(store_dsn, SCHEMA, "cdc")
    writer.connect()
    writer.write(
        batch(
            change(1000, 0, t, s, "I", "[1]", {"id": 1, "body": big, "n": 0}), fresh=[1000], max_position=1000
        )
    )
    writer.write(
        batch(
            change(2000, 0, t, s, "U", "[1]", {"id": 1, "n": 1}, pending=["body"]),
            fresh=[2000],
            pending=[2000],
            max_position=2000,
        )
    )
    image = q(store_dsn, "SELECT image FROM changes WHERE position = 2000")[0][0]
    assert json.loads(image) == {"id": 1, "body": big, "n": 1}
    writer.close()


def test_writer_refuses_a_format_1_store(pg: LocalPostgres, fresh_dbname: str) -> None:
    dsn = pg.create_database(fresh_dbname)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {SCHEMA}")
        conn.execute(f"CREATE TABLE {SCHEMA}.mutations (position bigint)")
    writer = StoreWriter(dsn, SCHEMA, "cdc")
    with pytest.raises(SetupError, match="format 1") as caught:
        writer.connect()
    assert caught.value.hint is not None and "cdc setup" in caught.value.hint


def test_batches_create_partitions_of_every_partitioned_table(store_dsn: str, docs: tuple[int, int]) -> None:
    t, s = docs
    writer = StoreWriter(store_dsn, SCHEMA, "cdc")
    writer.connect()
    writer.write(
        batch(
            change(1000, 0, t, s, "I", "[1]", {"id": 1, "body": "a", "n": 0}),
            txns=(txn_line(1000, 1),),
            ack=1000,
            fresh=[1000],
            max_position=1000,
        )
    )
    names = {r[0] for r in q(store_dsn, "SELECT relname FROM pg_class WHERE relname LIKE '%%_p20260310'")}
    assert names == {"changes_p20260310", "transactions_p20260310", "context_changes_p20260310"}
    assert q(store_dsn, "SELECT count(*) FROM changes_default") == [(0,)]
    assert q(store_dsn, "SELECT key_hash = hashtextextended('[1]', 0) FROM changes_p20260310") == [(True,)]
    writer.close()


def test_fill_reads_rolled_back_images_only_for_rolled_back_rows(
    store_dsn: str, docs: tuple[int, int]
) -> None:
    t, s = docs
    writer = StoreWriter(store_dsn, SCHEMA, "cdc")
    writer.connect()
    writer.write(
        batch(
            change(1000, 0, t, s, "I", "[1]", {"id": 1, "body": "committed", "n": 0}),
            fresh=[1000],
            max_position=1000,
        )
    )
    writer.write(
        batch(
            # a savepoint rolled back: its image must not fill the committed change after it
            change(2000, 0, t, s, "U", "[1]", {"id": 1, "body": "attempt", "n": 1}, flags=1),
            change(2000, 1, t, s, "U", "[1]", {"id": 1, "n": 2}, pending=["body"]),
            # a rolled-back transaction: its own earlier (rolled-back) change counts
            change(3001, 0, t, s, "U", "[1]", {"id": 1, "body": "doomed", "n": 3}, flags=1),
            change(3001, 1, t, s, "U", "[1]", {"id": 1, "n": 4}, flags=1, pending=["body"]),
            fresh=[2000, 3001],
            pending=[2000, 3001],
            max_position=3001,
        )
    )
    bodies = q(
        store_dsn,
        "SELECT position, image::json ->> 'body' FROM changes WHERE pending IS NULL ORDER BY 1, ordinal",
    )
    assert bodies == [
        (1000, "committed"),
        (2000, "attempt"),
        (2000, "committed"),
        (3001, "doomed"),
        (3001, "doomed"),
    ]
    writer.close()
