"""Retention of the history store: time partitions, pruning with keyframes, erasure.

See ``docs/retention.md`` for the semantics; in short:

* ``transactions`` and ``mutations`` are partitioned by RANGE (``committed_at``), one partition
  per ``retention.partition_interval``, aligned on the Unix epoch in UTC (so daily partitions
  start at midnight UTC) and named ``mutations_p20261121`` (``_HHMM[SS]`` appended when the
  interval is not whole days). :func:`ensure_partitions` creates them; the writer calls it
  (through a :class:`PartitionCache`) before a batch that needs a partition that does not exist
  yet, and the :class:`Pruner` creates the next :data:`AHEAD` intervals every time it runs.
* :class:`Pruner` drops the partitions older than ``retention.default``. It first **stages**
  the **keyframes** (the image, at the new history floor, of every row that still existed there
  and whose last change is being dropped) without any table lock: written into
  ``mutations_keep`` at the future floor, where no reader sees them yet, with the list of older
  keyframes they replace. Then one locked store transaction checks that nothing the staging
  read has changed, deletes the replaced keyframes (or, if something changed, computes the
  keyframes inline), copies the rows of tables with a longer retention into ``mutations_keep``,
  removes the few rows at or below the floor left outside the dropped partitions, moves the
  floor (which makes the staged keyframes visible), and drops the partitions last. The locked
  part costs the replaced keyframes' deletion plus one short ``ACCESS EXCLUSIVE`` lock on the
  parent for the ``DROP``.
* :func:`erase_row` removes every image of one row (``cdc erase``) and records the erasure
  without its data.

Every function takes an open psycopg connection; :class:`Pruner` owns its own.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import structlog
from psycopg import sql
from psycopg.types.json import Jsonb

from cdc.config import RetentionConfig, normalize_table, redact_dsn
from cdc.errors import CdcError, NotFoundError, StoreUnavailableError, UsageError, error_text
from cdc.lsn import format_lsn
from cdc.metrics import Metrics

__all__ = [
    "AHEAD",
    "KEYFRAME_ORDINAL_BASE",
    "ErasureReport",
    "Partition",
    "PartitionCache",
    "PruneLockError",
    "PruneReport",
    "Pruner",
    "RowStillLiveError",
    "bench_prune",
    "bucket_start",
    "canonical_key_sha256",
    "ensure_partitions",
    "erase_row",
    "list_partitions",
    "partition_interval",
    "partition_name",
    "retention_stats",
    "row_on_source",
    "set_partition_interval",
]

log = structlog.get_logger("cdc.retention")

#: Partitions created ahead of the current interval.
AHEAD = 3
#: Keyframes take ordinals from here up at their position: after any real mutation there.
KEYFRAME_ORDINAL_BASE = 1_000_000_000
#: ``ensure_partitions`` refuses to create more partitions than this in one call.
MAX_NEW_PARTITIONS = 1000
PARTITIONED = ("transactions", "mutations")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MIN_INTERVAL = timedelta(minutes=1)
_ADVISORY = "cdc:partitions:"
_ROW_OPS = ("INSERT", "UPDATE", "SNAPSHOT")
MUTATION_COLUMNS = (
    "position",
    "ordinal",
    "version",
    "lsn",
    "xid",
    "committed_at",
    "table_name",
    "op",
    "key",
    "old_key",
    "before",
    "after",
    "changed",
    "status",
    "request_id",
    "context",
    "schema_id",
    "actor",
    "actor_seq",
)

Conn = psycopg.Connection[Any]


# ============================================================================ partitions


@dataclass(frozen=True)
class Partition:
    """One partition of ``transactions`` or ``mutations``: ``[lo, hi)`` (None: unbounded)."""

    parent: str
    name: str
    lo: datetime | None
    hi: datetime | None
    default: bool = False

    def covers(self, ts: datetime) -> bool:
        return not self.default and (self.lo is None or self.lo <= ts) and (self.hi is None or ts < self.hi)


def _q(schema: str, name: str) -> sql.Identifier:
    return sql.Identifier(schema, name)


def list_partitions(conn: Conn, schema: str, parent: str) -> list[Partition]:
    """The partitions of ``schema.parent``, ordered by lower bound (the DEFAULT one last)."""
    rows = conn.execute(
        "SELECT c.relname, b.bound = 'DEFAULT', "
        "  CASE WHEN f.v = 'MINVALUE' THEN NULL ELSE btrim(f.v, '''')::timestamptz END, "
        "  CASE WHEN t.v = 'MAXVALUE' THEN NULL ELSE btrim(t.v, '''')::timestamptz END "
        "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "CROSS JOIN LATERAL (SELECT pg_get_expr(c.relpartbound, c.oid) AS bound) b "
        "CROSS JOIN LATERAL (SELECT substring(b.bound FROM 'FROM \\((.*)\\) TO') AS v) f "
        "CROSS JOIN LATERAL (SELECT substring(b.bound FROM ' TO \\((.*)\\)$') AS v) t "
        "WHERE i.inhparent = to_regclass(%s)",
        (sql.Identifier(schema, parent).as_string(conn),),
    ).fetchall()
    parts = [Partition(parent, str(r[0]), r[2], r[3], bool(r[1])) for r in rows]
    floor = datetime.min.replace(tzinfo=UTC)
    return sorted(parts, key=lambda p: (p.default, p.lo or floor))


def partition_interval(conn: Conn, schema: str) -> timedelta:
    """The interval new partitions are cut to (``retention_state.partition_interval``)."""
    row = conn.execute(
        sql.SQL("SELECT partition_interval FROM {}").format(_q(schema, "retention_state"))
    ).fetchone()
    value = row[0] if row else None
    return value if isinstance(value, timedelta) and value > timedelta(0) else timedelta(days=1)


def set_partition_interval(conn: Conn, schema: str, interval: timedelta) -> bool:
    """Record ``interval`` for partitions created from now on; True if it changed."""
    _check_interval(interval)
    row = conn.execute(
        sql.SQL(
            "UPDATE {} SET partition_interval = %s, updated_at = now() "
            "WHERE partition_interval IS DISTINCT FROM %s RETURNING 1"
        ).format(_q(schema, "retention_state")),
        (interval, interval),
    ).fetchone()
    return row is not None


def _check_interval(interval: timedelta) -> None:
    if interval < _MIN_INTERVAL:
        raise UsageError(f"retention.partition_interval must be at least 1 minute, got {interval}")


def bucket_start(ts: datetime, interval: timedelta) -> datetime:
    """The start of the interval holding ``ts``: intervals are aligned on the Unix epoch (UTC)."""
    return _EPOCH + ((ts - _EPOCH) // interval) * interval


def partition_name(parent: str, lo: datetime) -> str:
    """``mutations_p20261121`` (``_HHMM`` / ``_HHMMSS`` when ``lo`` is not midnight UTC)."""
    u = lo.astimezone(UTC)
    if (u.hour, u.minute, u.second, u.microsecond) == (0, 0, 0, 0):
        suffix = u.strftime("%Y%m%d")
    elif (u.second, u.microsecond) == (0, 0):
        suffix = u.strftime("%Y%m%d_%H%M")
    else:
        suffix = u.strftime("%Y%m%d_%H%M%S")
    return f"{parent}_p{suffix}"


def _gaps(
    lo: datetime, hi: datetime, taken: Sequence[tuple[datetime, datetime]]
) -> list[tuple[datetime, datetime]]:
    """The parts of ``[lo, hi)`` not covered by the ``taken`` ranges."""
    out: list[tuple[datetime, datetime]] = []
    cursor = lo
    for a, b in sorted(taken):
        if b <= cursor or a >= hi:
            continue
        if a > cursor:
            out.append((cursor, min(a, hi)))
        cursor = max(cursor, b)
        if cursor >= hi:
            break
    if cursor < hi:
        out.append((cursor, hi))
    return out


def _columns(conn: Conn, schema: str, table: str) -> list[str]:
    rows = conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 "
        "AND NOT attisdropped ORDER BY attnum",
        (sql.Identifier(schema, table).as_string(conn),),
    ).fetchall()
    return [str(r[0]) for r in rows]


def _free_name(conn: Conn, schema: str, name: str) -> str:
    candidate, n = name, 1
    while conn.execute(
        "SELECT to_regclass(%s)", (sql.Identifier(schema, candidate).as_string(conn),)
    ).fetchone()[0]:  # type: ignore[index]
        n += 1
        candidate = f"{name}_{n}"
    return candidate


def _create_partition(
    conn: Conn, schema: str, parent: str, lo: datetime, hi: datetime, default: Partition | None
) -> str:
    """Create ``[lo, hi)`` of ``parent`` as a plain table, move the default partition's rows of
    that range into it, and attach it (SHARE UPDATE EXCLUSIVE on the parent, not ACCESS EXCLUSIVE
    as CREATE TABLE ... PARTITION OF would take)."""
    name = _free_name(conn, schema, partition_name(parent, lo))
    table = _q(schema, name)
    conn.execute(
        sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)").format(
            table, _q(schema, parent)
        )
    )
    # A constraint matching the bound lets ATTACH skip scanning the new table.
    conn.execute(
        sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK (committed_at >= {} AND committed_at < {})").format(
            table, sql.Identifier(f"{name}_bound"[:63]), sql.Literal(lo), sql.Literal(hi)
        )
    )
    if default is not None:
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in _columns(conn, schema, parent))
        conn.execute(
            sql.SQL(
                "WITH moved AS (DELETE FROM {d} WHERE committed_at >= %s AND committed_at < %s RETURNING {c}) "
                "INSERT INTO {t} ({c}) SELECT {c} FROM moved"
            ).format(d=_q(schema, default.name), t=table, c=cols),
            (lo, hi),
        )
    conn.execute(
        sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES FROM ({}) TO ({})").format(
            _q(schema, parent), table, sql.Literal(lo), sql.Literal(hi)
        )
    )
    return name


def _lock_partitions(conn: Conn, schema: str, wait: bool) -> bool:
    if wait:
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (_ADVISORY + schema,))
        return True
    row = conn.execute("SELECT pg_try_advisory_xact_lock(hashtext(%s))", (_ADVISORY + schema,)).fetchone()
    return bool(row and row[0])


def ensure_partitions(
    conn: Conn,
    schema: str,
    start: datetime,
    end: datetime,
    *,
    interval: timedelta | None = None,
    wait: bool = True,
    lock_timeout: str | None = None,
) -> list[str] | None:
    """Make sure every interval overlapping ``[start, end]`` has a partition in both
    ``transactions`` and ``mutations``; return the partitions created.

    Runs in the connection's current transaction (the caller commits). Creations are
    serialized by an advisory transaction lock: ``wait=False`` returns None at once when
    another session holds it. Rows already in a DEFAULT partition for a new interval move into
    it. A partition whose range would overlap an existing one is cut to fit around it.
    ``lock_timeout`` (e.g. ``"2s"``) bounds the wait for the table locks (LockNotAvailable).
    """
    interval = interval or partition_interval(conn, schema)
    _check_interval(interval)
    if end < start:
        start, end = end, start
    buckets: list[datetime] = []
    t = bucket_start(start, interval)
    while t <= end:
        buckets.append(t)
        if len(buckets) > MAX_NEW_PARTITIONS:
            raise UsageError(
                f"refusing to create more than {MAX_NEW_PARTITIONS} partitions for {start} .. {end}",
                hint="check the commit times being written, or raise retention.partition_interval",
            )
        t += interval
    return _ensure_buckets(conn, schema, buckets, interval, wait=wait, lock_timeout=lock_timeout)


def _ensure_buckets(
    conn: Conn,
    schema: str,
    buckets: Iterable[datetime],
    interval: timedelta,
    *,
    wait: bool,
    lock_timeout: str | None,
) -> list[str] | None:
    wanted = sorted(set(buckets))
    if not wanted:
        return []
    if not _lock_partitions(conn, schema, wait):
        return None
    if lock_timeout is not None:
        conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(lock_timeout)))
    created: list[str] = []
    for parent in PARTITIONED:
        parts = list_partitions(conn, schema, parent)
        default = next((p for p in parts if p.default), None)
        low, high = datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC)
        taken = [(p.lo or low, p.hi or high) for p in parts if not p.default]
        for lo in wanted:
            for a, b in _gaps(lo, lo + interval, taken):
                created.append(_create_partition(conn, schema, parent, a, b, default))
                taken.append((a, b))
    if created:
        log.info("partitions_created", schema=schema, partitions=created)
    return created


class PartitionCache:
    """What the writer knows of the partitions: the time spans covered in both partitioned
    tables. ``covers`` is a few comparisons; only a miss touches the store."""

    def __init__(self, schema: str, *, ahead: int = AHEAD, retry_seconds: float = 30.0) -> None:
        self.schema = schema
        self.ahead = ahead
        self.retry_seconds = retry_seconds
        self.interval = timedelta(days=1)
        self.spans: list[tuple[datetime, datetime]] = []
        self._retry_at = 0.0

    def load(self, conn: Conn) -> None:
        """Read the partitions (in the connection's current transaction)."""
        self.interval = partition_interval(conn, self.schema)
        per_table = []
        for parent in PARTITIONED:
            low, high = datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC)
            per_table.append(
                _merge(
                    [
                        (p.lo or low, p.hi or high)
                        for p in list_partitions(conn, self.schema, parent)
                        if not p.default
                    ]
                )
            )
        self.spans = _intersect(per_table[0], per_table[1])

    def covers(self, lo: datetime, hi: datetime) -> bool:
        return any(a <= lo and hi < b for a, b in self.spans)

    def recent_cut(self, earliest: datetime) -> datetime:
        """Where "recent" starts for rows written at ``earliest`` or later: the start of the
        interval before the one holding ``earliest`` (the writer's first before-image pass)."""
        return bucket_start(earliest, self.interval) - self.interval

    def ensure(self, conn: Conn, times: Iterable[datetime], now: datetime | None = None) -> bool:
        """Create the partitions for ``times`` and the next intervals, in a transaction of its own
        (committed here). Never waits for another session creating partitions, and gives up after
        a short lock timeout: the rows then go to the DEFAULT partition, and the next miss after
        ``retry_seconds`` tries again. Returns True when everything is covered."""
        if time.monotonic() < self._retry_at:
            return False
        now = now or datetime.now(UTC)
        interval = self.interval
        buckets = {bucket_start(t, interval) for t in times}
        current = bucket_start(now, interval)
        buckets.update(current + k * interval for k in range(self.ahead + 1))
        try:
            created = _ensure_buckets(conn, self.schema, buckets, interval, wait=False, lock_timeout="2s")
            if created is None:
                conn.rollback()
                self._retry_at = time.monotonic() + 1.0
                return False
            conn.commit()
            self.load(conn)
            conn.commit()
        except psycopg.OperationalError:
            raise
        except psycopg.Error as exc:
            if not conn.closed:
                conn.rollback()
            self._retry_at = time.monotonic() + self.retry_seconds
            log.warning(
                "partitions_not_created",
                error=str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                retry_in_seconds=self.retry_seconds,
                note="rows go to the DEFAULT partition meanwhile",
            )
            return False
        return True


