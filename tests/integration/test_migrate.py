"""Migration of a format-1 store (tests/data/store_v1.sql) to format 2 (cdc/store/migrate.py):
every format-1 mutation becomes exactly one change with the same key, images, flags, position
and context; look-alike dotted names become distinct tables; a failure leaves format 1 as it was."""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner
from psycopg import sql
from psycopg.types.json import Jsonb

from cdc.cli import main
from cdc.cli_errors import load
from cdc.devdb import LocalPostgres
from cdc.setup import apply_store_schema
from cdc.status import collect_status, render_status
from cdc.store.migrate import (
    MigrationError,
    MigrationStep,
    drop_v1,
    is_v1_store,
    migrate_v1,
    prepare_store,
    v1_leftovers,
)
from tests.v1_store import BOOL, INT4, INT8, NUMERIC, STEP, TEXT, TIMESTAMPTZ, Table, V1Store, at, ctx

SCHEMA = "cdc_history"
ODD_KEY = 'x\ty "q" é\\'

SOURCE_DDL = """
CREATE TABLE public.users (id bigint PRIMARY KEY, email text, name text, plan text, age int);
CREATE TABLE public."User" (id int PRIMARY KEY, nick text);
CREATE SCHEMA "a.b";
CREATE TABLE "a.b".c (k text PRIMARY KEY, v int);
CREATE SCHEMA a;
CREATE TABLE a."b.c" (k text PRIMARY KEY, v int);
CREATE TABLE public.events (at timestamptz, kind text, n int, ok boolean, note text);
ALTER TABLE public.events REPLICA IDENTITY FULL;
CREATE TABLE public.accounts (region text, id int, balance numeric, PRIMARY KEY (region, id));
ALTER TABLE public.accounts REPLICA IDENTITY FULL;
CREATE TABLE public.purchases (id text PRIMARY KEY, total numeric);
CREATE TABLE public.audit (id int PRIMARY KEY, what text);
"""
GONE_OID = 3_999_999_999  # a table dropped from the source since


@dataclass
class Env:
    pg: LocalPostgres
    source_dsn: str
    store_dsn: str
    oids: dict[tuple[str, str], int]
    v1: V1Store
    floor: int
    pending: int  # position of a staged (pending) keyframe

    def store(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.store_dsn, autocommit=True)

    def source(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.source_dsn, autocommit=True)


@pytest.fixture
def env(pg: LocalPostgres, fresh_dbname: str) -> Iterator[Env]:
    source_dsn = pg.create_database(fresh_dbname + "_src")
    store_dsn = pg.create_database(fresh_dbname + "_st")
    with psycopg.connect(source_dsn, autocommit=True) as src:
        src.execute(SOURCE_DDL)
        oids = {
            (str(r[0]), str(r[1])): int(r[2])
            for r in src.execute(
                "SELECT n.nspname, c.relname, c.oid::bigint FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' "
                "AND n.nspname IN ('public', 'a', 'a.b')"
            ).fetchall()
        }
        ident = src.execute(
            "SELECT system_identifier::text, current_database() FROM pg_control_system()"
        ).fetchone()
    assert ident is not None
    conn = psycopg.connect(store_dsn, autocommit=True)
    try:
        v1 = V1Store(conn, SCHEMA)
        floor, pending = build_history(v1, oids)
        v1.finish(floor=floor, system_id=ident[0], database=ident[1], baseline=floor)
        yield Env(pg, source_dsn, store_dsn, oids, v1, floor, pending)
    finally:
        conn.close()
        pg.drop_database(fresh_dbname + "_src")
        pg.drop_database(fresh_dbname + "_st")


