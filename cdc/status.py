"""`cdc status`: the slot, the daemon, lag, LSNs, the store's version range and size, retention,
last error; and whether capture is healthy (``problems``).

Reads the source's pg_replication_slots (and pg_stat_replication) and the store's capture_state;
never prints a DSN password. Either side may be unreachable: that is reported, not raised.

- The daemon: a daemon is active while its store writer holds the slot's lock in the store
  (the lock dies with its connection: no stale pid is shown), and streams while the slot is
  also active on the source.
- Lag (``lag_seconds``, how in ``lag_measure``): the age of the oldest change not yet stored;
  0 when the store has acknowledged the source's WAL end. While a daemon streams: 0 when all
  its walsender sent is stored; the time since the daemon last stored an acknowledgement when
  that is overdue (a stuck daemon); else the server's own measure (pg_stat_replication.flush_lag
  of its walsender: from decoding a commit to its storing). With no daemon: the commit time of
  the first transaction waiting in the slot (peeked, bounded by PEEK_TIMEOUT; none waiting: 0).
- Counts: exact up to COUNT_LIMIT rows (a count), the planner's estimate beyond
  (``counts_exact``), see cdc/store/stats.py.
- Versions and LSNs are printed ``X/Y`` for people; JSON has versions as integers
  (``*_version``) and LSNs as ``X/Y`` (``*_lsn``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from cdc.capture.failover import pending_gap, recent_switches
from cdc.cli_table import echo_table
from cdc.config import Config, format_duration, format_size, redact_dsn
from cdc.failover_readiness import failover_json, failover_lines
from cdc.lsn import format_lsn, parse_lsn
from cdc.publications import partial_tables
from cdc.source_context import signing_status
from cdc.source_ddl import ddl_mode
from cdc.source_hosts import connected_host
from cdc.store.format import STATUS_CODES
from cdc.store.migrate import is_v1_store, v1_leftovers
from cdc.store.stats import count_stored
from cdc.store.writer import lock_holder

#: How long peeking at the slot for the first waiting transaction may take (its lag).
PEEK_TIMEOUT = "5s"
#: Rows peeked at most when looking for the first transaction with a change.
PEEK_ROWS = 1000
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


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
    mutations: int | None = None  # changes stored (counted, or estimated: counts_exact)
    transactions: int | None = None  # transactions stored (likewise)
    tables: int | None = None  # captured tables (one per source relation)
    dropped_tables: int | None = None
    daemon: str | None = None
    last_error: str | None = None
    last_error_at: datetime | None = None
    retention: str | None = None
    #: context message signing on the source: key id, and whether pg_logical_emit_message is
    #: still executable by PUBLIC (cdc.source_context.SigningStatus)
    signing: str | None = None
    gaps: list[dict[str, Any]] = field(default_factory=list)
    # Source failover (cdc/failover_readiness.py, cdc/capture/failover.py).
    source_server: str | None = None  # host:port of the primary the source DSN reached
    failover: dict[str, Any] | None = None  # the slot's readiness to survive a promotion
    switches: list[dict[str, Any]] = field(default_factory=list)  # newest first
    pending_gap: str | None = None  # capture stopped at a gap or fork: `cdc setup --recreate-slot`
    v1_tables: list[str] = field(default_factory=list)  # left by a store migration
    daemon_active: bool | None = None  # a daemon's store writer holds the slot's lock
    daemon_streaming: bool | None = None  # ... and the slot is active on the source
    lag_measure: str | None = None  # how lag_seconds was measured, or why it was not
    counts_exact: bool | None = None  # mutations and transactions counted (else estimated)
    max_lag_bytes: int | None = None
    max_lag_seconds: float | None = None
    walsender_flush_lag: float | None = None  # pg_stat_replication of the slot's walsender
    walsender_caught_up: bool | None = None  # its sent_lsn is flushed (stored)
    acked_age_seconds: float | None = None  # since the store last recorded an acknowledgement
    # Tables whose baseline or backfill is not done: their history is incomplete (docs/baseline.md).
    incomplete: list[dict[str, Any]] = field(default_factory=list)
    # Tables whose history a rewrite too large to record left inexact, until a backfill (docs/ddl.md).
    inexact: list[dict[str, Any]] = field(default_factory=list)
    # Tables whose changes are not all captured, and why (cdc/publications.py).
    partial: list[dict[str, str]] = field(default_factory=list)
    schema_changes: str | None = None  # "event trigger" | "relation messages only" (docs/ddl.md)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        for name, value in data.items():
            if isinstance(value, datetime):
                data[name] = value.isoformat()
        data["healthy"] = self.healthy
        data["problems"] = self.problems
        return data

    @property
    def problems(self) -> list[str]:
        """Why capture is not healthy (empty: healthy)."""
        found = []
        if self.source_error is not None:
            found.append(f"source: {self.source_error}")
        if self.store_error is not None:
            found.append(f"store: {self.store_error}")
        if self.slot_exists is False:
            found.append(f"slot {self.slot} is missing")
        if self.wal_status in ("lost", "unreserved"):
            found.append(f"the slot's wal_status is {self.wal_status}")
        for item in self.incomplete:
            found.append(
                f"{item['table']}: its {item['kind']} is {item['state']} (its history is incomplete)"
            )
        for item in self.inexact:
            found.append(
                f"{item['table']}: its history is inexact from version {item['since']} "
                f"(rewritten by {item['command']}, too large to record): `cdc backfill {item['table']}`"
            )
        for item in self.partial:
            if item["reason"] == "updates_fail":
                found.append(f"{item['table']}: {item['detail']}")
        if self.pending_gap is not None:
            found.append(f"capture stopped at a {self.pending_gap}: `cdc setup --recreate-slot`")
        if self.store_error is None and self.baseline_done is False:
            found.append("the baseline is incomplete: run `cdc setup`")
        if self.source_error is None and self.store_error is None and not self.daemon_streaming:
            found.append(
                "no daemon is streaming from the slot"
                + (" (one is connecting)" if self.daemon_active else "")
            )
        if (
            self.lag_bytes is not None
            and self.max_lag_bytes is not None
            and self.lag_bytes > self.max_lag_bytes
        ):
            found.append(f"lag {format_size(self.lag_bytes)} is over capture.max_lag_bytes")
        if (
            self.lag_seconds is not None
            and self.max_lag_seconds is not None
            and self.lag_seconds > self.max_lag_seconds
        ):
            found.append(f"lag {self.lag_seconds:.0f}s is over capture.max_lag_seconds")
        return found

    @property
    def healthy(self) -> bool:
        return not self.problems


def collect_status(config: Config) -> Status:
    status = Status(
        slot=config.source.slot,
        retention=format_duration(config.retention.default),
        max_lag_bytes=config.capture.max_lag_bytes,
        max_lag_seconds=config.capture.max_lag_seconds,
    )
    if config.source.dsn is None:
        status.source_error = "no source DSN given (--source, CDC_SOURCE_DSN or source.dsn)"
    else:
        dsn = config.require_source()
        status.source = redact_dsn(dsn)
        try:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
                _source_status(conn, config, status)
                status.signing = signing_status(conn).describe()
                status.source_server = connected_host(conn)
                status.partial = [p.as_json() for p in partial_tables(conn, config)]
                status.schema_changes = ddl_mode(conn)
        except psycopg.Error as exc:
            status.source_error = str(exc).strip().splitlines()[0]
        if status.source_error is None:
            status.failover = failover_json(dsn, config.source.slot, config.source.failover)
    if config.store.dsn is None:
        status.store_error = "no store DSN given (--store, CDC_STORE_DSN or store.dsn)"
    else:
        dsn = config.require_store()
        status.store = redact_dsn(dsn)
        try:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
                _store_status(conn, config, status)
        except psycopg.Error as exc:
            status.store_error = str(exc).strip().splitlines()[0]
    _lag(config, status)
    return status


def _source_status(conn: psycopg.Connection[Any], config: Config, status: Status) -> None:
    """The slot, the server's WAL end (read before the store's acked LSN: see _lag) and the
    slot's walsender, if any."""
    row = conn.execute(
        "SELECT s.active, s.active_pid, s.wal_status, s.safe_wal_size, s.confirmed_flush_lsn::text, "
        "(pg_current_wal_lsn() - s.restart_lsn)::bigint, pg_current_wal_lsn()::text, "
        "extract(epoch FROM r.flush_lag)::float8, r.flush_lsn >= r.sent_lsn "
        "FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid "
        "WHERE s.slot_name = %s",
        (config.source.slot,),
    ).fetchone()
    if row is None:
        status.slot_exists = False
        current = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        status.server_lsn = current[0] if current else None
        return
    status.slot_exists = True
    status.slot_active, status.active_pid, status.wal_status = row[0], row[1], row[2]
    status.safe_wal_size_bytes, status.confirmed_flush_lsn = row[3], row[4]
    status.retained_wal_bytes, status.server_lsn = row[5], row[6]
    status.walsender_flush_lag, status.walsender_caught_up = row[7], row[8]
    if row[4] and row[6]:
        status.lag_bytes = max(0, parse_lsn(row[6]) - parse_lsn(row[4]))


