"""Schema changes applied on read (docs/ddl.md): an image stored before a DDL, read at a version
after it, is given the DDL's effect: columns renamed, the value ADD COLUMN gave existing rows,
dropped columns removed. Per read, never per stored row: a table's steps (``ddl_events`` with
column changes) are read once and kept while the store's version has not moved past them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from psycopg import sql

from cdc.lsn import format_lsn
from cdc.names import format_table
from cdc.query.catalog import Catalog
from cdc.query.model import Row, parse_json

__all__ = ["Evolution", "SchemaVersion", "Step", "schema_versions", "summarize"]

Cursor = tuple[int, int]


@dataclass(frozen=True)
class Step:
    """What one DDL did to the table's columns, at ``(position, ordinal)``."""

    position: int
    ordinal: int
    renamed: dict[str, str] = field(default_factory=dict)
    added: dict[str, Any] = field(default_factory=dict)
    dropped: tuple[str, ...] = ()

    @property
    def cursor(self) -> Cursor:
        return (self.position, self.ordinal)

    def apply(self, image: Row) -> Row:
        out: Row = {}
        for name, value in image.items():
            if name in self.dropped:
                continue
            out[self.renamed.get(name, name)] = value
        for name, value in self.added.items():
            out.setdefault(name, value)
        return out


class Evolution(Catalog):
    """The steps of each table and their application to images."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._steps: dict[int, tuple[int, list[Step]]] = {}  # table_id -> (loaded at version, steps)
        self._ddl_table: bool | None = None

    def ddl_steps(self, table_id: int, upto: int | None = None) -> list[Step]:
        """The table's column-changing DDLs, oldest first (read again when ``upto`` is past the
        version they were read at)."""
        cached = self._steps.get(table_id)
        if cached is not None and (upto is None or upto <= cached[0]):
            return cached[1]
        current = self.current_version() or 0
        if not self._has_ddl_events():
            self._steps[table_id] = (current, [])
            return []
        rows = self._rows(
            sql.SQL(
                "SELECT position, ordinal, details FROM {} WHERE table_id = %(t)s "
                "AND (details ? 'renamed' OR details ? 'added' OR details ? 'dropped') "
                "ORDER BY position, ordinal, seq"
            ).format(self._t("ddl_events")),
            {"t": table_id},
        )
        steps = [
            Step(
                int(r["position"]),
                int(r["ordinal"]),
                dict(r["details"].get("renamed") or {}),
                dict(r["details"].get("added") or {}),
                tuple(r["details"].get("dropped") or ()),
            )
            for r in rows
        ]
        self._steps[table_id] = (current, steps)
        return steps

    def _has_ddl_events(self) -> bool:
        """A store set up before schema changes were recorded has no ``ddl_events``: no steps."""
        if self._ddl_table is None:
            found = self._rows(sql.SQL("SELECT to_regclass(%(t)s) IS NOT NULL AS found"),
                               {"t": f"{sql.Identifier(self.schema).as_string()}.ddl_events"})  # fmt: skip
            self._ddl_table = bool(found and found[0]["found"])
        return self._ddl_table

    def inexact_windows(self, table: str) -> list[tuple[int, int | None, str]]:
        """``(from version, until version or None, command)``: the table's history is inexact
        between them (a rewrite too large to record; None: until a backfill, still pending)."""
        info = self.table(table)
        if not self._has_ddl_events():
            return []
        rows = self._rows(
            sql.SQL(
                "SELECT position, resolved_position, command FROM {} WHERE table_id = %(t)s "
                "AND (details ->> 'inexact')::boolean ORDER BY position, ordinal, seq"
            ).format(self._t("ddl_events")),
            {"t": info.table_id},
        )
        return [
            (
                int(r["position"]),
                None if r["resolved_position"] is None else int(r["resolved_position"]),
                str(r["command"]),
            )
            for r in rows
        ]

    def schema_versions(self, table: str) -> list[SchemaVersion]:
        """Every schema version of ``table``, oldest first (see :func:`schema_versions`)."""
        return schema_versions(self, table)

    def evolve(self, table_id: int, image: Row | None, since: Cursor | None, until: Cursor) -> Row | None:
        """``image`` (stored at ``since``) as the table's DDLs after it, up to ``until``, left it."""
        if image is None or since is None:
            return image
        steps = self.ddl_steps(table_id, until[0])
        for step in steps:
            if since < step.cursor <= until:
                image = step.apply(image)
        return image


