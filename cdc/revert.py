"""Undo: the SQL that reverts a request's committed changes, or restores one row to a past version.

::

    from cdc.query import Store
    from cdc.revert import apply_plan, plan_restore, plan_revert

    store = Store(store_dsn)
    with psycopg.connect(source_dsn, autocommit=True) as source:
        plan = plan_revert(store, source, "550e8400")
        print(plan.sql_text)                 # the inverse statements, newest change first
        if not plan.conflicts:
            new_id = apply_plan(source, plan, actor="ops")   # tagged reverts=550e8400

        plan = plan_restore(store, source, "users", 42, version=before)
        apply_plan(source, plan)             # tagged restores="public.users id=42 @ 0/16B3748"

**Revert** reads the request's committed mutations from the history store (rolled-back
attempts are ignored) and builds, newest first, the inverse of each: an INSERT becomes a
DELETE of that row, a DELETE an INSERT of the before image, an UPDATE an UPDATE setting the
changed columns back to their before values, found by the key after the update (so a
key-changing UPDATE moves the row back). Replaying the inverses in reverse order walks the
rows back through the same intermediate states, so unique keys never collide on the way.
Rows are named by their key; a table without a key by the ``ctid`` of one row equal to the
image. Tables are the captured relations by identity: the SQL names each by its current schema
and name (identifiers, never a dotted string), found on the source by the relation's oid, and
the plan refuses a table that was dropped, or whose oid on the source now carries another name
than the history knows (a look-alike is never written to). A table renamed after the request
is reverted under its current name.

Values are literals of the stored text with an explicit cast to the column's current type
on the source (``'12.50'::numeric(10,2)``), rendered by psycopg (quotes and backslashes
escaped). The text forms are the server's output under the capture daemon's output
settings, which :func:`apply_plan` sets for its transaction (the printed script does the
same with ``SET LOCAL``).

**Conflicts** stop a revert (unless forced): a later committed mutation of another request on
the same row that touched the same columns (per the history store), or a current row on the
source that differs, in the columns the request touched, from the state the request left
(this also catches changes the daemon has not captured yet). :func:`apply_plan` checks the
rows again inside its transaction, with the rows locked, and requires every statement to
change exactly the expected number of rows: anything else rolls the whole revert back.

**Restore** makes the current row equal to its state at a version (``Store.row_at``): an
INSERT, an UPDATE of the differing columns, or a DELETE. It reports the diff; it has no
conflicts (it is explicit), but it refuses to apply if the row changed since the plan.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Final, Literal

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus

from cdc.dryrun import parse_record
from cdc.errors import CdcError, NotFoundError, UsageError
from cdc.lsn import format_lsn, parse_lsn
from cdc.names import format_table, parse_table
from cdc.query import Mutation, Row, Store, TableInfo, format_key
from cdc.render import oversize_text
from cdc.store.format import is_oversize
from cdc.values import converter_for

__all__ = [
    "OUTPUT_SETTINGS",
    "ColumnDiff",
    "Conflict",
    "RevertApplyError",
    "RevertConflictError",
    "RevertPlan",
    "RowExpectation",
    "apply_plan",
    "plan_restore",
    "plan_revert",
    "script_text",
]

#: The session settings under which the stored text forms were produced (and parse back
#: exactly): the capture daemon's output settings (cdc/stream/replication.py).
OUTPUT_SETTINGS: Final[Mapping[str, str]] = {
    "DateStyle": "ISO, MDY",
    "IntervalStyle": "postgres",
    "extra_float_digits": "1",
    "bytea_output": "hex",
    "TimeZone": "UTC",
}

_MAX_CONFLICTS_IN_MESSAGE: Final = 20
_LOG_PAGE: Final = 200


# ============================================================================ results


@dataclass(frozen=True)
class Conflict:
    """Why a revert would clobber something: a column of a row changed after the request."""

    table: str
    key: Row
    column: str | None  # None: the whole row (it appeared, disappeared or was truncated)
    request_id: str | None  # the request that changed it later (None: unknown / not captured yet)
    version: int | None  # the version of that change (None: seen on the source, not in the history)
    reason: str

    def describe(self) -> str:
        what = f"{self.table} {format_key(self.key)}" + (f" column {self.column}" if self.column else "")
        by = []
        if self.request_id:
            by.append(f"request {self.request_id}")
        if self.version is not None:
            by.append(f"version {format_lsn(self.version)}")
        return f"{what}: {self.reason}" + (f" (by {', '.join(by)})" if by else "")

    def to_json(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "key": self.key,
            "column": self.column,
            "request_id": self.request_id,
            "version": self.version,
            "version_lsn": format_lsn(self.version) if self.version is not None else None,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class ColumnDiff:
    """One column of a restore: its value now on the source and at the target version."""

    column: str
    current: Any
    target: Any
    current_present: bool = True  # False: the row (or the column) does not exist now
    target_present: bool = True  # False: the row (or the column) did not exist at the version

    def to_json(self) -> dict[str, Any]:
        return {
            "column": self.column,
            "current": self.current if self.current_present else None,
            "target": self.target if self.target_present else None,
            "current_present": self.current_present,
            "target_present": self.target_present,
        }


@dataclass(frozen=True)
class RowExpectation:
    """The state a row must be in when the plan is applied (checked unless forced).

    ``image`` holds the columns to compare (None: the row must be absent); ``keyless`` rows
    are matched by the whole image and only their presence is checked.
    """

    table: str
    key: Row
    image: Row | None
    keyless: bool = False
    relation_oid: int = 0  # the source relation the history knows the table as


@dataclass(frozen=True)
class RevertPlan:
    """The statements of a revert or restore, their SQL text, and what stands in their way."""

    statements: list[sql.Composed]
    sql_text: str
    conflicts: list[Conflict]
    kind: Literal["revert", "restore"] = "revert"
    context_key: str = "reverts"  # the extra context key of the applying request
    context_value: str = ""  # the request reverted, or "table key @ version" restored
    #: rows each statement must change (several numbers: a statement grouping inverses, see below)
    expected_rows: list[tuple[int, ...]] = field(default_factory=list)
    expectations: list[RowExpectation] = field(default_factory=list)
    diff: list[ColumnDiff] = field(default_factory=list)  # restore: current vs target
    notes: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.statements

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "target": self.context_value,
            "sql": self.sql_text,
            "statements": len(self.statements),
            "conflicts": [c.to_json() for c in self.conflicts],
            "diff": [d.to_json() for d in self.diff],
            "notes": list(self.notes),
        }


class RevertConflictError(CdcError):
    """Later changes stand in the way of a revert (exit code 3); ``conflicts`` lists them."""

    exit_code = 3

    def __init__(self, conflicts: Sequence[Conflict], *, what: str = "revert") -> None:
        self.conflicts = list(conflicts)
        shown = [c.describe() for c in self.conflicts[:_MAX_CONFLICTS_IN_MESSAGE]]
        more = len(self.conflicts) - len(shown)
        text = f"{len(self.conflicts)} conflict(s) stop the {what}:\n" + "\n".join(f"  - {s}" for s in shown)
        if more > 0:
            text += f"\n  ... and {more} more"
        super().__init__(text, hint="review them; --force (force=True) applies anyway")


class RevertApplyError(CdcError):
    """A statement of the plan did not change the rows it should have: nothing was applied."""

    exit_code = 3


# ============================================================================ the source tables


@dataclass(frozen=True)
class _Column:
    name: str
    type_sql: str  # format_type() with search_path = pg_catalog: schema-qualified unless built in
    type_oid: int
    identity: str  # '' | 'a' (GENERATED ALWAYS AS IDENTITY) | 'd'
    generated: bool
    has_equality: bool
    captured: bool = True  # in the publication's rows (stored generated columns from PostgreSQL 18)


@dataclass(frozen=True)
class _Table:
    name: str  # the table's current name, "schema.name" as cdc.names prints it
    oid: int
    ident: sql.Identifier
    columns: dict[str, _Column]  # in table order, every non-dropped column

    @property
    def plain(self) -> list[_Column]:
        """The columns capture sees (generated ones only where stored ones are published: docs/ddl.md)."""
        return [c for c in self.columns.values() if c.captured]


_COLUMNS_QUERY: Final = """
SELECT a.attname::pg_catalog.text, pg_catalog.format_type(a.atttypid, a.atttypmod),
       a.atttypid::pg_catalog.int8, a.attidentity::pg_catalog.text, a.attgenerated <> '',
       a.attgenerated = '' OR (a.attgenerated = 's'
           AND pg_catalog.current_setting('server_version_num')::pg_catalog.int4 >= 180000) AS captured,
       EXISTS (SELECT 1 FROM pg_catalog.pg_operator AS o
                WHERE o.oprname = '=' AND o.oprresult = 'pg_catalog.bool'::pg_catalog.regtype
                  AND o.oprleft = e.base AND o.oprright = e.base)
  FROM pg_catalog.pg_attribute AS a
  JOIN pg_catalog.pg_type AS t ON t.oid = a.atttypid
  CROSS JOIN LATERAL (
        SELECT CASE WHEN b.typelem <> 0 AND b.typlen = -1 AND b.typcategory = 'A'
                    THEN (SELECT coalesce(nullif(el.typbasetype, 0), el.oid)
                            FROM pg_catalog.pg_type AS el WHERE el.oid = b.typelem)
                    ELSE b.oid END AS base
          FROM pg_catalog.pg_type AS b
         WHERE b.oid = coalesce(nullif(t.typbasetype, 0), t.oid)) AS e
 WHERE a.attrelid = %s::pg_catalog.regclass AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attnum
