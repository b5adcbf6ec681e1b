"""`cdc setup` and `cdc teardown`: prepare (or remove) everything capture needs.

Setup checks the source (wal_level, privileges), creates the publications before the
slot (decoding fails otherwise; cdc/publications.py: never one that would make an
application's UPDATE or DELETE fail), the store schema, the context trigger, and the slot;
the rows already in the published tables are recorded as SNAPSHOT mutations read in
the snapshot the slot exports (cdc/baseline.py), so history starts complete and consistent
with the slot's first change. On an installation that captures already (the daemon may be
running), the slot is left alone and the tables that joined capture are backfilled
(cdc/backfill.py). Every step is idempotent and every failure says what to run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import structlog
from psycopg import sql

import cdc
from cdc.backfill import backfill_joined
from cdc.baseline import Baseline, discard_unfinished, finish, published_source_tables, take_slot_lock
from cdc.capture.failover import identify, pending_gap
from cdc.capture.registry import key_policy_problems
from cdc.config import Config
from cdc.connections import connect
from cdc.dryrun import install_simulate, simulate_installed, uninstall_simulate
from cdc.errors import ConfigError, SetupError, SlotLostError, SourceUnavailableError
from cdc.failover_readiness import create_slot_command, setup_failover
from cdc.lsn import format_lsn, parse_lsn
from cdc.progress import Progress
from cdc.publications import ensure_publications, record_publications, uninstall_publications
from cdc.source import SourceTable, describe_table, primary_key
from cdc.source_context import context_installed, install_context, signing_status, uninstall_context
from cdc.source_context import rotate_context_key as rotate_key
from cdc.source_ddl import install_ddl, uninstall_ddl
from cdc.store.migrate import prepare_store
from cdc.store.writer import CaptureState, StoreWriter
from cdc.stream.replication import OUTPUT_SETTINGS, options_string

log = structlog.get_logger("cdc.setup")

SQL_DIR = Path(cdc.__file__).parent / "sql"


@dataclass
class SetupReport:
    steps: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def did(self, step: str) -> None:
        self.steps.append(step)
        log.debug("setup_step", step=step)  # printed by the caller: a log line only with -vv


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
        # The store's own schema first (the file's names are unqualified), then the catalog, and
        # pg_temp explicitly last: left implicit it would be searched first.
        conn.execute(
            sql.SQL("SET LOCAL search_path = {}, pg_catalog, pg_temp").format(sql.Identifier(schema))
        )
        conn.execute(ddl.encode())  # a trusted file shipped with the package


def same_database(source: psycopg.Connection[Any], store: psycopg.Connection[Any]) -> bool:
    query = "SELECT system_identifier::text, current_database() FROM pg_control_system()"
    return source.execute(query).fetchone() == store.execute(query).fetchone()


def install_await_capture(conn: psycopg.Connection[Any], slot: str) -> list[str]:
    """The function the client helper calls before rolling back a failed request; a warning
    when it cannot see the walsender's position (and so never waits)."""
    text = (SQL_DIR / "await_capture.sql").read_text().replace("{slot}", sql.Literal(slot).as_string(conn))
    with conn.transaction():
        conn.execute(text.encode())
        row = conn.execute("SELECT cdc.await_capture_can_see()").fetchone()
    if conn.info.server_version < 160000 or (row is not None and row[0]):
        return []
    return [
        f"role {conn.info.user} cannot read the walsender's position (pg_stat_replication.sent_lsn): "
        "a failed request will not wait for capture, so its attempted changes may be missing from the "
        f"history; GRANT pg_read_all_stats TO {conn.info.user} (sql/grants.sql does), then run `cdc setup`"
    ]