def _lag(config: Config, status: Status) -> None:
    """``lag_seconds``: the age of the oldest change not yet stored (module docstring)."""
    if status.server_lsn is None or not status.slot_exists or status.source_error is not None:
        status.lag_measure = "unknown: the source's slot cannot be read"
        return
    stored = max(
        parse_lsn(status.acked_lsn) if status.acked_lsn else 0,
        parse_lsn(status.confirmed_flush_lsn) if status.confirmed_flush_lsn else 0,
    )
    if stored >= parse_lsn(status.server_lsn):
        status.lag_seconds, status.lag_measure = 0.0, "caught up: the source's WAL end is stored"
    elif status.slot_active:
        _streaming_lag(config, status)
    else:
        _peek_lag(config, status)


def _streaming_lag(config: Config, status: Status) -> None:
    """A daemon reads the slot. A healthy one stores an acknowledgement at least every status
    interval or so while WAL waits (a batch, or an idle advance): one that stored nothing for
    longer is stuck, and the lag is at least that long. Else the server's own measure."""
    stale_after = 3 * config.capture.status_interval_seconds + 5
    age = status.acked_age_seconds
    if status.walsender_caught_up:
        status.lag_seconds, status.lag_measure = 0.0, "caught up: all the walsender sent is stored"
    elif age is not None and age > stale_after:
        status.lag_seconds = round(age, 3)
        status.lag_measure = "the daemon has stored nothing for that long while WAL waits"
    elif status.walsender_flush_lag is not None:
        status.lag_seconds = round(status.walsender_flush_lag, 3)
        status.lag_measure = "the walsender's flush_lag: from decoding a commit to its storing"
    else:
        status.lag_seconds = 0.0
        status.lag_measure = f"caught up: an acknowledgement stored {age or 0:.0f} s ago, no commit waits"


