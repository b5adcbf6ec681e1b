"""Following the source's primary: what a capture session checks before it streams.

The source may be a primary with physical standbys. When the primary fails and a standby is
promoted, the daemon's next session reaches the new primary (a multi-host DSN with
``target_session_attrs=primary``, cdc/source_hosts.py). Before it streams from there it
proves that nothing is lost and nothing is doubled:

1. The server is the same database cluster: the system identifier (IDENTIFY_SYSTEM) equals
   ``capture_state.source_system_id`` (a promoted physical standby keeps it; checked by the
   session).
2. The server's history contains every position the store acknowledged. The store remembers
   the server and timeline capture last read from (``source_switches``). When the timeline
   changed, the new one's history file (``TIMELINE_HISTORY``) says where the old timeline
   ended on this server (its fork point). ``acked_lsn`` beyond that point means the store
   holds transactions this server never had (an old primary ran on after the standby was
   promoted, or replication was asynchronous without ``synchronized_standby_slots``): a
   **fork**. A server on an older timeline than the one capture read last (an old primary
   that came back) is refused and retried: it must be fenced, not captured.
3. The slot exists and holds everything after ``acked_lsn``: its ``confirmed_flush_lsn`` is at
   or before ``acked_lsn`` (a failover slot synchronized from the old primary, PostgreSQL
   17+, is; the store then skips what it already has). A slot missing on the new primary (it
   was not synchronized: PostgreSQL < 17, ``source.failover`` off, or slot synchronization not
   configured), invalidated, or confirmed past ``acked_lsn`` (changes in between were consumed
   elsewhere) is a **gap**.

A gap or a fork is recorded in ``source_switches`` with its bounds and stops the daemon
(``SlotLostError``, exit code 5; ``cdc status`` unhealthy) until ``cdc setup --recreate-slot``
takes a new baseline and records the gap in ``gaps`` with this reason. Capture never moves
silently past one. A switch that passes is recorded too, counted
(``cdc_source_switches_total``) and logged (``source_switched``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
import structlog
from psycopg import sql

from cdc.config import redact_dsn
from cdc.errors import SlotLostError, SourceUnavailableError, StoreUnavailableError, error_text
from cdc.lsn import format_lsn, parse_lsn
from cdc.metrics import Metrics
from cdc.source_hosts import connected_host
from cdc.stream.replication import ReplicationStream
from cdc.watchdog import Deadline

log = structlog.get_logger("cdc.failover")

GAP_HINT = (
    "run `cdc setup --recreate-slot`: it takes a new baseline and records the gap in the history; "
    "to keep the slot through the next promotion use a failover slot (PostgreSQL 17+, "
    "source.failover: true, docs/reliability.md)"
)
FORK_HINT = (
    "stop and fence the old primary; then `cdc setup --recreate-slot` takes a new baseline (the "
    "history keeps the transactions the new primary lost, before the recorded gap); set "
    "synchronized_standby_slots on the primary so capture never reads ahead of the standby"
)


@dataclass(frozen=True, slots=True)
class SourceServer:
    """The server a session streams from."""

    host: str  # host:port
    system_id: str
    timeline: int


@dataclass(frozen=True, slots=True)
class SlotView:
    """The slot as the server shows it."""

    confirmed_flush: int | None
    wal_status: str | None
    failover: bool | None  # PostgreSQL 17+
    synced: bool | None  # PostgreSQL 17+: synchronized from a primary (kept after a promotion)


@dataclass(frozen=True, slots=True)
class Switch:
    """A row of ``source_switches``."""

    switch_id: int
    host: str
    timeline: int
    outcome: str  # first | resumed | gap | fork
    acked_lsn: int
    reason: str | None
    resolved_position: int | None

    @property
    def pending(self) -> bool:
        """A gap or fork that `cdc setup --recreate-slot` has not resolved yet."""
        return self.outcome in ("gap", "fork") and self.resolved_position is None


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a session may do on a server: the row to record (outcome, reason) and the fork."""

    outcome: str  # first | resumed | same | gap | fork
    reason: str | None = None
    fork_lsn: int | None = None


# ============================================================================ timelines


def parse_history(content: str) -> dict[int, int]:
    """A timeline history file → {ancestor timeline: the LSN where it ended (switched)}."""
    ended: dict[int, int] = {}
    for line in content.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0].startswith("#"):
            continue
        ended[int(fields[0])] = parse_lsn(fields[1])
    return ended


# ============================================================================ the decision