"""


class _Source:
    """Catalog and row reads on the source, inside one read-only (rolled back) transaction."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self._tables: dict[str, _Table] = {}

    def table(self, name: str, relation_oid: int) -> _Table:
        """The source relation ``relation_oid``, which must still be named ``name`` (exact parts)."""
        found = self._tables.get(name)
        if found is not None:
            return found
        schema, table = parse_table(name)
        row = self.conn.execute(
            "SELECT c.oid::pg_catalog.int8, n.nspname::pg_catalog.text, c.relname::pg_catalog.text "
            "FROM pg_catalog.pg_class AS c JOIN pg_catalog.pg_namespace AS n ON n.oid = c.relnamespace "
            "WHERE c.oid = %s::pg_catalog.oid AND c.relkind IN ('r', 'p')",
            [relation_oid],
        ).fetchone()
        if row is None:
            raise NotFoundError(
                f"table {name} does not exist on the source any more (relation oid {relation_oid})",
                hint="it was dropped, or capture has not seen it again yet",
            )
        if (row[1], row[2]) != (schema, table):
            raise UsageError(
                f"the source relation of {name} (oid {relation_oid}) is now named "
                f"{format_table(str(row[1]), str(row[2]))}: nothing is written to a table the history does "
                "not know under that name",
                hint="let capture catch up with the rename (`cdc status`), then plan again",
            )
        ident = sql.Identifier(schema, table)
        # format_type() qualifies every type not visible on the search_path: with only pg_catalog
        # on it, user types come out schema-qualified (the SQL then runs under any search_path).
        saved = self.conn.execute(
            "SELECT pg_catalog.current_setting('search_path'), "
            "pg_catalog.set_config('search_path', 'pg_catalog', true)"
        ).fetchone()
        try:
            found_columns = self.conn.execute(_COLUMNS_QUERY, [int(row[0])]).fetchall()
        finally:
            self.conn.execute(
                "SELECT pg_catalog.set_config('search_path', %s, true)", [saved[0] if saved else ""]
            )
        columns = {
            str(r[0]): _Column(str(r[0]), str(r[1]), int(r[2]), str(r[3]), bool(r[4]), bool(r[6]), bool(r[5]))
            for r in found_columns
        }
        found = _Table(name=name, oid=int(row[0]), ident=ident, columns=columns)
        self._tables[name] = found
        return found

    def rows(self, table: _Table, where: sql.Composable, *, lock: bool = False, limit: int = 2) -> list[Row]:
        """The rows matching ``where``, as images in cdc's value convention (plain columns)."""
        columns = table.plain
        query = sql.SQL(
            "SELECT ROW({cols})::pg_catalog.text FROM {t} WHERE {where}{lock} LIMIT {limit}"
        ).format(
            cols=sql.SQL(", ").join(sql.Identifier(c.name) for c in columns) if columns else sql.SQL(""),
            t=table.ident,
            where=where,
            lock=sql.SQL(" FOR UPDATE") if lock else sql.SQL(""),
            limit=sql.Literal(limit),
        )
        out: list[Row] = []
        for (text,) in self.conn.execute(query).fetchall():
            fields = parse_record(str(text), len(columns))
            image: Row = {}
            for column, value in zip(columns, fields, strict=True):
                converter = converter_for(column.type_oid)
                image[column.name] = value if value is None or converter is None else converter(value)
            out.append(image)
        return out

    def count(self, table: _Table, where: sql.Composable) -> int:
        row = self.conn.execute(
            sql.SQL("SELECT pg_catalog.count(*) FROM {t} WHERE {where}").format(t=table.ident, where=where)
        ).fetchone()
        return int(row[0]) if row else 0


