"""Write history into a real store (format 2, docs/store.md) for reader tests.

Describe what happened (tables, renames, drops, transactions of inserts, updates, deletes,
truncates, rolled-back attempts, reported errors) and the builder writes the rows the capture
side would: ``tables``, ``table_names``, ``table_schemas``, ``transactions``,
``context_changes``, ``changes`` (COPY), ``request_errors`` and ``capture_state``. It keeps its
own idea of every table at every version (:meth:`StoreBuilder.state_at`): an oracle to check
readers against.

    b = StoreBuilder(dsn)            # creates the schema and applies sql/store.sql
    b.table("users", {"id": INT8, "email": TEXT}, key=["id"])
    with b.txn(at("2026-03-10 12:00"), request_id="1a2b3c4d-...") as t:
        t.insert("users", {"id": 42, "email": "a@b.com"})
    b.rename("users", "app.members")  # a table_names row
    b.finish()                       # capture_state: acked_lsn = the last position

Tables are named as PostgreSQL names them (``users``, ``"User"``, ``"a.b".c``): cdc/names.py.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
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

from cdc.names import format_table, parse_table
from cdc.store.format import OP_CODES, OVERSIZE_MARKER, STATUS_CODES, ChangeFlag, TxnFlag, is_oversize
from cdc.store.keys import image_text, key_text

STORE_SQL = Path(__file__).resolve().parents[1] / "sql" / "store.sql"

BOOL, INT8, INT2, INT4, TEXT, NUMERIC, UUID, TIMESTAMPTZ = 16, 20, 21, 23, 25, 1700, 2950, 1184

#: distance between transaction positions (a plausible WAL distance)
STEP = 0x100

ROLLED_BACK, BEFORE_FROM_WAL, INCOMPLETE = (
    ChangeFlag.ROLLED_BACK,
    ChangeFlag.BEFORE_FROM_WAL,
    ChangeFlag.INCOMPLETE,
)
OVERSIZE, STREAMED, MAYBE_INCOMPLETE = ChangeFlag.OVERSIZE, TxnFlag.STREAMED, TxnFlag.MAYBE_INCOMPLETE
_CONTEXT_ORDER = ("request_id", "actor", "application_name", "db_user", "client_addr", "backend_pid", "source",
                  "extra")  # fmt: skip
_CHANGE_COLUMNS = ("position", "ordinal", "committed_at", "table_id", "schema_id", "op", "flags", "lsn", "xid",
                   "key_text", "image", "before", "old_key_text", "pending")  # fmt: skip
_UNSET: Any = object()


def at(text: str) -> datetime:
    """``2026-03-10 12:00`` in UTC."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def oversize(text: str) -> dict[str, Any]:
    """The stored reference to a value over ``capture.max_value_bytes``."""
    data = text.encode()
    return {"$cdc": OVERSIZE_MARKER, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@dataclass
class _Table:
    table_id: int
    schema: str
    name: str
    schema_id: int
    key: tuple[str, ...]  # empty: keyless (REPLICA IDENTITY FULL, the whole row names it)
    columns: tuple[str, ...]
    replica_identity: str
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # keyed: key_text -> row
    bag: list[dict[str, Any]] = field(default_factory=list)  # keyless: the multiset

    @property
    def full(self) -> str:
        return format_table(self.schema, self.name)

    def key_of(self, row: Mapping[str, Any]) -> str:
        """The row's key_text: its key columns' values (every column without a key)."""
        return key_text([row.get(c) for c in self.key] if self.key else list(row.values()))

    def key_image(self, row: Mapping[str, Any]) -> dict[str, Any]:
        return {c: row.get(c) for c in self.key} if self.key else dict(row)

    def rows_now(self) -> list[dict[str, Any]]:
        return [dict(r) for r in (self.rows.values() if self.key else self.bag)]


class Txn:
    """The changes of one transaction; see :meth:`StoreBuilder.txn`."""

    def __init__(self, builder: StoreBuilder, status: str, request_id: str | None, context: dict[str, Any]):
        self.b = builder
        self.status = status
        self.request_id = request_id
        self.context = context
        self.changes: list[dict[str, Any]] = []
        self.tables: dict[int, _Table] = {}  # copies of the tables this transaction touched
        self._seen: dict[tuple[int, str], dict[str, Any] | None] = {}  # what attempts saw

    def _t(self, table: str) -> _Table:
        live = self.b.resolve(table)
        if live.table_id not in self.tables:
            self.tables[live.table_id] = copy.deepcopy(live)
        return self.tables[live.table_id]

    def rows(self, table: str, *, rolled_back: bool = False) -> list[dict[str, Any]]:
        """The rows a change of this transaction sees (``rolled_back``: an attempt's view)."""
        t = self._t(table)
        if not t.key or not self._attempt(rolled_back):
            return t.rows_now()
        seen = {**t.rows, **{kt: row for (tid, kt), row in self._seen.items() if tid == t.table_id}}
        return [dict(r) for r in seen.values() if r is not None]

    def _attempt(self, rolled_back: bool) -> bool:
        return rolled_back or self.status == "rolled_back"

    def _key(self, t: _Table, key: Any) -> str:
        if not isinstance(key, Mapping):
            key = {t.key[0]: key}
        if t.key:
            return key_text([key[c] for c in t.key])
        return key_text([key[c] for c in t.columns if c in key])

    def _lookup(self, t: _Table, key: Any, attempt: bool) -> dict[str, Any]:
        kt = self._key(t, key)
        if not t.key:
            for row in t.bag:
                if t.key_of(row) == kt:
                    return row
            raise KeyError(key)
        if attempt and (t.table_id, kt) in self._seen:
            found = self._seen[(t.table_id, kt)]
            if found is None:
                raise KeyError(key)
            return found
        return t.rows[kt]

    def _add(
        self, t: _Table, op: str, *, attempt: bool, request_id: str | None, seen: Any = None, **fields: Any
    ) -> None:
        """One change; ``seen``: what the oracle records (the row before it, or the keys a TRUNCATE
        removed, as the change saw them)."""
        rid = request_id if request_id is not None else self.request_id
        oracle = {"op": op, "before": seen if op != "TRUNCATE" else None, "after": fields.get("image"),
                  "removed": seen if op == "TRUNCATE" else [], "status": "rolled_back" if attempt else "committed"}  # fmt: skip
        if op == "DELETE":
            oracle["after"] = None
        flags = int(ROLLED_BACK) if attempt else 0
        for name in ("image", "before"):
            image = fields.get(name)
            if image is None:
                continue
            if any(is_oversize(v) for v in image.values()):
                flags |= OVERSIZE
            fields[name] = image_text(image)
        if fields.get("before") is not None:
            flags |= BEFORE_FROM_WAL
        if fields.pop("incomplete", False):
            flags |= INCOMPLETE
        self.changes.append(
            {"table_id": t.table_id, "schema_id": t.schema_id, "op": OP_CODES[op], "flags": flags,
             "request_id": rid, "key_text": None, "image": None, "before": None, "old_key_text": None, **fields,
             "oracle": oracle}
        )  # fmt: skip

    def _apply(
        self, t: _Table, attempt: bool, old: dict[str, Any] | None, new: dict[str, Any] | None
    ) -> None:
        """Record a row going from ``old`` to ``new`` (None: absent) in what this transaction sees."""
        if old is not None:
            self._seen[(t.table_id, t.key_of(old))] = None
        if new is not None:
            self._seen[(t.table_id, t.key_of(new))] = new
        if attempt:
            return
        if t.key:
            if old is not None:
                t.rows.pop(t.key_of(old), None)
            if new is not None:
                t.rows[t.key_of(new)] = new
        else:
            if old is not None:
                t.bag.remove(old)
            if new is not None:
                t.bag.append(new)

    def insert(self, table: str, row: Mapping[str, Any], *, rolled_back: bool = False, op: str = "INSERT",
               request_id: str | None = None, unknown: Sequence[str] = ()) -> None:  # fmt: skip
        """An INSERT (or ``op="SNAPSHOT"``); ``unknown``: columns the image lacks (INCOMPLETE)."""
        t = self._t(table)
        attempt = self._attempt(rolled_back)
        full = {c: row.get(c) for c in t.columns if c in row and c not in unknown}
        self._add(t, op, attempt=attempt, request_id=request_id, key_text=t.key_of(full), seen=None,
                  image=full, incomplete=bool(unknown))  # fmt: skip
        self._apply(t, attempt, None, full)

    def snapshot(self, table: str, row: Mapping[str, Any]) -> None:
        self.insert(table, row, op="SNAPSHOT")

    def update(self, table: str, key: Any, changes: Mapping[str, Any], *, rolled_back: bool = False,
               request_id: str | None = None, unknown: Sequence[str] = ()) -> None:  # fmt: skip
        """An UPDATE of the row named ``key``; ``unknown``: columns the image lacks (INCOMPLETE)."""
        t = self._t(table)
        attempt = self._attempt(rolled_back)
        before = self._lookup(t, key, attempt)
        after = {c: v for c, v in {**before, **changes}.items() if c not in unknown}
        after = {c: after[c] for c in [*t.columns, *after] if c in after}
        old_key, new_key = t.key_of(before), t.key_of(after)
        self._add(
            t, "UPDATE", attempt=attempt, request_id=request_id, key_text=new_key, image=after, seen=dict(before),
            before=before if t.replica_identity == "f" else None,
            old_key_text=old_key if old_key != new_key else None, incomplete=bool(unknown),
        )  # fmt: skip
        self._apply(t, attempt, before, after)

    def delete(
        self, table: str, key: Any, *, rolled_back: bool = False, request_id: str | None = None
    ) -> None:
        t = self._t(table)
        attempt = self._attempt(rolled_back)
        before = self._lookup(t, key, attempt)
        image = before if t.replica_identity == "f" else t.key_image(before)
        self._add(t, "DELETE", attempt=attempt, request_id=request_id, key_text=t.key_of(before), seen=dict(before),
                  image=image)  # fmt: skip
        self._apply(t, attempt, before, None)

    def truncate(self, table: str, *, rolled_back: bool = False) -> None:
        t = self._t(table)
        attempt = self._attempt(rolled_back)
        visible = {t.key_of(r) for r in t.rows_now()}
        if attempt:  # what the attempt sees: its transaction's earlier changes too
            for (table_id, kt), row in self._seen.items():
                if table_id == t.table_id:
                    (visible.add if row is not None else visible.discard)(kt)
        self._add(t, "TRUNCATE", attempt=attempt, request_id=None, seen=sorted(visible))
        for row in t.rows_now() if not attempt else ():
            self._apply(t, attempt, row, None)
        for kt in visible:
            self._seen[(t.table_id, kt)] = None


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
        self.tables: dict[int, _Table] = {}  # by table_id, dropped ones too
        self.live: dict[tuple[str, str], int] = {}  # (schema, name) -> table_id of the live table
        self.positions: list[int] = []  # of every committed transaction, in order
        self.log: list[dict[str, Any]] = []  # every change written, with the oracle's view of it
        self._history: dict[int, list[tuple[int, list[dict[str, Any]]]]] = {}  # table_id -> states
        self._between = 0  # DDL and error positions used since the last transaction
        self._actor_seq: dict[str, int] = {}
        self._request_context: dict[str, dict[str, Any]] = {}
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

    def _next_between(self) -> int:
        """A position after the last transaction and before the next (DDL, reported errors)."""
        self._between += 1
        assert self._between < STEP
        return self.position + self._between

    @staticmethod
    def full(name: str) -> str:
        """``users`` → ``public.users``, ``"User"`` → ``public."User"`` (cdc/names.py)."""
        return format_table(*parse_table(name))

    def resolve(self, name: str) -> _Table:
        """The live table named ``name`` now."""
        return self.tables[self.live[parse_table(name)]]

    def table_id(self, name: str) -> int:
        return self.resolve(name).table_id

    # ------------------------------------------------------------------ tables

    def table(
        self,
        name: str,
        columns: Mapping[str, int],
        key: Sequence[str] = ("id",),
        *,
        replica_identity: str = "d",
        relation_oid: int | None = None,
    ) -> int:
        """Register a table, or a new schema version of the live table of that name; the schema id.

        ``columns``: name → type oid, in table order. An empty ``key``: REPLICA IDENTITY FULL.
        """
        schema, table = parse_table(name)
        identity = "f" if not key else replica_identity
        cols = [
            {"name": c, "type_oid": oid, "type_modifier": -1, "key": c in key} for c, oid in columns.items()
        ]
        old = self.tables.get(self.live.get((schema, table), -1))
        position = self._next_between()
        if old is None:
            row = self.conn.execute(
                sql.SQL(
                    "INSERT INTO {} (relation_oid, first_position) VALUES (%s, %s) RETURNING table_id"
                ).format(self._t("tables")),
                [relation_oid or 16384 + len(self.tables), position],
            ).fetchone()
            assert row is not None
            table_id = int(row[0])
            self._name_row(table_id, schema, table, position)
        else:
            table_id = old.table_id
        fingerprint = hashlib.sha256(json.dumps([table_id, identity, list(key), cols]).encode()).hexdigest()
        found = self.conn.execute(
            sql.SQL(
                "INSERT INTO {} (table_id, replica_identity, key_columns, columns, fingerprint, first_position) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (fingerprint) DO UPDATE SET fingerprint = "
                "excluded.fingerprint RETURNING schema_id"
            ).format(self._t("table_schemas")),
            [table_id, identity, list(key), Jsonb(cols), fingerprint, position],
        ).fetchone()
        assert found is not None
        self.tables[table_id] = _Table(
            table_id=table_id, schema=schema, name=table, schema_id=int(found[0]), key=tuple(key),
            columns=tuple(columns), replica_identity=identity,
            rows=old.rows if old else {}, bag=old.bag if old else [],
        )  # fmt: skip
        self.live[(schema, table)] = table_id
        return int(found[0])

    def _name_row(self, table_id: int, schema: str, name: str, position: int) -> None:
        self.conn.execute(
            sql.SQL(
                "INSERT INTO {} (table_id, schema_name, table_name, from_position) VALUES (%s, %s, %s, %s)"
            ).format(self._t("table_names")),
            [table_id, schema, name, position],
        )

    def rename(self, table: str, new_name: str) -> int:
        """``ALTER TABLE ... RENAME`` / ``SET SCHEMA``: a table_names row; its position."""
        t = self.resolve(table)
        schema, name = parse_table(new_name)
        assert (schema, name) not in self.live, f"{new_name} exists"
        position = self._next_between()
        self._name_row(t.table_id, schema, name, position)
        del self.live[(t.schema, t.name)]
        t.schema, t.name = schema, name
        self.live[(schema, name)] = t.table_id
        return position

    def drop(self, table: str) -> int:
        """``DROP TABLE``: the table's dropped_position; its name is free for a new table."""
        t = self.resolve(table)
        position = self._next_between()
        self.conn.execute(
            sql.SQL("UPDATE {} SET dropped_position = %s WHERE table_id = %s").format(self._t("tables")),
            [position, t.table_id],
        )
        del self.live[(t.schema, t.name)]
        return position

    # ------------------------------------------------------------------ transactions

    @contextmanager
    def txn(
        self,
        when: datetime | str,
        request_id: str | None = None,
        *,
        status: str = "committed",
        actor: str | None = None,
        context: Mapping[str, Any] | None = None,
        flags: int = 0,
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
        self._write(txn, when, flags)

    def _context(self, txn: Txn, request_id: str | None) -> dict[str, Any] | None:
        doc = dict(txn.context, request_id=request_id) if request_id else dict(txn.context)
        if not doc:
            return None
        return {k: doc[k] for k in [*_CONTEXT_ORDER, *doc] if k in doc and doc[k] is not None}

    def _write(self, txn: Txn, when: datetime, flags: int) -> None:
        self.position += STEP
        self._between = 0
        self.xid += 1
        position, xid = self.position, self.xid
        committed = txn.status == "committed"
        contexts = [self._context(txn, c["request_id"]) for c in txn.changes] or [
            self._context(txn, txn.request_id)
        ]
        spans = [o for o in range(len(contexts)) if o == 0 or contexts[o] != contexts[o - 1]]
        span_rows = []
        for i, start in enumerate(spans):
            ctx = contexts[start]
            length = (spans[i + 1] if i + 1 < len(spans) else len(txn.changes)) - start
            actor = (ctx or {}).get("actor")
            seq = None
            if actor is not None:
                seq = self._actor_seq.get(actor, 0) + 1
                self._actor_seq[actor] = seq + max(length, 1) - 1
            rid = (ctx or {}).get("request_id")
            if rid is not None and ctx is not None:
                self._request_context[rid] = ctx
            span_rows.append((start, rid, actor, seq, json.dumps(ctx) if ctx else None))
        with self.conn.transaction():
            first = span_rows[0]
            self.conn.execute(
                sql.SQL(
                    "INSERT INTO {} (position, committed_at, xid, commit_lsn, status, flags, change_count, "
                    "request_id, actor, actor_seq, context) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                ).format(self._t("transactions")),
                [position, when, xid, position - 16, STATUS_CODES[txn.status], int(flags), len(txn.changes),
                 *first[1:]],
            )  # fmt: skip
            for start, rid, actor, seq, ctx_text in span_rows[1:]:
                self.conn.execute(
                    sql.SQL(
                        "INSERT INTO {} (position, committed_at, from_ordinal, request_id, actor, actor_seq, "
                        "context) VALUES (%s, %s, %s, %s, %s, %s, %s)"
                    ).format(self._t("context_changes")),
                    [position, when, start, rid, actor, seq, ctx_text],
                )
            copy_sql = sql.SQL("COPY {} ({}) FROM STDIN").format(
                self._t("changes"), sql.SQL(", ").join(map(sql.Identifier, _CHANGE_COLUMNS))
            )
            with self.conn.cursor() as cur, cur.copy(copy_sql) as out:
                for ordinal, c in enumerate(txn.changes):
                    out.write_row(
                        [position, ordinal, when, c["table_id"], c["schema_id"], c["op"], int(c["flags"]),
                         position - STEP + 16 + ordinal, None, c["key_text"], c["image"], c["before"],
                         c["old_key_text"], None]
                    )  # fmt: skip
        for ordinal, c in enumerate(txn.changes):
            self.log.append(
                {**c["oracle"], "position": position, "ordinal": ordinal, "table_id": c["table_id"],
                 "key_text": c["key_text"], "old_key_text": c["old_key_text"], "request_id": c["request_id"]}
            )  # fmt: skip
        if committed:
            self.positions.append(position)
            for table_id, table in txn.tables.items():
                self.tables[table_id].rows = table.rows
                self.tables[table_id].bag = table.bag
                self._history.setdefault(table_id, []).append((position, table.rows_now()))

    def request_error(
        self, request_id: str, error_type: str | None, message: str, location: str | None = None,
        when: datetime | None = None, *, db_user: str | None = _UNSET, backend_pid: int | None = _UNSET,
        client_addr: str | None = None, proven: bool | None = None,
    ) -> int:  # fmt: skip
        """A ``cdc.error`` message of the request; by default from the session of its last context,
        as the client helper reports it (proven by the session token: ``reporter_pid`` set).
        ``proven`` defaults to whether the reporter is that session.

        Returns the message's LSN.
        """
        ctx = self._request_context.get(request_id, {})
        lsn = self._next_between()
        user = ctx.get("db_user") if db_user is _UNSET else db_user
        pid = ctx.get("backend_pid") if backend_pid is _UNSET else backend_pid
        if proven is None:
            proven = db_user is _UNSET and backend_pid is _UNSET and pid is not None
        self.conn.execute(
            sql.SQL(
                "INSERT INTO {} (lsn, request_id, reported_at, error_type, message, location, db_user, "
                "backend_pid, client_addr, reporter_pid) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            ).format(self._t("request_errors")),
            [lsn, request_id, when or datetime.now(UTC), error_type, message, location, user, pid, client_addr,
             pid if proven else None],
        )  # fmt: skip
        return lsn

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

    # ------------------------------------------------------------------ the oracle

    def state(self, table: str) -> list[dict[str, Any]]:
        """The builder's own idea of the live table named ``table`` now (for comparisons)."""
        return self.resolve(table).rows_now()

    def state_at(self, table: str | int, version: int) -> list[dict[str, Any]]:
        """The rows of a table (live name, or table id) at ``version``, as readers should see them."""
        table_id = table if isinstance(table, int) else self.table_id(table)
        states = self._history.get(table_id, [])
        i = bisect.bisect_right([p for p, _ in states], version)
        return [dict(r) for r in states[i - 1][1]] if i else []


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
        flags=STREAMED,
    ) as t:
        t.update("users", 42, {"plan": None})
        t.update("orders", "81b2", {"status": None})
    b.request_error(REQ_FAILED, "TimeoutError", "Stripe API timeout after 10s", "payments/create.ts:42",
                    at("2026-03-10 14:22:30"))  # fmt: skip
