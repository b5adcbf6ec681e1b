"""A format-1 history store (tests/data/store_v1.sql, the DDL of 77587fe) written by plain SQL,
as the format-1 daemon wrote it: for the migration tests (tests/integration/test_migrate.py)
and its benchmark (bench/migrate_v1.py).

    v1 = V1Store(conn, "cdc_history")          # applies the format-1 DDL
    users = v1.table("public.users", oid, {"id": INT8, "name": TEXT}, key=["id"])
    with v1.txn("2026-03-10 12:00", context=ctx("r1", "alice")) as t:
        t.insert(users, {"id": 1, "name": "a"})
    v1.finish(slot="cdc")

Rows follow the format-1 writer (77587fe:cdc/store/writer.py, cdc/assembler.py): ``key`` is
the key columns' object (the whole row for a table without a key), ``before`` the previous
image of the row, ``old_key`` set when an UPDATE changed the key, ``version`` NULL for a
rolled-back attempt, ``actor_seq`` from a per-actor counter, ``context`` per mutation.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

V1_SQL = Path(__file__).resolve().parent / "data" / "store_v1.sql"

BOOL, INT8, INT4, TEXT, NUMERIC, TIMESTAMPTZ = 16, 20, 23, 25, 1700, 1184
STEP = 0x100
KEYFRAME_ORDINAL_BASE = 1_000_000_000


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def ctx(request_id: str | None, actor: str | None = None, **extra: Any) -> dict[str, Any]:
    """A context document as the format-1 daemon stored it (RequestContext.as_json)."""
    return {
        "request_id": request_id,
        "actor": actor,
        "application_name": extra.pop("application_name", "app"),
        "db_user": extra.pop("db_user", "app"),
        "client_addr": extra.pop("client_addr", None),
        "backend_pid": extra.pop("backend_pid", 4242),
        "source": extra.pop("source", "guc"),
        "extra": extra,
    }


@dataclass
class Table:
    text: str  # "schema.name" as format 1 stored it
    oid: int
    schema_id: int
    columns: tuple[str, ...]
    key: tuple[str, ...]
    replica_identity: str
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    bag: list[dict[str, Any]] = field(default_factory=list)

    @property
    def key_columns(self) -> tuple[str, ...]:
        """The columns naming a row: the key, or every column in table order."""
        return self.key or self.columns

    def key_of(self, row: Mapping[str, Any]) -> dict[str, Any]:
        return {c: row.get(c) for c in self.key} if self.key else dict(row)


def _kj(key: Mapping[str, Any]) -> str:
    return json.dumps(key, sort_keys=True)


class Txn:
    """The mutations of one transaction (see :meth:`V1Store.txn`)."""

    def __init__(self, store: V1Store, context: dict[str, Any] | None, xid: int, rolled_back: bool) -> None:
        self.v1 = store
        self.context = context
        self.xid = xid
        self.subxid = xid
        self.rolled_back = rolled_back
        self.mutations: list[dict[str, Any]] = []
        self.seq_gap = 0
        self.state: dict[int, tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]] = {}

    def set_context(self, context: dict[str, Any] | None) -> None:
        """A later context (SET LOCAL again, a nested request): for the mutations from here."""
        self.context = context

    def skip_actor_seqs(self, n: int) -> None:
        """The next mutation's actor sequence number jumps ``n`` ahead (gaps are allowed)."""
        self.seq_gap = n

    def savepoint(self) -> None:
        """The mutations from here are made by a new subtransaction."""
        self.v1.xid += 1
        self.subxid = self.v1.xid

    def _rows(self, t: Table) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
        if t.oid not in self.state:
            self.state[t.oid] = (dict(t.rows), list(t.bag))
        return self.state[t.oid]

    def _add(self, t: Table, op: str, rolled_back: bool, **fields: Any) -> None:
        self.mutations.append(
            {"table": t, "op": op, "rolled_back": rolled_back or self.rolled_back, "context": self.context,
             "xid": self.subxid, "key": None, "old_key": None, "before": None, "after": None, "changed": None,
             "seq_gap": self.seq_gap, **fields}
        )  # fmt: skip
        self.seq_gap = 0

    def _apply(
        self, t: Table, rolled_back: bool, old: dict[str, Any] | None, new: dict[str, Any] | None
    ) -> None:
        if rolled_back:
            return
        rows, bag = self._rows(t)
        if t.key:
            if old is not None:
                del rows[_kj(t.key_of(old))]
            if new is not None:
                rows[_kj(t.key_of(new))] = new
        else:
            if old is not None:
                bag.remove(old)
            if new is not None:
                bag.append(new)

    def find(self, t: Table, key: Any) -> dict[str, Any]:
        rows, bag = self._rows(t)
        if t.key:
            key = key if isinstance(key, Mapping) else {t.key[0]: key}
            return dict(rows[_kj(key)])
        for row in bag:
            if row == dict(key):
                return dict(row)
        raise KeyError(key)

    def insert(
        self, t: Table, row: Mapping[str, Any], *, rolled_back: bool = False, op: str = "INSERT"
    ) -> None:
        after = {c: row.get(c) for c in t.columns}
        self._add(t, op, rolled_back, key=t.key_of(after), after=after, changed=list(after))
        self._apply(t, rolled_back, None, after)

    def snapshot(self, t: Table, row: Mapping[str, Any]) -> None:
        self.insert(t, row, op="SNAPSHOT")

    def update(self, t: Table, key: Any, changes: Mapping[str, Any], *, rolled_back: bool = False) -> None:
        before = self.find(t, key)
        after = {**before, **changes}
        old_key, new_key = t.key_of(before), t.key_of(after)
        changed = [c for c in t.columns if before.get(c) != after.get(c)]
        self._add(
            t, "UPDATE", rolled_back, key=new_key, old_key=old_key if old_key != new_key else None,
            before=before, after=after, changed=changed,
        )  # fmt: skip
        self._apply(t, rolled_back, before, after)

    def delete(self, t: Table, key: Any, *, rolled_back: bool = False) -> None:
        before = self.find(t, key)
        self._add(t, "DELETE", rolled_back, key=t.key_of(before), before=before, changed=list(before))
        self._apply(t, rolled_back, before, None)

    def truncate(self, *tables: Table, rolled_back: bool = False) -> None:
        for t in tables:
            self._add(t, "TRUNCATE", rolled_back)
            if not (rolled_back or self.rolled_back):
                rows, bag = self._rows(t)
                rows.clear()
                bag.clear()


