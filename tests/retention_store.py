"""Format-2 history for the retention and erasure tests, written with plain INSERTs.

A stand-in for tests/store_builder.py (branch ``readers`` ports it to format 2): the same
API (``table``, ``txn`` with ``insert``/``snapshot``/``update``/``delete``/``truncate``,
``finish``, ``state``), writing ``tables``, ``table_names``, ``table_schemas``,
``transactions`` and ``changes`` as docs/store.md says the capture side does. Also an
independent oracle: :func:`replay` (a table at a version, replayed from ``changes_all``) and
:func:`row_at` (one row at a version, read the way docs/store.md "Reading" says).
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from cdc.store.retention import partition_name

STORE_SQL = Path(__file__).resolve().parents[1] / "sql" / "store.sql"
BOOL, INT8, INT2, INT4, TEXT, NUMERIC = 16, 20, 21, 23, 25, 1700
STEP = 0x100  # between transaction positions
ROLLED_BACK, BEFORE_FROM_WAL, KEYFRAME = 1, 2, 256
PARENTS = ("changes", "transactions", "context_changes")
DAY = timedelta(days=1)


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def json_text(value: Any) -> str:
    """JSON as PostgreSQL's jsonb prints it (the store's key and image texts, for test values)."""
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def canonical(image: str | Mapping[str, Any]) -> str:
    """A row image as sorted JSON (for multiset comparisons)."""
    value = json.loads(image) if isinstance(image, str) else image
    return json.dumps(value, sort_keys=True)


@dataclass
class _Table:
    name: str  # schema.name
    table_id: int
    schema_id: int
    key: tuple[str, ...]
    columns: tuple[str, ...]
    full: bool  # REPLICA IDENTITY FULL: the WAL sends old rows whole
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # keyed: key_text -> row
    bag: list[dict[str, Any]] = field(default_factory=list)  # keyless: the multiset

    def key_of(self, row: Mapping[str, Any]) -> str:
        return json_text([row.get(c) for c in (self.key or self.columns)])


class Txn:
    """The changes of one transaction; see :meth:`StoreBuilder.txn`."""

    def __init__(self, builder: StoreBuilder, status: str):
        self.b = builder
        self.status = status
        self.changes: list[dict[str, Any]] = []
        self.tables = {name: copy.deepcopy(t) for name, t in builder.tables.items()}

    def _t(self, table: str) -> _Table:
        return self.tables[self.b.full(table)]

    def _add(self, t: _Table, op: str, rolled_back: bool, **fields: Any) -> None:
        flags = ROLLED_BACK if rolled_back or self.status == "rolled_back" else 0
        if fields.get("before") is not None:
            flags |= BEFORE_FROM_WAL
        self.changes.append({"table_id": t.table_id, "schema_id": t.schema_id, "op": op, "flags": flags,
                             "key_text": None, "image": None, "before": None, "old_key_text": None, **fields})  # fmt: skip

    def _row(self, t: _Table, key: Any) -> dict[str, Any]:
        if isinstance(key, Mapping):
            if not t.key:
                for row in t.bag:
                    if row == dict(key):
                        return row
                raise KeyError(key)
            return t.rows[json_text([key[c] for c in t.key])]
        return t.rows[json_text([key])]

    def insert(self, table: str, row: Mapping[str, Any], *, rolled_back: bool = False, op: str = "I") -> None:
        t = self._t(table)
        full = {c: row.get(c) for c in t.columns}
        self._add(t, op, rolled_back, key_text=t.key_of(full), image=json_text(full))
        if not rolled_back and self.status == "committed":
            if t.key:
                t.rows[t.key_of(full)] = full
            else:
                t.bag.append(full)

    def snapshot(self, table: str, row: Mapping[str, Any]) -> None:
        self.insert(table, row, op="S")

    def update(self, table: str, key: Any, changes: Mapping[str, Any], *, rolled_back: bool = False) -> None:
        t = self._t(table)
        before = self._row(t, key)
        after = {**before, **changes}
        old, new = t.key_of(before), t.key_of(after)
        self._add(t, "U", rolled_back, key_text=new, image=json_text(after), old_key_text=old if old != new else None,
                  before=json_text(before) if t.full else None)  # fmt: skip
        if not rolled_back and self.status == "committed":
            if t.key:
                del t.rows[old]
                t.rows[new] = after
            else:
                t.bag.remove(before)
                t.bag.append(after)

    def delete(self, table: str, key: Any, *, rolled_back: bool = False) -> None:
        t = self._t(table)
        before = self._row(t, key)
        image = before if t.full else {c: before[c] for c in t.key}
        self._add(t, "D", rolled_back, key_text=t.key_of(before), image=json_text(image))
        if not rolled_back and self.status == "committed":
            if t.key:
                del t.rows[t.key_of(before)]
            else:
                t.bag.remove(before)

    def truncate(self, table: str, *, rolled_back: bool = False) -> None:
        t = self._t(table)
        self._add(t, "T", rolled_back)
        if not rolled_back and self.status == "committed":
            t.rows.clear()
            t.bag.clear()


class StoreBuilder:
    """Creates a format-2 store schema in the database at ``dsn`` and writes history into it."""

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
            with self.conn.transaction():
                self.conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
                self.conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(schema)))
                self.conn.execute(STORE_SQL.read_bytes())

    def close(self) -> None:
        self.conn.close()

    def t(self, name: str) -> sql.Identifier:
        return sql.Identifier(self.schema, name)

    @staticmethod
    def full(name: str) -> str:
        return name if "." in name else f"public.{name}"

    def table(self, name: str, columns: Mapping[str, int], key: Sequence[str] = ("id",), *,
              replica_identity: str = "d", relation_oid: int | None = None) -> int:  # fmt: skip
        """Register a table (or a new shape of it): ``columns`` name → type oid, in table order.
        Returns its table_id."""
        full = self.full(name)
        old = self.tables.get(full)
        if old is None:
            oid = relation_oid if relation_oid is not None else 16384 + len(self.tables)
            row = self.conn.execute(
                sql.SQL(
                    "INSERT INTO {} (relation_oid, first_position) VALUES (%s, %s) RETURNING table_id"
                ).format(self.t("tables")),
                (oid, self.position),
            ).fetchone()
            assert row is not None
            table_id = int(row[0])
            schema_name, table_name = full.split(".", 1)
            self.conn.execute(
                sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s)").format(self.t("table_names")),
                (table_id, schema_name, table_name, self.position),
            )
        else:
            table_id = old.table_id
        ri = "f" if not key else replica_identity
        cols = [
            {"name": c, "type_oid": oid, "type_modifier": -1, "key": c in key} for c, oid in columns.items()
        ]
        row = self.conn.execute(
            sql.SQL(
                "INSERT INTO {} (table_id, replica_identity, key_columns, columns, fingerprint, first_position) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (fingerprint) DO UPDATE SET fingerprint = excluded.fingerprint "
                "RETURNING schema_id"
            ).format(self.t("table_schemas")),
            (
                table_id,
                ri,
                list(key),
                json.dumps(cols),
                json.dumps([table_id, ri, list(key), cols]),
                self.position,
            ),
        ).fetchone()
        assert row is not None
        self.tables[full] = _Table(full, table_id, int(row[0]), tuple(key), tuple(columns), ri == "f",
                                   rows=old.rows if old else {}, bag=old.bag if old else [])  # fmt: skip
        return table_id

    def table_id(self, name: str) -> int:
        return self.tables[self.full(name)].table_id

    @contextmanager
    def txn(self, when: datetime | str, request_id: str | None = None, *, status: str = "committed",
            actor: str | None = None) -> Iterator[Txn]:  # fmt: skip
        """One transaction at ``when``; ``status="rolled_back"`` for an aborted one."""
        when = at(when) if isinstance(when, str) else when
        txn = Txn(self, status)
        yield txn
        self.position += STEP
        self.xid += 1
        position, committed = self.position, status == "committed"
        context = json.dumps({"request_id": request_id, "actor": actor}) if request_id or actor else None
        with self.conn.transaction():
            self.conn.execute(
                sql.SQL(
                    "INSERT INTO {} (position, committed_at, xid, commit_lsn, status, change_count, request_id, actor, "
                    "context) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
                ).format(self.t("transactions")),
                (position, when, self.xid, position - 16, "c" if committed else "r", len(txn.changes), request_id,
                 actor, context),
            )  # fmt: skip
            for ordinal, c in enumerate(txn.changes):
                self.conn.execute(
                    sql.SQL(
                        "INSERT INTO {} (position, ordinal, committed_at, table_id, schema_id, op, flags, lsn, key_text, "
                        "image, before, old_key_text) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    ).format(self.t("changes")),
                    (position, ordinal, when, c["table_id"], c["schema_id"], c["op"], c["flags"],
                     position - STEP + 16 + ordinal, c["key_text"], c["image"], c["before"], c["old_key_text"]),
                )  # fmt: skip
        if committed:
            self.positions.append(position)
            for name, table in txn.tables.items():
                self.tables[name].rows = table.rows
                self.tables[name].bag = table.bag

    def finish(
        self, *, acked: int | None = None, baseline: int | None = None, floor: int | None = None
    ) -> None:
        """capture_state: acked_lsn (default: the last position), baseline and floor."""
        self.conn.execute(
            sql.SQL(
                "INSERT INTO {} (slot_name, acked_lsn, baseline_lsn, baseline_done, history_floor) "
                "VALUES ('cdc', %s, %s, true, %s) ON CONFLICT (slot_name) DO UPDATE SET "
                "acked_lsn = excluded.acked_lsn, baseline_lsn = excluded.baseline_lsn, history_floor = excluded.history_floor"
            ).format(self.t("capture_state")),
            (self.position if acked is None else acked, baseline, floor),
        )

    def state(self, table: str) -> list[dict[str, Any]]:
        """The builder's own idea of the table now."""
        t = self.tables[self.full(table)]
        return list(t.rows.values()) if t.key else list(t.bag)

    def model(self, table: str) -> Counter[str]:
        return Counter(canonical(r) for r in self.state(table))