@dataclass(frozen=True)
class SchemaVersion:
    """One version of a table's schema: the DDL (or Relation message) that made it, when, by
    which request, and the columns from then on."""

    version: int
    committed_at: Any  # datetime | None
    command: str  # ALTER TABLE, CREATE TABLE, DROP TABLE, ... or "(first seen)" / "(relation message)"
    summary: str  # what changed, in words
    request_id: str | None
    context: dict[str, Any] | None
    name: str  # the table's name from this version on
    columns: tuple[str, ...]
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "version_lsn": format_lsn(self.version),
            "committed_at": self.committed_at.isoformat() if self.committed_at is not None else None,
            "command": self.command,
            "summary": self.summary,
            "request_id": self.request_id,
            "context": self.context,
            "name": self.name,
            "columns": list(self.columns),
            "details": self.details,
        }


def summarize(command: str, details: dict[str, Any]) -> str:
    """``renamed column a → b; added c (default 'x'); ...`` (no row values: defaults are the
    DDL's own constants)."""
    parts: list[str] = []
    if details.get("created"):
        parts.append("created" if command.startswith("CREATE") else "joined capture")
    if details.get("detached"):
        parts.append("detached from its partitioned table")
    if details.get("renamed_from"):
        old = details["renamed_from"]
        parts.append(f"table renamed from {format_table(str(old[0]), str(old[1]))}")
    for old, new in (details.get("renamed") or {}).items():
        parts.append(f"column {old} renamed to {new}")
    for name, value in (details.get("added") or {}).items():
        parts.append(f"column {name} added" + (f" (existing rows: {value!r})" if value is not None else ""))
    for name in details.get("dropped") or ():
        parts.append(f"column {name} dropped")
    for change in details.get("retyped") or ():
        parts.append(f"column {change.get('name')} {change.get('from')} → {change.get('to')}")
    if details.get("rewritten"):
        parts.append("values rewritten (recorded at this version)")
    if details.get("inexact"):
        parts.append("rewritten, too large to record: history inexact from here until a backfill")
    if details.get("dropped_table"):
        parts.append("table dropped")
    if details.get("attached"):
        parts.append("attached as a partition")
    return "; ".join(parts) or "no change history sees"


def schema_versions(store: Evolution, table: str) -> list[SchemaVersion]:
    """Every schema version of ``table`` (resolved as history does), oldest first: its DDLs
    (``ddl_events``) and the shapes Relation messages announced without one."""
    info = store.table(table)
    events = store._rows(
        sql.SQL(
            "SELECT position, committed_at, command, details, request_id, context FROM {} "
            "WHERE table_id = %(t)s ORDER BY position, ordinal, seq"
        ).format(store._t("ddl_events")),
        {"t": info.table_id},
    )
    shapes = store._schemas_of(info.table_id)
    out: list[SchemaVersion] = []
    for e in events:
        position = int(e["position"])
        shape = store._schema_at(info.table_id, position)
        details = dict(e["details"] or {})
        out.append(
            SchemaVersion(
                version=position,
                committed_at=e["committed_at"],
                command=str(e["command"]),
                summary=summarize(str(e["command"]), details),
                request_id=e["request_id"],
                context=parse_json(e["context"]),
                name=store.name_at(info.table_id, position),
                columns=shape.columns if shape else (),
                details=details,
            )
        )
    # The shape capture first saw; without DDL events (relation messages only: docs/ddl.md),
    # every shape a Relation message announced.
    for i, shape in enumerate(shapes):
        if i > 0 and events:
            break
        if out and i == 0 and min(o.version for o in out) <= shape.first_position:
            continue
        out.append(
            SchemaVersion(
                version=shape.first_position,
                committed_at=None,
                command="(first seen)" if i == 0 else "(relation message)",
                summary="the shape capture first saw"
                if i == 0
                else "a new shape announced by a Relation message",
                request_id=None,
                context=None,
                name=store.name_at(info.table_id, shape.first_position),
                columns=shape.columns,
            )
        )
    return sorted(out, key=lambda v: v.version)