@contextmanager
def _reading(conn: psycopg.Connection[Any]) -> Iterator[_Source]:
    """A read transaction (or savepoint) under the output settings, always rolled back."""
    with conn.transaction(force_rollback=True):
        _set_output_settings(conn)
        yield _Source(conn)


def _set_output_settings(conn: psycopg.Connection[Any]) -> None:
    for name, value in OUTPUT_SETTINGS.items():
        conn.execute("SELECT pg_catalog.set_config(%s, %s, true)", [name, value])


# ============================================================================ SQL building


def _refuse_oversize(table: str, key: Mapping[str, Any], values: Mapping[str, Any]) -> None:
    """Undo never writes a value the store kept only by reference (``capture.max_value_bytes``)."""
    big = [c for c, v in values.items() if is_oversize(v)]
    if big:
        raise UsageError(
            f"{table} {format_key(key)}: the value of {', '.join(big)} was over capture.max_value_bytes "
            f"and is stored only by reference ({oversize_text(values[big[0]])}): it cannot be written back",
            hint="restore that value by hand; the other changes can be reverted after it",
        )


def _literal(column: _Column, value: Any) -> sql.Composable:
    if value is None:
        return sql.SQL("NULL::{}").format(sql.SQL(column.type_sql))
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        # -32768::smallint would parse as -(32768::smallint)
        return sql.SQL("({})::{}").format(sql.Literal(value), sql.SQL(column.type_sql))
    if isinstance(value, bool | int | str):
        return sql.SQL("{}::{}").format(sql.Literal(value), sql.SQL(column.type_sql))
    return sql.SQL("{}::{}").format(sql.Literal(json.dumps(value)), sql.SQL(column.type_sql))


def _text_literal(value: Any) -> sql.Composable:
    """The stored value as the server's text output (bools as t/f), for text comparisons."""
    if isinstance(value, bool):
        return sql.Literal("t" if value else "f")
    if isinstance(value, int | str):
        return sql.Literal(str(value))
    return sql.Literal(json.dumps(value))


