"""The source side of undo: tables found by relation oid, their columns, reading rows, and the
SQL of the inverse statements (literals cast to the current column types)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

import psycopg
from psycopg import sql

from cdc.dryrun import parse_record
from cdc.errors import NotFoundError, RefusedError, UsageError
from cdc.names import format_table, parse_table
from cdc.query import Row, format_key
from cdc.render import oversize_text
from cdc.store.format import is_oversize
from cdc.undo.model import (
    OUTPUT_SETTINGS,
    RevertPlan,
)
from cdc.values import converter_for

# ============================================================================ the source tables


@dataclass(frozen=True)
class _Column:
    name: str
    type_sql: str  # format_type() with search_path = pg_catalog: schema-qualified unless built in
    type_oid: int
    identity: str  # '' | 'a' (GENERATED ALWAYS AS IDENTITY) | 'd'
    generated: bool
    has_equality: bool
    required: bool = False  # NOT NULL with no default (nor identity): an INSERT must give it
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
       EXISTS (SELECT 1 FROM pg_catalog.pg_operator AS o
                WHERE o.oprname = '=' AND o.oprresult = 'pg_catalog.bool'::pg_catalog.regtype
                  AND o.oprleft = e.base AND o.oprright = e.base),
       a.attnotnull AND NOT a.atthasdef AND a.attidentity = '' AND a.attgenerated = '',
       a.attgenerated = '' OR (a.attgenerated = 's'
           AND pg_catalog.current_setting('server_version_num')::pg_catalog.int4 >= 180000) AS captured
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
            raise RefusedError(
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
            str(r[0]): _Column(
                str(r[0]), str(r[1]), int(r[2]), str(r[3]), bool(r[4]), bool(r[5]), bool(r[6]), bool(r[7])
            )
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
        raise RefusedError(
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