def build_history(v1: V1Store, oids: dict[tuple[str, str], int]) -> tuple[int, int]:
    """A realistic format-1 history; returns (history floor, a pending keyframe's position)."""
    users = v1.table(
        "public.users", oids["public", "users"], {"id": INT8, "email": TEXT, "name": TEXT, "plan": TEXT}
    )
    upper = v1.table("public.User", oids["public", "User"], {"id": INT4, "nick": TEXT})
    dotted_schema = v1.table("a.b.c", oids["a.b", "c"], {"k": TEXT, "v": INT4}, key=["k"])  # "a.b".c
    dotted_name = v1.table("a.b.c", oids["a", "b.c"], {"k": TEXT, "v": INT4}, key=["k"])  # a."b.c"
    events = v1.table(
        "public.events", oids["public", "events"],
        {"at": TIMESTAMPTZ, "kind": TEXT, "n": INT4, "ok": BOOL, "note": TEXT}, key=[], replica_identity="f",
    )  # fmt: skip
    accounts = v1.table(
        "public.accounts", oids["public", "accounts"], {"region": TEXT, "id": INT4, "balance": NUMERIC},
        key=["region", "id"], replica_identity="f",
    )  # fmt: skip
    audit = v1.table("public.audit", oids["public", "audit"], {"id": INT4, "what": TEXT})
    purchases = v1.table("public.purchases", oids["public", "purchases"], {"id": TEXT, "total": NUMERIC})
    gone = v1.table("public.gone", GONE_OID, {"id": INT4})

    # 2026-03-08: pruned. Only the kept rows of audit (a longer retention) and keyframes remain.
    with v1.txn("2026-03-08 10:00", context=ctx("r0", "ops"), kept=True) as t:
        t.insert(audit, {"id": 1, "what": "created"})
        t.insert(audit, {"id": 2, "what": "created"})
    with v1.txn("2026-03-08 11:00", context=ctx("r0b", "ops"), kept=True) as t:
        t.update(audit, 1, {"what": "checked"})
        t.set_context(ctx("r0c", "auditor", extra_key="x"))
        t.update(audit, 2, {"what": "checked"})
    floor = v1.position
    users.rows = {
        json.dumps({"id": 1}): {"id": 1, "email": "a@x.org", "name": None, "plan": "free"},
        json.dumps({"id": 2}): {"id": 2, "email": "b@x.org", "name": "Bo", "plan": "free"},
    }
    v1.keyframes(users, floor, at("2026-03-09 00:00"))

    v1.partition("2026-03-09")
    v1.partition("2026-03-10")
    # 2026-03-09
    with v1.txn("2026-03-09 08:00", origin="cdc.baseline", xid=0) as t:
        t.snapshot(upper, {"id": 1, "nick": "one"})
    with v1.txn("2026-03-09 09:00", context=ctx("r1", "alice")) as t:
        t.insert(users, {"id": 3, "email": "c@x.org", "name": None, "plan": "free"})
        t.update(users, 1, {"name": "Ann"})
        t.delete(users, 2)
    with v1.txn("2026-03-09 09:30", context=ctx("r2", "bob")) as t:
        t.update(users, 3, {"id": 30})  # the key changes
    e1 = {"at": "2026-03-09T09:00:00+00:00", "kind": "login", "n": 1, "ok": True, "note": None}
    e2 = {"at": "2026-03-09T09:01:00+00:00", "kind": "logout", "n": 2, "ok": False, "note": ODD_KEY}
    with v1.txn("2026-03-09 10:00") as t:
        t.insert(events, e1)
        t.insert(events, e1)  # the same row twice: a multiset
        t.insert(events, e2)
    with v1.txn("2026-03-09 10:30", context=ctx("r3", "alice")) as t:
        t.delete(events, e1)
        t.update(events, e2, {"n": 5})
    with v1.txn("2026-03-09 11:00", context=ctx("r-fail", "alice", backend_pid=777), rolled_back=True) as t:
        t.update(users, 1, {"plan": "pro"})
        t.insert(users, {"id": 99, "email": "z@x.org", "name": "Zed", "plan": "pro"})
    v1.request_error("r-fail", "TimeoutError", "payment API timeout", "pay.py:42", at("2026-03-09 11:00"))
    with v1.txn("2026-03-09 12:00", context=ctx("r4", "carol")) as t:
        t.insert(users, {"id": 4, "email": "d@x.org", "name": None, "plan": "free"})
        t.savepoint()
        t.update(users, 4, {"plan": "x"}, rolled_back=True)
        t.savepoint()
        t.insert(users, {"id": 5, "email": "e@x.org", "name": None, "plan": "free"})
    with v1.txn("2026-03-09 13:00", context=ctx("r5", "bob")) as t:
        t.update(users, 1, {"plan": "gold"})
        t.set_context(ctx("r6", "dave"))  # a nested request
        t.update(users, 4, {"name": "Dee"})
        t.set_context(ctx("r5", "bob"))
        t.update(users, 5, {"name": "Eve"})
        t.set_context(None)
        t.update(users, 5, {"name": "Eve 2"})
    with v1.txn("2026-03-09 14:00", context=ctx("r7", "erin")) as t:
        t.insert(upper, {"id": 7, "nick": "seven"})
        t.insert(dotted_schema, {"k": ODD_KEY, "v": 1})
        t.insert(dotted_name, {"k": ODD_KEY, "v": 2})  # the same key in the look-alike table
        t.update(dotted_schema, ODD_KEY, {"v": 10})
        t.skip_actor_seqs(10)
        t.update(upper, 7, {"nick": "Seven"})
    # 2026-03-10
    with v1.txn("2026-03-10 09:00", context=ctx("r8", "frank")) as t:
        t.insert(accounts, {"region": "eu", "id": 1, "balance": "10.50"})
        t.insert(accounts, {"region": "us", "id": 1, "balance": "3"})
        t.update(accounts, {"region": "eu", "id": 1}, {"balance": "11.00"})
        t.delete(accounts, {"region": "us", "id": 1})
        t.update(users, 30, {"id": 9007199254740993})  # beyond a double's precision
    with v1.txn("2026-03-10 10:00") as t:
        t.insert(purchases, {"id": "o1", "total": "12.50"})
    orders = v1.table("public.orders", oids["public", "purchases"], {"id": TEXT, "total": NUMERIC})  # renamed
    with v1.txn("2026-03-10 11:00") as t:
        t.update(orders, "o1", {"total": "13.00"})
    purchases = v1.table(
        "public.purchases", oids["public", "purchases"], {"id": TEXT, "total": NUMERIC}
    )  # back
    with v1.txn("2026-03-10 11:30") as t:
        t.update(purchases, "o1", {"total": "14.00"})
    with v1.txn("2026-03-10 12:00") as t:
        t.truncate(events, dotted_schema)
    with v1.txn("2026-03-10 13:00") as t:
        t.insert(gone, {"id": 1})
    users = v1.table(
        "public.users",
        oids["public", "users"],
        {"id": INT8, "email": TEXT, "name": TEXT, "plan": TEXT, "age": INT4},
    )
    with v1.txn("2026-03-10 14:00", context=ctx("r9", "alice")) as t:
        t.insert(users, {"id": 6, "email": "f@x.org", "name": "Fay", "plan": "free", "age": 30})
    # 2026-03-11: no partition (the default one)
    with v1.txn("2026-03-11 09:00", context=ctx("r10", "alice")) as t:
        t.update(users, 1, {"name": "Ann B"})
    # a prune that staged keyframes and never published them
    pending = v1.position + STEP
    v1.keyframes(users, pending, at("2026-03-10 00:00"))
    conn, t_ = v1.conn, v1.t
    conn.execute(
        sql.SQL("UPDATE {} SET horizon = %s, last_prune_at = %s, staged = %s").format(t_("retention_state")),
        (at("2026-03-09 00:00"), at("2026-03-09 00:05"), Jsonb({"floor": pending})),
    )
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (pruned_at, horizon, floor, partitions, keyframes, kept_rows, removed_rows, seconds) "
            "VALUES (%s, %s, %s, %s, 2, 4, 0, 0.25)"
        ).format(t_("prunes")),
        (
            at("2026-03-09 00:05"),
            at("2026-03-09 00:00"),
            floor,
            ["mutations_p20260308", "transactions_p20260308"],
        ),
    )
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (actor, table_name, key_sha256, key_columns, mutations_removed, keyframes_removed, "
            "source_check) VALUES ('ops', 'public.users', repeat('ab', 32), '{{id}}', 3, 1, 'absent')"
        ).format(t_("erasures"))
    )
    conn.execute(
        sql.SQL("INSERT INTO {} (slot_name, after_position, resumed_position) VALUES ('cdc', 16, 32)").format(
            t_("gaps")
        )
    )
    return floor, pending