def _peek_lag(config: Config, status: Status) -> None:
    """No daemon reads the slot: the commit time of the first transaction with a change
    waiting in it (a peek: nothing is consumed)."""
    publication = '"' + config.source.publication.replace('"', '""') + '"'
    try:
        with psycopg.connect(config.require_source(), autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.SQL("SET statement_timeout = {}").format(sql.Literal(PEEK_TIMEOUT)))
            rows = conn.execute(
                "SELECT data FROM pg_catalog.pg_logical_slot_peek_binary_changes(%s, NULL, %s, "
                "'proto_version', '1', 'publication_names', %s)",
                (config.source.slot, PEEK_ROWS, publication),
            ).fetchall()
    except psycopg.Error as exc:
        text = str(exc).strip().splitlines()
        status.lag_measure = f"unknown: cannot peek at the slot ({text[0] if text else type(exc).__name__})"
        return
    commit: datetime | None = None
    for (data,) in rows:
        message = bytes(data)
        if message[:1] == b"B" and len(message) >= 17:  # Begin: final LSN, commit time, xid
            commit = _PG_EPOCH + timedelta(microseconds=int.from_bytes(message[9:17], "big", signed=True))
        elif message[:1] in (b"I", b"U", b"D", b"T") and commit is not None:
            status.lag_seconds = round(max(0.0, (datetime.now(UTC) - commit).total_seconds()), 3)
            status.lag_measure = "the first transaction waiting in the slot"
            return
    if len(rows) >= PEEK_ROWS:
        status.lag_measure = f"unknown: no change in the first {PEEK_ROWS} messages waiting in the slot"
        return
    status.lag_seconds, status.lag_measure = 0.0, "caught up: no change waits in the slot"


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
            "daemon_host, daemon_pid, last_error, last_error_at, extract(epoch FROM now() - updated_at)::float8 "
            "FROM {}.capture_state WHERE slot_name = %s"
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
    status.daemon_active = lock_holder(conn, config.store.schema_name, config.source.slot) is not None
    status.daemon_streaming = status.daemon_active and bool(status.slot_active)
    if status.daemon_active:  # the recorded pid is shown only while its daemon is alive
        status.daemon = f"{row[4]} pid {row[5]}" if row[4] else "pid unknown"
    status.last_error, status.last_error_at = row[6], row[7]
    status.acked_age_seconds = row[8]
    committed = STATUS_CODES["committed"]
    last = conn.execute(
        sql.SQL(
            "SELECT committed_at FROM {}.transactions_all WHERE status = %s ORDER BY position DESC LIMIT 1"
        ).format(schema),
        (committed,),
    ).fetchone()
    if last is not None:
        status.last_commit_at = last[0]
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
    status.mutations, changes_exact = count_stored(conn, config.store.schema_name, "changes", "changes_keep")
    status.transactions, transactions_exact = count_stored(
        conn, config.store.schema_name, "transactions", "transactions_keep"
    )
    status.counts_exact = changes_exact and transactions_exact
    counts = conn.execute(
        sql.SQL(
            "SELECT count(*), count(*) FILTER (WHERE dropped_position IS NOT NULL) FROM {}.tables"
        ).format(schema)
    ).fetchone()
    if counts is not None:
        status.tables, status.dropped_tables = int(counts[0]), int(counts[1])
    status.switches = recent_switches(conn, config.store.schema_name, config.source.slot)
    pending = pending_gap(conn, config.store.schema_name, config.source.slot)
    if pending is not None:
        status.pending_gap = f"{pending.outcome} after {format_lsn(pending.acked_lsn)}: {pending.reason}"
    status.incomplete = _incomplete(conn, config.store.schema_name)
    status.inexact = _inexact(conn, config.store.schema_name)
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