def _column(table: _Table, name: str) -> _Column:
    column = table.columns.get(name)
    if column is None:
        raise UsageError(f"column {name} of {table.name} no longer exists on the source")
    return column


def _equals(column: _Column, value: Any) -> sql.Composable:
    """``column`` holds ``value`` (NULL-safe; text comparison for types without ``=``)."""
    ident = sql.Identifier(column.name)
    if value is None:
        return sql.SQL("{} IS NULL").format(ident)
    if column.has_equality:
        return sql.SQL("{} = {}").format(ident, _literal(column, value))
    # json, xml, point...: compare the output function's text (format's %s) with the stored text
    return sql.SQL("pg_catalog.format('%s', {}) = {}").format(ident, _text_literal(value))


def _key_condition(table: _Table, key: Mapping[str, Any]) -> sql.Composable:
    return sql.SQL(" AND ").join(_equals(_column(table, c), v) for c, v in key.items())


def _row_condition(table: _Table, image: Mapping[str, Any]) -> sql.Composable:
    parts = [_equals(table.columns[c], v) for c, v in image.items() if c in table.columns]
    return sql.SQL(" AND ").join(parts) if parts else sql.SQL("true")


def _one_row(table: _Table, image: Mapping[str, Any]) -> sql.Composable:
    """``ctid = (one row equal to image)``: how a row of a table without a key is named."""
    return sql.SQL("ctid = (SELECT ctid FROM {t} WHERE {cond} LIMIT 1)").format(
        t=table.ident, cond=_row_condition(table, image)
    )


def _delete(table: _Table, where: sql.Composable) -> sql.Composed:
    return sql.SQL("DELETE FROM {} WHERE {}").format(table.ident, where)


def _insert(table: _Table, image: Mapping[str, Any]) -> sql.Composed:
    columns = [table.columns[c] for c in image if c in table.columns and not table.columns[c].generated]
    if not columns:
        return sql.SQL("INSERT INTO {} DEFAULT VALUES").format(table.ident)
    overriding = any(c.identity == "a" for c in columns)
    return sql.SQL("INSERT INTO {t} ({cols}){over} VALUES ({vals})").format(
        t=table.ident,
        cols=sql.SQL(", ").join(sql.Identifier(c.name) for c in columns),
        over=sql.SQL(" OVERRIDING SYSTEM VALUE") if overriding else sql.SQL(""),
        vals=sql.SQL(", ").join(_literal(c, image[c.name]) for c in columns),
    )


def _update(table: _Table, values: Mapping[str, Any], where: sql.Composable) -> sql.Composed:
    # A generated column follows the others: never written.
    writable = {c: v for c, v in values.items() if not _column(table, c).generated}
    return sql.SQL("UPDATE {t} SET {sets} WHERE {where}").format(
        t=table.ident,
        sets=sql.SQL(", ").join(
            sql.SQL("{} = {}").format(sql.Identifier(c), _literal(_column(table, c), v))
            for c, v in writable.items()
        ),
        where=where,
    )


def _render(conn: psycopg.Connection[Any], statements: Sequence[sql.Composed]) -> str:
    return "".join(f"{s.as_string(conn)};\n" for s in statements)


def script_text(plan: RevertPlan, *, header: Sequence[str] = ()) -> str:
    """The plan as a script for psql: one transaction, under the output settings."""
    lines = [f"-- {h}" for h in header]
    lines.append("BEGIN;")
    lines.extend(f"SET LOCAL {name} = '{value}';" for name, value in OUTPUT_SETTINGS.items())
    text = "\n".join(lines) + "\n" + plan.sql_text
    return text + "COMMIT;\n"


# ============================================================================ foreign keys


@dataclass(frozen=True)
class _Step:
    """One inverse statement and the rows it touches (for grouping)."""

    statement: sql.Composed
    table: str
    rows: frozenset[str]  # "table US canonical key" of every key it reads or writes
    keyless: bool


def _related(conn: psycopg.Connection[Any], tables: Iterable[_Table]) -> dict[str, int]:
    """Each table linked by a foreign key to another touched table (or itself) → its component.

    Tables in the same component (transitively linked) are related; a table without such a
    link is absent.
    """
    by_oid = {t.oid: t.name for t in tables}
    if not by_oid:
        return {}
    rows = conn.execute(
        "SELECT conrelid::pg_catalog.int8, confrelid::pg_catalog.int8 FROM pg_catalog.pg_constraint "
        "WHERE contype = 'f' AND conrelid = ANY(%(o)s::pg_catalog.oid[]) "
        "AND confrelid = ANY(%(o)s::pg_catalog.oid[])",
        {"o": list(by_oid)},
    ).fetchall()
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while parent.setdefault(name, name) != name:
            name = parent[name]
        return name

    for child, referenced in rows:
        a, b = root(by_oid[int(child)]), root(by_oid[int(referenced)])
        parent[a] = b
    roots = sorted({root(name) for name in parent})
    return {name: roots.index(root(name)) for name in parent}