# ============================================================================ helpers


def relations(conn: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    return [
        (str(r[0]), str(r[1]))
        for r in conn.execute(
            "SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s ORDER BY 1",
            (SCHEMA,),
        ).fetchall()
    ]


def dump(conn: psycopg.Connection[Any]) -> dict[str, list[str]]:
    """Every table of the store schema, its rows as text, sorted."""
    out: dict[str, list[str]] = {}
    for name, kind in relations(conn):
        if kind in ("r", "p"):
            rows = conn.execute(
                sql.SQL("SELECT t::text FROM {} t").format(sql.Identifier(SCHEMA, name))
            ).fetchall()
            out[name] = sorted(str(r[0]) for r in rows)
    return out


def q(conn: psycopg.Connection[Any], query: str, params: Any = None) -> list[tuple[Any, ...]]:
    conn.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(SCHEMA)))
    return [tuple(r) for r in conn.execute(query.encode(), params).fetchall()]


V1_ALL = (
    "SELECT position, ordinal, version, lsn, xid, committed_at, table_name, op, key, old_key, before, after, "
    "status, request_id, context, schema_id, actor, actor_seq, false AS keyframe FROM mutations_v1 "
    "UNION ALL SELECT position, ordinal, version, lsn, xid, committed_at, table_name, op, key, old_key, before, "
    "after, status, request_id, context, schema_id, actor, actor_seq, keyframe FROM mutations_keep_v1"
)


# ============================================================================ tests


def test_every_mutation_becomes_one_change(env: Env) -> None:
    steps: list[MigrationStep] = []
    with env.store() as conn, env.source() as src:
        assert is_v1_store(conn, SCHEMA)
        report = migrate_v1(conn, SCHEMA, source_conn=src, progress=steps.append)
        assert not is_v1_store(conn, SCHEMA)
        assert q(conn, "SELECT format_version FROM store_meta") == [(2,)]
        # exactly one change per format-1 mutation (the pending keyframe aside)
        missing = q(
            conn,
            f"SELECT m.position, m.ordinal FROM ({V1_ALL}) m WHERE NOT (m.keyframe AND m.position > %s) "
            "AND (SELECT count(*) FROM (SELECT 1 FROM changes c WHERE (c.position, c.ordinal) = (m.position, m.ordinal) "
            "UNION ALL SELECT 1 FROM changes_keep c WHERE (c.position, c.ordinal) = (m.position, m.ordinal)) x) <> 1",
            (env.floor,),
        )
        assert missing == []
        counts = q(conn, f"SELECT (SELECT count(*) FROM ({V1_ALL}) m), (SELECT count(*) FROM changes), "
                         "(SELECT count(*) FROM changes_keep)")  # fmt: skip
        total, changes, kept = counts[0]
        pending = len(env.v1.tables[env.oids["public", "users"]].rows)
        assert changes + kept == total - pending
        assert report.pending_keyframes == pending
        assert report.v1_rows == changes + kept
        assert report.rows["changes"] + report.rows["changes_keep"] == report.v1_rows
        # progress: every table of the migration, with its rows
        done = {s.table: s.rows for s in steps if s.done}
        for table in ("tables", "table_schemas", "changes", "changes_keep", "transactions", "context_changes",
                      "request_errors", "capture_state", "erasures"):  # fmt: skip
            assert table in done, table
        assert done["changes"] == changes

        check_changes(conn, env)
        check_contexts(conn)
        check_context_rows(conn)
        # the subtransactions' xids are kept, the transactions' own are not
        assert q(conn, "SELECT count(*) FROM changes WHERE xid IS NOT NULL")[0][0] == 2
        check_names(conn, env)
        check_small_tables(conn, env)
        assert sorted(v1_leftovers(conn, SCHEMA)) == sorted(
            t + "_v1"
            for t in ("capture_state", "gaps", "table_schemas", "retention_state", "transactions", "mutations",
                      "mutations_keep", "keyframes_retire", "prunes", "erasures", "actor_sequences", "requests")
        )  # fmt: skip
        # sql/store.sql applies again on the migrated store (what `cdc setup` does next)
        before = relations(conn)
        apply_store_schema(conn, SCHEMA)
        assert relations(conn) == before
        # the v2 indexes carry their own names (the format-1 ones moved away)
        indexes = {name for name, kind in before if kind in ("i", "I")}
        assert {"transactions_committed_at", "table_schemas_table", "erasures_key", "changes_row"} <= indexes
        assert "transactions_committed_at_v1" in indexes
        # then the format-1 tables go
        dropped = drop_v1(conn, SCHEMA)
        assert "mutations_v1" in dropped
        assert v1_leftovers(conn, SCHEMA) == []
        assert not [name for name, _ in relations(conn) if name.endswith("_v1")]
        assert q(conn, "SELECT count(*) FROM changes_all") == [(changes + kept,)]
        assert q(conn, "SELECT nextval(pg_get_serial_sequence('table_schemas', 'schema_id')) "
                       "= (SELECT max(schema_id) + 1 FROM table_schemas)") == [(True,)]  # fmt: skip
        assert q(conn, "SELECT nextval(pg_get_serial_sequence('tables', 'table_id'))") == [
            (report.tables + 1,)
        ]


