"""The vocabulary of a format-1 store's migration (cdc/store/migrate.py): the format-1 tables,
the report and progress of a migration, and the run every step works in."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import structlog
from psycopg import sql

from cdc.errors import SetupError
from cdc.store.format import ChangeFlag

log = structlog.get_logger("cdc.migrate")

Conn = psycopg.Connection[Any]

#: The tables of format 1 (77587fe:sql/store.sql), renamed ``<name>_v1`` by the migration.
V1_TABLES = (
    "capture_state",
    "gaps",
    "table_schemas",
    "retention_state",
    "transactions",
    "mutations",
    "mutations_keep",
    "keyframes_retire",
    "prunes",
    "erasures",
    "actor_sequences",
    "requests",
)
V1_VIEWS = ("mutations_all",)
SUFFIX = "_v1"
#: A gap of format 1 was only ever recorded by ``cdc setup --recreate-slot``.
V1_GAP_REASON = "slot re-created (format 1)"
KEYFRAME = int(ChangeFlag.KEYFRAME)
NAMEDATALEN = 63
#: Steps that are not a format-2 table (progress only).
_INTERNAL_STEPS = frozenset({"rename", "store.sql", "check", "context spans"})


class MigrationError(SetupError):
    """The format-1 store cannot be migrated as it is (nothing was changed)."""


@dataclass(frozen=True, slots=True)
class MigrationStep:
    """Progress of one table of the migration: ``rows`` done so far (cumulative)."""

    table: str
    rows: int
    seconds: float
    done: bool = False


@dataclass(frozen=True, slots=True)
class AmbiguousName:
    """A format-1 "schema.name" with more than one dot, and how it was split."""

    text: str
    relation_oid: int
    schema_name: str
    table_name: str
    how: str  # "catalog" (the oid's name), "catalog schema", "namespace", "first dot"


@dataclass
class MigrationReport:
    """What a migration did: counts per format-2 table, the names it had to guess, warnings."""

    tables: int = 0
    table_names: int = 0
    schemas: int = 0
    rows: dict[str, int] = field(default_factory=dict)  # format-2 table -> rows written
    v1_rows: int = 0  # rows of mutations + mutations_keep converted
    ambiguous: list[AmbiguousName] = field(default_factory=list)
    dropped_tables: int = 0  # tables whose relation is gone from the source catalog
    pending_keyframes: int = 0  # staged keyframes above the floor, left out (recomputed by a prune)
    renamed: list[str] = field(default_factory=list)  # format-1 relations now named *_v1
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    steps: list[MigrationStep] = field(default_factory=list)


Progress = Callable[[MigrationStep], None]


def regclass(conn: Conn, schema: str, name: str) -> bool:
    row = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", (sql.Identifier(schema, name).as_string(conn),)
    ).fetchone()
    return bool(row and row[0])


class Run:
    """One migration: the connection, the schema, the report, and how steps are reported."""

    def __init__(self, conn: Conn, schema: str, report: MigrationReport, progress: Progress | None) -> None:
        self.conn = conn
        self.schema = schema
        self.report = report
        self.progress = progress
        self.started = time.monotonic()
        self.step_started = self.started

    def t(self, name: str) -> sql.Identifier:
        return sql.Identifier(self.schema, name)

    def v1(self, name: str) -> sql.Identifier:
        return sql.Identifier(self.schema, name + SUFFIX)

    def exec(self, query: sql.Composed | sql.SQL) -> int:
        """Run a statement; its row count."""
        cur = self.conn.execute(query)
        return max(int(cur.rowcount), 0)

    def has_v1(self, table: str) -> bool:
        return regclass(self.conn, self.schema, table + SUFFIX)

    def columns(self, table: str) -> list[str]:
        rows = self.conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 "
            "AND NOT attisdropped ORDER BY attnum",
            (sql.Identifier(self.schema, table).as_string(self.conn),),
        ).fetchall()
        return [str(r[0]) for r in rows]

    def begin_step(self) -> None:
        self.step_started = time.monotonic()

    def step(self, table: str, rows: int, *, done: bool = True) -> None:
        """Report ``rows`` of ``table`` done (cumulative); ``done`` ends the table's step."""
        seconds = time.monotonic() - self.step_started
        if done and table not in _INTERNAL_STEPS:
            self.report.rows[table] = rows
        step = MigrationStep(table, rows, seconds, done)
        if done:
            self.report.steps.append(step)
            log.info("migrate_step", table=table, rows=rows, seconds=round(seconds, 3))
        if self.progress is not None:
            self.progress(step)