def _group(
    steps: Sequence[_Step], related: Mapping[str, int]
) -> tuple[list[sql.Composed], list[tuple[int, ...]]]:
    """Merge consecutive inverses on tables linked by foreign keys into one statement.

    Reversing a request replays its row changes backwards, one statement each; a foreign key
    is checked at the end of each statement, so the inverse of a cascade (a parent deleted,
    then its children by ON DELETE CASCADE / SET NULL) would insert a child before its parent.
    Consecutive inverses on tables linked (transitively) by foreign keys that touch different
    rows therefore run as one statement (data-modifying WITH queries: every foreign key is
    checked at its end), each returning its row count. Other steps stay plain statements.
    """
    groups: list[list[_Step]] = []
    for step in steps:
        group = groups[-1] if groups else None
        if (
            group is not None
            and step.table in related
            and related[step.table] == related.get(group[0].table)
            and not any(step.rows & other.rows for other in group)
            and not (step.keyless and any(other.table == step.table for other in group))
        ):
            group.append(step)
        else:
            groups.append([step])
    statements: list[sql.Composed] = []
    expected: list[tuple[int, ...]] = []
    for group in groups:
        if len(group) == 1:
            statements.append(group[0].statement)
        else:
            names = [sql.Identifier(f"s{i}") for i in range(1, len(group) + 1)]
            statements.append(
                sql.SQL("WITH\n  {ctes}\nSELECT {counts}").format(
                    ctes=sql.SQL(",\n  ").join(
                        sql.SQL("{} AS ({} RETURNING 1)").format(n, step.statement)
                        for n, step in zip(names, group, strict=True)
                    ),
                    counts=sql.SQL(", ").join(sql.SQL("(SELECT count(*) FROM {})").format(n) for n in names),
                )
            )
        expected.append(tuple(1 for _ in group))
    return statements, expected


# ============================================================================ revert


@dataclass
class _Track:
    """One row the request touched, followed through its key changes."""

    table: str
    keyless: bool
    first_position: int
    keys: list[Row]  # every key the row had during the request, first to last
    touched: set[str]  # columns the request wrote (every column for INSERT/DELETE)
    final: Row | None  # the row as the request left it (None: deleted)


def _canonical(key: Mapping[str, Any] | None) -> str:
    return json.dumps(key, sort_keys=True, default=str)


def _follow(mutations: Sequence[Mutation], infos: Mapping[str, TableInfo]) -> list[_Track]:
    open_rows: dict[tuple[str, str], list[_Track]] = {}
    tracks: list[_Track] = []
    for m in mutations:
        keyless = infos[m.table].keyless
        key = dict(m.key or {})
        source_key = dict(m.old_key) if m.old_key is not None else key
        lookup = (m.table, _canonical(source_key))
        if m.op == "INSERT":
            track = _Track(m.table, keyless, m.position, [key], set(m.after or {}), dict(m.after or {}))
            tracks.append(track)
        else:
            stack = open_rows.get(lookup)
            track_or_none = stack.pop() if stack else None
            if track_or_none is None:
                track = _Track(m.table, keyless, m.position, [source_key], set(), None)
                tracks.append(track)
            else:
                track = track_or_none
            if m.op == "DELETE":
                track.touched |= set(m.before or {})
                track.final = None
            else:  # UPDATE
                track.touched |= set(m.changed)
                track.final = dict(m.after or {})
                if _canonical(key) != _canonical(track.keys[-1]):
                    track.keys.append(key)
        if track.final is not None:
            open_rows.setdefault((m.table, _canonical(track.keys[-1])), []).append(track)
    return tracks


def _later_changes(
    store: Store, track: _Track, request_id: str, last_truncate: dict[str, Mutation | None]
) -> list[Conflict]:
    """Committed mutations of other requests on the row after the request first touched it.

    ``last_truncate`` caches the newest committed TRUNCATE of each table (None: none).
    """
    conflicts: list[Conflict] = []
    seen: set[tuple[int, int]] = set()
    for key in {_canonical(k): k for k in track.keys}.values():
        for m in _row_log_since(store, track.table, key, track.first_position):
            if m.request_id == request_id or m.cursor in seen:
                continue
            seen.add(m.cursor)
            # an UPDATE conflicts on the columns both wrote; INSERT, DELETE (and SNAPSHOT: a new
            # baseline after a gap) on every column the request touched
            overlap = sorted(set(m.changed) & track.touched) if m.op == "UPDATE" else sorted(track.touched)
            conflicts.extend(
                Conflict(
                    table=track.table,
                    key=dict(m.key or key),
                    column=column,
                    request_id=m.request_id,
                    version=m.version,
                    reason=f"changed later ({m.op})",
                )
                for column in overlap
            )
    if track.table not in last_truncate:
        found = store.mutation_log(table=track.table, op="TRUNCATE", status="committed", limit=1).mutations
        last_truncate[track.table] = found[0] if found else None
    t = last_truncate[track.table]
    if t is not None and t.position > track.first_position:
        conflicts.append(
            Conflict(
                track.table, dict(track.keys[-1]), None, t.request_id, t.version, "table truncated later"
            )
        )
    return conflicts


