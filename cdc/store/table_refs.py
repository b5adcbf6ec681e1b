"""Tables and row keys of a format-2 store, as retention and erasure need them.

Resolves a table named the way PostgreSQL names it (``users``, ``"User"``, ``app.users``,
``"a.b".c``) to its ``table_id`` through ``table_names`` (docs/store.md "Naming a table"), reads
its key columns from its latest ``table_schemas`` row, and turns a key given by an operator into
the store's canonical ``key_text``. Read-only; never logs a key or a value.

"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from cdc.errors import NotFoundError, UsageError
from cdc.names import format_table, parse_table
from cdc.store.keys import key_text
from cdc.values import key_value_from_user

__all__ = ["TableRef", "resolve_table", "table_ids_named"]

Conn = psycopg.Connection[Any]

# The latest name of each table: a table "has" a name when its latest table_names row is it.
_LATEST_NAMES = (
    "SELECT DISTINCT ON (n.table_id) n.table_id, n.schema_name, n.table_name, n.from_position, "
    "t.dropped_position, t.relation_oid FROM {names} n JOIN {tables} t USING (table_id) "
    "ORDER BY n.table_id, n.from_position DESC"
)


@dataclass(frozen=True)
class TableRef:
    """One captured table: its identity, its current (or last) name and its key."""

    table_id: int
    schema_name: str
    table_name: str
    relation_oid: int
    dropped: bool
    key_columns: tuple[str, ...]  # empty: no key (every column names the row)
    columns: tuple[str, ...]  # in table order (latest schema)
    type_oids: Mapping[str, int]

    @property
    def name(self) -> str:
        """``schema.name``, quoted where PostgreSQL would need quotes."""
        return format_table(self.schema_name, self.table_name)

    @property
    def keyless(self) -> bool:
        return not self.key_columns

    @property
    def naming_columns(self) -> tuple[str, ...]:
        """The columns whose values make up ``key_text``: the key, else every column."""
        return self.key_columns or self.columns

    def key_values(self, key: Any) -> list[Any]:
        """The stored values, in ``key_text`` order, of a key given by a user: a scalar (one
        key column), or a mapping of column to value (a composite key; every column of a keyless
        table). Raises UsageError when it does not name a row of this table."""
        if isinstance(key, Mapping):
            given = {str(k) for k in key}
            if given != set(self.naming_columns):
                what = "key columns" if self.key_columns else "columns (it has no key)"
                raise UsageError(
                    f"that key does not name a row of {self.name}: its {what} are "
                    f"({', '.join(self.naming_columns)})"
                )
            return [self._value(c, key[c]) for c in self.naming_columns]
        if self.keyless:
            raise UsageError(
                f"{self.name} has no key: name a row by all its columns as a JSON object "
                f"({', '.join(self.columns)})"
            )
        if len(self.key_columns) > 1:
            raise UsageError(
                f"{self.name} has a composite key ({', '.join(self.key_columns)}): "
                """give a JSON object such as '{"a": 1, "b": "x"}'"""
            )
        return [self._value(self.key_columns[0], key)]

    def key_text(self, key: Any) -> str:
        """The canonical ``key_text`` of a key given by a user (docs/store.md "The key")."""
        return key_text(self.key_values(key))

    def key_mapping(self, text: str) -> dict[str, Any]:
        """The column → value mapping of a stored ``key_text`` (for the source check)."""
        values = json.loads(text)
        if not isinstance(values, list) or len(values) != len(self.naming_columns):
            raise UsageError(f"a stored key of {self.name} does not match its columns")
        return dict(zip(self.naming_columns, values, strict=True))

    def _value(self, column: str, value: Any) -> Any:
        if isinstance(value, dict | list):
            return value
        try:
            return key_value_from_user(self.type_oids.get(column, 25), value)
        except ValueError as exc:
            raise UsageError(f"invalid key value for column {column!r} of {self.name}: {exc}") from None


def _t(schema: str, name: str) -> sql.Identifier:
    return sql.Identifier(schema, name)


def table_ids_named(conn: Conn, schema: str, name: str) -> list[int]:
    """Every table whose current (or, dropped, last) name is ``name``; if none, the table that had
    it last (renamed since). Empty when no table ever had it."""
    schema_name, table_name = parse_table(name)
    latest = sql.SQL(_LATEST_NAMES).format(names=_t(schema, "table_names"), tables=_t(schema, "tables"))
    rows = conn.execute(
        sql.SQL(
            "SELECT table_id FROM ({}) l WHERE schema_name = %s AND table_name = %s ORDER BY table_id"
        ).format(latest),
        (schema_name, table_name),
    ).fetchall()
    if rows:
        return [int(r[0]) for r in rows]
    row = conn.execute(
        sql.SQL(
            "SELECT table_id FROM {} WHERE schema_name = %s AND table_name = %s ORDER BY from_position DESC LIMIT 1"
        ).format(_t(schema, "table_names")),
        (schema_name, table_name),
    ).fetchone()
    return [int(row[0])] if row else []


def resolve_table(conn: Conn, schema: str, name: str) -> TableRef:
    """The table named ``name`` now (a live one before a dropped one), else the one that had the
    name last. Raises NotFoundError when no captured table ever had it."""
    ids = table_ids_named(conn, schema, name)
    if not ids:
        schema_name, table_name = parse_table(name)
        raise NotFoundError(f"no captured table {format_table(schema_name, table_name)} in the history")
    latest = sql.SQL(_LATEST_NAMES).format(names=_t(schema, "table_names"), tables=_t(schema, "tables"))
    row = conn.execute(
        sql.SQL(
            "SELECT l.table_id, l.schema_name, l.table_name, l.relation_oid, l.dropped_position IS NOT NULL, "
            "s.key_columns, s.columns FROM ({}) l "
            "LEFT JOIN LATERAL (SELECT key_columns, columns FROM {} s WHERE s.table_id = l.table_id "
            "  ORDER BY first_position DESC, schema_id DESC LIMIT 1) s ON true "
            "WHERE l.table_id = ANY(%s) ORDER BY l.dropped_position IS NOT NULL, l.from_position DESC LIMIT 1"
        ).format(latest, _t(schema, "table_schemas")),
        (ids,),
    ).fetchone()
    assert row is not None
    columns: Sequence[Mapping[str, Any]] = row[6] or []
    return TableRef(
        table_id=int(row[0]),
        schema_name=str(row[1]),
        table_name=str(row[2]),
        relation_oid=int(row[3]),
        dropped=bool(row[4]),
        key_columns=tuple(row[5] or ()),
        columns=tuple(str(c["name"]) for c in columns),
        type_oids={str(c["name"]): int(c.get("type_oid") or 25) for c in columns},
    )