class V1Store:
    """Writes a format-1 store into ``schema`` over ``conn`` (autocommit)."""

    def __init__(self, conn: psycopg.Connection[Any], schema: str, start: int = 0x1_0000_0000) -> None:
        self.conn = conn
        self.schema = schema
        self.position = start
        self.xid = 1000
        self.tables: dict[int, Table] = {}
        self.actor_seqs: dict[str, int] = {}
        self.positions: list[int] = []  # of every committed transaction
        with conn.transaction():
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
            conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(schema)))
            conn.execute(V1_SQL.read_text().encode())

    def t(self, name: str) -> sql.Identifier:
        return sql.Identifier(self.schema, name)

    def partition(self, day: str) -> None:
        """A day partition of ``mutations`` and ``transactions``, named as format 1 named them."""
        lo = at(day)
        for parent in ("mutations", "transactions"):
            self.conn.execute(
                sql.SQL("CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})").format(
                    self.t(f"{parent}_p{lo:%Y%m%d}"),
                    self.t(parent),
                    sql.Literal(lo),
                    sql.Literal(lo + timedelta(days=1)),
                )
            )

    def table(
        self,
        text: str,
        oid: int,
        columns: Mapping[str, int],
        key: Sequence[str] = ("id",),
        *,
        replica_identity: str = "d",
    ) -> Table:
        """A (new) schema row of relation ``oid``, first seen at the next position; a shape (name
        included) seen before gets its old row back, as the format-1 writer's fingerprint did."""
        cols = [{"name": c, "type_oid": o, "type_modifier": -1, "key": c in key} for c, o in columns.items()]
        row = self.conn.execute(
            sql.SQL(
                "INSERT INTO {} (table_name, relation_oid, replica_identity, key_columns, columns, fingerprint, "
                "first_position) VALUES (%s, %s, %s, %s, %s, md5(%s), %s) ON CONFLICT (fingerprint) DO UPDATE "
                "SET first_position = least(table_schemas.first_position, excluded.first_position) RETURNING schema_id"
            ).format(self.t("table_schemas")),
            (text, oid, replica_identity, list(key), Jsonb(cols), json.dumps([text, oid, replica_identity, list(key), cols]),
             self.position + STEP),
        ).fetchone()  # fmt: skip
        assert row is not None
        old = self.tables.get(oid)
        table = Table(text, oid, int(row[0]), tuple(columns), tuple(key), replica_identity)
        if old is not None:
            table.rows, table.bag = old.rows, old.bag
        self.tables[oid] = table
        return table

    @contextmanager
    def txn(
        self,
        when: str | datetime,
        *,
        context: dict[str, Any] | None = None,
        rolled_back: bool = False,
        kept: bool = False,
        origin: str | None = None,
        xid: int | None = None,
    ) -> Iterator[Txn]:
        """One transaction at ``when``; ``kept``: its partition was pruned, its rows kept in
        ``mutations_keep`` (a table with a longer retention), its transactions row gone."""
        if xid is None:
            self.xid += 1
            xid = self.xid
        txn = Txn(self, context, xid, rolled_back)
        yield txn
        self._write(txn, at(when) if isinstance(when, str) else when, kept, origin)

    def _write(self, txn: Txn, when: datetime, kept: bool, origin: str | None) -> None:
        self.position += STEP
        position = self.position
        committed = not txn.rolled_back
        status = "committed" if committed else "rolled_back"
        target = "mutations_keep" if kept else "mutations"
        with self.conn.transaction():
            if not kept:
                self.conn.execute(
                    sql.SQL(
                        "INSERT INTO {} (position, xid, version, commit_lsn, status, committed_at, origin, "
                        "mutation_count, request_ids) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    ).format(self.t("transactions")),
                    (position, txn.xid, position if committed else None, position - 16, status, when, origin,
                     len(txn.mutations),
                     sorted({m["context"]["request_id"] for m in txn.mutations
                             if m["context"] and m["context"].get("request_id")})),
                )  # fmt: skip
            requests: dict[str, list[Any]] = {}
            for ordinal, m in enumerate(txn.mutations):
                context = m["context"]
                actor = context.get("actor") if context else None
                seq = None
                if actor:
                    seq = self.actor_seqs.get(actor, 0) + 1 + m["seq_gap"]
                    self.actor_seqs[actor] = seq
                request_id = context.get("request_id") if context else None
                mstatus = "rolled_back" if m["rolled_back"] else "committed"
                self.conn.execute(
                    sql.SQL(
                        "INSERT INTO {} (position, ordinal, version, lsn, xid, committed_at, table_name, op, key, "
                        "old_key, before, after, changed, status, request_id, context, schema_id, actor, actor_seq) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    ).format(self.t(target)),
                    (position, ordinal, position if mstatus == "committed" else None, position - STEP + 16 + ordinal,
                     m["xid"], when, m["table"].text, m["op"], _j(m["key"]), _j(m["old_key"]), _j(m["before"]),
                     _j(m["after"]), m["changed"], mstatus, request_id, _j(context), m["table"].schema_id, actor, seq),
                )  # fmt: skip
                if request_id:
                    entry = requests.setdefault(request_id, [actor, context, False])
                    entry[2] = entry[2] or mstatus == "rolled_back"
            for request_id, (actor, context, rolled) in requests.items():
                self.conn.execute(
                    sql.SQL(
                        "INSERT INTO {} AS r (request_id, actor, context, first_seen_at, last_seen_at, "
                        "committed_count, rolled_back_count) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                        "ON CONFLICT (request_id) DO UPDATE SET last_seen_at = excluded.last_seen_at, "
                        "committed_count = r.committed_count + excluded.committed_count, "
                        "rolled_back_count = r.rolled_back_count + excluded.rolled_back_count"
                    ).format(self.t("requests")),
                    (
                        request_id,
                        actor,
                        Jsonb(context),
                        when,
                        when,
                        int(committed),
                        int(rolled or not committed),
                    ),
                )
        if committed:
            self.positions.append(position)
            for oid, (rows, bag) in txn.state.items():
                self.tables[oid].rows, self.tables[oid].bag = rows, bag

    def keyframes(self, table: Table, floor: int, horizon: datetime, *, first_ordinal: int = 0) -> int:
        """Keyframes (mutations_keep, keyframe) of every row of ``table`` at ``floor``; their count."""
        rows = list(table.rows.values()) if table.key else list(table.bag)
        for i, row in enumerate(rows):
            self.conn.execute(
                sql.SQL(
                    "INSERT INTO {} (position, ordinal, version, lsn, xid, committed_at, table_name, op, key, after, "
                    "changed, status, context, schema_id, keyframe) VALUES (%s, %s, %s, %s, 0, %s, %s, 'SNAPSHOT', "
                    "%s, %s, %s, 'committed', %s, %s, true)"
                ).format(self.t("mutations_keep")),
                (floor, KEYFRAME_ORDINAL_BASE + first_ordinal + i, floor, floor, horizon, table.text,
                 Jsonb(table.key_of(row)), Jsonb(row), list(row), Jsonb({"keyframe": True}), table.schema_id),
            )  # fmt: skip
        return len(rows)

    def request_error(
        self, request_id: str, error_type: str, message: str, location: str, when: datetime
    ) -> None:
        self.conn.execute(
            sql.SQL(
                "INSERT INTO {} AS r (request_id, first_seen_at, last_seen_at, error_type, error_message, "
                "error_location, error_at) VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (request_id) DO UPDATE "
                "SET error_type = excluded.error_type, error_message = excluded.error_message, "
                "error_location = excluded.error_location, error_at = excluded.error_at"
            ).format(self.t("requests")),
            (request_id, when, when, error_type, message, location, when),
        )

    def finish(self, *, slot: str = "cdc", floor: int | None = None, system_id: str | None = None,
               database: str | None = None, baseline: int | None = None) -> None:  # fmt: skip
        """capture_state (acked: the last position), actor_sequences."""
        self.conn.execute(
            sql.SQL(
                "INSERT INTO {} (slot_name, source_system_id, source_database, acked_lsn, baseline_lsn, "
                "baseline_done, history_floor) VALUES (%s, %s, %s, %s, %s, true, %s) ON CONFLICT (slot_name) DO UPDATE "
                "SET acked_lsn = excluded.acked_lsn, history_floor = excluded.history_floor"
            ).format(self.t("capture_state")),
            (slot, system_id, database, self.position, baseline, floor),
        )
        for actor, seq in self.actor_seqs.items():
            self.conn.execute(
                sql.SQL(
                    "INSERT INTO {} (actor, last_seq) VALUES (%s, %s) ON CONFLICT (actor) DO UPDATE SET last_seq = %s"
                ).format(self.t("actor_sequences")),
                (actor, seq, seq),
            )


def _j(value: Any) -> Jsonb | None:
    return None if value is None else Jsonb(value)
