"""`cdc setup` and `cdc teardown`: prepare (or remove) everything capture needs.

Setup checks the source (wal_level, privileges), creates the publication before the
slot (decoding fails otherwise), the store schema, the context trigger, and the slot;
the rows already in the published tables are recorded as SNAPSHOT mutations read in
the snapshot the slot exports, so history starts complete and consistent with the
slot's first change. Every step is idempotent and every failure says what to run.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import structlog
from psycopg import sql

import cdc
from cdc.capture.engine import Core
from cdc.capture.model import PG_EPOCH_OFFSET_US, ColumnDesc, RelationDesc, format_time, now_us
from cdc.capture.registry import Registry
from cdc.config import Config, redact_dsn
from cdc.dryrun import install_simulate, simulate_installed, uninstall_simulate
from cdc.errors import SetupError, SlotLostError, SourceUnavailableError, StoreUnavailableError
from cdc.lsn import format_lsn, parse_lsn
from cdc.policies import hash_text
from cdc.source import SourceTable, describe_table, primary_key, published_tables
from cdc.source_context import context_installed, install_context, uninstall_context
from cdc.source_ddl import install_ddl, uninstall_ddl
from cdc.store.migrate import prepare_store
from cdc.store.writer import StoreBatch, StoreWriter
from cdc.stream.replication import OUTPUT_SETTINGS, options_string

log = structlog.get_logger("cdc.setup")

SQL_DIR = Path(cdc.__file__).parent / "sql"
#: Baseline rows per store transaction, and bytes of source COPY text read at a time.
BASELINE_BATCH_ROWS = 50_000
BASELINE_CHUNK_BYTES = 4 * 1024 * 1024


@dataclass
class SetupReport:
    steps: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def did(self, step: str) -> None:
        self.steps.append(step)
        log.info("setup_step", step=step)


def connect(dsn: str, what: str, **kwargs: Any) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(dsn, connect_timeout=10, **kwargs)
    except psycopg.OperationalError as exc:
        error = SourceUnavailableError if what == "source" else StoreUnavailableError
        raise error(f"cannot connect to the {what} ({redact_dsn(dsn)}): {str(exc).strip()}") from exc


def check_source(conn: psycopg.Connection[Any]) -> None:
    row = conn.execute("SHOW wal_level").fetchone()
    if not row or row[0] != "logical":
        raise SetupError(
            f"wal_level is {row[0] if row else 'unknown'!r} on the source; logical decoding needs 'logical'",
            hint="run `ALTER SYSTEM SET wal_level = logical;` as a superuser and restart PostgreSQL",
        )
    if conn.info.server_version < 140000:
        raise SetupError("cdc needs PostgreSQL 14 or later on the source (streaming of transactions)")
    role = conn.execute(
        "SELECT rolsuper, rolreplication FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    if not role or not (role[0] or role[1]):
        raise SetupError(
            "the source role may not use replication",
            hint=f"run `ALTER ROLE {conn.info.user} REPLICATION;` as a superuser (see sql/grants.sql)",
        )


def apply_store_schema(conn: psycopg.Connection[Any], schema: str) -> None:
    ddl = (SQL_DIR / "store.sql").read_text()
    with conn.transaction():
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("SET LOCAL search_path = {}").format(sql.Identifier(schema)))
        conn.execute(ddl.encode())  # a trusted file shipped with the package


def same_database(source: psycopg.Connection[Any], store: psycopg.Connection[Any]) -> bool:
    query = "SELECT system_identifier::text, current_database() FROM pg_control_system()"
    return source.execute(query).fetchone() == store.execute(query).fetchone()


def ensure_publication(
    conn: psycopg.Connection[Any], name: str, tables: tuple[str, ...], exclude_schema: str | None
) -> str:
    """Create or align the publication; return what it publishes."""
    exists = conn.execute("SELECT puballtables FROM pg_publication WHERE pubname = %s", (name,)).fetchone()
    if tables:
        targets = sql.SQL(", ").join(sql.Identifier(*t.split(".", 1)) for t in tables)
        if exists is None:
            conn.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(sql.Identifier(name), targets))
        elif not exists[0]:
            conn.execute(sql.SQL("ALTER PUBLICATION {} SET TABLE {}").format(sql.Identifier(name), targets))
        return ", ".join(tables)
    if exists is not None:
        return "all tables" if exists[0] else "the tables it already lists"
    if exclude_schema is None:
        conn.execute(sql.SQL("CREATE PUBLICATION {} FOR ALL TABLES").format(sql.Identifier(name)))
        return "all tables"
    # The store lives in this database: publish every schema but the store's, so its own
    # writes are never captured back.
    schemas = [
        str(r[0])
        for r in conn.execute(
            "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%%' "
            "AND nspname NOT IN ('information_schema', 'cdc', %s) ORDER BY 1",
            (exclude_schema,),
        ).fetchall()
    ]
    conn.execute(
        sql.SQL("CREATE PUBLICATION {} FOR TABLES IN SCHEMA {}").format(
            sql.Identifier(name), sql.SQL(", ").join(sql.Identifier(s) for s in schemas)
        )
    )
    return "schemas " + ", ".join(schemas)


def install_await_capture(conn: psycopg.Connection[Any], slot: str) -> None:
    """The function the client helper calls before rolling back a failed request."""
    text = (SQL_DIR / "await_capture.sql").read_text().replace("{slot}", sql.Literal(slot).as_string(conn))
    with conn.transaction():
        conn.execute(text.encode())


def slot_exists(conn: psycopg.Connection[Any], slot: str) -> tuple[str, int | None] | None:
    row = conn.execute(
        "SELECT plugin, confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s", (slot,)
    ).fetchone()
    if row is None:
        return None
    return str(row[0]), parse_lsn(row[1]) if row[1] else None


def setup(config: Config, *, recreate_slot: bool = False, drop_v1: bool = False) -> SetupReport:
    """Prepare the source and the store (migrating a format-1 store). Safe to run again at any time."""
    try:
        return _setup(config, recreate_slot=recreate_slot, drop_v1=drop_v1)
    except psycopg.errors.InsufficientPrivilege as exc:
        raise SetupError(
            f"a privilege is missing: {str(exc).strip().splitlines()[0]}",
            hint="FOR ALL TABLES publications need a superuser: set source.tables to tables the role owns, "
            "or have an administrator create the publication and grant what sql/grants.sql lists "
            "(docs/security.md)",
        ) from exc
    except psycopg.OperationalError as exc:
        raise SourceUnavailableError(f"setup lost its connection: {str(exc).strip()}") from exc
    except psycopg.Error as exc:
        raise SetupError(f"setup failed: {str(exc).strip().splitlines()[0]}") from exc


def _setup(config: Config, *, recreate_slot: bool, drop_v1: bool = False) -> SetupReport:
    source_dsn = config.require_source()
    store_dsn = config.require_store()
    slot, publication, schema = config.source.slot, config.source.publication, config.store.schema_name
    report = SetupReport()
    with (
        connect(source_dsn, "source", autocommit=True) as src,
        connect(store_dsn, "store", autocommit=True) as st,
    ):
        check_source(src)
        report.did("source: wal_level=logical, replication allowed")
        prepare_store(st, schema, src, drop=drop_v1, did=report.did, warn=report.warnings.append)
        apply_store_schema(st, schema)
        report.did(f"store: schema {schema} ready")
        exclude = schema if same_database(src, st) else None
        what = ensure_publication(src, publication, tuple(config.source.tables), exclude)
        report.did(f"source: publication {publication} ({what})")
        report.warnings.extend(align_publication(src, publication))
        tables = published_tables(src, publication)
        if not tables:
            report.warnings.append(f"publication {publication} has no tables yet: nothing will be captured")
        for table in tables:
            if table.replica_identity == "n" or (table.replica_identity == "d" and not table.primary_key):
                report.warnings.append(
                    f"{table.qualified} has no primary key: UPDATE and DELETE on it will fail while it is "
                    f"published; run `ALTER TABLE {table.qualified} REPLICA IDENTITY FULL;`"
                )
        report.warnings.extend(
            install_context(
                src,
                with_partitions(src, [(t.schema, t.name) for t in tables]),
                application_name_pattern=config.context.application_name_pattern,
                settings_prefix=config.context.settings_prefix,
                # New tables join only an all-tables publication; never the store's own tables.
                attach_new_tables=not config.source.tables,
                exclude_schemas=(schema,) if exclude else (),
            )
        )
        install_await_capture(src, slot)
        report.did(f"source: context trigger on {len(tables)} table(s)")
        report.warnings.extend(install_schema_changes(src, config))
        if config.simulate.enabled:
            wanted = set(config.simulate.tables)
            chosen = [(t.schema, t.name) for t in tables if not wanted or t.qualified in wanted]
            report.warnings.extend(
                install_simulate(src, chosen, exclude_schemas=(schema,) if exclude else ())
            )
            report.did(f"source: dry-run trigger on {len(chosen)} table(s)")

        writer = StoreWriter(store_dsn, schema, slot)
        try:
            state = writer.load_state()
            existing = slot_exists(src, slot)
            if existing is not None and existing[0] != "pgoutput":
                raise SetupError(
                    f"slot {slot!r} exists with plugin {existing[0]!r}, not pgoutput",
                    hint=f"choose another slot name (source.slot) or drop it: SELECT pg_drop_replication_slot('{slot}')",
                )
            if state is not None and state.baseline_done and existing is not None:
                report.did(f"source: slot {slot} in place (acknowledged {format_lsn(state.acked_lsn)})")
                return report
            if state is not None and state.baseline_done and existing is None and not recreate_slot:
                raise SlotLostError(
                    f"the store has history for slot {slot!r} but the slot is gone from the source: "
                    "changes made since then were not captured",
                    hint="run `cdc setup --recreate-slot` to create it again; the history records a gap "
                    "and a new baseline",
                )
            if existing is not None:
                # A slot whose baseline never completed: its snapshot is gone, start over.
                src.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            gap = state is not None and state.baseline_done
            baseline_lsn = create_slot_with_baseline(src, source_dsn, writer, config, report, gap=gap)
            report.did(
                f"source: slot {slot} created; baseline of {len(tables)} table(s) at {format_lsn(baseline_lsn)}"
                + (" (after a gap)" if gap else "")
            )
        finally:
            writer.close()
    return report


def create_slot_with_baseline(
    src: psycopg.Connection[Any],
    source_dsn: str,
    writer: StoreWriter,
    config: Config,
    report: SetupReport,
    *,
    gap: bool,
) -> int:
    """Create the slot, exporting its snapshot, and record the published rows as SNAPSHOT."""
    slot = config.source.slot
    repl = connect(
        source_dsn, "source", replication="database", autocommit=True, options=options_string(OUTPUT_SETTINGS)
    )
    try:
        if repl.info.server_version >= 150000:
            command = sql.SQL("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'export')")
        else:
            command = sql.SQL("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT")
        row = repl.execute(command.format(sql.Identifier(slot))).fetchone()
        assert row is not None
        consistent_point, snapshot = parse_lsn(row[1]), str(row[2])
        system_id = str(src.execute("SELECT system_identifier::text FROM pg_control_system()").fetchone()[0])  # type: ignore[index]
        previous = writer.load_state()
        previous_ack = previous.acked_lsn if previous is not None else 0
        with writer.conn.cursor() as cur:
            cur.execute(
                "INSERT INTO capture_state (slot_name, source_system_id, source_database, acked_lsn, baseline_lsn, "
                "baseline_done, history_floor) VALUES (%s, %s, %s, %s, %s, false, %s) "
                "ON CONFLICT (slot_name) DO UPDATE SET source_system_id = EXCLUDED.source_system_id, "
                "source_database = EXCLUDED.source_database, acked_lsn = EXCLUDED.acked_lsn, "
                "baseline_lsn = EXCLUDED.baseline_lsn, baseline_done = false, "
                "history_floor = coalesce(capture_state.history_floor, EXCLUDED.history_floor), updated_at = now()",
                (slot, system_id, src.info.dbname, consistent_point, consistent_point, consistent_point),
            )
            # A baseline that died half way left rows at this same position: start it over.
            for table in ("changes", "transactions", "context_changes"):
                cur.execute(
                    sql.SQL("DELETE FROM {} WHERE position = %s").format(sql.Identifier(table)),
                    (consistent_point,),
                )
        writer.conn.commit()
        count = copy_baseline(source_dsn, snapshot, writer, config, consistent_point, report, gap=gap)
        with writer.conn.cursor() as cur:
            if gap:
                cur.execute(
                    "INSERT INTO gaps (slot_name, after_position, resumed_position) VALUES (%s, %s, %s) "
                    "ON CONFLICT DO NOTHING",
                    (slot, previous_ack, consistent_point),
                )
            cur.execute(
                "UPDATE capture_state SET baseline_done = true, updated_at = now() WHERE slot_name = %s",
                (slot,),
            )
        writer.conn.commit()
        log.info("baseline_done", lsn=format_lsn(consistent_point), rows=count)
        return consistent_point
    finally:
        repl.close()


def copy_baseline(
    source_dsn: str,
    snapshot: str,
    writer: StoreWriter,
    config: Config,
    position: int,
    report: SetupReport,
    *,
    gap: bool,
) -> int:
    """Read every published table in the exported snapshot; write its rows as SNAPSHOT changes.

    The rows come as the source's COPY text, read in large chunks and turned into ``changes``
    lines by the capture core (``snapshot_lines``): no row is parsed here."""
    when = now_us()  # PostgreSQL epoch, as the core takes it
    now_text = format_time(when).encode()
    ordinal = 0
    with connect(source_dsn, "source", options=options_string(OUTPUT_SETTINGS)) as conn:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
        tables = published_tables(conn, config.source.publication)
        registry = Registry(
            config.require_store(),
            config.store.schema_name,
            policies=config.columns,
            catalog=conn,
            source_timeout=config.source.timeout_seconds,
            store_timeout=config.store.timeout_seconds,
            report=report.warnings.append,
        )
        core = Core(
            registry.describe,
            skip_through=position,
            memory_limit_bytes=config.capture.memory_limit_bytes,
            spill_dir=str(config.capture.spill_dir) if config.capture.spill_dir else None,
            max_value_bytes=config.capture.max_value_bytes,
            hash_value=hash_text,
        )
        batch = StoreBatch()

        def flush() -> None:
            nonlocal batch
            batch.span(when + PG_EPOCH_OFFSET_US)
            batch.max_position = position
            writer.write(batch)
            batch = StoreBatch()

        try:
            for table in tables:
                info = registry.describe(_relation_desc(table, position))
                if gap:
                    # History before the gap may hold rows deleted meanwhile: start the table afresh.
                    batch.changes.append(
                        _truncate_line(position, ordinal, now_text, info.table_id, info.schema_id)
                    )
                    batch.rows += 1
                    ordinal += 1
                for data in _read_table(conn, table):
                    lines, n = core.snapshot_lines(
                        info, data, position=position, first_ordinal=ordinal, committed_at_us=when
                    )
                    batch.changes.append(lines)
                    batch.rows += n
                    ordinal += n
                    if batch.rows >= BASELINE_BATCH_ROWS:
                        flush()
            batch.transactions.append(
                b"\t".join(
                    (
                        str(position).encode(),
                        now_text,
                        b"0",
                        b"\\N",
                        b"c",
                        b"0",
                        b"cdc.baseline",
                        str(ordinal).encode(),
                    )
                    + (b"\\N",) * 4
                )
                + b"\n"
            )
            flush()
        finally:
            registry.close()
        conn.rollback()
    return ordinal


def _truncate_line(position: int, ordinal: int, when: bytes, table_id: int, schema_id: int) -> bytes:
    fields = (
        str(position).encode(),
        str(ordinal).encode(),
        when,
        str(table_id).encode(),
        str(schema_id).encode(),
    )
    return b"\t".join((*fields, b"T", b"0", str(position).encode(), *(b"\\N",) * 6)) + b"\n"


def _relation_desc(table: SourceTable, position: int) -> RelationDesc:
    return RelationDesc(
        table.oid,
        table.schema,
        table.name,
        table.replica_identity,
        tuple(ColumnDesc(c.name, c.type_oid, c.type_modifier, c.is_key) for c in table.columns),
        position,
    )


def _read_table(conn: psycopg.Connection[Any], table: SourceTable) -> Iterator[bytes]:
    """The table's rows as COPY text, in chunks of about BASELINE_CHUNK_BYTES."""
    if not table.columns:
        return
    # COPY's text format prints each value with its type's output function, exactly as
    # pgoutput sends it (a ::text cast would not: true vs t, char(n) padding, inet masks).
    # A partitioned table (published through its root) is read with its partitions.
    only = sql.SQL("" if _partitioned(conn, table.oid) else "ONLY ")
    select = sql.SQL("COPY (SELECT {} FROM {}{}) TO STDOUT").format(
        sql.SQL(", ").join(sql.Identifier(c.name) for c in table.columns),
        only,
        sql.Identifier(table.schema, table.name),
    )
    buffer = bytearray()
    with conn.cursor().copy(select) as copy:
        for data in copy:
            buffer += data
            if len(buffer) >= BASELINE_CHUNK_BYTES:
                yield bytes(buffer)
                buffer.clear()
    if buffer:
        yield bytes(buffer)