def slot_exists(conn: psycopg.Connection[Any], slot: str) -> tuple[str, int | None] | None:
    """(plugin, confirmed_flush_lsn) of the slot in this database; None when there is none.
    SetupError when another database of the server uses the name (slots are per server)."""
    row = conn.execute(
        "SELECT plugin, confirmed_flush_lsn::text, database, database = current_database() "
        "FROM pg_catalog.pg_replication_slots WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    if row is None:
        return None
    if not row[3]:
        where = f"database {row[2]!r}" if row[2] else "physical replication"
        raise SetupError(
            f"replication slot {slot!r} already exists on this server for {where}: slot names are "
            "shared by every database of a server",
            hint=f"choose another source.slot (CDC_SOURCE__SLOT) for database {conn.info.dbname!r}",
        )
    return str(row[0]), parse_lsn(row[1]) if row[1] else None


def setup(
    config: Config,
    *,
    recreate_slot: bool = False,
    drop_v1: bool = False,
    rotate_context_key: bool = False,
    progress: Progress | None = None,
) -> SetupReport:
    """Prepare the source and the store (migrating a format-1 store). Safe to run again at any
    time, also while the daemon runs (then the slot is left alone and the tables that joined
    capture are backfilled). ``progress``: where the baseline's and backfill's progress goes.

    ``rotate_context_key``: only replace the key that signs context messages (the previous one
    stays accepted); the daemon may keep running."""
    try:
        if rotate_context_key:
            return _rotate(config)
        report = _setup(config, recreate_slot=recreate_slot, drop_v1=drop_v1, progress=progress)
        steps, warnings = setup_failover(config, config.require_source(), options_string(OUTPUT_SETTINGS))
        for step in steps:
            report.did(step)
        report.warnings.extend(warnings)
        return report
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


def _rotate(config: Config) -> SetupReport:
    report = SetupReport()
    with connect(config.require_source(), "source", autocommit=True) as src:
        status = rotate_key(src)
    report.did(f"source: new context key; {status.describe()}")
    return report


def _setup(
    config: Config, *, recreate_slot: bool, drop_v1: bool = False, progress: Progress | None = None
) -> SetupReport:
    source_dsn = config.require_source()
    store_dsn = config.require_store()
    slot, publication, schema = config.source.slot, config.source.publication, config.store.schema_name
    report = SetupReport()
    with (
        connect(source_dsn, "source", autocommit=True) as src,
        connect(store_dsn, "store", autocommit=True) as st,
    ):
        check_source(src)
        if problems := key_policy_problems(src, config.columns):  # before anything is created
            raise ConfigError(problems)
        report.did("source: wal_level=logical, replication allowed")
        existing = slot_exists(src, slot)
        prepare_store(st, schema, src, drop=drop_v1, did=report.did, warn=report.warnings.append)
        apply_store_schema(st, schema)
        report.did(f"store: schema {schema} ready")
        exclude = schema if same_database(src, st) else None
        pubs = ensure_publications(src, config, exclude, slot_exists=existing is not None)
        report.steps.extend(pubs.steps)
        report.warnings.extend(pubs.warnings)
        report.did(f"source: publication {publication} ({pubs.description})")
        for name in pubs.names:
            report.warnings.extend(align_publication(src, name))
        tables = published_source_tables(src, pubs.names)
        if not tables:
            report.warnings.append(f"publication {publication} has no tables yet: nothing will be captured")
        report.warnings.extend(
            install_context(
                src,
                with_partitions(src, [(t.schema, t.name) for t in tables]),
                application_name_pattern=config.context.application_name_pattern,
                settings_prefix=config.context.settings_prefix,
                extra_settings=config.context.extra_settings,
                emit_none=config.context.emit_none,
                # New tables join only an all-tables publication; never the store's own tables.
                attach_new_tables=not config.source.tables,
                exclude_schemas=(schema,) if exclude else (),
            )
        )
        report.warnings.extend(install_await_capture(src, slot))
        report.did(f"source: context trigger on {len(tables)} table(s)")
        signing = signing_status(src)
        if signing.key_id is not None and signing.emit_revoked:
            report.did(f"source: {signing.describe()}")
        else:
            report.warnings.append(signing.describe())
        report.warnings.extend(install_schema_changes(src, config))
        if config.simulate.enabled:
            wanted = set(config.simulate.tables)
            chosen = [(t.schema, t.name) for t in tables if not wanted or t.qualified in wanted]
            report.warnings.extend(
                install_simulate(src, chosen, exclude_schemas=(schema,) if exclude else ())
            )
            report.did(f"source: dry-run trigger on {len(chosen)} table(s)")
        st.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(schema)))
        writer = StoreWriter(store_dsn, schema, slot)
        try:
            writer.connect(lock=False)
            state = writer.load_state()
            if existing is not None and existing[0] != "pgoutput":
                raise SetupError(
                    f"slot {slot!r} exists with plugin {existing[0]!r}, not pgoutput",
                    hint=f"choose another slot name (source.slot) or drop it: SELECT pg_drop_replication_slot('{slot}')",
                )
            # The daemon stopped at a gap or fork (a history torn down since starts afresh).
            pending = (
                pending_gap(writer.conn, schema, slot) if state is not None and state.baseline_done else None
            )
            if state is not None and state.baseline_done and existing is not None and pending is None:
                record_publications(st, src, slot, pubs, slot_created_after=False)
                report.did(f"source: slot {slot} in place (acknowledged {format_lsn(state.acked_lsn)})")
                backfill_joined(config, src, st, tables, pubs, report, progress)
                return report
            if pending is not None and not recreate_slot:
                raise SlotLostError(
                    f"capture stopped at a {pending.outcome}: {pending.reason}",
                    hint="run `cdc setup --recreate-slot`: a new baseline, and the gap recorded in the history",
                )
            if state is not None and state.baseline_done and existing is None and not recreate_slot:
                raise SlotLostError(
                    f"the store has history for slot {slot!r} but the slot is gone from the source: "
                    "changes made since then were not captured",
                    hint="run `cdc setup --recreate-slot` to create it again; the history records a gap "
                    "and a new baseline",
                )
            take_slot_lock(writer, schema, slot)
            if existing is not None:
                # A slot whose baseline never completed (capture never started): its snapshot is
                # gone, start over.
                active = src.execute(
                    "SELECT active_pid FROM pg_catalog.pg_replication_slots WHERE slot_name = %s AND active",
                    (slot,),
                ).fetchone()
                if active is not None:
                    raise SetupError(
                        f"slot {slot!r} has no completed baseline but process {active[0]} is using it",
                        hint="stop that process, then run `cdc setup` again",
                    )
                src.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                report.did(f"source: slot {slot} of an unfinished baseline dropped (starting over)")
            removed = discard_unfinished(writer.conn, slot)
            writer.conn.commit()
            if removed:
                report.did(f"store: {removed:,} row(s) of an unfinished baseline removed")
            gap = state is not None and state.baseline_done
            baseline_lsn = create_slot_with_baseline(
                src, source_dsn, writer, config, tables, progress, gap=gap, previous=state, report=report
            )
            record_publications(st, src, slot, pubs, slot_created_after=True)
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
    tables: list[SourceTable],
    progress: Progress | None,
    *,
    gap: bool,
    previous: CaptureState | None,
    report: SetupReport | None = None,
) -> int:
    """Create the slot, exporting its snapshot, and record the published rows as SNAPSHOT
    (cdc/baseline.py). The snapshot lives as long as the replication connection."""
    slot = config.source.slot
    repl = connect(
        source_dsn, "source", replication="database", autocommit=True, options=options_string(OUTPUT_SETTINGS)
    )
    try:
        # Before the slot: any later command on this connection ends its exported snapshot.
        created_on = identify(repl)
        command = create_slot_command(repl.info.server_version, config.source.failover)
        row = repl.execute(command.format(sql.Identifier(slot))).fetchone()
        assert row is not None
        consistent_point, snapshot = parse_lsn(row[1]), str(row[2])
        system_id = str(src.execute("SELECT system_identifier::text FROM pg_control_system()").fetchone()[0])  # type: ignore[index]
        previous_ack = previous.acked_lsn if previous is not None else 0
        with writer.conn.cursor() as cur:
            cur.execute(
                "INSERT INTO capture_state (slot_name, source_system_id, source_database, acked_lsn, baseline_lsn, "
                "baseline_done, history_floor) VALUES (%s, %s, %s, %s, %s, false, %s) "
                "ON CONFLICT (slot_name) DO UPDATE SET source_system_id = EXCLUDED.source_system_id, "
                "source_database = EXCLUDED.source_database, acked_lsn = EXCLUDED.acked_lsn, "
                "baseline_lsn = EXCLUDED.baseline_lsn, baseline_done = false, "
                "history_floor = CASE WHEN capture_state.baseline_done THEN coalesce(capture_state.history_floor, "
                "EXCLUDED.history_floor) ELSE EXCLUDED.history_floor END, updated_at = now()",
                (slot, system_id, src.info.dbname, consistent_point, consistent_point, consistent_point),
            )
        writer.conn.commit()
        own = progress is None
        progress = progress if progress is not None else Progress("baseline", terminal=False)
        baseline = Baseline(
            config,
            snapshot,
            consistent_point,
            writer,
            progress,
            gap=gap,
            report=report.warnings.append if report is not None else None,
        )
        try:
            count = baseline.run(tables)
        finally:
            if own:
                progress.close()
        finish(
            writer,
            slot,
            consistent_point,
            count,
            baseline.when,
            gap_after=previous_ack if gap else None,
            created_on=created_on,
        )
        return consistent_point
    finally:
        repl.close()


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
        uninstall_publications(src, publication)
        report.did(f"source: publication {publication} dropped")
        src.execute("DROP FUNCTION IF EXISTS cdc.await_capture(pg_lsn, integer)")
        src.execute("DROP FUNCTION IF EXISTS cdc.capture_slot()")
        src.execute("DROP FUNCTION IF EXISTS cdc.await_capture_can_see()")
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
