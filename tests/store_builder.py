"""Write history into a real store by plain INSERTs into the tables of sql/store.sql.

For reader tests: describe what happened (transactions of inserts, updates, deletes,
truncates, rolled-back attempts) and the builder writes the rows the capture side would:
``transactions``, ``mutations`` (before/after images, ``changed``, ``old_key``),
``requests``, ``table_schemas`` and ``capture_state``.

    b = StoreBuilder(dsn)            # creates the schema and applies sql/store.sql
    b.table("users", {"id": INT8, "email": TEXT}, key=["id"])
    with b.txn(at("2026-03-10 12:00"), request_id="1a2b3c4d-...") as t:
        t.insert("users", {"id": 42, "email": "a@b.com"})
    b.finish()                       # capture_state: acked_lsn = the last position
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

STORE_SQL = Path(__file__).resolve().parents[1] / "sql" / "store.sql"

BOOL, INT8, INT2, INT4, TEXT, NUMERIC, UUID, TIMESTAMPTZ = 16, 20, 21, 23, 25, 1700, 2950, 1184

#: distance between transaction positions (a plausible WAL distance)
STEP = 0x100


def at(text: str) -> datetime:
    """``2026-03-10 12:00`` in UTC."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@dataclass
class _Table:
    name: str
    schema_id: int
    key: tuple[str, ...]
    columns: tuple[str, ...]
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # keyed: key json -> row
    bag: list[dict[str, Any]] = field(default_factory=list)  # keyless: the multiset

    def key_of(self, row: Mapping[str, Any]) -> dict[str, Any]:
        if not self.key:
            return dict(row)
        return {c: row[c] for c in self.key}


def _kj(key: Mapping[str, Any]) -> str:
    return json.dumps(key, sort_keys=True)


class Txn:
    """The mutations of one transaction; see :meth:`StoreBuilder.txn`."""

    def __init__(self, builder: StoreBuilder, status: str, request_id: str | None, context: dict[str, Any]):
        self.b = builder
        self.status = status
        self.request_id = request_id
        self.context = context
        self.mutations: list[dict[str, Any]] = []
        self.tables = {name: copy.deepcopy(t) for name, t in builder.tables.items()}

    def _t(self, table: str) -> _Table:
        return self.tables[self.b.full(table)]

    def _add(
        self, t: _Table, op: str, *, rolled_back: bool, request_id: str | None = None, **fields: Any
    ) -> None:
        status = "rolled_back" if rolled_back or self.status == "rolled_back" else "committed"
        rid = request_id if request_id is not None else self.request_id
        context = dict(self.context, request_id=rid) if rid else (dict(self.context) or None)
        self.mutations.append(
            {"table_name": t.name, "op": op, "status": status, "request_id": rid, "context": context,
             "schema_id": t.schema_id, "key": None, "old_key": None, "before": None, "after": None,
             "changed": None, **fields}
        )  # fmt: skip

    def _lookup(self, t: _Table, key: Any) -> dict[str, Any]:
        if not isinstance(key, Mapping):
            key = {t.key[0]: key}
        if t.key:
            return t.rows[_kj(key)]
        for row in t.bag:
            if row == dict(key):
                return row
        raise KeyError(key)

    def insert(self, table: str, row: Mapping[str, Any], *, rolled_back: bool = False, op: str = "INSERT",
               request_id: str | None = None) -> None:  # fmt: skip
        t = self._t(table)
        full = {c: row.get(c) for c in t.columns if c in row}
        self._add(t, op, rolled_back=rolled_back, request_id=request_id, key=t.key_of(full), after=full)
        if not rolled_back:
            if t.key:
                t.rows[_kj(t.key_of(full))] = full
            else:
                t.bag.append(full)

    def snapshot(self, table: str, row: Mapping[str, Any]) -> None:
        self.insert(table, row, op="SNAPSHOT")

    def update(self, table: str, key: Any, changes: Mapping[str, Any], *, rolled_back: bool = False,
               request_id: str | None = None) -> None:  # fmt: skip
        t = self._t(table)
        before = self._lookup(t, key)
        after = {**before, **changes}
        changed = [c for c in t.columns if c in changes and before.get(c) != after.get(c)]
        old_key, new_key = t.key_of(before), t.key_of(after)
        self._add(
            t, "UPDATE", rolled_back=rolled_back, request_id=request_id, key=new_key,
            old_key=old_key if old_key != new_key else None, before=dict(before), after=after,
            changed=changed,
        )  # fmt: skip
        if not rolled_back:
            if t.key:
                del t.rows[_kj(old_key)]
                t.rows[_kj(new_key)] = after
            else:
                t.bag.remove(before)
                t.bag.append(after)

    def delete(
        self, table: str, key: Any, *, rolled_back: bool = False, request_id: str | None = None
    ) -> None:
        t = self._t(table)
        before = self._lookup(t, key)
        self._add(t, "DELETE", rolled_back=rolled_back, request_id=request_id, key=t.key_of(before),
                  before=dict(before))  # fmt: skip
        if not rolled_back:
            if t.key:
                del t.rows[_kj(t.key_of(before))]
            else:
                t.bag.remove(before)

    def truncate(self, table: str, *, rolled_back: bool = False) -> None:
        t = self._t(table)
        self._add(t, "TRUNCATE", rolled_back=rolled_back)
        if not rolled_back:
            t.rows.clear()
            t.bag.clear()