def _merge(ranges: list[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    out: list[tuple[datetime, datetime]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _intersect(
    x: list[tuple[datetime, datetime]], y: list[tuple[datetime, datetime]]
) -> list[tuple[datetime, datetime]]:
    out = []
    for a, b in x:
        for c, d in y:
            lo, hi = max(a, c), min(b, d)
            if lo < hi:
                out.append((lo, hi))
    return _merge(out)


# ============================================================================ statistics


@dataclass(frozen=True)
class RetentionStats:
    partitions: int  # of mutations, the DEFAULT one included
    rows: int  # estimated (pg_class.reltuples), mutations partitions + mutations_keep
    bytes: int  # total relation size of the mutations partitions and mutations_keep
    oldest: datetime | None  # oldest retained commit time (transactions, mutations_keep)
    default_rows: int  # estimated rows in the DEFAULT partitions (should be 0)
    keep_rows: int


def retention_stats(conn: Conn, schema: str) -> RetentionStats:
    """Cheap figures about what the store holds (catalog estimates, one index probe)."""
    row = conn.execute(
        "SELECT count(*), coalesce(sum(greatest(c.reltuples, 0)), 0)::bigint, "
        "coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint, "
        "coalesce(sum(greatest(c.reltuples, 0)) FILTER (WHERE pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT'), 0)::bigint "
        "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass(%s)",
        (sql.Identifier(schema, "mutations").as_string(conn),),
    ).fetchone()
    keep = conn.execute(
        "SELECT greatest(reltuples, 0)::bigint, pg_total_relation_size(oid) FROM pg_class WHERE oid = to_regclass(%s)",
        (sql.Identifier(schema, "mutations_keep").as_string(conn),),
    ).fetchone()
    oldest = conn.execute(
        sql.SQL(
            "SELECT least((SELECT min(committed_at) FROM {t}), "
            "(SELECT min(committed_at) FROM {k} WHERE NOT keyframe))"
        ).format(t=_q(schema, "transactions"), k=_q(schema, "mutations_keep"))
    ).fetchone()
    assert row is not None
    keep_rows, keep_bytes = (int(keep[0]), int(keep[1])) if keep else (0, 0)
    return RetentionStats(
        partitions=int(row[0]),
        rows=int(row[1]) + keep_rows,
        bytes=int(row[2]) + keep_bytes,
        oldest=oldest[0] if oldest else None,
        default_rows=int(row[3]),
        keep_rows=keep_rows,
    )


# ============================================================================ pruning


class PruneLockError(StoreUnavailableError):
    """The partitions could not be dropped within the lock timeout: nothing was changed."""


@dataclass
class PruneReport:
    """What one prune did (or, with ``dry_run``, would do)."""

    dry_run: bool
    now: datetime
    horizon: datetime | None  # partitions ending at or before it are dropped
    old_floor: int | None
    floor: int | None
    partitions: list[str] = field(default_factory=list)  # mutations partitions dropped
    transaction_partitions: list[str] = field(default_factory=list)
    dropped_rows: int = 0  # estimated rows of the dropped mutations partitions
    dropped_bytes: int = 0
    keyframes: int = 0  # keyframes written
    keyframes_replaced: int = 0  # older keyframes removed (superseded, truncated, deleted rows)
    kept_rows: int = 0  # rows of longer-retention tables copied to mutations_keep
    expired_rows: int = 0  # rows of longer-retention tables whose own retention ended
    straggler_rows: int = 0  # rows at or below the floor outside the dropped partitions
    transactions_removed: int = 0  # transactions rows at or below the floor outside them
    requests_removed: int = 0
    partitions_created: list[str] = field(default_factory=list)
    staged: bool = False  # the keyframes were computed ahead (stage) and published as they were
    stage_seconds: float = 0.0  # the staging, before the locks (0 for a dry run)
    # In the locked transaction, up to the drop: floor, keyframes (publishing the staged ones, or
    # computing them inline), stragglers, bookkeeping.
    keyframe_seconds: float = 0.0
    publish_seconds: float = 0.0  # the locked transaction: its SHARE locks through the drop's commit
    drop_seconds: float = 0.0  # the DROP of the partitions (ACCESS EXCLUSIVE wait included)
    seconds: float = 0.0  # the whole prune: prepare, stage, publish, request records

    @property
    def changed(self) -> bool:
        return bool(self.partitions or self.transaction_partitions or self.keyframes or self.expired_rows)

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "now": self.now.isoformat(),
            "horizon": self.horizon.isoformat() if self.horizon else None,
            "old_floor": self.old_floor,
            "old_floor_lsn": format_lsn(self.old_floor) if self.old_floor is not None else None,
            "floor": self.floor,
            "floor_lsn": format_lsn(self.floor) if self.floor is not None else None,
            "partitions": self.partitions,
            "transaction_partitions": self.transaction_partitions,
            "dropped_rows_estimate": self.dropped_rows,
            "dropped_bytes": self.dropped_bytes,
            "keyframes": self.keyframes,
            "keyframes_replaced": self.keyframes_replaced,
            "kept_rows": self.kept_rows,
            "expired_rows": self.expired_rows,
            "straggler_rows": self.straggler_rows,
            "transactions_removed": self.transactions_removed,
            "requests_removed": self.requests_removed,
            "partitions_created": self.partitions_created,
            "staged": self.staged,
            "stage_seconds": round(self.stage_seconds, 6),
            "keyframe_seconds": round(self.keyframe_seconds, 6),
            "publish_seconds": round(self.publish_seconds, 6),
            "drop_seconds": round(self.drop_seconds, 6),
            "seconds": round(self.seconds, 6),
        }


@dataclass
class _Plan:
    """What one prune removes (computed by ``Pruner._plan``, for the staging and the publish)."""

    old_floor: int | None
    longer: dict[str, timedelta]
    long_names: list[str]
    horizon: datetime | None
    drop_m: list[Partition]
    drop_t: list[Partition]
    keep_m: list[Partition]
    keep_t: list[Partition]
    default_m: Partition | None
    default_t: Partition | None
    params: dict[str, Any]
    floor: int | None = None
    gone: list[tuple[sql.Composable, sql.Composable]] = field(default_factory=list)
    straggle: list[sql.Composable] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    sources: list[tuple[sql.Composable, sql.Composable]] = field(default_factory=list)


def _staging_supported(conn: Conn, schema: str) -> bool:
    """Whether the store schema has ``keyframes_retire`` and a ``mutations_all`` that hides
    pending keyframes (``sql/store.sql`` of this version)."""
    row = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL AND coalesce(position('history_floor' IN "
        "pg_get_viewdef(to_regclass(%s))) > 0, false)",
        (
            sql.Identifier(schema, "keyframes_retire").as_string(conn),
            sql.Identifier(schema, "mutations_all").as_string(conn),
        ),
    ).fetchone()
    return bool(row and row[0])


class _DryRun(Exception):  # noqa: N818 - control flow: roll the prune transaction back
    pass


def _stored_table(name: str) -> str:
    schema, table = normalize_table(name)
    return f"{schema}.{table}"


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
        self._staging: bool | None = None  # the store can stage keyframes (checked once a connection)
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
            (sql.Identifier(self.schema, "mutations_keep").as_string(conn),),
        ).fetchone()
        if not found or not found[0]:
            conn.close()
            raise StoreUnavailableError(
                f"the history store has no partitioned schema {self.schema!r}",
                hint="run `cdc setup` (it creates or converts the store schema)",
            )
        # Before any temporary table of the session: room for the keyframe computation's.
        conn.execute("SET temp_buffers = '64MB'")
        self._conn = conn
        self._staging = None
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
        return _q(self.schema, name)

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
            m.retention_oldest_seconds.set(stats.oldest.timestamp() if stats.oldest else 0)
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
            report.requests_removed = self._prune_requests(conn, report.horizon)
        report.seconds = time.perf_counter() - started
        self.last_report = report
        self._record(report)
        return report

    def _record(self, report: PruneReport) -> None:
        log.info(
            "pruned" if not report.dry_run else "prune_planned",
            partitions=report.partitions,
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
        m.pruned_partitions.inc(len(report.partitions) + len(report.transaction_partitions))
        m.keyframes_written.inc(report.keyframes)
        m.prune_seconds.set(report.seconds)
        try:
            self.refresh_metrics()
        except (CdcError, psycopg.Error) as exc:
            log.warning("retention_stats_failed", error=_first_line(exc))

    # ------------------------------------------------------------------ staging

    def _staging_supported(self, conn: Conn) -> bool:
        """Whether the store has what staging needs (``keyframes_retire``, ``retention_state.staged``
        and the ``mutations_all`` view that hides pending keyframes): a store created by an older
        ``sql/store.sql`` gets them from ``cdc setup``; until then keyframes are computed inline."""
        if self._staging is None:
            self._staging = _staging_supported(conn, self.schema)
            if not self._staging:
                log.info(
                    "keyframe_staging_unavailable",
                    schema=self.schema,
                    hint="run `cdc setup` to update the store schema; keyframes are computed inline meanwhile",
                )
        return self._staging

    def stage(self, now: datetime | None = None) -> dict[str, Any] | None:
        """Compute the keyframes of the next prune ahead of it, in a transaction of its own that
        holds the pruner's advisory lock but no table lock (writers and readers go on).

        The new keyframes go into ``mutations_keep`` at the future floor, where readers do not
        see them until the prune moves the floor there (the ``mutations_all`` view); the older
        keyframes that publishing must delete go into ``keyframes_retire``; what the staging read
        is recorded in ``retention_state.staged`` (partitions, floor, horizon, configuration, and
        the largest position of each relation that goes). A staging already there with the same
        identity is reused; any other one is discarded first. Returns the recorded staging, or
        None when there is nothing to stage (nothing expires, or the store cannot stage).
        """
        now = now or datetime.now(UTC)
        conn = self._connection()
        if not self._staging_supported(conn):
            return None
        scratch = PruneReport(dry_run=False, now=now, horizon=None, old_floor=None, floor=None)
        started = time.perf_counter()
        with conn.transaction():
            cur = conn.cursor()
            plan = self._plan(cur, scratch, lock=False)
            identity = self._identity(cur, plan)
            staged = self._read_staged(cur)
            if identity is not None and staged is not None and staged.get("identity") == identity:
                log.info("keyframes_staged", reused=True, keyframes=staged.get("keyframes"))
                return staged
            self._discard(cur, plan.old_floor, staged is not None)
            if identity is None or plan.floor is None:
                return None
            written, replaced = self._keyframes(
                cur, plan.sources, plan.params, plan.floor, plan.horizon, "stage", keyless=identity["keyless"]
            )
            found = cur.execute(
                sql.SQL("SELECT max(position) FROM {}").format(self._t("mutations"))
            ).fetchone()
            staged = {
                "identity": identity,
                "keyframes": written,
                "retire": replaced,
                "store_position": int(found[0]) if found and found[0] is not None else None,
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

    def _read_staged(self, cur: psycopg.Cursor[Any]) -> dict[str, Any] | None:
        row = cur.execute(sql.SQL("SELECT staged FROM {}").format(self._t("retention_state"))).fetchone()
        return row[0] if row and isinstance(row[0], dict) else None

    def _discard(self, cur: psycopg.Cursor[Any], visible_floor: int | None, recorded: bool) -> None:
        """Forget a staging: its pending keyframes (above the visible floor), its retire list and
        its record. Cheap when there is none (a range scan of the primary key above the floor)."""
        cur.execute(
            sql.SQL("DELETE FROM {} WHERE keyframe AND position > %s").format(self._t("mutations_keep")),
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

    def _identity(self, cur: psycopg.Cursor[Any], plan: _Plan) -> dict[str, Any] | None:
        """What a staging depends on, as JSON: equal at publish time (under the SHARE locks)
        means the staged keyframes are exactly what the inline computation would write. None when
        there is nothing to stage, or the keyframes could not be hidden (the floor does not move:
        pending keyframes are told apart by their position above the visible floor)."""
        if plan.horizon is None or plan.floor is None:
            return None
        if plan.old_floor is not None and plan.floor <= plan.old_floor:
            return None
        # The writer writes in position order: a row written into what goes after this point
        # raises one of these maxima (all rows, rolled back ones included).
        marks = []
        for rel, cond in plan.gone:
            row = cur.execute(
                sql.SQL("SELECT max(position) FROM {} WHERE {}").format(rel, cond), plan.params
            ).fetchone()
            marks.append(int(row[0]) if row and row[0] is not None else None)
        return {
            "partitions": [p.name for p in plan.drop_m + plan.drop_t],
            "default": plan.default_m.name if plan.default_m is not None else None,
            "horizon": plan.horizon.isoformat(),
            "old_floor": plan.old_floor,
            "floor": plan.floor,
            "long": plan.long_names,
            "orphans": plan.orphans,
            "keyless": self._keyless(cur),
            "keyframe_on_prune": self.retention.keyframe_on_prune,
            "marks": marks,
        }

    # ------------------------------------------------------------------ the prune transaction

    def _plan(self, cur: psycopg.Cursor[Any], report: PruneReport, *, lock: bool) -> _Plan:
        """What a prune at ``report.now`` removes, its horizon and floor, and the keyframes'
        sources; with ``lock``, the partitions that go are locked IN SHARE MODE first."""
        conn = cur.connection
        now = report.now
        retention = self.retention
        cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (_ADVISORY + self.schema,))
        cur.execute(sql.SQL("SET LOCAL work_mem = {}").format(sql.Literal(self.work_mem)))
        row = cur.execute(
            sql.SQL("SELECT max(history_floor) FROM {}").format(self._t("capture_state"))
        ).fetchone()
        old_floor = int(row[0]) if row and row[0] is not None else None
        report.old_floor = report.floor = old_floor
        longer = {_stored_table(t): r for t, r in retention.tables.items() if r > retention.default}
        long_names = sorted(longer)
        interval = retention.partition_interval

        parts = {p: list_partitions(conn, self.schema, p) for p in PARTITIONED}
        cutoff = now - retention.default
        expired = [
            p for ps in parts.values() for p in ps if not p.default and p.hi is not None and p.hi <= cutoff
        ]
        horizon = max((p.hi for p in expired if p.hi is not None), default=None)
        drop_m = [p for p in parts["mutations"] if p in expired]
        drop_t = [p for p in parts["transactions"] if p in expired]
        keep_m = [p for p in parts["mutations"] if p not in expired and not p.default]
        keep_t = [p for p in parts["transactions"] if p not in expired and not p.default]
        default_m = next((p for p in parts["mutations"] if p.default), None)
        default_t = next((p for p in parts["transactions"] if p.default), None)
        # Rows still in a DEFAULT partition (a dry run, or prepare() could not move them) count as
        # if they were in the partitions of their intervals.
        for default in (default_m, default_t):
            if default is None:
                continue
            found = cur.execute(
                sql.SQL("SELECT max(committed_at) FROM {} WHERE committed_at < %s").format(
                    self._t(default.name)
                ),
                (bucket_start(cutoff, interval),),
            ).fetchone()
            if found and found[0] is not None:
                horizon = max(horizon or found[0], bucket_start(found[0], interval) + interval)
        report.horizon = horizon
        report.partitions = [p.name for p in drop_m]
        report.transaction_partitions = [p.name for p in drop_t]
        params: dict[str, Any] = {"long": long_names, "horizon": horizon}
        plan = _Plan(
            old_floor=old_floor, longer=longer, long_names=long_names, horizon=horizon, drop_m=drop_m,
            drop_t=drop_t, keep_m=keep_m, keep_t=keep_t, default_m=default_m, default_t=default_t,
            params=params,
        )  # fmt: skip
        if horizon is None:
            return plan
        if lock and (drop_m or drop_t):
            # No write may land in a partition between the keyframes computed from it and its
            # drop (a backlog replayed with old commit times would): SHARE blocks writers into
            # these partitions only, never readers, and first waits for writes in flight.
            self._lock_started = time.perf_counter()
            cur.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal("10s")))
            cur.execute(
                sql.SQL("LOCK TABLE {} IN SHARE MODE").format(
                    sql.SQL(", ").join(self._t(p.name) for p in drop_m + drop_t)
                )
            )
            cur.execute("SET LOCAL lock_timeout = 0")
        if drop_m:
            size = cur.execute(
                "SELECT coalesce(sum(greatest(reltuples, 0)), 0)::bigint, "
                "coalesce(sum(pg_total_relation_size(oid)), 0)::bigint FROM pg_class "
                "WHERE oid = ANY(%s::regclass[])",
                ([sql.Identifier(self.schema, p.name).as_string(conn) for p in drop_m],),
            ).fetchone()
            assert size is not None
            report.dropped_rows, report.dropped_bytes = int(size[0]), int(size[1])

        # What goes: the expired partitions whole, and the DEFAULT partition's rows below the
        # horizon. ``gone`` are (relation, condition) pairs.
        gone: list[tuple[sql.Composable, sql.Composable]] = [
            (self._t(p.name), sql.SQL("true")) for p in drop_m
        ]
        if default_m is not None:
            gone.append((self._t(default_m.name), sql.SQL("committed_at < %(horizon)s")))
        plan.gone = gone
        found = cur.execute(
            sql.SQL("SELECT max(m) FROM ({}) x").format(
                sql.SQL(" UNION ALL ").join(
                    sql.SQL("SELECT max(position) AS m FROM {} WHERE version IS NOT NULL AND {}").format(
                        rel, cond
                    )
                    for rel, cond in gone
                )
            ),
            params,
        ).fetchone()
        floor = old_floor
        if found and found[0] is not None:
            floor = max(floor or 0, int(found[0]))
        report.floor = plan.floor = floor
        params["floor"] = floor if floor is not None else -1
        if floor is None:
            return plan
        # The keyframes' sources. Removed: what goes, anything else at or below the floor
        # (stragglers: commit times are not exactly in WAL order), and the kept rows of a table
        # whose retention is no longer longer than the default.
        plan.straggle = [self._t(p.name) for p in keep_m]
        archived = self._archived_tables(cur)
        plan.orphans = orphans = sorted(set(archived) - set(longer))
        params["orphans"] = orphans
        not_long = sql.SQL(" AND table_name <> ALL(%(long)s)")
        sources: list[tuple[sql.Composable, sql.Composable]] = [
            (rel, sql.SQL("{}{}").format(cond, not_long)) for rel, cond in gone
        ]
        sources += [(rel, sql.SQL("position <= %(floor)s{}").format(not_long)) for rel in plan.straggle]
        if default_m is not None:
            sources.append(
                (
                    self._t(default_m.name),
                    sql.SQL("committed_at >= %(horizon)s AND position <= %(floor)s{}").format(not_long),
                )
            )
        if orphans:
            sources.append(
                (
                    self._t("mutations_keep"),
                    sql.SQL(
                        "NOT keyframe AND table_name = ANY(%(orphans)s) "
                        "AND (position <= %(floor)s OR committed_at < %(horizon)s)"
                    ),
                )
            )
        plan.sources = sources
        return plan

    def _prune_transaction(self, conn: Conn, report: PruneReport) -> None:
        """The locked part ("publish"): everything from the SHARE locks to the drops, one
        transaction."""
        cur = conn.cursor()
        plan = self._plan(cur, report, lock=True)
        horizon = plan.horizon
        longer = plan.longer
        old_floor = plan.old_floor
        if horizon is None:
            report.keyframe_seconds = 0.0
            self._expire_longer(cur, report, longer)
            self._finish(cur, report, old_floor, horizon, [], 0.0)
            return
        keyframe_started = time.perf_counter()
        params = plan.params
        floor = plan.floor

        # 1. Rows of longer-retention tables: copied out of what goes.
        cols = sql.SQL(", ").join(sql.Identifier(c) for c in MUTATION_COLUMNS)
        if plan.long_names:
            for rel, cond in plan.gone:
                if report.dry_run:
                    counted = cur.execute(
                        sql.SQL("SELECT count(*) FROM {} WHERE {} AND table_name = ANY(%(long)s)").format(
                            rel, cond
                        ),
                        params,
                    ).fetchone()
                    report.kept_rows += int(counted[0]) if counted else 0
                    continue
                cur.execute(
                    sql.SQL(
                        "INSERT INTO {k} ({c}) SELECT {c} FROM {r} WHERE {cond} AND table_name = ANY(%(long)s) "
                        "ON CONFLICT DO NOTHING"
                    ).format(k=self._t("mutations_keep"), c=cols, r=rel, cond=cond),
                    params,
                )
                report.kept_rows += max(cur.rowcount, 0)

        # 2. Keyframes of every other table at the new floor: the staged ones if nothing they
        #    depend on changed since (their older keyframes go, they become visible with the
        #    floor), else computed here.
        written = 0
        if floor is not None:
            staging = self._staging_supported(conn)
            staged = self._read_staged(cur) if staging else None
            if staged is not None and not report.dry_run:
                identity = self._identity(cur, plan)
                if identity is not None and staged.get("identity") == identity:
                    cur.execute(
                        sql.SQL(
                            "DELETE FROM {k} k USING {r} r WHERE k.position = r.position AND k.ordinal = r.ordinal "
                            "AND k.keyframe"
                        ).format(k=self._t("mutations_keep"), r=self._t("keyframes_retire"))
                    )
                    report.keyframes_replaced += max(cur.rowcount, 0)
                    cur.execute(sql.SQL("TRUNCATE {}").format(self._t("keyframes_retire")))
                    cur.execute(sql.SQL("UPDATE {} SET staged = NULL").format(self._t("retention_state")))
                    written = int(staged.get("keyframes") or 0)
                    report.keyframes += written
                    report.staged = True
                else:
                    log.info("keyframe_staging_stale", note="computing the keyframes inline")
            if not report.staged:
                if staging:
                    self._discard(cur, old_floor, staged is not None)
                written, replaced = self._keyframes(
                    cur, plan.sources, params, floor, horizon, "dry_run" if report.dry_run else "write"
                )
                report.keyframes += written
                report.keyframes_replaced += replaced
            if not report.dry_run:
                for rel in plan.straggle:
                    cur.execute(
                        sql.SQL(
                            "DELETE FROM {} WHERE position <= %(floor)s AND table_name <> ALL(%(long)s)"
                        ).format(rel),
                        params,
                    )
                    report.straggler_rows += max(cur.rowcount, 0)
                if plan.orphans:
                    cur.execute(
                        sql.SQL(
                            "DELETE FROM {} WHERE NOT keyframe AND table_name = ANY(%(orphans)s) "
                            "AND (position <= %(floor)s OR committed_at < %(horizon)s)"
                        ).format(self._t("mutations_keep")),
                        params,
                    )
                    report.straggler_rows += max(cur.rowcount, 0)
        if not report.dry_run:
            if plan.default_m is not None:
                cur.execute(
                    sql.SQL(
                        "DELETE FROM {} WHERE committed_at < %(horizon)s "
                        "OR (position <= %(floor)s AND table_name <> ALL(%(long)s))"
                    ).format(self._t(plan.default_m.name)),
                    params,
                )
                report.straggler_rows += max(cur.rowcount, 0)
            for p in [*plan.keep_t, plan.default_t]:
                if p is None:
                    continue
                cur.execute(
                    sql.SQL(
                        "DELETE FROM {} WHERE position <= %(floor)s OR committed_at < %(horizon)s"
                    ).format(self._t(p.name)),
                    params,
                )
                report.transactions_removed += max(cur.rowcount, 0)
            if floor is not None:
                # The floor's own transaction went: one row at the horizon stands for it, so the
                # floor keeps a commit time (version_time, version_at_timestamp).
                cur.execute(
                    sql.SQL(
                        "INSERT INTO {} (position, xid, version, commit_lsn, status, committed_at, origin, "
                        "mutation_count, request_ids) VALUES (%s, 0, %s, NULL, 'committed', %s, 'cdc.prune', %s, "
                        "'{{}}') ON CONFLICT DO NOTHING"
                    ).format(self._t("transactions")),
                    (floor, floor, horizon, written),
                )

        # 3. Longer-retention tables whose own retention ended: keyframes at their own floor.
        self._expire_longer(cur, report, longer)
        report.keyframe_seconds = time.perf_counter() - keyframe_started
        self._finish(
            cur,
            report,
            old_floor,
            horizon,
            [p.name for p in plan.drop_m + plan.drop_t],
            report.stage_seconds + report.keyframe_seconds,
        )

    def _expire_longer(
        self, cur: psycopg.Cursor[Any], report: PruneReport, longer: Mapping[str, timedelta]
    ) -> None:
        for table, keep_for in sorted(longer.items()):
            expired_rows, written, replaced = self._expire_kept(
                cur, table, report.now - keep_for, report.dry_run
            )
            report.expired_rows += expired_rows
            report.keyframes += written
            report.keyframes_replaced += replaced

    def _finish(
        self,
        cur: psycopg.Cursor[Any],
        report: PruneReport,
        old_floor: int | None,
        horizon: datetime | None,
        drops: list[str],
        keyframe_seconds: float,
    ) -> None:
        """The floor, the bookkeeping, and last the drops."""
        if report.dry_run:
            return
        floor = report.floor
        if floor is not None and floor != old_floor:
            cur.execute(
                sql.SQL(
                    "UPDATE {} SET history_floor = %s, updated_at = now() "
                    "WHERE history_floor IS NULL OR history_floor < %s"
                ).format(self._t("capture_state")),
                (floor, floor),
            )
        cur.execute(
            sql.SQL(
                "UPDATE {} SET horizon = greatest(horizon, %s), last_prune_at = %s, updated_at = now()"
            ).format(self._t("retention_state")),
            (horizon, report.now),
        )
        if report.changed or report.straggler_rows or report.kept_rows:
            cur.execute(
                sql.SQL(
                    "INSERT INTO {} (pruned_at, horizon, floor, partitions, keyframes, kept_rows, removed_rows, "
                    "seconds) VALUES (clock_timestamp(), %s, %s, %s, %s, %s, %s, %s)"
                ).format(self._t("prunes")),
                (
                    horizon,
                    floor,
                    drops,
                    report.keyframes,
                    report.kept_rows,
                    report.straggler_rows + report.expired_rows,
                    keyframe_seconds,
                ),
            )
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

    def _archived_tables(self, cur: psycopg.Cursor[Any]) -> list[str]:
        """Tables with kept (non-keyframe) rows, by a skip scan of the kept rows' index."""
        rows = cur.execute(
            sql.SQL(
                "WITH RECURSIVE t AS ("
                "  (SELECT table_name FROM {k} WHERE NOT keyframe ORDER BY table_name LIMIT 1) "
                "  UNION ALL "
                "  SELECT (SELECT table_name FROM {k} WHERE NOT keyframe AND table_name > t.table_name "
                "          ORDER BY table_name LIMIT 1) FROM t WHERE t.table_name IS NOT NULL"
                ") SELECT table_name FROM t WHERE table_name IS NOT NULL"
            ).format(k=self._t("mutations_keep"))
        ).fetchall()
        return [str(r[0]) for r in rows]

    def _expire_kept(
        self, cur: psycopg.Cursor[Any], table: str, horizon: datetime, dry_run: bool
    ) -> tuple[int, int, int]:
        keep = self._t("mutations_keep")
        row = cur.execute(
            sql.SQL(
                "SELECT max(position) FILTER (WHERE version IS NOT NULL), count(*) FROM {} "
                "WHERE NOT keyframe AND table_name = %s AND committed_at < %s"
            ).format(keep),
            (table, horizon),
        ).fetchone()
        if row is None or not row[1]:
            return 0, 0, 0
        floor = int(row[0]) if row[0] is not None else None
        condition = sql.SQL("table_name = %(t)s AND (committed_at < %(h)s OR position <= %(f)s)")
        params = {"t": table, "h": horizon, "f": floor if floor is not None else -1}
        sources: list[tuple[sql.Composable, sql.Composable]] = [
            (keep, sql.SQL("NOT keyframe AND {}").format(condition)),
            (self._t("mutations"), condition),
        ]
        written = replaced = 0
        if floor is not None:
            written, replaced = self._keyframes(
                cur, sources, params, floor, horizon, "dry_run" if dry_run else "write"
            )
        if dry_run:
            return int(row[1]), written, replaced
        cur.execute(sql.SQL("DELETE FROM {} WHERE NOT keyframe AND {}").format(keep, condition), params)
        count = max(cur.rowcount, 0)
        cur.execute(sql.SQL("DELETE FROM {} WHERE {}").format(self._t("mutations"), condition), params)
        return count + max(cur.rowcount, 0), written, replaced

    def _keyless(self, cur: psycopg.Cursor[Any]) -> list[str]:
        """Tables without a key, by their latest schema, as the readers decide."""
        return [
            str(r[0])
            for r in cur.execute(
                sql.SQL(
                    "SELECT table_name FROM (SELECT DISTINCT ON (table_name) table_name, key_columns FROM {} "
                    "ORDER BY table_name, first_position DESC, schema_id DESC) s WHERE key_columns = '{{}}' "
                    "ORDER BY 1"
                ).format(self._t("table_schemas"))
            ).fetchall()
        ]

    def _keyframes(
        self,
        cur: psycopg.Cursor[Any],
        sources: Sequence[tuple[sql.Composable, sql.Composable]],
        params: Mapping[str, Any],
        floor: int,
        horizon: datetime | None,
        mode: str,
        *,
        keyless: list[str] | None = None,
    ) -> tuple[int, int]:
        """Keyframes for the rows whose last change up to ``floor`` is among the removed mutations
        (``sources``: (relation, condition) pairs) and that still exist at ``floor``; replace their
        older keyframes. Returns (written, replaced).

        ``mode``: ``"write"`` deletes the older keyframes and inserts the new ones; ``"stage"``
        inserts the new ones (pending: ``floor`` is above the visible floor) and lists the older
        ones in ``keyframes_retire`` for the publish to delete; ``"dry_run"`` only counts.

        Set-based: per source, the last change per row of keyed tables in the order of the
        ``mutations_row`` index (``DISTINCT ON (table_name, key)``, no sort of the day), plus the
        key-changing UPDATEs; a hash aggregate keeps the last per row across sources. Tables
        without a key (whole-row keys, multisets: N identical rows → N keyframes) are counted with
        a GROUP BY. The last TRUNCATE per table comes from its partial index.
        """
        keep = self._t("mutations_keep")
        for name in ("_kf_trunc", "_kf_ev", "_kf_last", "_kf_count", "_kf_new"):
            cur.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))
        if keyless is None:
            keyless = self._keyless(cur)
        args = {**params, "keyless": keyless}
        cur.execute(
            sql.SQL(
                "CREATE TEMP TABLE _kf_trunc ON COMMIT DROP AS "
                "SELECT DISTINCT ON (table_name) table_name, position, ordinal FROM ({}) r "
                "ORDER BY table_name, position DESC, ordinal DESC"
            ).format(
                sql.SQL(" UNION ALL ").join(
                    sql.SQL(
                        "SELECT table_name, position, ordinal FROM {r} WHERE {c} AND op = 'TRUNCATE' "
                        "AND version IS NOT NULL"
                    ).format(r=rel, c=cond)
                    for rel, cond in sources
                )
            ),
            args,
        )
        cur.execute(
            "CREATE TEMP TABLE _kf_ev (table_name text, k jsonb, at_key boolean, op text, after jsonb, "
            "schema_id integer, position bigint, ordinal integer) ON COMMIT DROP"
        )
        contributing = 0
        for rel, cond in sources:
            cur.execute(
                sql.SQL(
                    "INSERT INTO _kf_ev SELECT DISTINCT ON (table_name, key) table_name, key, true, op, after, "
                    "schema_id, position, ordinal FROM {r} WHERE {c} AND version IS NOT NULL AND key IS NOT NULL "
                    "AND table_name <> ALL(%(keyless)s) ORDER BY table_name, key, position DESC, ordinal DESC"
                ).format(r=rel, c=cond),
                args,
            )
            contributing += cur.rowcount > 0
            cur.execute(
                sql.SQL(
                    "INSERT INTO _kf_ev SELECT table_name, old_key, false, op, NULL, schema_id, position, ordinal "
                    "FROM {r} WHERE {c} AND version IS NOT NULL AND old_key IS NOT NULL "
                    "AND table_name <> ALL(%(keyless)s)"
                ).format(r=rel, c=cond),
                args,
            )
            contributing += 2 * (cur.rowcount > 0)
        if contributing <= 1:  # one source of plain changes: already one row per key
            cur.execute("ALTER TABLE _kf_ev RENAME TO _kf_last")
        else:  # the last per row across sources, hashed (no sort of jsonb keys)
            cur.execute(
                "CREATE TEMP TABLE _kf_last ON COMMIT DROP AS SELECT e.* FROM _kf_ev e JOIN ("
                "  SELECT table_name, k, max(position::numeric * 4294967296 + ordinal) AS m FROM _kf_ev "
                "  GROUP BY table_name, k"
                ") w ON w.table_name = e.table_name AND w.k = e.k "
                "AND e.position::numeric * 4294967296 + e.ordinal = w.m"
            )
        cur.execute("ANALYZE _kf_last")
        cur.execute(
            "CREATE TEMP TABLE _kf_count (table_name text, k jsonb, schema_id integer, n bigint) ON COMMIT DROP"
        )
        if keyless:
            events = sql.SQL(" UNION ALL ").join(
                sql.SQL(
                    "SELECT table_name, key AS k, position, ordinal, schema_id, "
                    "  CASE WHEN op = 'DELETE' THEN -1 WHEN op = 'UPDATE' AND old_key IS NULL THEN 0 ELSE 1 END AS d "
                    "FROM {r} WHERE {c} AND version IS NOT NULL AND key IS NOT NULL "
                    "AND table_name = ANY(%(keyless)s) "
                    "UNION ALL "
                    "SELECT table_name, old_key, position, ordinal, schema_id, -1 FROM {r} WHERE {c} "
                    "AND version IS NOT NULL AND old_key IS NOT NULL AND table_name = ANY(%(keyless)s)"
                ).format(r=rel, c=cond)
                for rel, cond in sources
            )
            cur.execute(
                sql.SQL(
                    "INSERT INTO _kf_count "
                    "WITH e AS ({events}), kf AS ("
                    "  SELECT k.table_name, k.key AS k, count(*) AS n, max(k.position) AS position, "
                    "    max(k.ordinal) AS ordinal FROM {keep} k "
                    "  WHERE k.keyframe AND k.table_name = ANY(%(keyless)s) "
                    "  AND (k.table_name, k.key) IN (SELECT table_name, k FROM e) GROUP BY 1, 2"
                    ") "
                    "SELECT e.table_name, e.k, max(e.schema_id), "
                    "  CASE WHEN kf.k IS NOT NULL AND (t.table_name IS NULL OR (kf.position, kf.ordinal) > "
                    "    (t.position, t.ordinal)) THEN kf.n ELSE 0 END "
                    "  + coalesce(sum(e.d) FILTER (WHERE (t.table_name IS NULL OR (e.position, e.ordinal) > "
                    "    (t.position, t.ordinal)) AND (kf.k IS NULL OR (e.position, e.ordinal) > "
                    "    (kf.position, kf.ordinal))), 0) "
                    "FROM e LEFT JOIN _kf_trunc t ON t.table_name = e.table_name "
                    "LEFT JOIN kf ON kf.table_name = e.table_name AND kf.k = e.k "
                    "GROUP BY e.table_name, e.k, kf.k, kf.n, kf.position, kf.ordinal, t.table_name, t.position, "
                    "t.ordinal"
                ).format(events=events, keep=keep),
                args,
            )
        # The new keyframes: keyed rows whose last touch is an image at their key, not truncated
        # after, and not already covered by a newer keyframe; keyless values counted above zero.
        # (A newer keyframe can only exist when a removed row is older than the newest keyframe,
        # e.g. rows kept for a table whose retention was shortened: checked only then.)
        older = cur.execute(
            sql.SQL(
                "SELECT (SELECT min(position) FROM _kf_last) <= (SELECT max(position) FROM {} WHERE keyframe)"
            ).format(keep)
        ).fetchone()
        newer: sql.Composable = sql.SQL("")
        if older and older[0]:
            newer = sql.SQL(
                "AND NOT EXISTS (SELECT 1 FROM {keep} k WHERE k.keyframe AND k.table_name = l.table_name "
                "  AND k.key = l.k AND (k.position, k.ordinal) > (l.position, l.ordinal)) "
            ).format(keep=keep)
        cur.execute(
            sql.SQL(
                "CREATE TEMP TABLE _kf_new ON COMMIT DROP AS "
                "SELECT l.table_name, l.k AS key, l.after, l.schema_id, 1::bigint AS n FROM _kf_last l "
                "LEFT JOIN _kf_trunc t ON t.table_name = l.table_name "
                "WHERE l.at_key AND l.op IN ('INSERT', 'UPDATE', 'SNAPSHOT') "
                "AND (t.table_name IS NULL OR (l.position, l.ordinal) > (t.position, t.ordinal)) {newer}"
                "UNION ALL "
                "SELECT table_name, k, k, schema_id, n FROM _kf_count WHERE n > 0"
            ).format(newer=newer)
        )
        row = cur.execute("SELECT coalesce(sum(n), 0)::bigint FROM _kf_new").fetchone()
        written = int(row[0]) if row else 0
        if not self.retention.keyframe_on_prune:
            # retention.keyframe_on_prune: false: rows not changed since the horizon drop out of
            # time travel (docs/retention.md). Superseded keyframes still go.
            written = 0
        if mode == "dry_run":
            return written, 0
        # Older keyframes these rows replace: superseded by a removed change, killed by a removed
        # TRUNCATE, or (keyless) recounted above. Deleted now, or (staging) listed for the publish.
        retire = [  # (other relation, condition): k are the older keyframes
            (
                "_kf_last l",
                "k.table_name = l.table_name AND k.key = l.k AND (k.position, k.ordinal) < (l.position, l.ordinal)",
            ),
            (
                "_kf_trunc t",
                "k.table_name = t.table_name AND (k.position, k.ordinal) < (t.position, t.ordinal)",
            ),
            ("_kf_count c", "k.table_name = c.table_name AND k.key = c.k"),
        ]
        replaced = 0
        for other, condition in retire:
            if mode == "stage":
                statement = sql.SQL(
                    "INSERT INTO {r} SELECT k.position, k.ordinal FROM {keep} k, {o} WHERE k.keyframe AND {c} "
                    "ON CONFLICT DO NOTHING"
                ).format(r=self._t("keyframes_retire"), keep=keep, o=sql.SQL(other), c=sql.SQL(condition))
            else:
                statement = sql.SQL("DELETE FROM {keep} k USING {o} WHERE k.keyframe AND {c}").format(
                    keep=keep, o=sql.SQL(other), c=sql.SQL(condition)
                )
            cur.execute(statement)
            replaced += max(cur.rowcount, 0)
        if written:
            base = cur.execute(
                sql.SQL(
                    "SELECT greatest(%s, coalesce(max(ordinal) + 1, 0)) FROM {} WHERE position = %s"
                ).format(keep),
                (KEYFRAME_ORDINAL_BASE, floor),
            ).fetchone()
            assert base is not None
            cur.execute(
                sql.SQL(
                    "INSERT INTO {keep} (position, ordinal, version, lsn, xid, committed_at, table_name, op, key, "
                    "old_key, before, after, changed, status, request_id, context, schema_id, actor, actor_seq, "
                    "keyframe) "
                    "SELECT %(f)s, %(base)s + row_number() OVER () - 1, %(f)s, "
                    "%(f)s, 0, %(h)s, n.table_name, 'SNAPSHOT', n.key, NULL, NULL, n.after, NULL, 'committed', "
                    "NULL, '{{\"keyframe\": true}}', n.schema_id, NULL, NULL, true "
                    "FROM _kf_new n CROSS JOIN LATERAL generate_series(1, n.n) AS g(i)"
                ).format(keep=keep),
                {"f": floor, "base": int(base[0]), "h": horizon},
            )
        return written, replaced

    def _prune_requests(self, conn: Conn, horizon: datetime) -> int:
        """Remove request records last seen before the horizon whose mutations are all gone, in
        short batches (a budget per prune; the rest goes next time)."""
        removed = 0
        while removed < self.request_budget:
            with conn.transaction():
                cur = conn.execute(
                    sql.SQL(
                        "DELETE FROM {r} WHERE request_id IN (SELECT request_id FROM {r} WHERE last_seen_at < %s "
                        "ORDER BY last_seen_at LIMIT %s) AND NOT EXISTS (SELECT 1 FROM {k} k "
                        "WHERE k.request_id = {r}.request_id)"
                    ).format(r=self._t("requests"), k=self._t("mutations_keep")),
                    (horizon, self.request_batch),
                )
                count = max(cur.rowcount, 0)
            removed += count
            if count < self.request_batch:
                break
        return removed


