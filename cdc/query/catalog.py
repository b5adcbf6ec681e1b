"""Tables by identity: names at positions, schemas, resolution of a name, keys (docs/store.md).

A captured table is one source relation for as long as it exists (``tables``); every name it
had is a ``table_names`` row holding from its position until the next one's. A name given by a
user is read as PostgreSQL reads it (cdc/names.py) and resolved:

* at a version V: the table whose name at V is the given one (and that existed at V);
* without a version (history, blame, the log), or when no table had the name at V: the table
  that has the name now; if none has it now, the one that had it last, whose history is then
  read up to the rename or drop (``TableInfo.until``).

The catalog is small: it is read whole and kept for a while (``_CATALOG_SECONDS``), read
again at once when a name is not found in it.
"""

from __future__ import annotations

import difflib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from psycopg import sql

from cdc.errors import NotFoundError, UsageError
from cdc.names import format_table, parse_table
from cdc.query.base import StoreBase
from cdc.query.model import Key, Row, TableInfo, short
from cdc.store.keys import key_text
from cdc.values import key_value_from_user

__all__ = ["Catalog"]

_CATALOG_SECONDS = 30.0
_RELOAD_AFTER_MISS_SECONDS = 0.5
_TEXT_OID = 25


@dataclass(frozen=True)
class _Schema:
    schema_id: int
    table_id: int
    first_position: int
    key_columns: tuple[str, ...]
    columns: tuple[str, ...]
    type_oids: Mapping[str, int]
    policies: Mapping[str, str]  # column -> redaction policy (hash, mask, exclude) capture applied


@dataclass(frozen=True)
class _Name:
    table_id: int
    schema: str
    name: str
    start: int
    end: int | None  # where the next name (or the drop) begins; None: the name holds now

    @property
    def full(self) -> str:
        return format_table(self.schema, self.name)


@dataclass(frozen=True)
class _Table:
    table_id: int
    relation_oid: int
    first_position: int
    dropped_position: int | None
    names: tuple[_Name, ...]  # oldest first

    @property
    def latest(self) -> _Name:
        return self.names[-1]

    def name_at(self, position: int) -> _Name:
        """The name in force at ``position`` (the first one before the table was registered)."""
        found = self.names[0]
        for name in self.names:
            if name.start > position:
                break
            found = name
        return found


