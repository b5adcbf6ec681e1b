"""`cdc status`: the slot, lag, LSNs, the store's version range and size, retention, last error.

Reads the source's pg_replication_slots and the store's capture_state (and, for counts, the
estimates of the store's tables: never a count over the history); never prints a
DSN password. Either side may be unreachable: that is reported, not raised.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from cdc.config import Config, format_duration, redact_dsn
from cdc.lsn import format_lsn, parse_lsn
from cdc.source_ddl import ddl_mode
from cdc.store.format import STATUS_CODES
from cdc.store.migrate import is_v1_store, v1_leftovers


@dataclass
class Status:
    slot: str
    source: str | None = None
    store: str | None = None
    source_error: str | None = None
    store_error: str | None = None
    slot_exists: bool | None = None
    slot_active: bool | None = None
    active_pid: int | None = None
    wal_status: str | None = None
    safe_wal_size_bytes: int | None = None
    retained_wal_bytes: int | None = None
    confirmed_flush_lsn: str | None = None
    server_lsn: str | None = None
    lag_bytes: int | None = None
    acked_lsn: str | None = None
    baseline_lsn: str | None = None
    baseline_done: bool | None = None
    earliest_version: int | None = None
    current_version: int | None = None
    earliest_at: datetime | None = None
    last_commit_at: datetime | None = None
    lag_seconds: float | None = None
    store_format: int | None = None
    mutations: int | None = None  # changes stored (estimate)
    transactions: int | None = None  # transactions stored (estimate)
    tables: int | None = None  # captured tables (one per source relation)
    dropped_tables: int | None = None
    daemon: str | None = None
    last_error: str | None = None
    last_error_at: datetime | None = None
    retention: str | None = None
    gaps: list[dict[str, Any]] = field(default_factory=list)
    v1_tables: list[str] = field(default_factory=list)  # left by a store migration
    schema_changes: str | None = None  # "event trigger" | "relation messages only" (docs/ddl.md)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        for name, value in data.items():
            if isinstance(value, datetime):
                data[name] = value.isoformat()
        return data

    @property
    def healthy(self) -> bool:
        return (
            self.source_error is None
            and self.store_error is None
            and bool(self.slot_exists)
            and self.wal_status not in ("lost", "unreserved")
        )


def collect_status(config: Config) -> Status:
    status = Status(slot=config.source.slot, retention=format_duration(config.retention.default))
    if config.source.dsn is not None:
        dsn = config.require_source()
        status.source = redact_dsn(dsn)
        try:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
                row = conn.execute(
                    "SELECT active, active_pid, wal_status, safe_wal_size, confirmed_flush_lsn::text, "
                    "(pg_current_wal_lsn() - restart_lsn)::bigint, pg_current_wal_lsn()::text "
                    "FROM pg_replication_slots WHERE slot_name = %s",
                    (config.source.slot,),
                ).fetchone()
                if row is None:
                    status.slot_exists = False
                    current = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
                    status.server_lsn = current[0] if current else None
                else:
                    status.slot_exists = True
                    status.slot_active, status.active_pid, status.wal_status = row[0], row[1], row[2]
                    status.safe_wal_size_bytes, status.confirmed_flush_lsn = row[3], row[4]
                    status.retained_wal_bytes, status.server_lsn = row[5], row[6]
                    if row[4] and row[6]:
                        status.lag_bytes = max(0, parse_lsn(row[6]) - parse_lsn(row[4]))
                status.schema_changes = ddl_mode(conn)
        except psycopg.Error as exc:
            status.source_error = str(exc).strip().splitlines()[0]
    if config.store.dsn is not None:
        dsn = config.require_store()
        status.store = redact_dsn(dsn)
        try:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
                _store_status(conn, config, status)
        except psycopg.Error as exc:
            status.store_error = str(exc).strip().splitlines()[0]
    return status


def _store_status(conn: psycopg.Connection[Any], config: Config, status: Status) -> None:
    schema = sql.Identifier(config.store.schema_name)
    exists = conn.execute("SELECT to_regclass(%s)", (f"{config.store.schema_name}.capture_state",)).fetchone()
    if not exists or exists[0] is None:
        status.store_error = f"no history schema {config.store.schema_name!r}: run `cdc setup`"
        return
    if is_v1_store(conn, config.store.schema_name):
        status.store_error = "the store is of format 1: stop the daemon and run `cdc setup` to migrate it"
        return
    status.v1_tables = v1_leftovers(conn, config.store.schema_name)
    row = conn.execute(
        sql.SQL(
            "SELECT acked_lsn, baseline_lsn, baseline_done, coalesce(history_floor, baseline_lsn), "
            "daemon_host, daemon_pid, last_error, last_error_at FROM {}.capture_state WHERE slot_name = %s"
        ).format(schema),
        (config.source.slot,),
    ).fetchone()
    if row is None:
        status.store_error = f"the store has no state for slot {config.source.slot!r}: run `cdc setup`"
        return
    status.acked_lsn = format_lsn(row[0])
    status.current_version = int(row[0])
    status.baseline_lsn = format_lsn(row[1]) if row[1] is not None else None
    status.baseline_done = bool(row[2])
    status.earliest_version = int(row[3]) if row[3] is not None else None
    status.daemon = f"{row[4]} pid {row[5]}" if row[4] else None
    status.last_error, status.last_error_at = row[6], row[7]
    committed = STATUS_CODES["committed"]
    last = conn.execute(
        sql.SQL(
            "SELECT committed_at, extract(epoch FROM now() - committed_at) FROM {}.transactions_all "
            "WHERE status = %s ORDER BY position DESC LIMIT 1"
        ).format(schema),
        (committed,),
    ).fetchone()
    if last is not None:
        status.last_commit_at, status.lag_seconds = last[0], float(last[1])
    if status.earliest_version:
        first = conn.execute(
            sql.SQL(
                "SELECT committed_at FROM {}.transactions_all WHERE status = %s AND position <= %s "
                "ORDER BY position DESC LIMIT 1"
            ).format(schema),
            (committed, status.earliest_version),
        ).fetchone()
        status.earliest_at = first[0] if first else None
    meta = conn.execute(sql.SQL("SELECT max(format_version) FROM {}.store_meta").format(schema)).fetchone()
    status.store_format = int(meta[0]) if meta and meta[0] is not None else None
    status.mutations = _estimate(conn, config.store.schema_name, "changes", "changes_keep")
    status.transactions = _estimate(conn, config.store.schema_name, "transactions", "transactions_keep")
    counts = conn.execute(
        sql.SQL(
            "SELECT count(*), count(*) FILTER (WHERE dropped_position IS NOT NULL) FROM {}.tables"
        ).format(schema)
    ).fetchone()
    if counts is not None:
        status.tables, status.dropped_tables = int(counts[0]), int(counts[1])
    status.gaps = [
        {"after": format_lsn(r[0]), "resumed": format_lsn(r[1]), "recorded_at": r[2].isoformat()}
        for r in conn.execute(
            sql.SQL(
                "SELECT after_position, resumed_position, recorded_at FROM {}.gaps WHERE slot_name = %s "
                "ORDER BY resumed_position"
            ).format(schema),
            (config.source.slot,),
        ).fetchall()
    ]


def _estimate(conn: psycopg.Connection[Any], schema: str, *tables: str) -> int | None:
    """The row estimate of ``tables`` (a partitioned one: the sum of its partitions): the planner's
    or the statistics collector's, whichever is larger; never a count."""
    row = conn.execute(
        "SELECT sum(greatest(c.reltuples, s.n_live_tup, 0))::bigint "
        "FROM pg_catalog.unnest(%(t)s::text[]) AS t(name) "
        "CROSS JOIN LATERAL pg_catalog.pg_partition_tree("
        "  pg_catalog.to_regclass(pg_catalog.format('%%I.%%I', %(s)s::text, t.name))) AS p "
        "JOIN pg_catalog.pg_class AS c ON c.oid = p.relid "
        "LEFT JOIN pg_catalog.pg_stat_all_tables AS s ON s.relid = p.relid WHERE p.isleaf",
        {"s": schema, "t": list(tables)},
    ).fetchone()
    return int(row[0]) if row and row[0] is not None else None