# ============================================================================ erasure


class RowStillLiveError(UsageError):
    """``cdc erase`` refused: the row still exists on the source (or the source was not checked)."""


@dataclass(frozen=True)
class ErasureReport:
    erasure_id: int | None  # None for a dry run
    table: str
    key_sha256: str
    mutations_removed: int  # keyframes included
    keyframes_removed: int
    partitions: dict[str, int]  # relation -> rows removed there
    source_check: str
    forced: bool
    actor: str
    since: datetime | None
    until: datetime | None
    #: every key the row had (followed through key-changing UPDATEs), as its SHA-256, with the
    #: images removed under it: counts only, never a key value
    keys: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "erasure_id": self.erasure_id,
            "table": self.table,
            "key_sha256": self.key_sha256,
            "mutations_removed": self.mutations_removed,
            "keyframes_removed": self.keyframes_removed,
            "partitions": self.partitions,
            "source_check": self.source_check,
            "forced": self.forced,
            "actor": self.actor,
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
            "keys": self.keys,
        }


def canonical_key_sha256(table: str, key: Mapping[str, Any]) -> str:
    """Hex SHA-256 of the stored key as canonical JSON (sorted keys, no spaces, UTF-8).

    The table is not part of the hash (it is recorded beside it). The same row always hashes
    the same, so "was this row erased?" can be answered without storing the key.
    """
    del table
    text = json.dumps(dict(key), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def default_actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _erasable_relations(conn: Conn, schema: str) -> list[str]:
    return [p.name for p in list_partitions(conn, schema, "mutations")] + ["mutations_keep"]


# A row's life under one key: (key, from, to), bounds as (position, ordinal), None = open.
_Segment = tuple[dict[str, Any], tuple[int, int] | None, tuple[int, int] | None]
_MAX_LINKED_KEYS = 1000


def _bounds(lo: tuple[int, int] | None, hi: tuple[int, int] | None) -> sql.Composable:
    out: sql.Composable = sql.SQL("")
    if lo is not None:
        out += sql.SQL(" AND (position, ordinal) >= ({}, {})").format(sql.Literal(lo[0]), sql.Literal(lo[1]))
    if hi is not None:
        out += sql.SQL(" AND (position, ordinal) <= ({}, {})").format(sql.Literal(hi[0]), sql.Literal(hi[1]))
    return out


def linked_keys(conn: Conn, schema: str, table: str, key: Mapping[str, Any]) -> list[_Segment]:
    """Every key the row named by ``key`` had, followed through key-changing UPDATEs.

    Backwards: an UPDATE that moved the row into a key it had (``old_key`` -> ``key``) makes
    the old key's images up to that UPDATE part of the row. Forwards: an UPDATE that moved it
    out of ``key`` (given as an old key) makes the new key's images from that UPDATE on part of
    it. The first segment is ``key`` itself, whole, as erasure by key always was: a key reused
    by another row before or after (a DELETE then an INSERT) goes with it.
    """
    view = _q(schema, "mutations_all")
    start: _Segment = (dict(key), None, None)
    segments: list[_Segment] = [start]
    seen: set[tuple[str, tuple[int, int] | None, tuple[int, int] | None]] = {
        (json.dumps(dict(key), sort_keys=True), None, None)
    }
    todo: list[tuple[_Segment, bool, bool]] = [(start, True, True)]  # (segment, backwards, forwards)
    while todo:
        (k, lo, hi), backwards, forwards = todo.pop()
        found: list[tuple[_Segment, bool, bool]] = []
        if backwards:
            for old, position, ordinal in conn.execute(
                sql.SQL(
                    "SELECT old_key, position, ordinal FROM {v} WHERE table_name = %(t)s AND key = %(k)s "
                    "AND old_key IS NOT NULL AND old_key <> key{b}"
                ).format(v=view, b=_bounds(lo, hi)),
                {"t": table, "k": Jsonb(k)},
            ).fetchall():
                found.append(((dict(old), None, (int(position), int(ordinal))), True, False))
        if forwards:
            for new, position, ordinal in conn.execute(
                sql.SQL(
                    "SELECT key, position, ordinal FROM {v} WHERE table_name = %(t)s AND old_key = %(k)s "
                    "AND key IS NOT NULL AND old_key <> key{b}"
                ).format(v=view, b=_bounds(lo, hi)),
                {"t": table, "k": Jsonb(k)},
            ).fetchall():
                found.append(((dict(new), (int(position), int(ordinal)), None), False, True))
        for segment, back, fwd in found:
            marker = (json.dumps(segment[0], sort_keys=True), segment[1], segment[2])
            if marker in seen:
                continue
            seen.add(marker)
            if len(segments) >= _MAX_LINKED_KEYS:
                raise UsageError(
                    f"the row of {table} changed its key more than {_MAX_LINKED_KEYS} times: erase refused"
                )
            segments.append(segment)
            todo.append((segment, back, fwd))
    return segments


def erase_row(
    conn: Conn,
    schema: str,
    table: str,
    key: Mapping[str, Any],
    key_columns: Sequence[str],
    *,
    actor: str,
    source_check: str,
    forced: bool,
    since: datetime | None = None,
    until: datetime | None = None,
    dry_run: bool = False,
) -> ErasureReport:
    """Delete every image of the row of ``table`` named by ``key`` (optionally only those
    committed in ``[since, until)``), keyframes and SNAPSHOT rows included, one partition at a
    time in one transaction, and record the erasure (``erasures``: who, when, the key's
    SHA-256, counts).

    The row is followed through its key changes (:func:`linked_keys`): its images under an
    earlier key, up to the UPDATE that changed it, and under a later key when ``key`` is an
    old one, go too. ``key`` is the stored form (:meth:`cdc.query.Store.stored_key`). Raises
    NotFoundError when nothing matches. ``conn`` must be in autocommit mode (this runs its own
    transaction).
    """
    digest = canonical_key_sha256(table, key)
    window: sql.Composable = sql.SQL("")
    params: dict[str, Any] = {"t": table, "since": since, "until": until}
    if since is not None:
        window += sql.SQL(" AND committed_at >= %(since)s")
    if until is not None:
        window += sql.SQL(" AND committed_at < %(until)s")
    removed: dict[str, int] = {}
    per_key: dict[str, int] = {}
    keyframes = 0
    erasure_id: int | None = None
    try:
        with conn.transaction(force_rollback=dry_run):
            # One at a time with prunes (which may be dropping a partition listed here).
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (_ADVISORY + schema,))
            segments = linked_keys(conn, schema, table, key)
            for k, _lo, _hi in segments:
                per_key.setdefault(canonical_key_sha256(table, k), 0)
            for name in _erasable_relations(conn, schema):
                keyframe = sql.SQL("keyframe") if name == "mutations_keep" else sql.SQL("false")
                for k, lo, hi in segments:
                    row = conn.execute(
                        sql.SQL(
                            "WITH d AS (DELETE FROM {r} WHERE table_name = %(t)s AND (key = %(k)s OR old_key = %(k)s)"
                            "{b}{w} RETURNING {kf} AS keyframe) SELECT count(*), count(*) FILTER (WHERE keyframe) FROM d"
                        ).format(r=_q(schema, name), b=_bounds(lo, hi), w=window, kf=keyframe),
                        {**params, "k": Jsonb(k)},
                    ).fetchone()
                    if row and row[0]:
                        removed[name] = removed.get(name, 0) + int(row[0])
                        per_key[canonical_key_sha256(table, k)] += int(row[0])
                        keyframes += int(row[1])
            if _staging_supported(conn, schema):
                # Keyframes staged for the next prune (pending, above the floor) go whatever the
                # window: they may copy an image just erased. The staging is void (the publish
                # computes the keyframes again).
                pending = 0
                for text in dict.fromkeys(json.dumps(s[0], sort_keys=True) for s in segments):
                    row = conn.execute(
                        sql.SQL(
                            "WITH d AS (DELETE FROM {k} WHERE table_name = %(t)s AND key = %(k)s AND keyframe "
                            "AND position > coalesce((SELECT max(history_floor) FROM {c}), -1) RETURNING 1) "
                            "SELECT count(*) FROM d"
                        ).format(k=_q(schema, "mutations_keep"), c=_q(schema, "capture_state")),
                        {**params, "k": Jsonb(json.loads(text))},
                    ).fetchone()
                    count = int(row[0]) if row else 0
                    if count:
                        per_key[canonical_key_sha256(table, json.loads(text))] += count
                    pending += count
                if pending:
                    removed["mutations_keep"] = removed.get("mutations_keep", 0) + pending
                    keyframes += pending
                if removed:
                    conn.execute(
                        sql.SQL("UPDATE {} SET staged = NULL WHERE staged IS NOT NULL").format(
                            _q(schema, "retention_state")
                        )
                    )
            total = sum(removed.values())
            if total == 0:
                what = "in that time window" if since is not None or until is not None else "at all"
                raise NotFoundError(
                    f"no image of {table} with that key in the history {what}: nothing erased"
                )
            keys = [{"key_sha256": h, "removed": n} for h, n in per_key.items()]
            if not dry_run:
                found = conn.execute(
                    sql.SQL(
                        "INSERT INTO {} (actor, table_name, key_sha256, key_columns, from_time, until_time, "
                        "mutations_removed, keyframes_removed, source_check, forced, keys) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING erasure_id"
                    ).format(_q(schema, "erasures")),
                    (
                        actor,
                        table,
                        digest,
                        list(key_columns),
                        since,
                        until,
                        total,
                        keyframes,
                        source_check,
                        forced,
                        Jsonb(keys),
                    ),
                ).fetchone()
                erasure_id = int(found[0]) if found else None
    except psycopg.OperationalError as exc:
        raise StoreUnavailableError(f"erasure failed, nothing was removed: {_first_line(exc)}") from None
    log.info(
        "row_erased",
        table=table,
        key_sha256=digest,
        mutations=sum(removed.values()),
        keys=len(per_key),
        dry_run=dry_run,
    )
    return ErasureReport(
        erasure_id=erasure_id,
        table=table,
        key_sha256=digest,
        mutations_removed=sum(removed.values()),
        keyframes_removed=keyframes,
        partitions=removed,
        source_check=source_check,
        forced=forced,
        actor=actor,
        since=since,
        until=until,
        keys=keys,
    )


