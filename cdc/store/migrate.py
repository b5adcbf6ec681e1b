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
from collections.abc import Callable
from pathlib import Path

import psycopg
from psycopg import sql

import cdc
from cdc.config import format_table
from cdc.store.format import FORMAT_VERSION
from cdc.store.migrate_base import (
    SUFFIX,
    V1_GAP_REASON,
    V1_TABLES,
    V1_VIEWS,
    AmbiguousName,
    Conn,
    MigrationError,
    MigrationReport,
    MigrationStep,
    Progress,
    Run,
    log,
    regclass,
)
from cdc.store.migrate_changes import context_spans, copy_changes, history_floor
from cdc.store.migrate_plan import Part, parts, plan_tables, source_catalog, split_name, v1_name
from cdc.store.migrate_tables import (
    check_schema_ids,
    copy_request_errors,
    copy_small_tables,
    copy_tables,
    copy_transactions,
    name_timelines,
)

__all__ = [
    "SUFFIX",
    "V1_GAP_REASON",
    "V1_TABLES",
    "AmbiguousName",
    "MigrationError",
    "MigrationReport",
    "MigrationStep",
    "drop_v1",
    "is_v1_store",
    "migrate_v1",
    "prepare_store",
    "split_name",
    "v1_leftovers",
]

STORE_SQL = Path(cdc.__file__).parent / "sql" / "store.sql"
#: How long the migration waits for a table lock before it gives up (nothing changed).
LOCK_TIMEOUT = "10s"


# ============================================================================ detection


def is_v1_store(conn: Conn, schema: str) -> bool:
    """A format-1 store: ``mutations`` exists and ``store_meta`` does not."""
    return regclass(conn, schema, "mutations") and not regclass(conn, schema, "store_meta")


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
        if not regclass(conn, schema, "store_meta"):
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


# ============================================================================ the migration


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
    run = Run(store_conn, schema, report, progress)
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


def _migrate(run: Run, source: Conn | None) -> None:
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
    catalog, problem = source_catalog(conn, schema, source, sorted({r[2] for r in schema_rows}))
    if problem:
        report.warnings.append(problem)
    tables, table_of = plan_tables(schema_rows, catalog, report)
    for name in report.ambiguous:
        log.warning("migrate_ambiguous_name", oid=name.relation_oid, schema_name=name.schema_name,
                    table_name=name.table_name, how=name.how)  # fmt: skip

    mutation_parts = parts(conn, schema, "mutations")
    transaction_parts = parts(conn, schema, "transactions")
    _rename_v1(run)
    mutation_parts = [Part(v1_name(p.name), p.bound, p.lo, p.hi) for p in mutation_parts]
    transaction_parts = [Part(v1_name(p.name), p.bound, p.lo, p.hi) for p in transaction_parts]

    run.begin_step()
    conn.execute(STORE_SQL.read_text().encode())  # a trusted file shipped with the package
    run.step("store.sql", 0)

    copy_tables(run, tables, table_of)
    check_schema_ids(run)
    floor = history_floor(run)
    copy_changes(run, mutation_parts, transaction_parts, floor)
    name_timelines(run, tables, catalog)
    context_spans(run, mutation_parts)
    copy_transactions(run)
    copy_request_errors(run)
    copy_small_tables(run, tables)
    conn.execute(
        sql.SQL("UPDATE {} SET format_version = %s, updated_at = now()").format(run.t("store_meta")),
        (FORMAT_VERSION,),
    )


def _lock_out_writers(run: Run) -> None:
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
    present = [t for t in ("mutations", "mutations_keep", "transactions") if regclass(conn, run.schema, t)]
    conn.execute(
        sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(
            sql.SQL(", ").join(run.t(t) for t in present)
        )
    )


def _rename_v1(run: Run) -> None:
    """Rename the format-1 tables, their partitions, indexes and sequences, and its view, ``*_v1``."""
    conn, schema = run.conn, run.schema
    run.begin_step()
    for view in V1_VIEWS:
        if regclass(conn, schema, view):
            conn.execute(
                sql.SQL("ALTER VIEW {} RENAME TO {}").format(run.t(view), sql.Identifier(view + SUFFIX))
            )
            run.report.renamed.append(view + SUFFIX)
    present = [t for t in V1_TABLES if regclass(conn, schema, t)]
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
        new = v1_name(str(name))
        if regclass(conn, schema, new):
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
