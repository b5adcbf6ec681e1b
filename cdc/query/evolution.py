"""Schema changes applied on read (docs/ddl.md): an image stored before a DDL, read at a version
after it, is given the DDL's effect: columns renamed, the value ADD COLUMN gave existing rows,
dropped columns removed. Per read, never per stored row: a table's steps (``ddl_events`` with
column changes) are read once and kept while the store's version has not moved past them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from psycopg import sql

from cdc.query.catalog import Catalog
from cdc.query.model import Row

__all__ = ["Evolution", "Step"]

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

    def ddl_steps(self, table_id: int, upto: int | None = None) -> list[Step]:
        """The table's column-changing DDLs, oldest first (read again when ``upto`` is past the
        version they were read at)."""
        cached = self._steps.get(table_id)
        if cached is not None and (upto is None or upto <= cached[0]):
            return cached[1]
        current = self.current_version() or 0
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

    def evolve(self, table_id: int, image: Row | None, since: Cursor | None, until: Cursor) -> Row | None:
        """``image`` (stored at ``since``) as the table's DDLs after it, up to ``until``, left it."""
        if image is None or since is None:
            return image
        steps = self.ddl_steps(table_id, until[0])
        for step in steps:
            if since < step.cursor <= until:
                image = step.apply(image)
        return image
