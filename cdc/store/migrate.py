"""Migration of a format-1 history store (``mutations``) to format 2 (``changes``), in place.

:func:`migrate_v1` converts the store in one store transaction (all or nothing), as
docs/store.md "Migration from format 1" says: the format-1 relations are renamed ``<name>_v1``
(with their partitions, indexes and sequences), ``sql/store.sql`` creates the format-2 tables,
and every row is converted by ``INSERT ... SELECT`` on the server (no row passes through Python):

* ``tables``/``table_names``/``table_schemas`` from the format-1 ``table_schemas`` (one table per
  relation oid, one name per distinct "schema.name" it had; a dotted text is split by the source
  catalog when a source connection is given, else at the first dot);
* ``changes`` (one per row of ``mutations`` and ``changes_keep`` one per row of
  ``mutations_keep``), into partitions with the format-1 bounds, built before they are attached
  (their indexes are built once, not maintained row by row);
* ``transactions`` with the context of their first mutation, ``context_changes`` where a later
  mutation carries another context, ``*_keep`` for the kept rows of pruned partitions;
* ``request_errors`` from ``requests`` with an error, under synthetic negative LSNs;
* the small tables (capture state, gaps, retention, prunes, erasures, actor sequences) copied.

:func:`drop_v1` drops the renamed format-1 tables once the operator has checked the result.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import structlog
from psycopg import sql

import cdc
from cdc.config import format_table
from cdc.errors import SetupError
from cdc.store.format import FORMAT_VERSION, OP_CODES, ChangeFlag
from cdc.store.retention import partition_name

__all__ = [
    "V1_TABLES",
    "AmbiguousName",
    "MigrationError",
    "MigrationReport",
    "MigrationStep",
    "drop_v1",
    "is_v1_store",
    "migrate_v1",
    "prepare_store",
    "v1_leftovers",
]

log = structlog.get_logger("cdc.migrate")

Conn = psycopg.Connection[Any]

STORE_SQL = Path(cdc.__file__).parent / "sql" / "store.sql"
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
_KEYFRAME = int(ChangeFlag.KEYFRAME)
_NAMEDATALEN = 63
#: How long the migration waits for a table lock before it gives up (nothing changed).
LOCK_TIMEOUT = "10s"
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


# ============================================================================ detection


def _regclass(conn: Conn, schema: str, name: str) -> bool:
    row = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL", (sql.Identifier(schema, name).as_string(conn),)
    ).fetchone()
    return bool(row and row[0])


def is_v1_store(conn: Conn, schema: str) -> bool:
    """A format-1 store: ``mutations`` exists and ``store_meta`` does not."""
    return _regclass(conn, schema, "mutations") and not _regclass(conn, schema, "store_meta")


def v1_leftovers(conn: Conn, schema: str) -> list[str]:
    """The renamed format-1 tables still in the store (``drop_v1`` removes them)."""
    rows = conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relkind IN ('r', 'p') AND NOT c.relispartition AND c.relname = ANY(%s) "
        "ORDER BY 1",
        (schema, [t + SUFFIX for t in V1_TABLES]),
    ).fetchall()
    return [str(r[0]) for r in rows]


def drop_v1(conn: Conn, schema: str) -> list[str]:
    """Drop the format-1 tables a migration left (``*_v1``), in one transaction; return them.

    Refused unless the store is of format 2: the ``_v1`` tables are then copies."""
    with conn.transaction():
        if not _regclass(conn, schema, "store_meta"):
            raise MigrationError(
                f"the store schema {schema!r} is not of format 2: its format-1 tables are not copies",
                hint="run `cdc setup` to migrate it first",
            )
        tables = v1_leftovers(conn, schema)
        for view in V1_VIEWS:
            conn.execute(sql.SQL("DROP VIEW IF EXISTS {}").format(sql.Identifier(schema, view + SUFFIX)))
        for name in tables:
            conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(schema, name)))
    log.info("migrate_drop_v1", schema=schema, tables=len(tables))
    return tables


def prepare_store(
    store_conn: Conn,
    schema: str,
    source_conn: Conn | None,
    *,
    drop: bool,
    did: Callable[[str], None],
    warn: Callable[[str], None],
) -> None:
    """`cdc setup`'s part, before sql/store.sql: migrate a format-1 store (a line per step) and,
    with ``drop`` (``--drop-v1``), drop the format-1 tables a migration left."""
    if is_v1_store(store_conn, schema):
        did(f"store: schema {schema} is of format 1: migrating it to format 2 in one transaction")

        def step(s: MigrationStep) -> None:
            if s.done and s.table not in ("check", "store.sql", "context spans"):
                did(f"store: migrate {s.table}: {s.rows:,} {'relations' if s.table == 'rename' else 'rows'} "
                    f"({s.seconds:.1f} s)")  # fmt: skip

        report = migrate_v1(store_conn, schema, source_conn=source_conn, progress=step)
        for name in report.ambiguous:
            warn(
                f"format-1 table name {name.text!r} (relation oid {name.relation_oid}) read as "
                f"{format_table(name.schema_name, name.table_name)} ({name.how})"
            )
        for warning in report.warnings:
            warn(warning)
        did(
            f"store: migrated {report.v1_rows:,} format-1 mutations to format 2 in {report.seconds:.1f} s; "
            f"the format-1 tables are kept as *{SUFFIX} until `cdc setup --drop-v1`"
        )
    if drop:
        dropped = drop_v1(store_conn, schema) if v1_leftovers(store_conn, schema) else []
        did(
            f"store: {len(dropped)} format-1 table(s) dropped"
            if dropped
            else "store: no format-1 tables left"
        )


# ============================================================================ names


@dataclass(frozen=True, slots=True)
class _Catalog:
    """What the source catalog says: relation oid -> (schema, name), and the schema names."""

    relations: dict[int, tuple[str, str]]
    namespaces: frozenset[str]


def _source_catalog(
    store: Conn, schema: str, source: Conn | None, oids: Sequence[int]
) -> tuple[_Catalog | None, str | None]:
    """The source catalog, when ``source`` is the server and database the store captured; else
    None and why (a warning)."""
    if source is None:
        return None, None
    recorded = store.execute(
        sql.SQL(
            "SELECT DISTINCT source_system_id, source_database FROM {} WHERE source_system_id IS NOT NULL"
        ).format(sql.Identifier(schema, "capture_state"))
    ).fetchall()
    try:
        ident = source.execute(
            "SELECT system_identifier::text, current_database() FROM pg_control_system()"
        ).fetchone()
        rows = source.execute(
            "SELECT c.oid::bigint, n.nspname, c.relname FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid::bigint = ANY(%s)",
            (list(oids),),
        ).fetchall()
        spaces = source.execute("SELECT nspname FROM pg_namespace").fetchall()
    except psycopg.Error as exc:
        return (
            None,
            f"the source catalog could not be read ({type(exc).__name__}): table names split at the first dot",
        )
    if (
        ident is not None
        and recorded
        and all((r[0], r[1] or ident[1]) != (ident[0], ident[1]) for r in recorded)
    ):
        return (
            None,
            "the source given is not the database this store captured: table names split at the first dot",
        )
    return _Catalog(
        {int(r[0]): (str(r[1]), str(r[2])) for r in rows}, frozenset(str(r[0]) for r in spaces)
    ), None


def split_name(text: str, oid: int, catalog: _Catalog | None) -> tuple[str, str, str | None]:
    """Split a format-1 "schema.name" into (schema, name, how); ``how`` is None when unambiguous."""
    dots = [i for i, ch in enumerate(text) if ch == "."]
    if not dots:
        return "public", text, "no dot"
    candidates = [(text[:i], text[i + 1 :]) for i in dots]
    if len(candidates) == 1:
        return candidates[0][0], candidates[0][1], None
    if catalog is not None:
        current = catalog.relations.get(oid)
        if current is not None and current in candidates:
            return current[0], current[1], "catalog"
        if current is not None:
            same = [c for c in candidates if c[0] == current[0]]
            if len(same) == 1:
                return same[0][0], same[0][1], "catalog schema"
        known = [c for c in candidates if c[0] in catalog.namespaces]
        if len(known) == 1:
            return known[0][0], known[0][1], "namespace"
    return candidates[0][0], candidates[0][1], "first dot"


@dataclass
class _Table:
    table_id: int
    relation_oid: int
    first_position: int
    names: list[tuple[str, str, int]]  # (schema, name, from_position)
    dropped: bool = False


def _plan_tables(
    schema_rows: Iterable[tuple[int, str, int, int]], catalog: _Catalog | None, report: MigrationReport
) -> tuple[list[_Table], dict[int, int]]:
    """Tables by relation oid from (schema_id, text, oid, first_position); schema_id -> table_id."""
    by_oid: dict[int, list[tuple[int, int, str]]] = {}
    for schema_id, text, oid, first in schema_rows:
        by_oid.setdefault(oid, []).append((first, schema_id, text))
    tables: list[_Table] = []
    table_of: dict[int, int] = {}
    seen_ambiguous: set[tuple[str, int]] = set()
    for table_id, oid in enumerate(sorted(by_oid, key=lambda o: (min(by_oid[o])[0], o)), start=1):
        rows = sorted(by_oid[oid])
        table = _Table(table_id, oid, rows[0][0], [])
        last_text: str | None = None
        for first, schema_id, text in rows:
            table_of[schema_id] = table_id
            if text == last_text:
                continue
            last_text = text
            nsp, name, how = split_name(text, oid, catalog)
            if how is not None and (text, oid) not in seen_ambiguous:
                seen_ambiguous.add((text, oid))
                report.ambiguous.append(AmbiguousName(text, oid, nsp, name, how))
            start = table.first_position if not table.names else first
            if table.names and table.names[-1][2] == start:
                table.names[-1] = (nsp, name, start)  # two names at one position: the later wins
            else:
                table.names.append((nsp, name, start))
        table.dropped = catalog is not None and oid not in catalog.relations
        tables.append(table)
    live: dict[tuple[str, str], list[int]] = {}
    for t in tables:
        if not t.dropped:
            live.setdefault(t.names[-1][:2], []).append(t.relation_oid)
    for (nsp, name), oids in live.items():
        if len(oids) > 1:
            report.warnings.append(
                f"{len(oids)} tables (relation oids {', '.join(map(str, oids))}) are now named {nsp}.{name}: "
                "run the migration with the source reachable to tell them apart"
            )
    return tables, table_of


# ============================================================================ partitions


@dataclass(frozen=True, slots=True)
class _Part:
    """A partition of a format-1 table (after its rename), or the table itself if not partitioned."""

    name: str
    bound: str | None  # "FOR VALUES FROM (...) TO (...)", "DEFAULT"; None: not a partition
    lo: datetime | None
    hi: datetime | None

    @property
    def default(self) -> bool:
        return self.bound == "DEFAULT"


def _parts(conn: Conn, schema: str, table: str) -> list[_Part]:
    kind = conn.execute(
        "SELECT relkind FROM pg_class WHERE oid = to_regclass(%s)",
        (sql.Identifier(schema, table).as_string(conn),),
    ).fetchone()
    if kind is None:
        return []
    if kind[0] != "p":
        return [_Part(table, None, None, None)]
    rows = conn.execute(
        "SELECT c.relname, b.bound, "
        "  CASE WHEN f.v IS NULL OR f.v = 'MINVALUE' THEN NULL ELSE btrim(f.v, '''')::timestamptz END, "
        "  CASE WHEN t.v IS NULL OR t.v = 'MAXVALUE' THEN NULL ELSE btrim(t.v, '''')::timestamptz END "
        "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "CROSS JOIN LATERAL (SELECT pg_get_expr(c.relpartbound, c.oid) AS bound) b "
        "CROSS JOIN LATERAL (SELECT substring(b.bound FROM 'FROM \\((.*)\\) TO') AS v) f "
        "CROSS JOIN LATERAL (SELECT substring(b.bound FROM ' TO \\((.*)\\)$') AS v) t "
        "WHERE i.inhparent = to_regclass(%s) ORDER BY 3 NULLS FIRST, 1",
        (sql.Identifier(schema, table).as_string(conn),),
    ).fetchall()
    return [_Part(str(r[0]), str(r[1]), r[2], r[3]) for r in rows]


def _target_name(parent: str, part: _Part, taken: set[str]) -> str:
    base = (
        parent + "_default"
        if part.default
        else partition_name(parent, part.lo)
        if part.lo
        else parent + "_pmin"
    )
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    taken.add(name)
    return name


# ============================================================================ the migration


class _Run:
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
        return _regclass(self.conn, self.schema, table + SUFFIX)

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


def migrate_v1(
    store_conn: Conn, schema: str, *, source_conn: Conn | None = None, progress: Progress | None = None
) -> MigrationReport:
    """Convert the format-1 store in ``schema`` to format 2, in one transaction; see the module doc.

    ``store_conn`` must not be inside a transaction (this commits, or rolls everything back on
    any error, a failing ``progress`` callback included). ``source_conn`` (the captured
    database) splits dotted table names by relation oid and finds tables dropped since.
    """
    if store_conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise MigrationError("migrate_v1 needs a connection outside any transaction")
    report = MigrationReport()
    run = _Run(store_conn, schema, report, progress)
    log.info("migrate_start", schema=schema)
    try:
        with store_conn.transaction():
            _migrate(run, source_conn)
    except psycopg.errors.LockNotAvailable:
        raise MigrationError(
            f"the store schema {schema!r} is in use: its tables stayed locked for {LOCK_TIMEOUT}",
            hint="stop `cdc run`, `cdc serve` and any prune, then run `cdc setup` again",
        ) from None
    report.seconds = time.monotonic() - run.started
    log.info("migrate_done", schema=schema, rows=report.v1_rows, seconds=round(report.seconds, 3))
    return report


def _migrate(run: _Run, source: Conn | None) -> None:
    conn, schema, report = run.conn, run.schema, run.report
    if not is_v1_store(conn, schema):
        raise MigrationError(
            f"the store schema {schema!r} is not of format 1 (no mutations table, or a store_meta)"
        )
    conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(LOCK_TIMEOUT)))
    conn.execute("SET LOCAL statement_timeout = 0")
    conn.execute("SET LOCAL work_mem = '256MB'")
    conn.execute("SET LOCAL maintenance_work_mem = '512MB'")
    _lock_out_writers(run)
    conn.execute(sql.SQL("SET LOCAL search_path = {}").format(sql.Identifier(schema)))

    schema_rows = [
        (int(r[0]), str(r[1]), int(r[2]), int(r[3]))
        for r in conn.execute(
            sql.SQL(
                "SELECT schema_id, table_name, relation_oid, first_position FROM {} ORDER BY schema_id"
            ).format(run.t("table_schemas"))
        ).fetchall()
    ]
    catalog, problem = _source_catalog(conn, schema, source, sorted({r[2] for r in schema_rows}))
    if problem:
        report.warnings.append(problem)
    tables, table_of = _plan_tables(schema_rows, catalog, report)
    for name in report.ambiguous:
        log.warning("migrate_ambiguous_name", oid=name.relation_oid, schema_name=name.schema_name,
                    table_name=name.table_name, how=name.how)  # fmt: skip

    mutation_parts = _parts(conn, schema, "mutations")
    transaction_parts = _parts(conn, schema, "transactions")
    _rename_v1(run)
    mutation_parts = [_Part(_v1_name(p.name), p.bound, p.lo, p.hi) for p in mutation_parts]
    transaction_parts = [_Part(_v1_name(p.name), p.bound, p.lo, p.hi) for p in transaction_parts]

    run.begin_step()
    conn.execute(STORE_SQL.read_text().encode())  # a trusted file shipped with the package
    run.step("store.sql", 0)

    _tables(run, tables, table_of)
    _check_schema_ids(run)
    floor = _floor(run)
    _changes(run, mutation_parts, transaction_parts, floor)
    _name_timelines(run, tables, catalog)
    _spans(run, mutation_parts)
    _transactions(run)
    _request_errors(run)
    _small_tables(run, tables)
    conn.execute(
        sql.SQL("UPDATE {} SET format_version = %s, updated_at = now()").format(run.t("store_meta")),
        (FORMAT_VERSION,),
    )


def _lock_out_writers(run: _Run) -> None:
    """Refuse while a daemon or a prune works on the store; keep them out until the commit."""
    conn = run.conn
    slots = [
        str(r[0])
        for r in conn.execute(sql.SQL("SELECT slot_name FROM {}").format(run.t("capture_state"))).fetchall()
    ]
    for slot in slots:
        row = conn.execute(
            "SELECT pg_try_advisory_xact_lock(hashtext(%s))", (f"cdc:{run.schema}:{slot}",)
        ).fetchone()
        if not row or not row[0]:
            raise MigrationError(
                f"a cdc daemon is active on slot {slot!r} of this store",
                hint="stop it (`cdc run`) before `cdc setup` migrates the store",
            )
    row = conn.execute(
        "SELECT pg_try_advisory_xact_lock(hashtext(%s))", (f"cdc:partitions:{run.schema}",)
    ).fetchone()
    if not row or not row[0]:
        raise MigrationError(
            "a prune or partition change is running on this store", hint="wait for it, then retry"
        )
    present = [t for t in ("mutations", "mutations_keep", "transactions") if _regclass(conn, run.schema, t)]
    conn.execute(
        sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(
            sql.SQL(", ").join(run.t(t) for t in present)
        )
    )


def _v1_name(name: str) -> str:
    if len(name.encode()) + len(SUFFIX) <= _NAMEDATALEN:
        return name + SUFFIX
    return name.encode()[: _NAMEDATALEN - len(SUFFIX)].decode(errors="ignore") + SUFFIX


def _rename_v1(run: _Run) -> None:
    """Rename the format-1 tables, their partitions, indexes and sequences, and its view, ``*_v1``."""
    conn, schema = run.conn, run.schema
    run.begin_step()
    for view in V1_VIEWS:
        if _regclass(conn, schema, view):
            conn.execute(
                sql.SQL("ALTER VIEW {} RENAME TO {}").format(run.t(view), sql.Identifier(view + SUFFIX))
            )
            run.report.renamed.append(view + SUFFIX)
    present = [t for t in V1_TABLES if _regclass(conn, schema, t)]
    # every table with its partitions, then their indexes and owned sequences
    rels = conn.execute(
        "WITH RECURSIVE t(oid) AS ("
        "  SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "  WHERE n.nspname = %s AND c.relname = ANY(%s) "
        "  UNION SELECT i.inhrelid FROM pg_inherits i JOIN t ON i.inhparent = t.oid) "
        "SELECT c.relname, c.relkind, c.relispartition FROM t JOIN pg_class c ON c.oid = t.oid "
        "UNION ALL SELECT ic.relname, ic.relkind, false FROM t JOIN pg_index x ON x.indrelid = t.oid "
        "  JOIN pg_class ic ON ic.oid = x.indexrelid "
        "UNION ALL SELECT s.relname, s.relkind, false FROM t JOIN pg_depend d ON d.refobjid = t.oid "
        "  AND d.classid = 'pg_class'::regclass AND d.deptype IN ('a', 'i') "
        "  JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'",
        (schema, present),
    ).fetchall()
    for name, kind, is_partition in rels:
        new = _v1_name(str(name))
        if _regclass(conn, schema, new):
            raise MigrationError(
                f"the store already has a relation named {new!r}: a format-1 name cannot move there"
            )
        statement = {"r": "TABLE", "p": "TABLE", "i": "INDEX", "I": "INDEX", "S": "SEQUENCE"}[str(kind)]
        conn.execute(
            sql.SQL("ALTER {} {} RENAME TO {}").format(
                sql.SQL(statement), run.t(str(name)), sql.Identifier(new)
            )
        )
        if kind in ("r", "p") and not is_partition:
            run.report.renamed.append(new)
    run.step("rename", len(rels))


def _tables(run: _Run, tables: list[_Table], table_of: dict[int, int]) -> None:
    """tables, table_names, table_schemas (schema ids kept), and the schema map the changes use."""
    conn = run.conn
    run.begin_step()
    acked = conn.execute(sql.SQL("SELECT max(acked_lsn) FROM {}").format(run.v1("capture_state"))).fetchone()
    dropped_at = int(acked[0]) if acked and acked[0] is not None else None
    with conn.cursor() as cur:
        cur.executemany(
            sql.SQL(
                "INSERT INTO {} (table_id, relation_oid, first_position, dropped_position) VALUES (%s, %s, %s, %s)"
            ).format(run.t("tables")),
            [
                (
                    t.table_id,
                    t.relation_oid,
                    t.first_position,
                    (dropped_at if dropped_at is not None else t.first_position) if t.dropped else None,
                )
                for t in tables
            ],
        )
        cur.executemany(
            sql.SQL(
                "INSERT INTO {} (table_id, schema_name, table_name, from_position) VALUES (%s, %s, %s, %s)"
            ).format(run.t("table_names")),
            [(t.table_id, nsp, name, start) for t in tables for nsp, name, start in t.names],
        )
    run.report.tables = len(tables)
    run.report.table_names = sum(len(t.names) for t in tables)
    run.report.dropped_tables = sum(t.dropped for t in tables)
    conn.execute(
        sql.SQL("SELECT setval(pg_get_serial_sequence({}, 'table_id'), greatest(%s, 1), %s)").format(
            sql.Literal(run.t("tables").as_string(conn))
        ),
        (len(tables), bool(tables)),
    )
    run.step("tables", len(tables))
    run.begin_step()
    conn.execute(
        "CREATE TEMP TABLE _cdc_mig_table_of (schema_id integer PRIMARY KEY, table_id integer NOT NULL) ON COMMIT DROP"
    )
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO _cdc_mig_table_of VALUES (%s, %s)", sorted(table_of.items()))
    rows = run.exec(
        sql.SQL(
            "INSERT INTO {s2} (schema_id, table_id, replica_identity, key_columns, columns, fingerprint, "
            "first_position, first_seen_at) "
            'SELECT s.schema_id, m.table_id, s.replica_identity::"char", s.key_columns, s.columns, s.fingerprint, '
            "s.first_position, s.first_seen_at FROM {s1} s JOIN _cdc_mig_table_of m USING (schema_id)"
        ).format(s2=run.t("table_schemas"), s1=run.v1("table_schemas"))
    )
    conn.execute(
        sql.SQL(
            "SELECT setval(pg_get_serial_sequence({}, 'schema_id'), greatest((SELECT max(schema_id) FROM {}), 1), "
            "(SELECT count(*) > 0 FROM {}))"
        ).format(
            sql.Literal(run.t("table_schemas").as_string(conn)),
            run.t("table_schemas"),
            run.t("table_schemas"),
        )
    )
    # What the changes need of each schema row: its table, the key columns in key order (all
    # columns in table order for a table without a key), whether the WAL sent whole old rows, and
    # its columns in table order with their JSON member prefixes ('"name": ').
    conn.execute(
        sql.SQL(
            "CREATE TEMP TABLE _cdc_mig_schemas ON COMMIT DROP AS "
            "SELECT s.schema_id, s.table_id, k.kc, cardinality(k.kc) AS n, s.replica_identity = 'f' AS whole_row, "
            "  c.cols, c.members "
            "FROM {} s CROSS JOIN LATERAL (SELECT "
            "  ARRAY(SELECT e->>'name' FROM jsonb_array_elements(s.columns) WITH ORDINALITY x(e, i) ORDER BY i) AS cols, "
            "  ARRAY(SELECT to_json(e->>'name')::text || ': ' FROM jsonb_array_elements(s.columns) "
            "    WITH ORDINALITY x(e, i) ORDER BY i) AS members) c "
            "CROSS JOIN LATERAL (SELECT CASE WHEN cardinality(s.key_columns) > 0 THEN s.key_columns "
            "  ELSE c.cols END AS kc) k"
        ).format(run.t("table_schemas"))
    )
    conn.execute("ALTER TABLE _cdc_mig_schemas ADD PRIMARY KEY (schema_id)")
    run.report.schemas = rows
    run.step("table_schemas", rows)


def _name_timelines(run: _Run, tables: list[_Table], catalog: _Catalog | None) -> None:
    """The names of a table that had several, from its changes: a schema row's first position
    misses a rename back to an earlier name (format 1 reused that name's schema row). Each change
    follows the Relation message in force, so the name changes where its schema row's name does;
    renames in pruned history keep the positions of their schema rows."""
    run.begin_step()
    renamed = [t for t in tables if len({(n[0], n[1]) for n in t.names}) > 1]
    for table in renamed:
        timeline = run.conn.execute(
            sql.SQL(
                "SELECT position, text FROM (SELECT c.position, s.table_name AS text, "
                "  lag(s.table_name) OVER (ORDER BY c.position, c.ordinal) AS prev "
                "  FROM (SELECT position, ordinal, schema_id FROM {c} WHERE table_id = %(t)s AND flags & {kf} = 0 "
                "        UNION ALL SELECT position, ordinal, schema_id FROM {k} WHERE table_id = %(t)s "
                "        AND flags & {kf} = 0) c "
                "  JOIN {s} s ON s.schema_id = c.schema_id) x "
                "WHERE prev IS DISTINCT FROM text ORDER BY position"
            ).format(
                c=run.t("changes"),
                k=run.t("changes_keep"),
                s=run.v1("table_schemas"),
                kf=sql.Literal(_KEYFRAME),
            ),
            {"t": table.table_id},
        ).fetchall()
        if not timeline:
            continue
        first_change = int(timeline[0][0])
        names = [n for n in table.names if n[2] < first_change]
        for position, text in timeline:
            nsp, name, _how = split_name(str(text), table.relation_oid, catalog)
            if names and names[-1][:2] == (nsp, name):
                continue
            names.append((nsp, name, int(position)))
        names[0] = (names[0][0], names[0][1], table.first_position)
        if names == table.names:
            continue
        table.names = names
        run.conn.execute(
            sql.SQL("DELETE FROM {} WHERE table_id = %s").format(run.t("table_names")), (table.table_id,)
        )
        with run.conn.cursor() as cur:
            cur.executemany(
                sql.SQL(
                    "INSERT INTO {} (table_id, schema_name, table_name, from_position) VALUES (%s, %s, %s, %s)"
                ).format(run.t("table_names")),
                [(table.table_id, nsp, name, start) for nsp, name, start in names],
            )
    run.report.table_names = sum(len(t.names) for t in tables)
    run.step("table_names", run.report.table_names)


def _check_schema_ids(run: _Run) -> None:
    """Every mutation names its schema row (format 1 always wrote one); refuse the rest."""
    run.begin_step()
    sources = [run.v1("mutations")] + ([run.v1("mutations_keep")] if run.has_v1("mutations_keep") else [])
    bad = run.conn.execute(
        sql.SQL(" UNION ").join(
            sql.SQL(
                "(SELECT DISTINCT m.table_name, m.schema_id FROM {} m WHERE NOT EXISTS "
                "(SELECT 1 FROM _cdc_mig_schemas s WHERE s.schema_id = m.schema_id) LIMIT 20)"
            ).format(src)
            for src in sources
        )
    ).fetchall()
    if bad:
        names = ", ".join(f"{r[0]} (schema id {r[1]})" for r in bad)
        raise MigrationError(
            f"mutations without a schema row in table_schemas: {names}",
            hint="the format-1 store is inconsistent; nothing was changed",
        )
    run.step("check", 0)


def _floor(run: _Run) -> int | None:
    row = run.conn.execute(
        sql.SQL("SELECT max(history_floor) FROM {}").format(run.v1("capture_state"))
    ).fetchone()
    return int(row[0]) if row and row[0] is not None else None


def _key_text(column: str) -> sql.Composable:
    """``jsonb_build_array(<column>-><key columns in order>)::text``, NULL when ``column`` is."""
    c = sql.SQL(column)
    direct = [
        sql.SQL("WHEN s.n = {} THEN jsonb_build_array({})").format(
            sql.Literal(n),
            sql.SQL(", ").join(sql.SQL("{} -> s.kc[{}]").format(c, sql.Literal(i)) for i in range(1, n + 1)),
        )
        for n in range(1, 5)
    ]
    return sql.SQL(
        "(CASE WHEN {c} IS NULL THEN NULL WHEN s.n = 0 THEN jsonb_build_array() {direct} "
        "ELSE (SELECT jsonb_agg({c} -> u.c ORDER BY u.i) FROM unnest(s.kc) WITH ORDINALITY u(c, i)) END)::text"
    ).format(c=c, direct=sql.SQL(" ").join(direct))


#: Columns spelled out one by one in an image's expression; wider tables take a slower path.
_IMAGE_TERMS = 64


def _image(value: str, terms: int) -> sql.Composable:
    """The text of the jsonb object ``value`` with its members in table order (docs/store.md
    "Images and values"), spelled as jsonb prints it: ``concat_ws`` of the schema row's first
    ``terms`` columns (a subquery over all of them for a wider table); jsonb's own text when the
    object has a member the schema row does not list."""
    v = sql.SQL(value)
    members = sql.SQL(", ").join(
        sql.SQL("CASE WHEN {v} ? s.cols[{i}] THEN s.members[{i}] || ({v} -> s.cols[{i}])::text END").format(
            v=v, i=sql.Literal(i)
        )
        for i in range(1, terms + 1)
    )
    return sql.SQL(
        "(CASE WHEN {v} IS NULL THEN NULL WHEN ({v} - s.cols) <> '{{}}'::jsonb THEN ({v})::text "
        "WHEN cardinality(s.cols) <= {terms} THEN '{{' || concat_ws(', ', {members}) || '}}' "
        "ELSE (SELECT '{{' || coalesce(string_agg(u.p || ({v} -> u.c)::text, ', ' ORDER BY u.i), '') || '}}' "
        "  FROM unnest(s.cols, s.members) WITH ORDINALITY u(c, p, i) WHERE {v} ? u.c) END)"
    ).format(v=v, terms=sql.Literal(terms), members=members)


_OP = sql.SQL('(CASE m.op {} END)::"char"').format(
    sql.SQL(" ").join(
        sql.SQL("WHEN {} THEN {}").format(sql.Literal(n), sql.Literal(c)) for n, c in OP_CODES.items()
    )
)
_CHANGE_COLUMNS = sql.SQL(
    "position, ordinal, committed_at, table_id, schema_id, op, flags, lsn, xid, key_text, image, before, old_key_text"
)


def _changes_select(
    source: sql.Composable, transactions: sql.Composable, part: _Part | None, keep: bool, terms: int
) -> sql.Composable:
    """The SELECT turning the mutations of ``source`` into changes (``terms``: see _image)."""
    bounds: list[sql.Composable] = []
    if part is not None and part.lo is not None:
        bounds.append(sql.SQL("AND t.committed_at >= {}").format(sql.Literal(part.lo)))
    if part is not None and part.hi is not None:
        bounds.append(sql.SQL("AND t.committed_at < {}").format(sql.Literal(part.hi)))
    return sql.SQL(
        "SELECT m.position, m.ordinal, m.committed_at, s.table_id, m.schema_id, {op}, "
        "((CASE WHEN m.version IS NULL THEN {rb} ELSE 0 END) "
        " | (CASE WHEN m.op = 'UPDATE' AND s.whole_row AND m.before IS NOT NULL THEN {bw} ELSE 0 END) "
        " | (CASE WHEN m.op <> 'TRUNCATE' AND NOT coalesce(m.key ?& s.kc, false) THEN {ku} ELSE 0 END) "
        " | {kf})::smallint, "
        "m.lsn, {xid}, {key}, "
        "CASE m.op WHEN 'TRUNCATE' THEN NULL "
        "  WHEN 'DELETE' THEN {deleted} ELSE {after} END, "
        "CASE WHEN m.op = 'UPDATE' AND s.whole_row THEN {before} END, {old_key} "
        "FROM {src} m JOIN _cdc_mig_schemas s ON s.schema_id = m.schema_id "
        "LEFT JOIN {txn} t ON t.position = m.position AND t.committed_at = m.committed_at {bounds}"
    ).format(
        op=_OP,
        rb=sql.Literal(int(ChangeFlag.ROLLED_BACK)),
        bw=sql.Literal(int(ChangeFlag.BEFORE_FROM_WAL)),
        ku=sql.Literal(int(ChangeFlag.KEY_UNKNOWN)),
        kf=sql.SQL("(CASE WHEN m.keyframe THEN {} ELSE 0 END)").format(sql.Literal(_KEYFRAME))
        if keep
        else sql.SQL("0"),
        # the transaction's own xid is implied; keyframes belong to no transaction
        xid=sql.SQL(
            "CASE WHEN m.keyframe THEN NULL ELSE nullif(m.xid, t.xid) END" if keep else "nullif(m.xid, t.xid)"
        ),
        key=_key_text("m.key"),
        old_key=_key_text("m.old_key"),
        deleted=sql.SQL("(CASE WHEN s.whole_row AND m.before IS NOT NULL THEN {} ELSE {} END)").format(
            _image("m.before", terms), _image("m.key", terms)
        ),
        after=_image("m.after", terms),
        before=_image("m.before", terms),
        src=source,
        txn=transactions,
        bounds=sql.SQL(" ").join(bounds),
    )


def _pending_keyframes(floor: int | None) -> sql.Composable:
    """The condition selecting the kept rows to migrate: not the staged (pending) keyframes."""
    if floor is None:
        return sql.SQL("NOT m.keyframe")
    return sql.SQL("(NOT m.keyframe OR m.position <= {})").format(sql.Literal(floor))


def _changes(
    run: _Run, mutation_parts: list[_Part], transaction_parts: list[_Part], floor: int | None
) -> None:
    """changes (partition by partition, attached once filled) and changes_keep."""
    conn = run.conn
    run.begin_step()
    taken: set[str] = set()
    done = 0
    transactions = run.v1("transactions")
    widest = conn.execute("SELECT coalesce(max(cardinality(cols)), 0) FROM _cdc_mig_schemas").fetchone()
    terms = max(1, min(int(widest[0]) if widest else 0, _IMAGE_TERMS))
    for part in mutation_parts:
        source = run.t(part.name)
        if part.bound is None or part.default:
            # the format-1 table was not partitioned, or its default partition: through the parent
            target = run.t("changes")
            done += run.exec(
                sql.SQL("INSERT INTO {} ({}) ").format(target, _CHANGE_COLUMNS)
                + _changes_select(source, transactions, None, keep=False, terms=terms)
            )
            run.step("changes", done, done=False)
            continue
        name = _target_name("changes", part, taken)
        table = run.t(name)
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING GENERATED)"
            ).format(table, run.t("changes"))
        )
        if part.lo is not None and part.hi is not None:
            # a constraint matching the bound lets ATTACH skip its scan
            conn.execute(
                sql.SQL(
                    "ALTER TABLE {} ADD CONSTRAINT {} CHECK (committed_at >= {} AND committed_at < {})"
                ).format(
                    table,
                    sql.Identifier(f"{name}_bound"[:_NAMEDATALEN]),
                    sql.Literal(part.lo),
                    sql.Literal(part.hi),
                )
            )
        done += run.exec(
            sql.SQL("INSERT INTO {} ({}) ").format(table, _CHANGE_COLUMNS)
            + _changes_select(source, transactions, part, keep=False, terms=terms)
        )
        conn.execute(
            sql.SQL("ALTER TABLE {} ATTACH PARTITION {} {}").format(
                run.t("changes"), table, sql.SQL(part.bound)
            )
        )
        run.step("changes", done, done=False)
    run.step("changes", done)
    for part in transaction_parts:
        if part.bound is None or part.default:
            continue
        for parent in ("transactions", "context_changes"):
            name = _target_name(parent, part, taken)
            conn.execute(
                sql.SQL("CREATE TABLE {} PARTITION OF {} {}").format(
                    run.t(name), run.t(parent), sql.SQL(part.bound)
                )
            )
    run.report.v1_rows = done
    run.begin_step()
    kept = 0
    if run.has_v1("mutations_keep"):
        kept = run.exec(
            sql.SQL("INSERT INTO {} ({}) ").format(run.t("changes_keep"), _CHANGE_COLUMNS)
            + _changes_select(run.v1("mutations_keep"), transactions, None, keep=True, terms=terms)
            + sql.SQL(" WHERE ")
            + _pending_keyframes(floor)
        )
        pending = conn.execute(
            sql.SQL("SELECT count(*) FROM {} m WHERE NOT ").format(run.v1("mutations_keep"))
            + _pending_keyframes(floor)
        ).fetchone()
        run.report.pending_keyframes = int(pending[0]) if pending else 0
        if run.report.pending_keyframes:
            run.report.warnings.append(
                f"{run.report.pending_keyframes} staged keyframe(s) of an unfinished prune were left out "
                "(the next `cdc prune` computes them again)"
            )
    run.report.v1_rows += kept
    run.step("changes_keep", kept)


def _spans(run: _Run, mutation_parts: list[_Part]) -> None:
    """Each transaction's context spans: its first mutation, and every later one whose context
    (request id, actor, context document) differs from the previous mutation's, or whose actor
    sequence number does not follow it (so that ``actor_seq + k`` gives every mutation's).
    First rows also carry what a transaction missing from format-1 ``transactions`` needs.

    One format-1 partition at a time (a transaction's mutations share its commit time, so one
    partition holds them all, but see below): each sort stays in memory."""
    run.begin_step()
    run.conn.execute(
        "CREATE TEMP TABLE _cdc_mig_spans (position bigint, ordinal integer, committed_at timestamptz, "
        "keep boolean, first boolean, n bigint, xid bigint, committed boolean, request_id text, actor text, "
        "actor_seq bigint, context text) ON COMMIT DROP"
    )
    sources: list[tuple[sql.Composable, bool]] = [(run.t(p.name), False) for p in mutation_parts]
    if run.has_v1("mutations_keep"):
        sources.append((run.v1("mutations_keep"), True))
    done = 0
    for source, keep in sources:
        done += run.exec(
            sql.SQL(
                "INSERT INTO _cdc_mig_spans SELECT position, ordinal, committed_at, {keep}, prev IS NULL, n, xid_min, "
                "  committed, request_id, actor, actor_seq, context::text FROM ("
                "  SELECT m.position, m.ordinal, m.committed_at, m.request_id, m.actor, m.actor_seq, m.context, "
                "    lag(m.ordinal) OVER w AS prev, "
                "    (m.request_id, m.actor, m.context) IS DISTINCT FROM "
                "      (lag(m.request_id) OVER w, lag(m.actor) OVER w, lag(m.context) OVER w) "
                "      OR m.actor_seq IS DISTINCT FROM lag(m.actor_seq) OVER w + 1 AS differs, "
                "    count(*) OVER p AS n, min(m.xid) OVER p AS xid_min, "
                "    bool_or(m.version IS NOT NULL) OVER p AS committed "
                "  FROM {src} m WHERE {which} "
                "  WINDOW w AS (PARTITION BY m.position ORDER BY m.ordinal), p AS (PARTITION BY m.position)"
                ") x WHERE prev IS NULL OR differs"
            ).format(keep=sql.Literal(keep), src=source, which=sql.SQL("NOT m.keyframe" if keep else "true"))
        )
        run.step("context spans", done, done=False)
    # A rolled-back transaction written again after a crash with another abort time (before
    # PostgreSQL 16) may have mutations under two commit times: one first row per transaction.
    split = run.exec(
        sql.SQL(
            "UPDATE _cdc_mig_spans s SET first = false FROM (SELECT position, min(ordinal) AS o "
            "FROM _cdc_mig_spans WHERE first GROUP BY position HAVING count(*) > 1) d "
            "WHERE s.first AND s.position = d.position AND s.ordinal > d.o"
        )
    )
    if split:
        run.report.warnings.append(f"{split} transaction(s) had mutations under two commit times")
    run.conn.execute("CREATE INDEX ON _cdc_mig_spans (position) WHERE first")
    run.conn.execute("ANALYZE _cdc_mig_spans")
    run.step("context spans", done)


_TXN_COLUMNS = sql.SQL(
    "position, committed_at, xid, commit_lsn, status, flags, origin, change_count, request_id, actor, actor_seq, "
    "context"
)
_CTX_COLUMNS = sql.SQL("position, committed_at, from_ordinal, request_id, actor, actor_seq, context")


def _transactions(run: _Run) -> None:
    """transactions (format-1 rows with their first context), those format 1 lost (the kept rows
    of pruned partitions: transactions_keep), context_changes and context_changes_keep."""
    v1 = run.v1("transactions")
    no_v1_row = sql.SQL("NOT EXISTS (SELECT 1 FROM {} t WHERE t.position = s.position)").format(v1)
    run.begin_step()
    rows = run.exec(
        sql.SQL(
            "INSERT INTO {t2} ({cols}) SELECT t.position, t.committed_at, t.xid, t.commit_lsn, "
            "(CASE WHEN t.status = 'committed' THEN 'c' ELSE 'r' END)::\"char\", 0, t.origin, t.mutation_count, "
            "s.request_id, s.actor, s.actor_seq, s.context "
            "FROM {v1} t LEFT JOIN _cdc_mig_spans s ON s.first AND s.position = t.position"
        ).format(t2=run.t("transactions"), cols=_TXN_COLUMNS, v1=v1)
    )
    synthesized = sql.SQL(
        "INSERT INTO {} ({}) SELECT s.position, s.committed_at, s.xid, NULL, "
        "(CASE WHEN s.committed THEN 'c' ELSE 'r' END)::\"char\", 0, NULL, s.n, s.request_id, s.actor, "
        "s.actor_seq, s.context FROM _cdc_mig_spans s WHERE s.first AND s.keep = {} AND {}"
    )
    missing = run.exec(synthesized.format(run.t("transactions"), _TXN_COLUMNS, sql.Literal(False), no_v1_row))
    if missing:
        run.report.warnings.append(
            f"{missing} transaction(s) missing from format-1 transactions were rebuilt from their mutations"
        )
    run.step("transactions", rows + missing)
    run.begin_step()
    kept = run.exec(
        synthesized.format(run.t("transactions_keep"), _TXN_COLUMNS, sql.Literal(True), no_v1_row)
    )
    run.step("transactions_keep", kept)
    contexts = sql.SQL(
        "INSERT INTO {} ({}) SELECT s.position, s.committed_at, s.ordinal, s.request_id, s.actor, s.actor_seq, "
        "s.context FROM _cdc_mig_spans s WHERE NOT s.first AND {}"
    )
    run.begin_step()
    rows = run.exec(
        contexts.format(
            run.t("context_changes"), _CTX_COLUMNS, sql.SQL("(NOT s.keep OR NOT {})").format(no_v1_row)
        )
    )
    run.step("context_changes", rows)
    run.begin_step()
    rows = run.exec(
        contexts.format(
            run.t("context_changes_keep"), _CTX_COLUMNS, sql.SQL("s.keep AND {}").format(no_v1_row)
        )
    )
    run.step("context_changes_keep", rows)


def _request_errors(run: _Run) -> None:
    """request_errors from the requests with an error. Format 1 kept no LSN of the error message:
    each gets a synthetic negative one (-1, -2, ... in time order), so none can meet a real one.
    Format 1's messages were unsigned (any role could write one): no reporter is recorded, so
    readers show them as unverified, never as a request's root cause (docs/security.md)."""
    run.begin_step()
    rows = 0
    if run.has_v1("requests"):
        rows = run.exec(
            sql.SQL(
                "INSERT INTO {} (lsn, request_id, reported_at, error_type, message, location) "
                "SELECT -row_number() OVER (ORDER BY coalesce(r.error_at, r.last_seen_at), r.request_id), "
                "r.request_id, coalesce(r.error_at, r.last_seen_at), r.error_type, r.error_message, r.error_location "
                "FROM {} r WHERE r.error_type IS NOT NULL OR r.error_message IS NOT NULL"
            ).format(run.t("request_errors"), run.v1("requests"))
        )
    run.step("request_errors", rows)


def _copy_common(
    run: _Run,
    table: str,
    values: dict[str, sql.Composable] | None = None,
    where: sql.Composable | None = None,
) -> int:
    """Copy the rows of ``<table>_v1`` into ``table`` by the columns both have (``values``:
    expressions over ``o``, the old row, for columns computed instead; ``where``: which rows)."""
    if not run.has_v1(table):
        return 0
    values = values or {}
    old = set(run.columns(table + SUFFIX))
    names = [c for c in run.columns(table) if c in values or c in old]
    exprs = [values.get(c, sql.SQL("o.{}").format(sql.Identifier(c))) for c in names]
    return run.exec(
        sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {} o WHERE {}").format(
            run.t(table),
            sql.SQL(", ").join(map(sql.Identifier, names)),
            sql.SQL(", ").join(exprs),
            run.v1(table),
            where or sql.SQL("true"),
        )
    )


def _small_tables(run: _Run, tables: list[_Table]) -> None:
    """capture_state, gaps, retention_state, prunes, actor_sequences, erasures."""
    conn = run.conn
    copies: tuple[tuple[str, dict[str, sql.Composable] | None], ...] = (
        ("capture_state", None),
        ("gaps", {"reason": sql.Literal(V1_GAP_REASON)}),
        ("prunes", None),
        ("actor_sequences", None),
    )
    for table, values in copies:
        run.begin_step()
        run.step(table, _copy_common(run, table, values))
    run.begin_step()
    conn.execute(sql.SQL("DELETE FROM {}").format(run.t("retention_state")))
    # a keyframe staging of format 1 is not carried over (its keyframes were left out)
    rows = _copy_common(run, "retention_state", {"staged": sql.SQL("NULL::jsonb")})
    if not rows:
        conn.execute(sql.SQL("INSERT INTO {} DEFAULT VALUES").format(run.t("retention_state")))
    run.step("retention_state", rows)
    run.begin_step()
    rows = 0
    if run.has_v1("erasures"):
        # a format-1 name -> the table that had it last
        latest: dict[str, tuple[int, int]] = {}
        for t in tables:
            for nsp, name, start in t.names:
                for text in (f"{nsp}.{name}",):
                    if text not in latest or latest[text][0] <= start:
                        latest[text] = (start, t.table_id)
        conn.execute(
            "CREATE TEMP TABLE _cdc_mig_names (name text PRIMARY KEY, table_id integer) ON COMMIT DROP"
        )
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO _cdc_mig_names VALUES (%s, %s)", [(k, v[1]) for k, v in sorted(latest.items())]
            )
        known = sql.SQL("EXISTS (SELECT 1 FROM _cdc_mig_names n WHERE n.name = o.table_name)")
        rows = _copy_common(
            run,
            "erasures",
            {"table_id": sql.SQL("(SELECT n.table_id FROM _cdc_mig_names n WHERE n.name = o.table_name)")},
            known,
        )
        unknown = conn.execute(
            sql.SQL("SELECT count(*) FROM {} o WHERE NOT {}").format(run.v1("erasures"), known)
        ).fetchone()
        if unknown and unknown[0]:
            run.report.warnings.append(
                f"{unknown[0]} erasure record(s) name a table format 1 never described: left in erasures_v1"
            )
        conn.execute(
            sql.SQL(
                "SELECT setval(pg_get_serial_sequence({}, 'erasure_id'), greatest((SELECT max(erasure_id) FROM {}), 1), "
                "(SELECT count(*) > 0 FROM {}))"
            ).format(sql.Literal(run.t("erasures").as_string(conn)), run.t("erasures"), run.t("erasures"))
        )
    run.step("erasures", rows)