def assess(
    *,
    slot: str,
    previous: Switch | None,
    server: SourceServer,
    acked_lsn: int,
    view: SlotView | None,
    history: dict[int, int] | None,
) -> Verdict:
    """Whether capture may resume on ``server`` from ``acked_lsn`` (pure; see the module doc).

    ``history``: the server's timeline history (None on timeline 1 or when the timeline did
    not change). Raises SourceUnavailableError for a server on an older timeline (retried)."""
    acked = format_lsn(acked_lsn)
    switched = previous is not None and (previous.host, previous.timeline) != (server.host, server.timeline)
    fork_lsn: int | None = None
    if previous is not None and previous.timeline != server.timeline:
        if server.timeline < previous.timeline:
            raise SourceUnavailableError(
                f"the source {server.host} is on timeline {server.timeline}, older than timeline "
                f"{previous.timeline} capture last read from ({previous.host}): an old primary that was "
                "not shut down after a promotion? Not capturing from it",
                hint="fence the old primary (stop it, or make it a standby of the new one); capture "
                "then follows the new primary",
            )
        ended = (history or {}).get(previous.timeline)
        if ended is None:
            return Verdict(
                "fork",
                f"the history of timeline {server.timeline} on {server.host} does not contain timeline "
                f"{previous.timeline}, where capture acknowledged {acked}: it cannot be checked that "
                "this server has every change the history holds",
            )
        fork_lsn = ended
        if acked_lsn > ended:
            return Verdict(
                "fork",
                f"timeline {previous.timeline} ends at {format_lsn(ended)} on {server.host} (timeline "
                f"{server.timeline}), but the history holds changes up to {acked}: the transactions "
                "between were captured from the old primary and never reached the promoted one",
                fork_lsn,
            )
    where = f"{server.host} (timeline {server.timeline})"
    after = "the promotion of " if switched else ""
    if view is None:
        why = (
            f"replication slot {slot!r} does not exist on {where} after {after or 'it was dropped from '}"
            f"{'the standby: it was not synchronized to it' if switched else 'the source'}"
        )
        return Verdict("gap", f"{why}; changes after {acked} were not captured", fork_lsn)
    if view.wal_status == "lost":
        return Verdict(
            "gap",
            f"replication slot {slot!r} on {where} was invalidated (wal_status=lost): the WAL after "
            f"{acked} is gone",
            fork_lsn,
        )
    if view.confirmed_flush is not None and view.confirmed_flush > acked_lsn:
        return Verdict(
            "gap",
            f"replication slot {slot!r} on {where} is confirmed up to {format_lsn(view.confirmed_flush)}, "
            f"past the {acked} the history holds: the changes between were consumed elsewhere"
            + (" (a slot not synchronized from the old primary)" if switched and not view.synced else ""),
            fork_lsn,
        )
    if previous is None:
        return Verdict("first", None, fork_lsn)
    if not switched:
        return Verdict("same")
    synced = " (a synchronized failover slot)" if view.synced else ""
    return Verdict(
        "resumed",
        f"slot {slot!r} confirmed at {format_lsn(view.confirmed_flush or 0)}{synced}, at or before {acked}",
        fork_lsn,
    )


# ============================================================================ the store side