def check_changes(conn: psycopg.Connection[Any], env: Env) -> None:
    """Each change against its mutation: key text (jsonb_build_array of the key columns in key
    order, spelled out here per table), images, before, old key, flags, op, position, time."""
    tables = {t.schema_id: t for t in schema_rows(env)}
    seen = 0
    for schema_id, table in tables.items():
        cols = table.key_columns
        build = ", ".join(f"{{k}} -> {sql.Literal(c).as_string(conn)}" for c in cols)
        key_sql = f"jsonb_build_array({build.format(k='m.key')})::text"
        old_sql = f"jsonb_build_array({build.format(k='m.old_key')})::text"
        rows = q(
            conn,
            f"SELECT m.position, m.ordinal, m.op, c.op::text, m.version IS NULL, c.flags, m.lsn, c.lsn, "
            f"m.committed_at = c.committed_at, m.keyframe, "
            f"CASE WHEN m.key IS NULL THEN NULL ELSE {key_sql} END, c.key_text, "
            f"CASE WHEN m.old_key IS NULL THEN NULL ELSE {old_sql} END, c.old_key_text, "
            "m.before, m.after, m.key, c.image::jsonb, c.before::jsonb, c.schema_id, "
            't.relation_oid, c.key_hash = hashtextextended(c.key_text COLLATE "C", 0), c.xid, m.xid, '
            "c.image, c.before, c.image::jsonb::text, c.before::jsonb::text "
            f"FROM ({V1_ALL}) m JOIN (SELECT * FROM changes UNION ALL SELECT * FROM changes_keep) c "
            "USING (position, ordinal) JOIN tables t ON t.table_id = c.table_id WHERE m.schema_id = %s",
            (schema_id,),
        )
        for (pos, ordinal, op, op2, rolled_back, flags, lsn, lsn2, same_time, keyframe, key_text, key_text2,
             old_key_text, old_key_text2, before, after, key, image, before2, schema2, oid, hashed, xid2,
             xid, image_text, before_text, image_jsonb, before_jsonb) in rows:  # fmt: skip
            where = f"{table.text} {op} at {pos}/{ordinal}"
            seen += 1
            assert op2 == op[0] if op != "SNAPSHOT" else op2 == "S", where
            assert (lsn2, same_time, schema2, oid) == (lsn, True, schema_id, table.oid), where
            assert key_text2 == key_text, where
            assert old_key_text2 == old_key_text, where
            if key_text is not None:
                assert hashed, where
            whole_row = table.replica_identity == "f"
            expected_flags = (1 if rolled_back else 0) | (256 if keyframe else 0)
            if op == "UPDATE" and whole_row:
                expected_flags |= 2
            assert flags == expected_flags, where
            if op in ("INSERT", "UPDATE", "SNAPSHOT"):
                assert image == after, where
            elif op == "DELETE":
                assert image == (before if whole_row else key), where
            else:
                assert image is None and key_text2 is None, where
            assert before2 == (before if op == "UPDATE" and whole_row else None), where
            assert xid2 is None or xid2 == xid, where
            # images: members in table order, spelled as jsonb prints them
            for text, as_jsonb in ((image_text, image_jsonb), (before_text, before_jsonb)):
                if text is not None:
                    members = list(json.loads(text))
                    assert members == [c for c in table.columns if c in members], where
                    assert len(text) == len(as_jsonb) and text.startswith('{"'), where
    total = q(conn, "SELECT count(*) FROM changes_all")[0][0]
    assert seen == total
    # spot checks of the canonical key text
    texts = {r[0] for r in q(conn, "SELECT key_text FROM changes_all")}
    assert "[9007199254740993]" in texts
    assert '["eu", 1]' in texts
    assert json.dumps([ODD_KEY], ensure_ascii=False) in texts
    assert (
        '["2026-03-09T09:01:00+00:00", "logout", 2, false, ' + json.dumps(ODD_KEY, ensure_ascii=False) + "]"
        in texts
    )