def render_status(status: Status) -> list[tuple[str, str]]:
    """(label, value) lines for the table form."""

    def show(value: object) -> str:
        if value is None:
            return "-"
        if isinstance(value, datetime):
            return value.isoformat(timespec="seconds")
        if isinstance(value, bool):
            return "yes" if value else "no"
        return str(value)

    def size(value: int | None) -> str:
        if value is None:
            return "-"
        for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(value) < 1024 or unit == "TiB":
                return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
            value = value / 1024  # type: ignore[assignment]
        return str(value)

    lines = [
        ("source", (status.source_error and f"UNREACHABLE: {status.source_error}") or show(status.source)),
        ("store", (status.store_error and f"ERROR: {status.store_error}") or show(status.store)),
        (
            "slot",
            f"{status.slot} ({'exists' if status.slot_exists else 'MISSING'})"
            if status.slot_exists is not None
            else status.slot,
        ),
        (
            "slot active",
            show(status.slot_active) + (f" (pid {status.active_pid})" if status.active_pid else ""),
        ),
        ("wal_status", show(status.wal_status)),
        ("retained WAL", size(status.retained_wal_bytes)),
        ("safe_wal_size", size(status.safe_wal_size_bytes)),
        ("server LSN", show(status.server_lsn)),
        ("confirmed LSN", show(status.confirmed_flush_lsn)),
        ("lag", size(status.lag_bytes)),
        ("stored up to", show(status.acked_lsn)),
        ("versions", _version_range(status)),
        ("last commit", show(status.last_commit_at)),
        ("store format", show(status.store_format)),
        (
            "tables",
            show(status.tables) + (f" ({status.dropped_tables} dropped)" if status.dropped_tables else ""),
        ),
        ("transactions (est.)", show(status.transactions)),
        ("mutations (est.)", show(status.mutations)),
        ("retention", show(status.retention)),
        ("schema changes", show(status.schema_changes)),
        ("daemon", show(status.daemon)),
        ("last error", f"{status.last_error} ({show(status.last_error_at)})" if status.last_error else "-"),
    ]
    if status.v1_tables:
        lines.append(
            (
                "format 1",
                f"{len(status.v1_tables)} table(s) kept by the migration: `cdc setup --drop-v1` drops them",
            )
        )
    for gap in status.gaps:
        lines.append(("gap", f"after {gap['after']}, resumed at {gap['resumed']} ({gap['recorded_at']})"))
    return lines


def _version_range(status: Status) -> str:
    """``1/0 (2026-03-10T12:00:00+00:00) .. 1/1500 (...)``: the versions time travel reads exactly."""

    def one(version: int | None, when: datetime | None) -> str:
        if version is None:
            return "-"
        return format_lsn(version) + (f" ({when.isoformat(timespec='seconds')})" if when else "")

    return f"{one(status.earliest_version, status.earliest_at)} .. {one(status.current_version, status.last_commit_at)}"