def _incomplete(conn: psycopg.Connection[Any], schema: str) -> list[dict[str, Any]]:
    """Tables whose baseline or backfill is not done (their history is incomplete)."""
    exists = conn.execute("SELECT to_regclass(%s)", (f"{schema}.baselines",)).fetchone()
    if not exists or exists[0] is None:
        return []
    rows = conn.execute(
        sql.SQL(
            "SELECT coalesce(format('%I.%I', n.schema_name, n.table_name), b.table_id::text), b.kind, b.state, "
            "b.rows, b.estimated_rows, b.error, b.started_at FROM {s}.baselines b LEFT JOIN LATERAL ("
            "SELECT schema_name, table_name FROM {s}.table_names t WHERE t.table_id = b.table_id "
            "ORDER BY from_position DESC LIMIT 1) n ON true WHERE b.state <> 'done' OR b.complete_from IS NULL "
            "ORDER BY 1"
        ).format(s=sql.Identifier(schema))
    ).fetchall()
    return [
        {
            "table": r[0],
            "kind": "baseline" if r[1] == "b" else "backfill",
            "state": r[2],
            "rows": int(r[3]),
            "estimated_rows": int(r[4]) if r[4] is not None else None,
            "error": r[5],
            "started_at": r[6].isoformat() if r[6] is not None else None,
        }
        for r in rows
    ]