def schema_rows(env: Env) -> list[Table]:
    """Every schema row the builder wrote (a table's later shapes replace its earlier ones in
    ``env.v1.tables``: read them back from the store)."""
    with env.store() as conn:
        rows = q(conn, "SELECT schema_id, table_name, relation_oid, key_columns, columns, replica_identity::text "
                       "FROM table_schemas_v1")  # fmt: skip
    return [
        Table(str(r[1]), int(r[2]), int(r[0]), tuple(c["name"] for c in r[4]), tuple(r[3]), str(r[5]))
        for r in rows
    ]


def check_contexts(conn: psycopg.Connection[Any]) -> None:
    """The context of every change (its transaction's, or the context_changes row in force)
    equals the format-1 mutation's: request id, actor, document, actor sequence number."""
    rows = q(
        conn,
        f"SELECT m.position, m.ordinal, m.request_id, m.actor, m.actor_seq, m.context::text, "
        "  x.request_id, x.actor, x.actor_seq + (m.ordinal - x.from_ordinal), x.context "
        f"FROM ({V1_ALL}) m CROSS JOIN LATERAL ("
        "  SELECT * FROM (SELECT cc.from_ordinal, cc.request_id, cc.actor, cc.actor_seq, cc.context "
        "    FROM context_changes_all cc WHERE cc.position = m.position AND cc.from_ordinal <= m.ordinal "
        "    UNION ALL SELECT 0, t.request_id, t.actor, t.actor_seq, t.context FROM transactions_all t "
        "    WHERE t.position = m.position) s ORDER BY from_ordinal DESC LIMIT 1) x "
        "WHERE NOT m.keyframe",
    )
    assert len(rows) == q(conn, "SELECT count(*) FROM changes_all WHERE flags & 256 = 0")[0][0]
    for pos, ordinal, rid, actor, seq, context, rid2, actor2, seq2, context2 in rows:
        where = f"{pos}/{ordinal}"
        assert (rid2, actor2, context2) == (rid, actor, context), where
        assert seq2 == seq, where


def check_context_rows(conn: psycopg.Connection[Any]) -> None:
    # the nested request, its return, the context dropped, and the actor sequence jump
    assert q(conn, "SELECT count(*) FROM context_changes")[0][0] == 4
    assert q(conn, "SELECT count(*) FROM context_changes_keep")[0][0] == 1
    assert q(conn, "SELECT count(*) FROM transactions_keep")[0][0] == 2
    assert q(
        conn,
        "SELECT status::text, change_count FROM transactions t WHERE request_id = 'r-fail'",
    ) == [("r", 2)]


def check_names(conn: psycopg.Connection[Any], env: Env) -> None:
    names = q(
        conn,
        "SELECT t.relation_oid, n.schema_name, n.table_name, n.from_position, t.dropped_position IS NOT NULL "
        "FROM tables t JOIN table_names n USING (table_id) ORDER BY t.table_id, n.from_position",
    )
    by_oid: dict[int, list[tuple[str, str]]] = {}
    dropped = set()
    for oid, nsp, name, _start, is_dropped in names:
        by_oid.setdefault(oid, []).append((nsp, name))
        if is_dropped:
            dropped.add(oid)
    for (nsp, name), oid in env.oids.items():
        if name == "purchases":  # renamed to orders, then back (format 1 reused its schema row)
            assert by_oid[oid] == [("public", "purchases"), ("public", "orders"), ("public", "purchases")]
        else:
            assert by_oid[oid] == [(nsp, name)], (nsp, name)
    assert by_oid[GONE_OID] == [("public", "gone")]
    assert dropped == {GONE_OID}
    assert len(by_oid) == len(env.oids) + 1
    # each name holds from the first change made under it
    renames = q(
        conn,
        "SELECT n.table_name, n.from_position FROM table_names n JOIN tables t USING (table_id) "
        "WHERE t.relation_oid = %s ORDER BY n.from_position",
        (env.oids["public", "purchases"],),
    )
    changes = [p for (p,) in q(conn, "SELECT DISTINCT position FROM changes WHERE table_id = "
                                     "(SELECT table_id FROM tables WHERE relation_oid = %s) ORDER BY 1",
                               (env.oids["public", "purchases"],))]  # fmt: skip
    first = q(
        conn, "SELECT first_position FROM tables WHERE relation_oid = %s", (env.oids["public", "purchases"],)
    )
    assert renames == [("purchases", first[0][0]), ("orders", changes[1]), ("purchases", changes[2])]
    # table_schemas keep their ids and name their table
    assert q(conn, "SELECT count(*) FROM table_schemas s JOIN table_schemas_v1 o USING (schema_id) "
                   "JOIN tables t ON t.table_id = s.table_id AND t.relation_oid = o.relation_oid")[0][0] == (
        q(conn, "SELECT count(*) FROM table_schemas_v1")[0][0]
    )  # fmt: skip