def _row_log_since(store: Store, table: str, key: Row, position: int) -> Iterator[Mutation]:
    """The row's committed mutations (``key`` or ``old_key``) at or after ``position``, newest first."""
    cursor: tuple[int, int] | None = None
    while True:
        page = store.mutation_log(table=table, key=key, status="committed", before=cursor, limit=_LOG_PAGE)
        for m in page.mutations:
            if m.position < position:
                return
            yield m
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


def _current_state(
    source: _Source, table: _Table, expectation: RowExpectation, *, lock: bool
) -> list[Conflict]:
    """Compare the row on the source with ``expectation``; a conflict per differing column."""
    if expectation.keyless:
        if expectation.image is None:
            return []  # a multiset: another equal row may legitimately remain
        if source.count(table, _row_condition(table, expectation.image)) > 0:
            return []
        return [
            Conflict(table.name, expectation.key, None, None, None, "the row is not on the source any more")
        ]
    where = _key_condition(table, expectation.key)
    found = source.rows(table, where, lock=lock, limit=1)
    if expectation.image is None:
        if found:
            return [Conflict(table.name, expectation.key, None, None, None, "a row with this key exists now")]
        return []
    if not found:
        return [
            Conflict(table.name, expectation.key, None, None, None, "the row is not on the source any more")
        ]
    current = found[0]
    return [
        Conflict(table.name, expectation.key, column, None, None, "the current value on the source differs")
        for column, value in expectation.image.items()
        if column in current and current[column] != value
    ]


def _merge(conflicts: Sequence[Conflict]) -> list[Conflict]:
    """One conflict per (table, key, column), preferring the one that names a later request."""
    best: dict[tuple[str, str, str | None], Conflict] = {}
    for c in conflicts:
        slot = (c.table, _canonical(c.key), c.column)
        kept = best.get(slot)
        if kept is None or (kept.version is None and c.version is not None):
            best[slot] = c
    return list(best.values())


def _writable(info: TableInfo) -> TableInfo:
    """A table undo may write to: not dropped (its current name is where rows go)."""
    if info.dropped:
        raise UsageError(
            f"{info.current_name} was dropped on the source: its rows cannot be written back",
            hint="its history stays readable: cdc state history / cdc state at",
        )
    return info


def _by_current_name(
    store: Store, mutations: Sequence[Mutation]
) -> tuple[list[Mutation], dict[str, TableInfo]]:
    """The mutations with ``table`` set to their table's current name (a table renamed since is
    reverted under its new name), and each table's facts by that name."""
    by_id: dict[int, TableInfo] = {}
    out: list[Mutation] = []
    for m in mutations:
        if m.table_id is None:
            raise UsageError(f"{m.table}: no table identity in the history")
        if m.table_id not in by_id:
            by_id[m.table_id] = _writable(store.table(m.table, m.position))
            if by_id[m.table_id].table_id != m.table_id:  # not expected: names resolve by position
                raise UsageError(f"{m.table}: the history names another table at {format_lsn(m.position)}")
            by_id[m.table_id] = store.table(by_id[m.table_id].current_name)
        out.append(replace(m, table=by_id[m.table_id].name))
    return out, {info.name: info for info in by_id.values()}