def row_on_source(source: Conn, table: str, key: Mapping[str, Any], keyless: bool) -> bool:
    """Whether the row named by the stored ``key`` exists on the source now.

    Keyed tables: ``key column = value::type`` for each key column (an index seek). Keyless
    tables: every column of the stored row compared IS NOT DISTINCT FROM (a scan). Values are
    given in their text form and cast to the column's type, so the comparison is the server's.
    Raises psycopg errors (unknown column, bad value) to the caller; an absent table is absent.
    """
    schema, name = table.split(".", 1)
    relation = source.execute(
        "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s",
        (schema, name),
    ).fetchone()
    if relation is None:
        return False
    types = dict(
        source.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped",
            (relation[0],),
        ).fetchall()
    )
    conditions: list[sql.Composable] = []
    values: list[Any] = []
    for column, value in key.items():
        if column not in types:
            raise UsageError(f"the source table {table} has no column {column!r} any more")
        op = sql.SQL("IS NOT DISTINCT FROM") if keyless or value is None else sql.SQL("=")
        conditions.append(
            sql.SQL("{} {} CAST(%s AS {})").format(sql.Identifier(column), op, sql.SQL(types[column]))
        )
        values.append(_text_value(value))
    query = sql.SQL("SELECT EXISTS (SELECT 1 FROM ONLY {} WHERE {})").format(
        sql.Identifier(schema, name), sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("true")
    )
    row = source.execute(query, values).fetchone()
    return bool(row and row[0])