class SwitchLog:
    """``source_switches`` for one slot, on a short connection of its own (the writer process
    holds the store's lock; this runs in the same, active, daemon)."""

    def __init__(self, dsn: str, schema: str, slot: str, *, timeout: float = 30) -> None:
        self.dsn, self.schema, self.slot, self.timeout = dsn, schema, slot, timeout

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(self.dsn, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as exc:
            raise StoreUnavailableError(f"cannot reach the history store: {error_text(exc)}") from exc

    def _silent(self, what: str) -> StoreUnavailableError:
        return StoreUnavailableError(f"the history store went silent: {what}")

    def last(self) -> Switch | None:
        with self._connect() as conn, Deadline(conn, self.timeout, self._silent):
            return last_switch(conn, self.schema, self.slot)

    def record(
        self,
        server: SourceServer,
        previous: Switch | None,
        acked_lsn: int,
        view: SlotView | None,
        verdict: Verdict,
    ) -> None:
        with self._connect() as conn, Deadline(conn, self.timeout, self._silent):
            if last_switch(conn, self.schema, self.slot) is None and not _has_table(conn, self.schema):
                # A store set up by an earlier version: `cdc setup` adds the table.
                log.warning("source_switches_missing", hint="run `cdc setup` to record source switches")
                return
            conn.execute(
                sql.SQL(
                    "INSERT INTO {}.source_switches (slot_name, host, timeline, previous_host, previous_timeline, "
                    "acked_lsn, slot_confirmed_lsn, slot_synced, fork_lsn, outcome, reason) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                ).format(sql.Identifier(self.schema)),
                (
                    self.slot,
                    server.host,
                    server.timeline,
                    previous.host if previous else None,
                    previous.timeline if previous else None,
                    acked_lsn,
                    view.confirmed_flush if view else None,
                    view.synced if view else None,
                    verdict.fork_lsn,
                    verdict.outcome,
                    verdict.reason,
                ),
            )


_SWITCH_COLUMNS = "switch_id, host, timeline, outcome, acked_lsn, reason, resolved_position"


def _has_table(conn: psycopg.Connection[Any], schema: str) -> bool:
    exists = conn.execute("SELECT to_regclass(%s)", (f"{schema}.source_switches",)).fetchone()
    return bool(exists and exists[0] is not None)


def last_switch(conn: psycopg.Connection[Any], schema: str, slot: str) -> Switch | None:
    """The latest row of ``source_switches`` for ``slot`` (None: none, or a store without it)."""
    if not _has_table(conn, schema):
        return None
    row = conn.execute(
        sql.SQL(
            f"SELECT {_SWITCH_COLUMNS} FROM {{}}.source_switches WHERE slot_name = %s ORDER BY switch_id DESC LIMIT 1"
        ).format(sql.Identifier(schema)),
        (slot,),
    ).fetchone()
    return Switch(*row) if row else None


def recent_switches(
    conn: psycopg.Connection[Any], schema: str, slot: str, limit: int = 5
) -> list[dict[str, Any]]:
    """The latest rows of ``source_switches``, newest first, for `cdc status`."""
    if not _has_table(conn, schema):
        return []
    rows = conn.execute(
        sql.SQL(
            "SELECT switched_at, host, timeline, previous_host, previous_timeline, acked_lsn, slot_confirmed_lsn, "
            "slot_synced, outcome, reason, resolved_position FROM {}.source_switches WHERE slot_name = %s "
            "ORDER BY switch_id DESC LIMIT %s"
        ).format(sql.Identifier(schema)),
        (slot, limit),
    ).fetchall()
    return [
        {
            "at": r[0].isoformat(),
            "host": r[1],
            "timeline": r[2],
            "previous_host": r[3],
            "previous_timeline": r[4],
            "acked_lsn": format_lsn(r[5]),
            "slot_confirmed_lsn": format_lsn(r[6]) if r[6] is not None else None,
            "slot_synced": r[7],
            "outcome": r[8],
            "reason": r[9],
            "resolved_position": format_lsn(r[10]) if r[10] is not None else None,
        }
        for r in rows
    ]


def record_gap(cur: psycopg.Cursor[Any], slot: str, after: int, resumed: int) -> None:
    """`cdc setup --recreate-slot`, in its store transaction: the ``gaps`` row (with the reason
    the daemon recorded, if it stopped at a gap or fork) and the pending switch resolved."""
    cur.execute("SELECT to_regclass('source_switches') IS NOT NULL")
    row = cur.fetchone()
    reason = None
    if row is not None and row[0]:
        cur.execute(
            "UPDATE source_switches SET resolved_position = %s WHERE slot_name = %s AND outcome IN ('gap', 'fork') "
            "AND resolved_position IS NULL RETURNING outcome, reason",
            (resumed, slot),
        )
        reasons = [f"{r[0]}: {r[1]}" for r in cur.fetchall() if r[1]]
        reason = "; ".join(reasons) or None
    cur.execute(
        "INSERT INTO gaps (slot_name, after_position, resumed_position, reason) VALUES (%s, %s, %s, %s) "
        "ON CONFLICT DO NOTHING",
        (slot, after, resumed, reason or "slot re-created (cdc setup --recreate-slot)"),
    )


def identify(repl: psycopg.Connection[Any]) -> tuple[str, int]:
    """(host:port, timeline) of the server a replication connection reached."""
    row = repl.execute("IDENTIFY_SYSTEM").fetchone()
    return connected_host(repl), int(row[1]) if row else 0


def record_slot_created(cur: psycopg.Cursor[Any], slot: str, server: tuple[str, int], position: int) -> None:
    """`cdc setup`, in the store transaction that completes a baseline: the server and timeline
    the new slot lives on, where the next session's checks start from."""
    cur.execute(
        "INSERT INTO source_switches (slot_name, host, timeline, acked_lsn, slot_confirmed_lsn, outcome, reason) "
        "VALUES (%s, %s, %s, %s, %s, 'first', 'slot created by cdc setup')",
        (slot, server[0], server[1], position, position),
    )


def pending_gap(conn: psycopg.Connection[Any], schema: str, slot: str) -> Switch | None:
    """The gap or fork the daemon stopped at, not yet resolved by `cdc setup --recreate-slot`."""
    last = last_switch(conn, schema, slot)
    return last if last is not None and last.pending else None


# ============================================================================ the source side


def slot_view(conn: psycopg.Connection[Any], slot: str, timeout: float) -> SlotView | None:
    """The slot on the server ``conn`` reached (a normal connection: replication ones cannot
    read the catalog)."""
    v17 = conn.info.server_version >= 170000
    extra = "failover, synced" if v17 else "NULL::bool, NULL::bool"

    def silent(what: str) -> SourceUnavailableError:
        return SourceUnavailableError(f"the source went silent: a catalog query had {what}")

    with Deadline(conn, timeout, silent):
        row = conn.execute(
            f"SELECT confirmed_flush_lsn::text, wal_status, {extra} FROM pg_replication_slots "
            "WHERE slot_name = %s AND database = current_database()",
            (slot,),
        ).fetchone()
    if row is None:
        return None
    return SlotView(parse_lsn(row[0]) if row[0] else None, row[1], row[2], row[3])


def verify_source(
    stream: ReplicationStream,
    source_dsn: str,
    *,
    slot: str,
    acked_lsn: int,
    switches: SwitchLog,
    metrics: Metrics,
    timeout: float,
    connect_timeout: float,
) -> SourceServer:
    """Check that capture may resume on the server ``stream`` reached (module doc); record
    and count a switch. Raises SlotLostError at a gap or fork, SourceUnavailableError when the
    server is a standby or an old primary (retried)."""
    if stream.in_hot_standby:
        raise SourceUnavailableError(
            f"the source {stream.host} is a standby (in hot standby mode): waiting for a primary",
            hint="name every server in the source DSN (host=a,b) with target_session_attrs=primary, "
            "or source.hosts; a standby being promoted is picked up by the next attempt",
        )
    server = SourceServer(stream.host, stream.system_id or "", stream.timeline)
    previous = switches.last()
    if previous is not None and previous.pending:
        metrics.source_info.clear()
        raise SlotLostError(
            f"capture stopped at a {previous.outcome} recorded on {previous.host}: {previous.reason}",
            hint=GAP_HINT if previous.outcome == "gap" else FORK_HINT,
        )
    history = None
    if previous is not None and server.timeline > previous.timeline and server.timeline > 1:
        history = parse_history(stream.timeline_history(server.timeline))
    try:
        with psycopg.connect(source_dsn, autocommit=True, connect_timeout=int(connect_timeout)) as conn:
            if connected_host(conn) != server.host:
                raise SourceUnavailableError(
                    f"two connections to the source reached two servers ({server.host}, {connected_host(conn)}): "
                    "a failover in progress? Trying again"
                )
            view = slot_view(conn, slot, timeout)
    except psycopg.OperationalError as exc:
        raise SourceUnavailableError(
            f"cannot reach the source ({redact_dsn(source_dsn)}): {error_text(exc)}"
        ) from exc
    verdict = assess(
        slot=slot, previous=previous, server=server, acked_lsn=acked_lsn, view=view, history=history
    )
    if verdict.outcome != "same":
        switches.record(server, previous, acked_lsn, view, verdict)
    metrics.source_info.clear()
    metrics.source_info.labels(host=server.host, timeline=str(server.timeline)).set(1)
    fields: dict[str, Any] = {
        "host": server.host,
        "timeline": server.timeline,
        "previous_host": previous.host if previous else None,
        "previous_timeline": previous.timeline if previous else None,
        "lsn": format_lsn(acked_lsn),
        "slot_confirmed_lsn": format_lsn(view.confirmed_flush) if view and view.confirmed_flush else None,
        "slot_synced": view.synced if view else None,
        "fork_lsn": format_lsn(verdict.fork_lsn) if verdict.fork_lsn is not None else None,
    }
    if verdict.outcome in ("gap", "fork"):
        if previous is not None:
            metrics.source_switches.labels(outcome=verdict.outcome).inc()
        metrics.source_info.clear()
        log.error(
            "source_gap" if verdict.outcome == "gap" else "source_fork", reason=verdict.reason, **fields
        )
        raise SlotLostError(
            verdict.reason or verdict.outcome, hint=GAP_HINT if verdict.outcome == "gap" else FORK_HINT
        )
    if verdict.outcome == "resumed":
        metrics.source_switches.labels(outcome="resumed").inc()
        log.warning("source_switched", **fields)
    return server


def same_source(stream: ReplicationStream, server: SourceServer) -> None:
    """The session's second connection reached the server it checked (else: try again)."""
    if (stream.host, stream.timeline) != (server.host, server.timeline) or stream.in_hot_standby:
        raise SourceUnavailableError(
            f"the source changed while the session started ({server.host} timeline {server.timeline} → "
            f"{stream.host} timeline {stream.timeline}): checking it again"
        )