def check_small_tables(conn: psycopg.Connection[Any], env: Env) -> None:
    errors = q(
        conn,
        "SELECT lsn, request_id, error_type, message, location, db_user, backend_pid FROM request_errors",
    )
    # unsigned in format 1: no reporter, so never attributed (docs/security.md "Request attribution")
    assert errors == [(-1, "r-fail", "TimeoutError", "payment API timeout", "pay.py:42", None, None)]
    assert q(conn, "SELECT slot_name, acked_lsn, history_floor FROM capture_state") == [
        ("cdc", env.v1.position, env.floor)
    ]
    assert q(conn, "SELECT reason IS NOT NULL FROM gaps") == [(True,)]
    assert q(conn, "SELECT horizon, staged FROM retention_state") == [(at("2026-03-09 00:00"), None)]
    assert q(conn, "SELECT floor, keyframes FROM prunes") == [(env.floor, 2)]
    assert q(conn, "SELECT actor, last_seq FROM actor_sequences ORDER BY 1") == sorted(
        env.v1.actor_seqs.items()
    )
    assert q(
        conn, "SELECT t.relation_oid, e.mutations_removed FROM erasures e JOIN tables t USING (table_id)"
    ) == [(env.oids["public", "users"], 3)]
    # partitions: the format-1 bounds, format-2 names
    parts = {r[0] for r in q(conn, "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                                   "WHERE i.inhparent = 'changes'::regclass")}  # fmt: skip
    assert parts == {"changes_p20260309", "changes_p20260310", "changes_default"}
    assert q(conn, "SELECT count(*) FROM changes_default")[0][0] == 1
    # a partition filled before it was attached has the parent's indexes, generated hashes included
    for part in ("changes_p20260309", "changes_p20260310"):
        indexes = q(conn, "SELECT count(*) FROM pg_index i JOIN pg_inherits h ON h.inhrelid = i.indexrelid "
                          "WHERE i.indrelid = %s::regclass", (part,))  # fmt: skip
        assert indexes == [(4,)], part
    assert q(conn, "SELECT count(*) FROM changes WHERE key_text IS NOT NULL AND key_hash IS NULL") == [(0,)]
    assert q(conn, "SELECT count(*) FROM ONLY transactions_p20260310")[0][0] == 7


def test_without_the_source_dotted_names_split_at_the_first_dot(env: Env) -> None:
    with env.store() as conn:
        report = migrate_v1(conn, SCHEMA)
        names = q(
            conn,
            "SELECT t.relation_oid, n.schema_name, n.table_name FROM tables t JOIN table_names n USING (table_id)",
        )
    lookalikes = sorted(
        (nsp, name) for oid, nsp, name in names if oid in (env.oids["a.b", "c"], env.oids["a", "b.c"])
    )
    assert lookalikes == [("a", "b.c"), ("a", "b.c")]
    assert sorted((a.relation_oid, a.how) for a in report.ambiguous) == sorted(
        [(env.oids["a.b", "c"], "first dot"), (env.oids["a", "b.c"], "first dot")]
    )
    assert any("are now named a.b.c" in w for w in report.warnings), report.warnings
    assert report.dropped_tables == 0


def test_a_failure_half_way_leaves_format_1_untouched(env: Env) -> None:
    with env.store() as conn:
        before_rels, before_rows = relations(conn), dump(conn)

        def fail_after_changes(step: MigrationStep) -> None:
            if step.table == "transactions" and step.done:
                raise RuntimeError("injected")

        with pytest.raises(RuntimeError, match="injected"):
            migrate_v1(conn, SCHEMA, progress=fail_after_changes)
        assert relations(conn) == before_rels
        assert dump(conn) == before_rows
        assert is_v1_store(conn, SCHEMA)
        # a mutation naming a schema row that does not exist: refused once the format-1 tables
        # are renamed and the format-2 ones created
        conn.execute(
            sql.SQL("UPDATE {} SET schema_id = 424242 WHERE ordinal = 0 AND position = %s").format(
                sql.Identifier(SCHEMA, "mutations")
            ),
            (env.v1.positions[-1],),
        )
        before_rels, before_rows = relations(conn), dump(conn)
        with pytest.raises(MigrationError, match="without a schema row"):
            migrate_v1(conn, SCHEMA)
        assert relations(conn) == before_rels
        assert dump(conn) == before_rows


def test_refused_while_a_daemon_holds_the_store(env: Env) -> None:
    with env.store() as daemon, env.store() as conn:
        daemon.execute("SELECT pg_advisory_lock(hashtext(%s))", (f"cdc:{SCHEMA}:cdc",))
        with pytest.raises(MigrationError, match="daemon is active"):
            migrate_v1(conn, SCHEMA)
        assert is_v1_store(conn, SCHEMA)


def test_setup_steps_status_and_drop(env: Env) -> None:
    """What `cdc setup` runs before sql/store.sql: a line per step, the ambiguous names as
    warnings, the `_v1` tables in `cdc status` until `--drop-v1`."""
    config = load(None, env.source_dsn, env.store_dsn)
    assert collect_status(config).store_error == (
        "the store is of format 1: stop the daemon and run `cdc setup` to migrate it"
    )
    lines: list[str] = []
    warnings: list[str] = []
    with env.store() as conn, env.source() as src:
        prepare_store(conn, SCHEMA, src, drop=False, did=lines.append, warn=warnings.append)
        assert lines[0].startswith(f"store: schema {SCHEMA} is of format 1")
        assert any(line.startswith("store: migrate changes: 37 rows") for line in lines), lines
        assert any(line.startswith("store: migrate transactions: ") for line in lines), lines
        assert lines[-1].startswith("store: migrated 43 format-1 mutations to format 2")
        assert (
            f"format-1 table name 'a.b.c' (relation oid {env.oids['a.b', 'c']}) read as \"a.b\".c (catalog)"
            in warnings
        )
        assert (
            f"format-1 table name 'a.b.c' (relation oid {env.oids['a', 'b.c']}) read as a.\"b.c\" (catalog)"
            in warnings
        )
        status = collect_status(config)
        assert status.store_error is None
        assert len(status.v1_tables) == 12
        assert (
            "format 1",
            "12 table(s) kept by the migration: `cdc setup --drop-v1` drops them",
        ) in render_status(status)
        # run again: nothing to migrate; then --drop-v1
        lines.clear()
        prepare_store(conn, SCHEMA, src, drop=False, did=lines.append, warn=warnings.append)
        assert lines == []
        prepare_store(conn, SCHEMA, src, drop=True, did=lines.append, warn=warnings.append)
        assert lines == ["store: 12 format-1 table(s) dropped"]
        assert collect_status(config).v1_tables == []
        with pytest.raises(MigrationError, match="not of format 1"):
            migrate_v1(conn, SCHEMA)


def _writer_is_format_2() -> bool:
    import cdc.store.writer

    return "changes" in inspect.getsource(cdc.store.writer) and "mutations_all" not in inspect.getsource(
        cdc.store.writer
    )


@pytest.mark.skipif(
    not _writer_is_format_2(), reason="cdc/store/writer.py still writes format 1 (the store branch)"
)
def test_cdc_setup_migrates_then_drops(env: Env) -> None:
    with env.source() as src:
        src.execute("SELECT pg_create_logical_replication_slot('cdc', 'pgoutput')")
    try:
        runner = CliRunner()
        args = ["setup", "--source", env.source_dsn, "--store", env.store_dsn]
        result = runner.invoke(main, args, env={"CDC_CONFIG": ""}, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert "ok    store: migrated 43 format-1 mutations to format 2" in result.output
        result = runner.invoke(main, [*args, "--drop-v1"], env={"CDC_CONFIG": ""}, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert "ok    store: 12 format-1 table(s) dropped" in result.output
    finally:
        with env.source() as src:
            src.execute("SELECT pg_drop_replication_slot('cdc')")


# ============================================================================ through the query layers


def _query_is_format_2() -> bool:
    import cdc.query

    return hasattr(cdc.query, "__path__")  # the cdc/query/ package reads format 2


#: Format 1 read these tables by their "schema.name" text alone: a renamed table's history was
#: split between its names, look-alike dotted names were mixed. Compared: the others.
COMPARED = (
    "public.users",
    'public."User"',
    "public.events",
    "public.accounts",
    "public.audit",
    "public.gone",
)


def _history_fields(m: Any) -> tuple[Any, ...]:
    names = (
        "position",
        "ordinal",
        "version",
        "op",
        "key",
        "old_key",
        "before",
        "after",
        "status",
        "request_id",
    )
    context = getattr(m, "context", None)
    if context == {"keyframe": True}:
        context = None  # how format 1 marked a keyframe (format 2: a flag)
    images = [getattr(m, name, None) for name in ("before", "after")]
    return (
        *(getattr(m, name, None) for name in names),
        context,
        tuple(getattr(m, "changed", ()) or ()),
        *(None if image is None else list(image) for image in images),  # column order
    )


def _read_all(
    store: Any, keys: dict[str, list[Any]], versions: list[int]
) -> dict[tuple[str, str, int | None], Any]:
    """row_at of every row at every version, and row_history of every row (version None)."""
    out: dict[tuple[str, str, int | None], Any] = {}
    for table, table_keys in keys.items():
        for key in table_keys:
            name = json.dumps(key, sort_keys=True)
            out[table, name, None] = [_history_fields(m) for m in store.row_history(table, key)]
            for version in versions:
                row = store.row_at(table, key, version)
                out[table, name, version] = None if row is None else dict(row)
    return out


@pytest.mark.skipif(not _query_is_format_2(), reason="cdc/query.py still reads format 1 (the readers branch)")
def test_query_layers_agree(env: Env) -> None:
    """row_at of every row at every version, and every row's history, through the format-1 query
    layer before the migration and through the format-2 one after it."""
    from cdc.query import Store
    from tests.data.query_v1 import Store as StoreV1

    with env.store() as conn:
        rows = q(
            conn,
            "SELECT DISTINCT s.table_name, s.key_columns, m.key FROM mutations m "
            "JOIN table_schemas s USING (schema_id) WHERE m.key IS NOT NULL "
            "UNION SELECT DISTINCT s.table_name, s.key_columns, m.key FROM mutations_keep m "
            "JOIN table_schemas s USING (schema_id) WHERE m.key IS NOT NULL",
        )
        versions = [v for (v,) in q(conn, "SELECT DISTINCT version FROM mutations WHERE version IS NOT NULL")]
    shown = {"public.User": 'public."User"'}
    keys: dict[str, list[Any]] = {}
    for text, key_columns, key in rows:
        table = shown.get(text, text)
        if table not in COMPARED:
            continue
        keys.setdefault(table, []).append(key[key_columns[0]] if len(key_columns) == 1 else key)
    versions = sorted(v for v in versions if v >= env.floor)
    assert len(keys) == len(COMPARED) and len(versions) > 10
    v1 = StoreV1(env.store_dsn, schema=SCHEMA)
    try:
        before = _read_all(v1, keys, versions)
    finally:
        v1.close()
    with env.store() as conn, env.source() as src:
        migrate_v1(conn, SCHEMA, source_conn=src)
    v2 = Store(env.store_dsn, schema=SCHEMA)
    try:
        after = _read_all(v2, keys, versions)
    finally:
        v2.close()
    assert after.keys() == before.keys()
    # Known difference, of the format-2 query layer: the history of a row of a keyless table
    # leaves out a TRUNCATE that removed a copy of it left after another copy's DELETE
    # (cdc/query/rows.py _walk keeps one state per key, not a multiset count).
    for k in before:
        if k[0] == "public.events" and k[2] is None:
            before[k] = [m for m in before[k] if m[3] != "TRUNCATE"]
            after[k] = [m for m in after[k] if m[3] != "TRUNCATE"]
    # A table the source no longer has is dropped at the last acknowledged position (format 1
    # never recorded drops): from there on its rows are gone, as on the source.
    with env.store() as conn:
        dropped = dict(
            q(
                conn,
                "SELECT n.schema_name || '.' || n.table_name, t.dropped_position FROM tables t "
                "JOIN table_names n USING (table_id) WHERE t.dropped_position IS NOT NULL",
            )
        )
    for k in before:
        if k[0] in dropped and k[2] is not None and k[2] >= dropped[k[0]]:
            before[k] = None
    differ = [k for k in before if before[k] != after[k]]
    assert not differ, [(k, before[k], after[k]) for k in differ[:5]]


def test_an_empty_format_1_store(pg: LocalPostgres, fresh_dbname: str) -> None:
    dsn = pg.create_database(fresh_dbname)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            V1Store(conn, SCHEMA)
            report = migrate_v1(conn, SCHEMA)
            assert (report.v1_rows, report.tables, report.warnings) == (0, 0, [])
            assert q(conn, "SELECT format_version FROM store_meta") == [(2,)]
            assert q(conn, "SELECT count(*) FROM retention_state") == [(1,)]
            # the sequences start where format 1 left them (here: at 1)
            assert q(conn, "SELECT nextval(pg_get_serial_sequence('tables', 'table_id'))") == [(1,)]
            assert len(drop_v1(conn, SCHEMA)) == 12
    finally:
        pg.drop_database(fresh_dbname)


def test_refused_while_a_reader_holds_a_table(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("cdc.store.migrate.LOCK_TIMEOUT", "200ms")
    with env.store() as reader, env.store() as conn:
        with reader.transaction():
            reader.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(SCHEMA, "mutations")))
            with pytest.raises(MigrationError, match="is in use: its tables stayed locked for 200ms"):
                migrate_v1(conn, SCHEMA)
        assert is_v1_store(conn, SCHEMA)
        assert not v1_leftovers(conn, SCHEMA)


def test_a_transaction_under_two_commit_times(env: Env) -> None:
    """A rolled-back transaction written again after a crash with another abort time (format 1
    before PostgreSQL 16) can have mutations in two partitions: still one transaction."""
    with env.store() as conn:
        (position,) = q(conn, "SELECT position FROM transactions WHERE status = 'rolled_back'")[0]
        conn.execute(
            "UPDATE mutations SET committed_at = '2026-03-10 00:00:01+00' WHERE position = %s AND ordinal = 1",
            (position,),
        )
        report = migrate_v1(conn, SCHEMA)
        assert "1 transaction(s) had mutations under two commit times" in report.warnings
        assert q(conn, "SELECT count(*) FROM transactions_all WHERE position = %s", (position,)) == [(1,)]
        assert q(conn, "SELECT ordinal, committed_at FROM changes WHERE position = %s ORDER BY 1", (position,)) == [
            (0, at("2026-03-09 11:00")), (1, at("2026-03-10 00:00:01"))
        ]  # fmt: skip
        check_changes(conn, env)
        check_contexts(conn)


def test_images_of_wide_tables_and_unlisted_members(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A table wider than the columns spelled out (here 3) takes the subquery path; an image with
    a member its schema row does not list keeps jsonb's text, nothing lost."""
    monkeypatch.setattr("cdc.store.migrate_changes.IMAGE_TERMS", 3)
    with env.store() as conn:
        (position,) = q(conn, "SELECT max(position) FROM mutations WHERE op = 'INSERT'")[0]
        conn.execute(
            sql.SQL(
                "UPDATE {} SET after = after || '{{\"zz\": 1}}' WHERE position = %s AND op = 'INSERT'"
            ).format(sql.Identifier(SCHEMA, "mutations")),
            (position,),
        )
        migrate_v1(conn, SCHEMA)
        check_contexts(conn)
        (image,) = q(conn, "SELECT image FROM changes WHERE position = %s AND op = 'I'", (position,))[0]
        (expected,) = q(
            conn, "SELECT after::text FROM mutations_v1 WHERE position = %s AND op = 'INSERT'", (position,)
        )[0]
        assert image == expected and '"zz": 1' in image
        conn.execute("DELETE FROM changes WHERE position = %s AND op = 'I'", (position,))
        conn.execute("DELETE FROM mutations_v1 WHERE position = %s AND op = 'INSERT'", (position,))
        check_changes(conn, env)