class StoreBuilder:
    """Creates a store schema in the database at ``dsn`` and writes history into it."""

    def __init__(
        self, dsn: str, schema: str = "cdc_history", start: int = 0x1_0000_0000, create: bool = True
    ):
        self.dsn = dsn
        self.schema = schema
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.position = start
        self.xid = 1000
        self.tables: dict[str, _Table] = {}
        self.positions: list[int] = []  # of every committed transaction, in order
        if create:
            self.create()

    def create(self) -> None:
        with self.conn.transaction():
            self.conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
            self.conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(self.schema)))
            self.conn.execute(STORE_SQL.read_text())

    def close(self) -> None:
        self.conn.close()

    def _t(self, name: str) -> sql.Identifier:
        return sql.Identifier(self.schema, name)

    @staticmethod
    def full(name: str) -> str:
        return name if "." in name else f"public.{name}"

    def table(
        self,
        name: str,
        columns: Mapping[str, int],
        key: Sequence[str] = ("id",),
        *,
        replica_identity: str = "d",
    ) -> int:
        """Register (a new schema version of) a table: ``columns`` name → type oid, in table order."""
        full = self.full(name)
        cols = [
            {"name": c, "type_oid": oid, "type_modifier": -1, "key": c in key} for c, oid in columns.items()
        ]
        fingerprint = json.dumps([full, list(key), cols])
        row = self.conn.execute(
            sql.SQL(
                "INSERT INTO {} (table_name, relation_oid, replica_identity, key_columns, columns, "
                "fingerprint, first_position) VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING schema_id"
            ).format(self._t("table_schemas")),
            [full, 16384 + len(self.tables), "f" if not key else replica_identity, list(key), Jsonb(cols),
             fingerprint, self.position],
        ).fetchone()  # fmt: skip
        assert row is not None
        old = self.tables.get(full)
        self.tables[full] = _Table(
            name=full, schema_id=row[0], key=tuple(key), columns=tuple(columns),
            rows=old.rows if old else {}, bag=old.bag if old else [],
        )  # fmt: skip
        return int(row[0])

    @contextmanager
    def txn(
        self,
        when: datetime | str,
        request_id: str | None = None,
        *,
        status: str = "committed",
        actor: str | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> Iterator[Txn]:
        """One transaction at ``when``; ``status="rolled_back"`` for an aborted one."""
        if isinstance(when, str):
            when = at(when)
        ctx: dict[str, Any] = dict(context or {})
        if actor is not None:
            ctx.setdefault("actor", actor)
        if request_id is not None:
            ctx.setdefault("application_name", "app")
        txn = Txn(self, status, request_id, ctx)
        yield txn
        self._write(txn, when)

    def _write(self, txn: Txn, when: datetime) -> None:
        self.position += STEP
        self.xid += 1
        position, xid = self.position, self.xid
        committed = txn.status == "committed"
        with self.conn.transaction():
            self.conn.execute(
                sql.SQL(
                    "INSERT INTO {} (position, xid, version, commit_lsn, status, committed_at, "
                    "mutation_count, request_ids) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
                ).format(self._t("transactions")),
                [position, xid, position if committed else None, position - 16, txn.status, when,
                 len(txn.mutations), sorted({m["request_id"] for m in txn.mutations if m["request_id"]})],
            )  # fmt: skip
            for ordinal, m in enumerate(txn.mutations):
                self.conn.execute(
                    sql.SQL(
                        "INSERT INTO {} (position, ordinal, version, lsn, xid, committed_at, table_name, "
                        "op, key, old_key, before, after, changed, status, request_id, context, schema_id) "
                        "VALUES "
                        "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    ).format(self._t("mutations")),
                    [position, ordinal, position if m["status"] == "committed" else None,
                     position - STEP + 16 + ordinal, xid, when, m["table_name"], m["op"], _j(m["key"]),
                     _j(m["old_key"]), _j(m["before"]), _j(m["after"]), m["changed"], m["status"],
                     m["request_id"], _j(m["context"]), m["schema_id"]],
                )  # fmt: skip
            for rid in dict.fromkeys(m["request_id"] for m in txn.mutations if m["request_id"]):
                rolled = txn.status == "rolled_back" or any(
                    mm["status"] == "rolled_back" for mm in txn.mutations if mm["request_id"] == rid
                )
                self.conn.execute(
                    sql.SQL(
                        "INSERT INTO {} AS r (request_id, actor, context, first_seen_at, last_seen_at, "
                        "committed_count, rolled_back_count) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                        "ON CONFLICT (request_id) DO UPDATE SET last_seen_at = excluded.last_seen_at, "
                        "committed_count = r.committed_count + excluded.committed_count, "
                        "rolled_back_count = r.rolled_back_count + excluded.rolled_back_count"
                    ).format(self._t("requests")),
                    [rid, txn.context.get("actor"), _j(dict(txn.context, request_id=rid)), when, when,
                     1 if committed else 0, 1 if rolled else 0],
                )  # fmt: skip
        if committed:
            self.positions.append(position)
            for name, table in txn.tables.items():
                self.tables[name].rows = table.rows
                self.tables[name].bag = table.bag

    def request_error(
        self, request_id: str, error_type: str | None, message: str, location: str | None = None,
        when: datetime | None = None, *, reported_by: tuple[str, int] | None = ("app", 4242),
        proven: bool = True,
    ) -> None:  # fmt: skip
        """The request's reported error; by default as the client helper reports it (a session of
        the request, proven by its token)."""
        user, pid = reported_by if reported_by is not None else (None, None)
        self.conn.execute(
            sql.SQL(
                "UPDATE {} SET error_type = %s, error_message = %s, error_location = %s, error_at = %s, "
                "error_db_user = %s, error_backend_pid = %s, error_proven = %s WHERE request_id = %s"
            ).format(self._t("requests")),
            [error_type, message, location, when, user, pid, proven and reported_by is not None, request_id],
        )

    def finish(
        self,
        *,
        acked: int | None = None,
        baseline: int | None = None,
        floor: int | None = None,
        slot: str = "cdc",
    ) -> None:
        """Write capture_state: acked_lsn (default: the last position), baseline and floor."""
        acked = self.position if acked is None else acked
        self.conn.execute(
            sql.SQL(
                "INSERT INTO {} (slot_name, acked_lsn, baseline_lsn, baseline_done, history_floor) "
                "VALUES (%s, %s, %s, true, %s) ON CONFLICT (slot_name) DO UPDATE SET "
                "acked_lsn = excluded.acked_lsn, baseline_lsn = excluded.baseline_lsn, "
                "history_floor = excluded.history_floor"
            ).format(self._t("capture_state")),
            [slot, acked, baseline, floor],
        )

    def state(self, table: str) -> list[dict[str, Any]]:
        """The builder's own idea of the table now (for comparisons)."""
        t = self.tables[self.full(table)]
        return list(t.rows.values()) if t.key else list(t.bag)


def _j(value: Any) -> Jsonb | None:
    return None if value is None else Jsonb(value)


# ============================================================================ the seed 000 scenario

REQ_INSERT = "1a2b3c4d-1111-4111-8111-111111111111"
REQ_NAME = "a3c91ef0-2222-4222-8222-222222222222"
REQ_PLAN = "4f9a3b2c-3333-4333-8333-333333333333"
REQ_FAILED = "550e8400-e29b-41d4-a716-446655440000"
REQ_ORDER = "7c1d2e3f-4444-4444-8444-444444444444"

USERS = {"id": INT8, "email": TEXT, "name": TEXT, "plan": TEXT}
ORDERS = {"id": TEXT, "status": TEXT, "total": NUMERIC}


def build_seed_000(b: StoreBuilder) -> None:
    """users id=42: INSERT, name set, plan free → pro, then a rolled-back plan → null
    (req 550e8400, which also tried orders 81b2 status pending → null and failed)."""
    b.table("users", USERS)
    b.table("orders", ORDERS)
    with b.txn("2026-03-09 09:00", REQ_ORDER, actor="shop") as t:
        t.insert("orders", {"id": "81b2", "status": "pending", "total": "12.50"})
    with b.txn("2026-03-10 12:00", REQ_INSERT, actor="signup") as t:
        t.insert("users", {"id": 42, "email": "a@b.com", "name": None, "plan": "free"})
    with b.txn("2026-03-10 14:21", REQ_NAME, actor="alice@example.com") as t:
        t.update("users", 42, {"name": "Alice Smith"})
    with b.txn("2026-03-10 14:22", REQ_PLAN, actor="billing") as t:
        t.update("users", 42, {"plan": "pro"})
    with b.txn(
        "2026-03-10 14:22:30",
        REQ_FAILED,
        status="rolled_back",
        actor="alice@example.com",
        context={
            "db_user": "app",
            "client_addr": "10.0.0.5",
            "backend_pid": 4242,
            "extra": {"route": "/pay"},
        },
    ) as t:
        t.update("users", 42, {"plan": None})
        t.update("orders", "81b2", {"status": None})
    b.request_error(REQ_FAILED, "TimeoutError", "Stripe API timeout after 10s", "payments/create.ts:42",
                    at("2026-03-10 14:22:30"))  # fmt: skip