def plan_revert(store: Store, source_conn: psycopg.Connection[Any], request_id: str) -> RevertPlan:
    """The SQL that undoes the committed changes of ``request_id`` (full id or unique prefix).

    Reads the history from ``store`` and the current rows and column types from
    ``source_conn`` (inside a transaction or savepoint that is rolled back). Raises
    :class:`~cdc.errors.NotFoundError` for an unknown request and
    :class:`~cdc.errors.UsageError` for changes that cannot be inverted (TRUNCATE).
    """
    full = store.resolve_request(request_id)
    mutations = [m for m in store.request_mutations(full) if not m.rolled_back and m.version is not None]
    notes: list[str] = []
    truncates = [m for m in mutations if m.op == "TRUNCATE"]
    if truncates:
        raise UsageError(
            f"request {full} truncated {', '.join(sorted({m.table for m in truncates}))}: "
            "a TRUNCATE cannot be reverted row by row",
            hint="restore the rows one by one with `cdc restore TABLE --id ID --version V`",
        )
    mutations, infos = _by_current_name(
        store, [m for m in mutations if m.op in ("INSERT", "UPDATE", "DELETE")]
    )
    if not mutations:
        notes.append(f"request {full} has no committed data changes: nothing to revert")
    steps: list[_Step] = []
    conflicts: list[Conflict] = []
    expectations: list[RowExpectation] = []
    with _reading(source_conn) as source:
        tables = {t: source.table(t, info.relation_oid) for t, info in infos.items()}
        for m in reversed(mutations):
            table = tables[m.table]
            keyless = infos[m.table].keyless
            rows = frozenset(
                f"{m.table}\x1f{_canonical(k)}" for k in (m.key, m.old_key) if k is not None and not keyless
            )
            if m.op == "INSERT":
                after = dict(m.after or {})
                _refuse_oversize(m.table, dict(m.key or {}), after if keyless else dict(m.key or {}))
                where = _one_row(table, after) if keyless else _key_condition(table, dict(m.key or {}))
                steps.append(_Step(_delete(table, where), m.table, rows, keyless))
            elif m.op == "DELETE":
                before = dict(m.before or {})
                _refuse_oversize(m.table, dict(m.key or {}), before)
                gone = [c for c in before if c not in table.columns]
                if gone:
                    notes.append(
                        f"{m.table}: column(s) {', '.join(gone)} no longer exist; left out of the INSERT"
                    )
                steps.append(_Step(_insert(table, before), m.table, rows, keyless))
            else:
                before, after = dict(m.before or {}), dict(m.after or {})
                changed = [c for c in m.changed if c in before]
                if not changed:
                    continue  # an UPDATE that changed nothing
                missing = [c for c in changed if c not in table.columns]
                for column in missing:
                    conflicts.append(
                        Conflict(
                            m.table, dict(m.key or {}), column, None, None, "the column no longer exists"
                        )
                    )
                values = {
                    c: before[c] for c in changed if c in table.columns and not table.columns[c].generated
                }
                if not values:
                    continue
                _refuse_oversize(m.table, dict(m.key or {}), values if not keyless else {**values, **after})
                where = _one_row(table, after) if keyless else _key_condition(table, dict(m.key or {}))
                steps.append(_Step(_update(table, values, where), m.table, rows, keyless))
        statements, expected_rows = _group(steps, _related(source_conn, tables.values()))
        final: dict[tuple[str, str], RowExpectation] = {}
        keyless_rows: list[RowExpectation] = []
        last_truncate: dict[str, Mutation | None] = {}
        for track in _follow(mutations, infos):
            conflicts.extend(_later_changes(store, track, full, last_truncate))
            image = (
                None
                if track.final is None
                else {c: v for c, v in track.final.items() if c in track.touched or track.keyless}
            )
            expectation = RowExpectation(
                track.table, dict(track.keys[-1]), image, track.keyless, infos[track.table].relation_oid
            )
            if track.keyless:
                keyless_rows.append(expectation)
            else:  # a key deleted and inserted again by the request: the last state counts
                final[(track.table, _canonical(track.keys[-1]))] = expectation
        expectations = [*final.values(), *keyless_rows]
        for expectation in expectations:
            table = tables[expectation.table]
            conflicts.extend(_current_state(source, table, expectation, lock=False))
        sql_text = _render(source_conn, statements)
    return RevertPlan(
        statements=statements,
        sql_text=sql_text,
        conflicts=_merge(conflicts),
        kind="revert",
        context_key="reverts",
        context_value=full,
        expected_rows=expected_rows,
        expectations=expectations,
        notes=notes,
    )


# ============================================================================ restore


def _resolve_version(store: Store, version: int | str | None, at: datetime | None) -> int:
    if (version is None) == (at is None):
        raise UsageError("give exactly one of a version or a time")
    if at is not None:
        resolved = store.version_at_timestamp(at)
        if resolved is None:
            raise NotFoundError(f"no stored version at or before {at.isoformat()}")
        return resolved
    assert version is not None
    if isinstance(version, bool):
        raise UsageError(f"invalid version {version!r}: expected an int LSN or X/Y")
    number = parse_lsn(version)
    if not store.check_version(number):
        floor = store.earliest_version()
        raise NotFoundError(
            f"version {format_lsn(number)} is below the history floor {format_lsn(floor or 0)}: "
            "it was pruned or precedes the capture"
        )
    return number