def create_partitions(conn: psycopg.Connection[Any], schema: str, first: datetime, count: int) -> None:
    """Daily partitions of the three partitioned tables (plain DDL, the names and bounds
    ensure_partitions gives them: it creates them itself once it knows the format-2 tables)."""
    with conn.transaction():
        for parent in PARENTS:
            for d in range(count):
                lo = first + d * DAY
                conn.execute(
                    sql.SQL("CREATE TABLE IF NOT EXISTS {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})").format(
                        sql.Identifier(schema, partition_name(parent, lo)), sql.Identifier(schema, parent),
                        sql.Literal(lo), sql.Literal(lo + DAY),
                    )
                )  # fmt: skip


# ============================================================================ the oracle


def _changes(
    conn: psycopg.Connection[Any], schema: str, table_id: int, version: int
) -> list[tuple[Any, ...]]:
    return conn.execute(
        sql.SQL(
            "SELECT op, key_text, image, old_key_text FROM {} WHERE table_id = %s AND flags & 1 = 0 "
            "AND position <= %s ORDER BY position, ordinal"
        ).format(sql.Identifier(schema, "changes_all")),
        (table_id, version),
    ).fetchall()


def replay(
    conn: psycopg.Connection[Any], schema: str, table_id: int, keyless: bool, version: int
) -> Counter[str]:
    """The table at ``version``, replayed from every committed change in ``changes_all`` up to
    it (keyframes included), as a multiset of canonical rows. Exact at and above the floor."""
    keyed: dict[str, str] = {}
    bag: Counter[str] = Counter()
    images: dict[str, str] = {}
    for op, key, image, old_key in _changes(conn, schema, table_id, version):
        if op == "T":
            keyed.clear()
            bag.clear()
        elif not keyless:
            if old_key is not None:
                keyed.pop(old_key, None)
            if op == "D":
                keyed.pop(key, None)
            else:
                keyed[key] = image
        else:
            if op == "D" or (op == "U" and old_key is not None):
                gone = key if op == "D" else old_key
                assert bag[gone] > 0, f"{op} of a value not in the replayed state"
                bag[gone] -= 1
                bag += Counter()
            if op in ("I", "S") or (op == "U" and old_key is not None):
                bag[key] += 1
                images[key] = image
    if not keyless:
        return Counter(canonical(i) for i in keyed.values())
    return Counter({canonical(images[k]): n for k, n in bag.items() if n > 0})