class Catalog(StoreBase):
    """The store's tables, their names and schemas, and the keys of their rows."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._catalog: dict[int, _Table] = {}
        self._by_name: dict[tuple[str, str], list[_Name]] = {}
        self._catalog_at = -1e9
        self._schemas: dict[int, _Schema] = {}
        self._table_schemas: dict[int, list[_Schema]] = {}

    # ------------------------------------------------------------------ loading

    def _load_catalog(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._catalog_at < _CATALOG_SECONDS:
            return
        rows = self._rows(
            sql.SQL(
                "SELECT t.table_id, t.relation_oid, t.first_position, t.dropped_position, "
                "n.schema_name, n.table_name, n.from_position FROM {t} t JOIN {n} n USING (table_id) "
                "ORDER BY t.table_id, n.from_position"
            ).format(t=self._t("tables"), n=self._t("table_names"))
        )
        grouped: dict[int, list[Mapping[str, Any]]] = {}
        for r in rows:
            grouped.setdefault(int(r["table_id"]), []).append(r)
        catalog: dict[int, _Table] = {}
        by_name: dict[tuple[str, str], list[_Name]] = {}
        for table_id, found in grouped.items():
            first = found[0]
            dropped = None if first["dropped_position"] is None else int(first["dropped_position"])
            names = []
            for i, n in enumerate(found):
                end = int(found[i + 1]["from_position"]) if i + 1 < len(found) else dropped
                name = _Name(table_id, n["schema_name"], n["table_name"], int(n["from_position"]), end)
                names.append(name)
                by_name.setdefault((name.schema, name.name), []).append(name)
            catalog[table_id] = _Table(
                table_id, int(first["relation_oid"]), int(first["first_position"]), dropped, tuple(names)
            )
        self._catalog, self._by_name, self._catalog_at = catalog, by_name, now
        self._table_schemas.clear()

    def _schemas_of(self, table_id: int) -> list[_Schema]:
        """Every schema of the table, oldest first."""
        found = self._table_schemas.get(table_id)
        if found is None:
            rows = self._rows(
                sql.SQL(
                    "SELECT schema_id, table_id, first_position, key_columns, columns FROM {} "
                    "WHERE table_id = %(t)s ORDER BY first_position, schema_id"
                ).format(self._t("table_schemas")),
                {"t": table_id},
            )
            found = [self._schema_row(r) for r in rows]
            self._table_schemas[table_id] = found
        return found

    def _shape(self, schema_id: int) -> _Schema | None:
        """One schema by id (cached)."""
        if schema_id not in self._schemas:
            rows = self._rows(
                sql.SQL(
                    "SELECT schema_id, table_id, first_position, key_columns, columns FROM {} "
                    "WHERE schema_id = %(s)s"
                ).format(self._t("table_schemas")),
                {"s": schema_id},
            )
            if not rows:
                return None
            self._schema_row(rows[0])
        return self._schemas[schema_id]

    def _schema_row(self, r: Mapping[str, Any]) -> _Schema:
        columns = [c for c in r["columns"] or [] if isinstance(c, dict) and "name" in c]
        schema = _Schema(
            schema_id=int(r["schema_id"]),
            table_id=int(r["table_id"]),
            first_position=int(r["first_position"]),
            key_columns=tuple(r["key_columns"] or ()),
            columns=tuple(str(c["name"]) for c in columns),
            type_oids={str(c["name"]): int(c.get("type_oid") or _TEXT_OID) for c in columns},
            policies={str(c["name"]): str(c["policy"]) for c in columns if c.get("policy")},
        )
        self._schemas[schema.schema_id] = schema
        return schema

    def _schema_at(self, table_id: int, position: int | None) -> _Schema | None:
        """The table's schema in force at ``position`` (its latest without one)."""
        schemas = self._schemas_of(table_id)
        if not schemas:
            return None
        if position is None:
            return schemas[-1]
        found = schemas[0]
        for schema in schemas:
            if schema.first_position > position:
                break
            found = schema
        return found

    def recorded_policies(self, table_id: int) -> dict[str, str]:
        """Column -> redaction policy (hash, mask, exclude) as capture recorded them in any schema
        version of the table (the latest wins): which stored values are placeholders."""
        found: dict[str, str] = {}
        for schema in self._schemas_of(table_id):
            found.update(schema.policies)
        return found

    # ------------------------------------------------------------------ names

    def name_at(self, table_id: int, position: int) -> str:
        """The table's name at ``position``, ``schema.name`` quoted as PostgreSQL needs."""
        table = self._catalog.get(table_id)
        if table is None:
            self._load_catalog(force=True)
            table = self._catalog.get(table_id)
        return table.name_at(position).full if table is not None else f"(table {table_id})"

    def _find(self, schema: str, name: str, version: int | None) -> tuple[_Table, int | None] | None:
        """The table named ``schema.name`` (at ``version``), and the bound of its history."""
        spans = self._by_name.get((schema, name), [])
        if version is not None:
            at = [
                s for s in spans
                if s.start <= version and (s.end is None or version < s.end)
                and self._catalog[s.table_id].first_position <= version
            ]  # fmt: skip
            if at:
                return self._catalog[max(at, key=lambda s: s.start).table_id], None
        current = [s for s in spans if s.end is None]
        if current:
            return self._catalog[max(current, key=lambda s: s.start).table_id], None
        if spans:
            last = max(spans, key=lambda s: (s.end or 0, s.start))
            table = self._catalog[last.table_id]
            return table, None if last is table.latest else last.end
        return None

    def table(self, name: str, version: int | None = None) -> TableInfo:
        """The table ``name`` resolves to (at ``version``) with its schema there.

        :class:`NotFoundError` when the store has no history of it; :class:`UsageError` for a
        malformed name.
        """
        schema, table = parse_table(name)
        self._load_catalog()
        found = self._find(schema, table, version)
        if found is None and time.monotonic() - self._catalog_at > _RELOAD_AFTER_MISS_SECONDS:
            self._load_catalog(force=True)
            found = self._find(schema, table, version)
        if found is None:
            raise self._unknown_table(format_table(schema, table))
        identity, until = found
        bound = version if version is not None else (until - 1 if until is not None else None)
        shape = self._schema_at(identity.table_id, bound)
        return TableInfo(
            name=format_table(schema, table),
            key_columns=shape.key_columns if shape else (),
            columns=shape.columns if shape else (),
            type_oids=shape.type_oids if shape else {},
            table_id=identity.table_id,
            schema_name=schema,
            table_name=table,
            current_name=identity.latest.full,
            relation_oid=identity.relation_oid,
            dropped_position=identity.dropped_position,
            until=until,
            names=tuple((n.start, n.full) for n in identity.names),
        )

    def tables(self) -> list[TableInfo]:
        """Every captured table (one per source relation, dropped ones too), by current name."""
        self._load_catalog()
        out = []
        for t in self._catalog.values():
            shape = self._schema_at(t.table_id, None)
            out.append(
                TableInfo(
                    name=t.latest.full, key_columns=shape.key_columns if shape else (),
                    columns=shape.columns if shape else (), type_oids=shape.type_oids if shape else {},
                    table_id=t.table_id, schema_name=t.latest.schema, table_name=t.latest.name,
                    current_name=t.latest.full, relation_oid=t.relation_oid,
                    dropped_position=t.dropped_position, names=tuple((n.start, n.full) for n in t.names),
                )
            )  # fmt: skip
        return sorted(out, key=lambda i: (i.dropped, i.name, i.table_id))

    def known_tables(self) -> list[str]:
        """The names that resolve to a table now: live tables, and dropped ones not taken again."""
        self._load_catalog()
        names = {t.latest.full for t in self._catalog.values()}
        return sorted(names)

    def _unknown_table(self, full: str) -> NotFoundError:
        known = self.known_tables()
        short_names = {t.removeprefix("public."): t for t in known}
        close = difflib.get_close_matches(full, known, n=3, cutoff=0.6)
        close += [
            short_names[c]
            for c in difflib.get_close_matches(full.removeprefix("public."), list(short_names), n=3)
        ]
        close = list(dict.fromkeys(close))
        listed = ", ".join(known[:20]) + (f", ... ({len(known)} in all)" if len(known) > 20 else "")
        message = f"no history for table {full}; known tables: {listed or '(none)'}"
        return NotFoundError(message, hint=f"did you mean {' or '.join(close)}?" if close else None)

    # ------------------------------------------------------------------ keys

    def stored_key(self, table: str | TableInfo, key: Key) -> Row:
        """Turn a user's key (scalar, dict, or CLI text) into the stored form of ``table``:
        ``{column: value}`` in key-column order (every column, in table order, without a key)."""
        info = table if isinstance(table, TableInfo) else self.table(table)
        if isinstance(key, Mapping):
            names = [str(k) for k in key]
            if info.key_columns and set(names) != set(info.key_columns):
                raise UsageError(
                    f"key {short(json.dumps(dict(key), default=str))} does not name a row of {info.name}: "
                    f"its key columns are ({', '.join(info.key_columns)})"
                )
            order = info.key_columns or tuple(c for c in info.columns if c in key) + tuple(
                c for c in names if c not in info.columns
            )
            return {c: self._key_value(info, c, key[c]) for c in order}
        if info.keyless:
            raise UsageError(
                f"{info.name} has no key: name a row by all its columns as a JSON object / dict "
                f"({', '.join(info.columns)})"
            )
        if len(info.key_columns) > 1:
            raise UsageError(
                f"{info.name} has a composite key ({', '.join(info.key_columns)}): "
                """give a dict / a JSON object such as '{"a": 1, "b": "x"}'"""
            )
        column = info.key_columns[0]
        return {column: self._key_value(info, column, key)}

    @staticmethod
    def _key_value(info: TableInfo, column: str, value: Any) -> Any:
        oid = info.type_oids.get(column, _TEXT_OID)
        if isinstance(value, dict | list):
            return value
        try:
            return key_value_from_user(oid, value)
        except ValueError as exc:
            raise UsageError(f"invalid key value for {info.name}.{column}: {exc}") from None

    @staticmethod
    def key_text_of(stored: Mapping[str, Any]) -> str:
        """The canonical key (``changes.key_text``) of a stored key."""
        return key_text(list(stored.values()))

    def key_of(self, schema_id: int | None, table_id: int, text: str | None, image: Row | None) -> Row | None:
        """A change's key as ``{column: value}``: from its key text and the key columns of its schema."""
        if text is None:
            return None
        shape = self._shape(schema_id) if schema_id is not None else self._schema_at(table_id, None)
        values = json.loads(text)
        if shape is None or not isinstance(values, list):
            return {"key": values}
        if not shape.key_columns:  # the whole row: its image, when it has one
            if image is not None and len(image) == len(values):
                return dict(image)
            return dict(zip(shape.columns, values, strict=False))
        return dict(zip(shape.key_columns, values, strict=False))

    def columns_of(self, schema_id: int | None) -> Sequence[str]:
        shape = self._shape(schema_id) if schema_id is not None else None
        return shape.columns if shape is not None else ()