def plan_restore(
    store: Store,
    source_conn: psycopg.Connection[Any],
    table: str,
    key: Any,
    *,
    version: int | str | None = None,
    at: datetime | None = None,
) -> RevertPlan:
    """The SQL that makes row ``key`` of ``table`` on the source equal to its state at ``version``.

    ``version``: an int LSN or ``X/Y``; or ``at``: a time (the newest version at or before it).
    The plan's ``diff`` lists the differing columns; it has no conflicts, but applying it
    checks that the row has not changed since the plan.
    """
    info = _writable(store.table(table))
    stored = store.stored_key(info, key)
    number = _resolve_version(store, version, at)
    target = store.row_at(info, stored, number)  # the row of this table (identity) then
    if target is None and not store.has_history(info, stored):
        raise NotFoundError(f"no history for {info.name} {format_key(stored)}")
    if target is not None:
        _refuse_oversize(info.current_name, stored, target)
    label = f"{info.current_name} {format_key(stored)} @ {format_lsn(number)}"
    notes: list[str] = []
    statements: list[sql.Composed] = []
    expected_rows: list[tuple[int, ...]] = []
    diff: list[ColumnDiff] = []
    with _reading(source_conn) as source:
        src = source.table(info.current_name, info.relation_oid)
        plain = {c.name for c in src.plain}
        if target is not None:
            gone = [c for c in target if c not in src.columns]
            if gone:
                notes.append(f"column(s) {', '.join(gone)} no longer exist on the source: not restored")
            added = [c for c in plain if c not in target]
            if added:
                notes.append(f"column(s) {', '.join(added)} did not exist at that version: left as they are")
            target = {c: v for c, v in target.items() if c in plain}
        if info.keyless:
            count = source.count(src, _row_condition(src, stored))
            current: Row | None = dict(stored) if count else None
            expectation = RowExpectation(src.name, stored, current, True, info.relation_oid)
            if target is not None and count == 0:
                statements.append(_insert(src, target))
                expected_rows.append((1,))
            elif target is None and count > 0:
                statements.append(_delete(src, _row_condition(src, stored)))
                expected_rows.append((count,))
        else:
            found = source.rows(src, _key_condition(src, stored), limit=1)
            current = found[0] if found else None
            expectation = RowExpectation(src.name, stored, current, False, info.relation_oid)
            if target is not None and current is None:
                statements.append(_insert(src, target))
                expected_rows.append((1,))
            elif target is None and current is not None:
                statements.append(_delete(src, _key_condition(src, stored)))
                expected_rows.append((1,))
            elif target is not None and current is not None:
                values = {c: v for c, v in target.items() if c not in current or current[c] != v}
                if values:
                    statements.append(_update(src, values, _key_condition(src, stored)))
                    expected_rows.append((1,))
        diff = _diff(current, target)
        if not statements:
            notes.append(f"{src.name} {format_key(stored)} already equals its state at {format_lsn(number)}")
        sql_text = _render(source_conn, statements)
    return RevertPlan(
        statements=statements,
        sql_text=sql_text,
        conflicts=[],
        kind="restore",
        context_key="restores",
        context_value=label,
        expected_rows=expected_rows,
        expectations=[expectation],
        diff=diff,
        notes=notes,
    )


def _diff(current: Row | None, target: Row | None) -> list[ColumnDiff]:
    columns = list(dict.fromkeys([*(target or {}), *(current or {})]))
    out: list[ColumnDiff] = []
    for column in columns:
        in_current = current is not None and column in current
        in_target = target is not None and column in target
        now = current.get(column) if current is not None else None
        then = target.get(column) if target is not None else None
        if in_current and in_target and now == then:
            continue
        if current is not None and target is not None and not in_target:
            continue  # a column added since: left alone
        out.append(ColumnDiff(column, now, then, current_present=in_current, target_present=in_target))
    return out


# ============================================================================ apply


def apply_plan(
    source_conn: psycopg.Connection[Any],
    plan: RevertPlan,
    *,
    request_id: str | None = None,
    actor: str | None = None,
    force: bool = False,
) -> str:
    """Run the plan in one transaction on the source, as a new request; return its id.

    The transaction is tagged with ``cdc.client.request(conn, request_id, actor=actor,
    reverts=...)`` (``restores=...`` for a restore), so the undo has its own history. Unless
    ``force``: a plan with conflicts raises :class:`RevertConflictError` (nothing is run), and
    the rows are locked and checked again first. Every statement must change exactly the
    rows it should, else :class:`RevertApplyError`; on any error the transaction rolls back.
    ``source_conn`` must not be inside a transaction.
    """
    from cdc import client

    if plan.conflicts and not force:
        raise RevertConflictError(plan.conflicts, what=plan.kind)
    if not plan.statements:
        raise UsageError(f"nothing to apply: the {plan.kind} plan has no statements")
    if source_conn.info.transaction_status != TransactionStatus.IDLE:
        raise UsageError(f"apply_plan runs its own transaction: the connection is inside one ({plan.kind})")
    rid = request_id or client.new_request_id()
    was_autocommit = source_conn.autocommit
    source_conn.autocommit = True  # request() then owns the transaction: committed or rolled back as a whole
    try:
        with client.request(source_conn, rid, actor=actor, **{plan.context_key: plan.context_value}):
            _set_output_settings(source_conn)
            if not force:
                source = _Source(source_conn)
                found: list[Conflict] = []
                for expectation in plan.expectations:
                    found.extend(
                        _current_state(
                            source,
                            source.table(expectation.table, expectation.relation_oid),
                            expectation,
                            lock=True,
                        )
                    )
                if found:
                    raise RevertConflictError(_merge(found), what=plan.kind)
            expected = plan.expected_rows or [(1,)] * len(plan.statements)
            for index, (statement, rows) in enumerate(zip(plan.statements, expected, strict=True), 1):
                cur = source_conn.execute(statement)
                changed = (cur.rowcount,) if len(rows) == 1 else tuple(int(n) for n in cur.fetchone() or ())
                if changed != rows:
                    shown = ", ".join(map(str, changed))
                    raise RevertApplyError(
                        f"statement {index} of {len(plan.statements)} changed {shown} row(s), "
                        f"expected {', '.join(map(str, rows))}: nothing was applied "
                        f"({statement.as_string(source_conn)[:200]})",
                        hint="the rows changed since the plan was made; plan again",
                    )
    finally:
        if not source_conn.closed and source_conn.info.transaction_status == TransactionStatus.IDLE:
            source_conn.autocommit = was_autocommit
    return rid