def row_at(conn: psycopg.Connection[Any], schema: str, table_id: int, key: str, version: int) -> str | None:
    """Row ``key`` at ``version`` as docs/store.md "Reading" says: the latest committed change at
    or before it with that key or old key decides; a later TRUNCATE makes it absent."""
    row = conn.execute(
        sql.SQL(
            "SELECT op, key_text, image, position, ordinal FROM {c} WHERE table_id = %(t)s AND flags & 1 = 0 "
            'AND position <= %(v)s AND ((key_hash = hashtextextended(%(k)s COLLATE "C", 0) AND key_text = %(k)s) '
            'OR (old_key_hash = hashtextextended(%(k)s COLLATE "C", 0) AND old_key_text = %(k)s)) '
            "ORDER BY position DESC, ordinal DESC LIMIT 1"
        ).format(c=sql.Identifier(schema, "changes_all")),
        {"t": table_id, "v": version, "k": key},
    ).fetchone()
    if row is None or row[1] != key or row[0] not in ("I", "U", "S"):
        return None
    truncated = conn.execute(
        sql.SQL(
            "SELECT 1 FROM {} WHERE table_id = %s AND op = 'T' AND flags & 1 = 0 AND position <= %s "
            "AND (position, ordinal) > (%s, %s)"
        ).format(sql.Identifier(schema, "changes_all")),
        (table_id, version, row[3], row[4]),
    ).fetchone()
    return None if truncated else canonical(row[2])