def _inexact(conn: psycopg.Connection[Any], schema: str) -> list[dict[str, Any]]:
    """Live tables with a rewrite too large to record that no backfill resolved yet."""
    exists = conn.execute("SELECT to_regclass(%s)", (f"{schema}.ddl_events",)).fetchone()
    if not exists or exists[0] is None:
        return []
    rows = conn.execute(
        sql.SQL(
            "SELECT format('%I.%I', n.schema_name, n.table_name), min(e.position), "
            "(array_agg(e.command ORDER BY e.position))[1] FROM {s}.ddl_events e "
            "JOIN {s}.tables t ON t.table_id = e.table_id AND t.dropped_position IS NULL "
            "CROSS JOIN LATERAL (SELECT schema_name, table_name FROM {s}.table_names x "
            "WHERE x.table_id = e.table_id ORDER BY from_position DESC LIMIT 1) n "
            "WHERE (e.details ->> 'inexact')::boolean AND e.resolved_position IS NULL "
            "GROUP BY 1 ORDER BY 1"
        ).format(s=sql.Identifier(schema))
    ).fetchall()
    return [{"table": r[0], "since": format_lsn(r[1]), "command": r[2]} for r in rows]


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

    problems = status.problems
    lines = [
        ("health", "ok" if not problems else "UNHEALTHY: " + "; ".join(problems)),
        ("source", (status.source_error and f"ERROR: {status.source_error}") or show(status.source)),
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
        ("safe_wal_size", _safe_wal_size(status, size)),
        ("server LSN", show(status.server_lsn)),
        ("confirmed LSN", show(status.confirmed_flush_lsn)),
        ("lag", _lag_text(status)),
        ("lag (WAL)", size(status.lag_bytes)),
        ("stored up to", show(status.acked_lsn)),
        ("versions", _version_range(status)),
        ("last commit", show(status.last_commit_at)),
        ("store format", show(status.store_format)),
        (
            "tables",
            show(status.tables) + (f" ({status.dropped_tables} dropped)" if status.dropped_tables else ""),
        ),
        ("transactions", _count(status.transactions, status.counts_exact)),
        ("mutations", _count(status.mutations, status.counts_exact)),
        ("retention", show(status.retention)),
        ("schema changes", show(status.schema_changes)),
        ("daemon", _daemon_text(status)),
        ("signing", show(status.signing)),
        ("last error", f"{status.last_error} ({show(status.last_error_at)})" if status.last_error else "-"),
    ]
    if status.v1_tables:
        lines.append(
            (
                "format 1",
                f"{len(status.v1_tables)} table(s) kept by the migration: `cdc setup --drop-v1` drops them",
            )
        )
    lines.extend(failover_lines(status.source_server, status.failover, status.switches, status.pending_gap))
    for item in status.incomplete:
        estimate = f" of ~{item['estimated_rows']:,}" if item["estimated_rows"] else ""
        command = "cdc setup" if item["kind"] == "baseline" else f"cdc backfill {item['table']}"
        error = f": {item['error']}" if item["error"] else ""
        lines.append(
            (
                "INCOMPLETE",
                f"{item['table']}: {item['kind']} {item['state']}{error}, {item['rows']:,}{estimate} rows "
                f"(its history is incomplete; `{command}`)",
            )
        )
    for item in status.inexact:
        lines.append(
            (
                "INEXACT",
                f"{item['table']}: history inexact from version {item['since']} (rewritten by "
                f"{item['command']}, too large to record; `cdc backfill {item['table']}`)",
            )
        )
    for item in status.partial:
        label = "WRITES FAIL" if item["reason"] == "updates_fail" else "partial"
        lines.append((label, f"{item['table']}: {item['detail']}"))
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


def print_status(status: Status) -> None:
    """The table form, on stdout."""
    echo_table(render_status(status))


def _count(value: int | None, exact: bool | None) -> str:
    if value is None:
        return "-"
    return f"{value:,}" if exact else f"≈ {value:,} (the planner's estimate)"


def _daemon_text(status: Status) -> str:
    if status.daemon_active is None:
        return "-"
    if not status.daemon_active:
        return "not running"
    return f"{status.daemon}, " + ("streaming" if status.daemon_streaming else "connected, not streaming")


def _lag_text(status: Status) -> str:
    if status.lag_seconds is None:
        return f"- ({status.lag_measure})" if status.lag_measure else "-"
    return f"{status.lag_seconds:g} s ({status.lag_measure})"


def _safe_wal_size(status: Status, size: Any) -> str:
    if status.safe_wal_size_bytes is not None:
        return str(size(status.safe_wal_size_bytes))
    if status.slot_exists and status.wal_status not in (None, "lost"):
        return "no limit (max_slot_wal_keep_size = -1)"
    return "-"
