"""Pruning of a format-2 history store: drop expired partitions, keep time travel exact.

docs/retention.md is the reference. :class:`Pruner` drops the partitions of ``changes``,
``transactions`` and ``context_changes`` older than ``retention.default``. It first **stages**
the keyframes (:mod:`cdc.store.keyframes`) without any table lock, pending above the visible
floor; then one locked transaction checks that nothing the staging read has changed (else it
computes them inline), copies the rows of longer-retention tables (and their transactions and
context changes) to the ``*_keep`` tables, removes what is left at or below the new floor outside
the dropped partitions, moves the floor (which publishes the staged keyframes), records the prune
and drops the partitions last. Then it expires request errors reported before the horizon.

Must not: hold a table lock while computing keyframes, leave a moment where readers see rows and
their keyframes together (or neither), or put a row value in a log line or a stored error.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import structlog
from psycopg import sql
from psycopg.types.json import Jsonb

from cdc.config import RetentionConfig, redact_dsn
from cdc.errors import CdcError, StoreUnavailableError, error_text
from cdc.lsn import format_lsn
from cdc.metrics import Metrics
from cdc.store.keyframes import Mode, Source, compute_keyframes, keyless_tables
from cdc.store.prune_plan import KF, PrunePlan, PruneReport, make_plan, plan_identity
from cdc.store.prune_steps import copy_longer, expire_longer, remove_stragglers, remove_transactions
from cdc.store.retention import (
    AHEAD,
    PARTITIONED,
    _ensure_buckets,
    bucket_start,
    list_partitions,
    set_partition_interval,
)
from cdc.store.stats import RetentionStats, retention_stats

__all__ = ["PruneLockError", "PruneReport", "Pruner"]

log = structlog.get_logger("cdc.retention")

Conn = psycopg.Connection[Any]
Cursor = psycopg.Cursor[Any]


class PruneLockError(StoreUnavailableError):
    """The partitions could not be dropped within the lock timeout: nothing was changed."""


class _DryRun(Exception):  # noqa: N818 - control flow: roll the prune transaction back
    pass


class Pruner:
    """Drops expired partitions on a schedule, keeping time travel exact from the new floor.

    ``maybe_prune(now)`` does nothing until ``retention.prune_interval`` has passed since the
    last prune (recorded in the store, so restarts do not prune again at once); ``prune()``
    runs one now. Uses its own connection (autocommit, explicit transactions): run it from a
    thread of its own so ingestion never waits on it (see :meth:`start`). Not thread-safe.
    """

    def __init__(
        self,
        dsn: str,
        schema: str,
        retention: RetentionConfig,
        *,
        metrics: Metrics | None = None,
        lock_timeout: str = "500ms",
        drop_attempts: int = 10,
        request_batch: int = 10_000,
        request_budget: int = 200_000,
        work_mem: str = "256MB",
    ) -> None:
        self.dsn = dsn
        self.schema = schema
        self.retention = retention
        self.metrics = metrics
        self.lock_timeout = lock_timeout
        self.drop_attempts = drop_attempts
        self.request_batch = request_batch
        self.request_budget = request_budget
        self.work_mem = work_mem
        self._conn: Conn | None = None
        self._lock_started = 0.0
        self._last_attempt: datetime | None = None
        self._last_stats = 0.0
        self.last_report: PruneReport | None = None

    # ------------------------------------------------------------------ plumbing

    def _connection(self) -> Conn:
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        try:
            conn = psycopg.connect(
                self.dsn, autocommit=True, connect_timeout=10, application_name="cdc-prune"
            )
        except psycopg.OperationalError as exc:
            raise StoreUnavailableError(
                f"cannot reach the history store ({redact_dsn(self.dsn)}): {_first_line(exc)}"
            ) from None
        found = conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL",
            (sql.Identifier(self.schema, "changes_keep").as_string(conn),),
        ).fetchone()
        if not found or not found[0]:
            conn.close()
            raise StoreUnavailableError(
                f"the history store has no format-2 schema {self.schema!r}",
                hint="run `cdc setup` (it creates the store schema, or converts a format-1 store)",
            )
        # Before any temporary table of the session: room for the keyframe computation's.
        conn.execute("SET temp_buffers = '64MB'")
        self._conn = conn
        return conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Pruner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _t(self, name: str) -> sql.Identifier:
        return sql.Identifier(self.schema, name)

    # ------------------------------------------------------------------ scheduling

    def maybe_prune(self, now: datetime | None = None) -> PruneReport | None:
        """Prune if ``retention.prune_interval`` has passed since the last prune; else None.

        Never raises for store trouble: it logs ``prune_failed``, counts the error and tries
        again after a minute (or the prune interval, if shorter). Refreshes the retention
        gauges at most once a minute.
        """
        now = now or datetime.now(UTC)
        interval = self.retention.prune_interval
        try:
            if self._last_attempt is None:
                row = (
                    self._connection()
                    .execute(sql.SQL("SELECT last_prune_at FROM {}").format(self._t("retention_state")))
                    .fetchone()
                )
                self._last_attempt = row[0] if row and row[0] else datetime.min.replace(tzinfo=UTC)
            if now - self._last_attempt < interval:
                if time.monotonic() - self._last_stats >= 60:
                    self.refresh_metrics()
                return None
            self._last_attempt = now
            return self.prune(now)
        except (CdcError, psycopg.Error) as exc:
            retry = min(interval, timedelta(minutes=1))
            self._last_attempt = now - interval + retry
            if isinstance(exc, psycopg.Error):
                self.close()
            if self.metrics is not None:
                self.metrics.errors.labels(kind=f"prune:{type(exc).__name__}").inc()
            log.warning("prune_failed", error=_first_line(exc), retry_in_seconds=retry.total_seconds())
            return None

    def run(self, stop: threading.Event, poll_seconds: float = 30.0) -> None:
        """Call :meth:`maybe_prune` every ``poll_seconds`` until ``stop`` is set."""
        try:
            while not stop.is_set():
                self.maybe_prune()
                stop.wait(poll_seconds)
        finally:
            self.close()

    def start(self, stop: threading.Event, poll_seconds: float = 30.0) -> threading.Thread:
        """:meth:`run` in a daemon thread named ``cdc-pruner``; set ``stop`` and join it to end."""
        thread = threading.Thread(target=self.run, args=(stop, poll_seconds), name="cdc-pruner", daemon=True)
        thread.start()
        return thread

    def refresh_metrics(self) -> RetentionStats | None:
        """Set the ``cdc_retention_*`` gauges from catalog estimates."""
        self._last_stats = time.monotonic()
        stats = retention_stats(self._connection(), self.schema)
        m = self.metrics
        if m is not None:
            m.retention_rows.set(stats.rows)
            m.retention_bytes.set(stats.bytes)
            m.retention_partitions.set(stats.partitions)
            m.retention_oldest_seconds.set(stats.oldest.timestamp() if stats.oldest else None)
        return stats

    # ------------------------------------------------------------------ housekeeping

    def prepare(self, now: datetime | None = None) -> list[str]:
        """Record the configured partition interval, create the next partitions, and move rows
        out of the DEFAULT partitions into partitions of their own: each in a short transaction
        of its own (never while the prune transaction holds its locks). Lock trouble is logged
        and left for the next run: it never stops the prune itself."""
        now = now or datetime.now(UTC)
        conn = self._connection()
        interval = self.retention.partition_interval
        created: list[str] = []
        try:
            with conn.transaction():
                set_partition_interval(conn, self.schema, interval)
            current = bucket_start(now, interval)
            with conn.transaction():
                created += _ensure_buckets(
                    conn, self.schema, [current + k * interval for k in range(AHEAD + 1)], interval,
                    wait=True, lock_timeout="5s",
                ) or []  # fmt: skip
            for parent in PARTITIONED:
                default = next((p for p in list_partitions(conn, self.schema, parent) if p.default), None)
                if default is None:
                    continue
                # One interval at a time: each move is bounded by one interval of rows.
                while True:
                    row = conn.execute(
                        sql.SQL("SELECT committed_at FROM {} LIMIT 1").format(self._t(default.name))
                    ).fetchone()
                    if row is None:
                        break
                    with conn.transaction():
                        made = _ensure_buckets(
                            conn, self.schema, [bucket_start(row[0], interval)], interval,
                            wait=True, lock_timeout="5s",
                        ) or []  # fmt: skip
                    if not made:  # covered already: cannot happen (ATTACH refuses), but never loop
                        log.warning("default_partition_rows_left", partition=default.name)
                        break
                    created += made
        except psycopg.OperationalError:
            raise
        except psycopg.Error as exc:
            log.warning("partitions_not_prepared", error=_first_line(exc))
        return created

    # ------------------------------------------------------------------ the prune

    def prune(self, now: datetime | None = None, *, dry_run: bool = False, stage: bool = True) -> PruneReport:
        """Drop the partitions past ``retention.default`` (keyframes first); see the module doc.

        Two steps: :meth:`stage` computes the keyframes ahead, outside the locked transaction
        (pending, invisible to readers); the prune transaction then takes its locks, checks that
        nothing the staging read has changed, and publishes them with the floor move and the drop
        (else it computes them inline, as a fallback).

        With ``dry_run`` nothing changes: the plan, the new floor and the number of keyframes
        are computed in a transaction that is rolled back (no staging, no partition created).
        ``stage=False`` skips the staging step: a staging made earlier by :meth:`stage` is
        published if still exact, else the keyframes are computed inline.
        """
        started = time.perf_counter()
        now = now or datetime.now(UTC)
        conn = self._connection()
        report = PruneReport(dry_run=dry_run, now=now, horizon=None, old_floor=None, floor=None)
        if not dry_run:
            report.partitions_created = self.prepare(now)
        if not dry_run and stage:
            stage_started = time.perf_counter()
            self.stage(now)
            report.stage_seconds = time.perf_counter() - stage_started
        self._lock_started = time.perf_counter()
        try:
            with conn.transaction():
                self._prune_transaction(conn, report)
                if dry_run:
                    raise _DryRun
        except _DryRun:
            pass
        report.publish_seconds = time.perf_counter() - self._lock_started
        if not dry_run and report.horizon is not None:
            report.requests_removed = self._prune_request_errors(conn, report.horizon)
        report.seconds = time.perf_counter() - started
        self.last_report = report
        self._record(report)
        return report

    def _record(self, report: PruneReport) -> None:
        log.info(
            "pruned" if not report.dry_run else "prune_planned",
            partitions=report.dropped,
            horizon=report.horizon.isoformat() if report.horizon else None,
            floor=format_lsn(report.floor) if report.floor is not None else None,
            keyframes=report.keyframes,
            staged=report.staged,
            kept_rows=report.kept_rows,
            stage_seconds=round(report.stage_seconds, 3),
            publish_seconds=round(report.publish_seconds, 3),
            seconds=round(report.seconds, 3),
        )
        m = self.metrics
        if m is None or report.dry_run:
            return
        m.pruned_partitions.inc(len(report.dropped))
        m.keyframes_written.inc(report.keyframes)
        m.prune_seconds.set(report.seconds)
        try:
            self.refresh_metrics()
        except (CdcError, psycopg.Error) as exc:
            log.warning("retention_stats_failed", error=_first_line(exc))

    # ------------------------------------------------------------------ staging

    def stage(self, now: datetime | None = None) -> dict[str, Any] | None:
        """Compute the keyframes of the next prune ahead of it, in a transaction of its own that
        holds the pruner's advisory lock but no table lock (writers and readers go on).

        The new keyframes go into ``changes_keep`` at the future floor, where readers do not see
        them until the prune moves the floor there (the ``changes_all`` view); the older
        keyframes that publishing must delete go into ``keyframes_retire``; what the staging read
        is recorded in ``retention_state.staged`` (partitions, floor, horizon, configuration, and
        the largest position of each relation that goes). A staging already there with the same
        identity is reused; any other one is discarded first. Returns the recorded staging, or
        None when there is nothing to stage.
        """
        now = now or datetime.now(UTC)
        conn = self._connection()
        scratch = PruneReport(dry_run=False, now=now, horizon=None, old_floor=None, floor=None)
        started = time.perf_counter()
        with conn.transaction():
            cur = conn.cursor()
            plan = self._plan(cur, scratch, lock=False)
            identity = plan_identity(cur, plan, self.retention)
            staged = self._read_staged(cur)
            if identity is not None and staged is not None and staged.get("identity") == identity:
                log.info("keyframes_staged", reused=True, keyframes=staged.get("keyframes"))
                return staged
            self._discard(cur, plan.old_floor, staged is not None)
            if identity is None or plan.floor is None:
                return None
            written, replaced = self._keyframes(cur, plan.sources, plan.params, plan.floor, plan.horizon, "stage",
                                                keyless=identity["keyless"])  # fmt: skip
            staged = {
                "identity": identity,
                "keyframes": written,
                "retire": replaced,
                "staged_at": datetime.now(UTC).isoformat(),
                "seconds": round(time.perf_counter() - started, 6),
            }
            cur.execute(
                sql.SQL("UPDATE {} SET staged = %s, updated_at = now()").format(self._t("retention_state")),
                (Jsonb(staged),),
            )
        log.info(
            "keyframes_staged", reused=False, keyframes=written, retire=replaced, seconds=staged["seconds"]
        )
        return staged

    def _read_staged(self, cur: Cursor) -> dict[str, Any] | None:
        row = cur.execute(sql.SQL("SELECT staged FROM {}").format(self._t("retention_state"))).fetchone()
        return row[0] if row and isinstance(row[0], dict) else None

    def _discard(self, cur: Cursor, visible_floor: int | None, recorded: bool) -> None:
        """Forget a staging: its pending keyframes (above the visible floor), its retire list and
        its record. Cheap when there is none (a range scan of the primary key above the floor)."""
        cur.execute(
            sql.SQL("DELETE FROM {} WHERE position > %s AND flags & {} <> 0").format(
                self._t("changes_keep"), KF
            ),
            (visible_floor if visible_floor is not None else -1,),
        )
        pending = max(cur.rowcount, 0)
        cur.execute(sql.SQL("TRUNCATE {}").format(self._t("keyframes_retire")))
        if recorded:
            cur.execute(
                sql.SQL("UPDATE {} SET staged = NULL, updated_at = now()").format(self._t("retention_state"))
            )
        if pending or recorded:
            log.info("keyframe_staging_discarded", pending_keyframes=pending)

    def _keyframes(
        self,
        cur: Cursor,
        sources: Sequence[Source],
        params: Mapping[str, Any],
        floor: int,
        horizon: datetime | None,
        mode: Mode,
        *,
        keyless: list[int] | None = None,
    ) -> tuple[int, int]:
        return compute_keyframes(
            cur, self.schema, sources, params, floor, horizon, mode,
            keyless=keyless if keyless is not None else keyless_tables(cur, self.schema),
            write=self.retention.keyframe_on_prune,
        )  # fmt: skip

    # ------------------------------------------------------------------ the prune transaction

    def _plan(self, cur: Cursor, report: PruneReport, *, lock: bool) -> PrunePlan:
        plan = make_plan(cur, self.schema, self.retention, report, lock=lock, work_mem=self.work_mem)
        if plan.locked_at is not None:
            self._lock_started = plan.locked_at
        return plan

    def _prune_transaction(self, conn: Conn, report: PruneReport) -> None:
        """The locked part ("publish"): everything from the SHARE locks to the drops, one
        transaction."""
        cur = conn.cursor()
        plan = self._plan(cur, report, lock=True)
        if plan.horizon is None:
            expire_longer(cur, report, plan, self._keyframes)
            self._finish(cur, report, plan, [], 0.0)
            return
        keyframe_started = time.perf_counter()
        # 1. Rows of longer-retention tables: copied out of what goes.
        copy_longer(cur, report, plan)
        written = 0
        if plan.floor is not None:
            # 2. Keyframes of every other table at the new floor, and the stragglers below it.
            written = self._publish_keyframes(cur, report, plan)
            if not report.dry_run:
                remove_stragglers(cur, report, plan)
        if not report.dry_run:
            remove_transactions(cur, report, plan, written)
        # 3. Longer-retention tables whose own retention ended: keyframes at their own floor.
        expire_longer(cur, report, plan, self._keyframes)
        report.keyframe_seconds = time.perf_counter() - keyframe_started
        self._finish(cur, report, plan, plan.dropped, report.stage_seconds + report.keyframe_seconds)

    def _publish_keyframes(self, cur: Cursor, report: PruneReport, plan: PrunePlan) -> int:
        """Keyframes of every other table at the new floor: the staged ones if nothing they
        depend on changed since (their older keyframes go, they become visible with the floor),
        else computed here. Returns the keyframes written."""
        assert plan.floor is not None
        staged = self._read_staged(cur)
        if staged is not None and not report.dry_run:
            identity = plan_identity(cur, plan, self.retention)
            if identity is not None and staged.get("identity") == identity:
                cur.execute(
                    sql.SQL(
                        "DELETE FROM {k} k USING {r} r WHERE k.position = r.position AND k.ordinal = r.ordinal "
                        "AND k.flags & {kf} <> 0"
                    ).format(k=self._t("changes_keep"), r=self._t("keyframes_retire"), kf=KF)
                )
                report.keyframes_replaced += max(cur.rowcount, 0)
                cur.execute(sql.SQL("TRUNCATE {}").format(self._t("keyframes_retire")))
                cur.execute(sql.SQL("UPDATE {} SET staged = NULL").format(self._t("retention_state")))
                written = int(staged.get("keyframes") or 0)
                report.keyframes += written
                report.staged = True
                return written
            log.info("keyframe_staging_stale", note="computing the keyframes inline")
        self._discard(cur, plan.old_floor, staged is not None)
        written, replaced = self._keyframes(
            cur, plan.sources, plan.params, plan.floor, plan.horizon, "dry_run" if report.dry_run else "write"
        )
        report.keyframes += written
        report.keyframes_replaced += replaced
        return written

    def _finish(
        self, cur: Cursor, report: PruneReport, plan: PrunePlan, drops: list[str], keyframe_seconds: float
    ) -> None:
        """The floor, the bookkeeping, and last the drops."""
        if report.dry_run:
            return
        floor = report.floor
        if floor is not None and floor != plan.old_floor:
            cur.execute(
                sql.SQL(
                    "UPDATE {} SET history_floor = %s, updated_at = now() WHERE history_floor IS NULL OR history_floor < %s"
                ).format(self._t("capture_state")),
                (floor, floor),
            )
        cur.execute(
            sql.SQL(
                "UPDATE {} SET horizon = greatest(horizon, %s), last_prune_at = %s, updated_at = now()"
            ).format(self._t("retention_state")),
            (plan.horizon, report.now),
        )
        if report.changed or report.straggler_rows or report.kept_rows:
            cur.execute(
                sql.SQL(
                    "INSERT INTO {} (pruned_at, horizon, floor, partitions, keyframes, kept_rows, removed_rows, "
                    "seconds) VALUES (clock_timestamp(), %s, %s, %s, %s, %s, %s, %s)"
                ).format(self._t("prunes")),
                (plan.horizon, floor, drops, report.keyframes, report.kept_rows,
                 report.straggler_rows + report.expired_rows, keyframe_seconds),
            )  # fmt: skip
        # Last: the drops. Each takes ACCESS EXCLUSIVE on its parent until the commit right after;
        # a short lock timeout and a few retries keep ingestion from queueing behind a long reader.
        # If they all fail, everything above rolls back with them.
        if drops:
            drop_started = time.perf_counter()
            self._drop(cur.connection, drops)
            report.drop_seconds = time.perf_counter() - drop_started

    def _drop(self, conn: Conn, names: list[str]) -> None:
        delay = 0.05
        for attempt in range(1, self.drop_attempts + 1):
            try:
                with conn.transaction():
                    conn.execute(
                        sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(self.lock_timeout))
                    )
                    for name in names:
                        conn.execute(sql.SQL("DROP TABLE {}").format(self._t(name)))
                    conn.execute("SET LOCAL lock_timeout = 0")
                return
            except psycopg.errors.LockNotAvailable:
                log.info("prune_drop_waiting", attempt=attempt, lock_timeout=self.lock_timeout)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        raise PruneLockError(
            f"could not lock the partitioned tables to drop {', '.join(names)} "
            f"({self.drop_attempts} attempts, lock_timeout {self.lock_timeout}): nothing was pruned",
            hint="a long query on the history store holds them; the prune runs again at the next interval",
        )

    # ------------------------------------------------------------------ request errors

    def _prune_request_errors(self, conn: Conn, horizon: datetime) -> int:
        """Remove request errors reported before the horizon, except those of requests with a
        kept transaction (a longer-retention table), in short batches (a budget per prune; the
        rest goes next time)."""
        removed = 0
        while removed < self.request_budget:
            with conn.transaction():
                cur = conn.execute(
                    sql.SQL(
                        "DELETE FROM {r} WHERE lsn IN (SELECT e.lsn FROM {r} e WHERE e.reported_at < %s "
                        "AND NOT EXISTS (SELECT 1 FROM {tk} t WHERE t.request_id = e.request_id) "
                        "AND NOT EXISTS (SELECT 1 FROM {ck} c WHERE c.request_id = e.request_id) "
                        "ORDER BY e.reported_at LIMIT %s)"
                    ).format(
                        r=self._t("request_errors"),
                        tk=self._t("transactions_keep"),
                        ck=self._t("context_changes_keep"),
                    ),
                    (horizon, self.request_batch),
                )
                count = max(cur.rowcount, 0)
            removed += count
            if count < self.request_batch:
                break
        return removed


def _first_line(exc: BaseException) -> str:
    return redact_dsn(error_text(exc))
