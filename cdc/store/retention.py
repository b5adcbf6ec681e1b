"""Time partitions of the history store (docs/retention.md "Layout", "Creating partitions").

The partitioned tables are partitioned by RANGE (``committed_at``), one partition per
``retention.partition_interval``, aligned on the Unix epoch in UTC (so daily partitions start at
midnight UTC) and named ``<table>_p20261121`` (``_HHMM[SS]`` appended when the interval is not
whole days). :func:`ensure_partitions` creates them; the writer calls it (through a
:class:`PartitionCache`) before a batch that needs a partition that does not exist yet, and the
pruner (:mod:`cdc.store.prune`) creates the next :data:`AHEAD` intervals every time it runs.

Pruning is :mod:`cdc.store.prune` (keyframes: :mod:`cdc.store.keyframes`), erasure
:mod:`cdc.store.erase`, the retention gauges :mod:`cdc.store.stats`. Every function here takes an
open psycopg connection and runs in its current transaction unless it says otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import structlog
from psycopg import sql

from cdc.errors import UsageError

__all__ = [
    "AHEAD",
    "Partition",
    "PartitionCache",
    "bucket_start",
    "ensure_partitions",
    "list_partitions",
    "partition_interval",
    "partition_name",
    "set_partition_interval",
]

log = structlog.get_logger("cdc.retention")

#: Partitions created ahead of the current interval.
AHEAD = 3
#: ``ensure_partitions`` refuses to create more partitions than this in one call.
MAX_NEW_PARTITIONS = 1000
PARTITIONED = ("transactions", "context_changes", "changes")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MIN_INTERVAL = timedelta(minutes=1)
_ADVISORY = "cdc:partitions:"

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
        "AND NOT attisdropped AND attgenerated = '' ORDER BY attnum",
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
        sql.SQL(
            "CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING GENERATED)"
        ).format(table, _q(schema, parent))
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
    """What the writer knows of the partitions: the time spans covered in every partitioned
    table. ``covers`` is a few comparisons; only a miss touches the store."""

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
        spans: list[tuple[datetime, datetime]] | None = None
        for parent in PARTITIONED:
            low, high = datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC)
            covered = _merge(
                [
                    (p.lo or low, p.hi or high)
                    for p in list_partitions(conn, self.schema, parent)
                    if not p.default
                ]
            )
            spans = covered if spans is None else _intersect(spans, covered)
        self.spans = spans or []

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