# ---------------------------------------------------------------------------- schema changes
# Partitioned tables, generated columns and DDL events (docs/ddl.md).


def align_publication(conn: psycopg.Connection[Any], publication: str) -> list[str]:
    """Partitioned tables published through their root (one table in history, before images
    and keys from the root's rows); on PostgreSQL 18, stored generated columns published too."""
    options = [sql.SQL("publish_via_partition_root = true")]
    if conn.info.server_version >= 180000:
        options.append(sql.SQL("publish_generated_columns = stored"))
    try:
        with conn.transaction():
            conn.execute(
                sql.SQL("ALTER PUBLICATION {} SET ({})").format(
                    sql.Identifier(publication), sql.SQL(", ").join(options)
                )
            )
    except psycopg.errors.InsufficientPrivilege:
        return [
            f"publication {publication}: not its owner, publish_via_partition_root not set: partitioned "
            "tables are captured per partition (docs/ddl.md)"
        ]
    return []


def with_partitions(conn: psycopg.Connection[Any], tables: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The tables and every partition of the partitioned ones: a statement on a parent fires the
    parent's statement trigger, one straight into a partition the partition's."""
    out = list(tables)
    for schema, name in tables:
        rows = conn.execute(
            "SELECT n.nspname, c.relname FROM pg_catalog.pg_partition_tree("
            "  (SELECT c2.oid FROM pg_catalog.pg_class c2 JOIN pg_catalog.pg_namespace n2 "
            "   ON n2.oid = c2.relnamespace WHERE n2.nspname = %s AND c2.relname = %s)) t "
            "JOIN pg_catalog.pg_class c ON c.oid = t.relid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            "WHERE t.level > 0",
            (schema, name),
        ).fetchall()
        out.extend((str(r[0]), str(r[1])) for r in rows)
    return list(dict.fromkeys(out))


def install_schema_changes(conn: psycopg.Connection[Any], config: Config) -> list[str]:
    """The DDL event triggers (superuser only; docs/ddl.md)."""
    return install_ddl(
        conn,
        publication=config.source.publication,
        rewrite_snapshot_max_rows=config.ddl.rewrite_snapshot_max_rows,
        publishes_generated=conn.info.server_version >= 180000,
    )


def _partitioned(conn: psycopg.Connection[Any], oid: int) -> bool:
    row = conn.execute("SELECT relkind FROM pg_catalog.pg_class WHERE oid = %s", (oid,)).fetchone()
    return bool(row and row[0] == "p")


def teardown(config: Config, *, drop_history: bool = False) -> SetupReport:
    """Remove the slot, publication and context trigger; the history stays unless asked."""
    source_dsn = config.require_source()
    slot, publication = config.source.slot, config.source.publication
    report = SetupReport()
    with connect(source_dsn, "source", autocommit=True) as src:
        active = src.execute(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s AND active", (slot,)
        ).fetchone()
        if active is not None:
            raise SetupError(
                f"slot {slot!r} is in use by process {active[0]}",
                hint="stop `cdc run` first (systemctl stop cdc), then run `cdc teardown` again",
            )
        if slot_exists(src, slot) is not None:
            src.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            report.did(f"source: slot {slot} dropped")
        src.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(publication)))
        report.did(f"source: publication {publication} dropped")
        src.execute("DROP FUNCTION IF EXISTS cdc.await_capture(pg_lsn, integer)")
        src.execute("DROP FUNCTION IF EXISTS cdc.capture_slot()")
        if simulate_installed(src):
            uninstall_simulate(src)
            report.did("source: dry-run trigger removed")
        uninstall_ddl(src)
        if context_installed(src):
            uninstall_context(src)
            report.did("source: context trigger removed")
    if config.store.dsn is not None:
        store_dsn = config.require_store()
        with connect(store_dsn, "store", autocommit=True) as st:
            if drop_history:
                st.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                        sql.Identifier(config.store.schema_name)
                    )
                )
                report.did(f"store: schema {config.store.schema_name} dropped")
            else:
                exists = st.execute(
                    "SELECT to_regclass(%s)", (f"{config.store.schema_name}.capture_state",)
                ).fetchone()
                if exists and exists[0]:
                    st.execute(
                        sql.SQL("DELETE FROM {}.capture_state WHERE slot_name = %s").format(
                            sql.Identifier(config.store.schema_name)
                        ),
                        (slot,),
                    )
                report.did(
                    f"store: history kept in schema {config.store.schema_name} (--drop-history removes it)"
                )
    return report


__all__ = ["SetupReport", "apply_store_schema", "describe_table", "primary_key", "setup", "teardown"]