def _text_value(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


# ============================================================================ benchmark


def bench_prune(
    dsn: str,
    *,
    schema: str = "cdc_bench_prune",
    mutations: int = 10_000_000,
    days: int = 10,
    hot: int = 100_000,
    cold: int = 100_000,
    keep_schema: bool = False,
) -> dict[str, Any]:
    """Build a synthetic store of ``mutations`` mutations spread evenly over ``days`` daily
    partitions (transactions of 10), then prune the oldest day, and return sizes and timings.

    One keyed table: day one INSERTs ``hot + cold`` rows; every other mutation is an UPDATE of one
    of the ``hot`` rows (so each is changed every day; the ``cold`` ones never again). Pruning the
    oldest day (``mutations / days`` rows) writes one keyframe per row changed that day: ``hot +
    cold`` (the state at the new floor needs them all; a hot row's keyframe is replaced by the next
    prune, a cold row's stays). ``stage_seconds`` is the keyframe computation ahead of the locks
    (:meth:`Pruner.stage`); ``publish_seconds`` the locked transaction, from its SHARE locks through
    the commit of the drop, of which ``keyframe_seconds`` up to the drop (publishing the staged
    keyframes, floor, bookkeeping) and ``drop_seconds`` the DROP of the two partitions (lock
    included); ``prune_seconds`` the whole prune. ``schema`` is dropped first, and at the end
    unless ``keep_schema``.

    From the command line: ``python -m cdc.store.retention DSN [--mutations N] [--days D]
    [--hot H] [--cold C]``.
    """
    from pathlib import Path

    from cdc.config import RetentionConfig as _Retention

    per_day = mutations // days
    if hot + cold > per_day or hot <= 0:
        raise UsageError("bench_prune: need 0 < hot and hot + cold <= mutations / days")
    ddl = (Path(__file__).resolve().parents[1] / "sql" / "store.sql").read_text()
    day0 = bucket_start(datetime.now(UTC), timedelta(days=1)) - timedelta(days=days + 1)
    result: dict[str, Any] = {
        "mutations": per_day * days,
        "days": days,
        "per_day": per_day,
        "hot": hot,
        "cold": cold,
    }
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        with conn.transaction():
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
            conn.execute(sql.SQL("SET LOCAL search_path = {}").format(sql.Identifier(schema)))
            conn.execute(ddl.encode())
        with conn.transaction():
            ensure_partitions(conn, schema, day0, day0 + timedelta(days=days + AHEAD))
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (table_name, relation_oid, replica_identity, key_columns, columns, fingerprint, "
                "first_position) VALUES ('public.bench', 1, 'd', '{{id}}', "
                '\'[{{"name": "id", "type_oid": 20, "key": true}}, {{"name": "v", "type_oid": 20}}]\', '
                "'bench', 0)"
            ).format(_q(schema, "table_schemas"))
        )
        built = time.perf_counter()
        step = 86_400_000_000 / per_day  # microseconds between mutations
        params: dict[str, Any] = {"day0": day0, "step": step, "born": hot + cold, "hot": hot}
        for day in range(days):
            params.update(lo=day * per_day, hi=(day + 1) * per_day - 1)
            conn.execute(
                sql.SQL(
                    "INSERT INTO {m} (position, ordinal, version, lsn, xid, committed_at, table_name, op, key, "
                    "before, after, changed, status) "
                    "SELECT 1000000 + (g / 10) * 100, g %% 10, 1000000 + (g / 10) * 100, 1000000 + g, g / 10, "
                    "%(day0)s + make_interval(secs => ((g / 10) * 10 * %(step)s) / 1e6), 'public.bench', "
                    "CASE WHEN g < %(born)s THEN 'INSERT' ELSE 'UPDATE' END, "
                    "jsonb_build_object('id', k), "
                    "CASE WHEN g >= %(born)s THEN jsonb_build_object('id', k, 'v', g - %(hot)s) END, "
                    "jsonb_build_object('id', k, 'v', g), "
                    "CASE WHEN g >= %(born)s THEN '{{v}}'::text[] END, 'committed' "
                    "FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) g, "
                    "LATERAL (SELECT CASE WHEN g < %(born)s THEN g ELSE g %% %(hot)s END AS k) k"
                ).format(m=_q(schema, "mutations")),
                params,
            )
            conn.execute(
                sql.SQL(
                    "INSERT INTO {t} (position, xid, version, status, committed_at, mutation_count) "
                    "SELECT 1000000 + x * 100, x, 1000000 + x * 100, 'committed', "
                    "%(day0)s + make_interval(secs => (x * 10 * %(step)s) / 1e6), 10 "
                    "FROM generate_series(%(lo)s::bigint / 10, %(hi)s::bigint / 10) x"
                ).format(t=_q(schema, "transactions")),
                params,
            )
        last = 1000000 + ((per_day * days - 1) // 10) * 100
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (slot_name, acked_lsn, baseline_lsn, baseline_done, history_floor) "
                "VALUES ('bench', %s, 1000000, true, 1000000)"
            ).format(_q(schema, "capture_state")),
            (last,),
        )
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(_q(schema, "mutations")))
        conn.execute(sql.SQL("VACUUM ANALYZE {}").format(_q(schema, "transactions")))
        result["build_seconds"] = round(time.perf_counter() - built, 1)
        result["store_bytes"] = retention_stats(conn, schema).bytes
    # As of one hour into day ``days`` with a retention of ``days - 1`` days: the first day expires.
    retention = _Retention(default=timedelta(days=days - 1), partition_interval=timedelta(days=1))
    with Pruner(dsn, schema, retention) as pruner:
        report = pruner.prune(day0 + timedelta(days=days, hours=1))
    result.update(
        partitions=report.partitions + report.transaction_partitions,
        dropped_rows=report.dropped_rows,
        dropped_bytes=report.dropped_bytes,
        keyframes=report.keyframes,
        staged=report.staged,
        stage_seconds=round(report.stage_seconds, 3),
        publish_seconds=round(report.publish_seconds, 3),
        keyframe_seconds=round(report.keyframe_seconds, 3),
        drop_seconds=round(report.drop_seconds, 3),
        prune_seconds=round(report.seconds, 3),
        floor=report.floor,
    )
    if not keep_schema:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    return result


def _first_line(exc: BaseException) -> str:
    return redact_dsn(error_text(exc))


def _main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cdc.store.retention", description=bench_prune.__doc__)
    parser.add_argument("dsn")
    parser.add_argument("--schema", default="cdc_bench_prune")
    parser.add_argument("--mutations", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--hot", type=int, default=100_000)
    parser.add_argument("--cold", type=int, default=100_000)
    parser.add_argument("--keep-schema", action="store_true")
    args = parser.parse_args(argv)
    result = bench_prune(
        args.dsn, schema=args.schema, mutations=args.mutations, days=args.days, hot=args.hot, cold=args.cold,
        keep_schema=args.keep_schema,
    )  # fmt: skip
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    _main()
