"""Writes captured batches to the history store (format 2, docs/store.md).

One ``write(batch)`` is one store transaction: the batch's partitions ensured first (in a short
transaction of their own), rows a crash left of a replayed transaction deleted, then COPY of
``changes``, ``transactions`` and ``context_changes``, the fill of ``pending`` columns from each
row's previous image, the actor sequences, the reported request errors, and the new
``capture_state.acked_lsn`` (this module is its only writer). Nothing is acknowledged to the
source before that commit returns, so a crash at any point loses nothing; a transaction written
again after a crash replaces what a partial write of it left, so nothing is recorded twice.

The batch arrives as COPY text built by the capture side (cdc/capture/batches.py): this module
never parses a row. It never talks to the source.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg
from psycopg import sql

from cdc.errors import SetupError, StandbyError, StoreUnavailableError, error_text
from cdc.store.backfill import ChunkDone, apply_chunks
from cdc.store.retention import PartitionCache

STORE_FORMAT = 2

CHANGES_COPY = (
    "COPY changes (position, ordinal, committed_at, table_id, schema_id, op, flags, lsn, xid, key_text, "
    "image, before, old_key_text, pending) FROM STDIN"
)
TRANSACTIONS_COPY = (
    "COPY transactions (position, committed_at, xid, commit_lsn, status, flags, origin, change_count, "
    "request_id, actor, actor_seq, context) FROM STDIN"
)
CONTEXT_CHANGES_COPY = (
    "COPY context_changes (position, committed_at, from_ordinal, request_id, actor, actor_seq, context) "
    "FROM STDIN"
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

#: Change flags (docs/store.md "Change flags"): some columns of the image are unknown; a value
#: is stored by reference.
INCOMPLETE = 4
OVERSIZE = 8


def from_us(us: int) -> datetime:
    """A commit time in microseconds since the Unix epoch, as a UTC datetime."""
    return _EPOCH + timedelta(microseconds=us)


@dataclass(slots=True)
class StoreBatch:
    """What one store transaction writes. Row data is COPY text (docs/store.md "COPY format")."""

    changes: list[bytes] = field(default_factory=list)  # `changes` COPY text, whole lines per part
    transactions: list[bytes] = field(default_factory=list)  # one COPY line each
    context_changes: list[bytes] = field(default_factory=list)
    request_errors: list[dict[str, Any]] = field(default_factory=list)  # request_errors rows
    actor_sequences: dict[str, int] = field(default_factory=dict)  # actor -> last sequence handed out
    fresh: list[int] = field(default_factory=list)  # positions whose first change is in this batch
    pending: list[int] = field(default_factory=list)  # positions with rows whose `pending` is set
    ack_lsn: int | None = None  # acknowledged once this batch commits
    min_us: int | None = None  # committed_at range of the rows (µs since the epoch)
    max_us: int | None = None
    rows: int = 0  # change rows
    max_position: int = 0  # largest position of a change row
    backfill: list[ChunkDone] = field(default_factory=list)  # high watermarks (cdc/store/backfill.py)

    def span(self, us: int) -> None:
        if self.min_us is None or us < self.min_us:
            self.min_us = us
        if self.max_us is None or us > self.max_us:
            self.max_us = us

    def empty(self) -> bool:
        return not (
            self.changes
            or self.transactions
            or self.context_changes
            or self.request_errors
            or self.actor_sequences
            or self.backfill
            or self.ack_lsn is not None
        )


@dataclass(frozen=True, slots=True)
class CaptureState:
    slot_name: str
    acked_lsn: int
    baseline_lsn: int | None
    baseline_done: bool
    source_system_id: str | None


def check_format(cur: psycopg.Cursor[Any], schema: str) -> None:
    """Refuse a store that is missing, of format 1 (``mutations``), or newer than this code."""
    cur.execute("SELECT to_regclass('store_meta') IS NOT NULL, to_regclass('mutations') IS NOT NULL")
    row = cur.fetchone()
    has_meta, has_mutations = (bool(row[0]), bool(row[1])) if row else (False, False)
    if not has_meta:
        if has_mutations:
            raise SetupError(
                f"the history store schema {schema!r} is in format 1 (a `mutations` table): this "
                "version writes format 2",
                hint="stop the daemon and run `cdc setup`: it converts the store",
            )
        raise SetupError(f"the history store has no schema {schema!r}", hint="run `cdc setup` first")
    cur.execute("SELECT format_version FROM store_meta")
    found = cur.fetchone()
    version = int(found[0]) if found else 0
    if version != STORE_FORMAT:
        raise SetupError(
            f"the history store schema {schema!r} is in format {version}; this version of cdc writes "
            f"format {STORE_FORMAT}",
            hint="run the cdc release that matches the store, or `cdc setup` to convert an older one",
        )


def lock_key(schema: str, slot_name: str) -> str:
    """The advisory lock of "one active daemon per slot" (its hashtext)."""
    return f"cdc:{schema}:{slot_name}"


def lock_taken(dsn: str, schema: str, slot_name: str) -> bool:
    """Whether another session holds the slot's lock now (a standby's cheap check)."""
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            row = conn.execute(
                "SELECT pg_try_advisory_lock(hashtext(%s))", (lock_key(schema, slot_name),)
            ).fetchone()
            if row is not None and row[0]:
                conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (lock_key(schema, slot_name),))
                return False
            return True
    except psycopg.OperationalError as exc:
        raise StoreUnavailableError(f"cannot reach the history store: {error_text(exc)}") from exc


def lock_holder(conn: psycopg.Connection[Any], schema: str, slot_name: str) -> int | None:
    """The store backend pid holding the slot's lock (an active daemon's writer), or None:
    read from pg_locks, without taking the lock (a standby is never disturbed). A bigint
    advisory key shows as its high half in classid and its low half in objid."""
    row = conn.execute(
        "WITH k AS (SELECT hashtext(%s)::bigint AS v) "
        "SELECT l.pid FROM pg_catalog.pg_locks l, k WHERE l.locktype = 'advisory' AND l.granted "
        "AND l.objsubid = 1 AND l.database = (SELECT oid FROM pg_catalog.pg_database "
        "WHERE datname = pg_catalog.current_database()) "
        "AND l.classid::bigint = (k.v >> 32) & 4294967295 AND l.objid::bigint = k.v & 4294967295 LIMIT 1",
        (lock_key(schema, slot_name),),
    ).fetchone()
    return int(row[0]) if row is not None and row[0] is not None else None


class StoreWriter:
    """The capture side's connection to the store. Not thread-safe; one per daemon."""

    def __init__(self, dsn: str, schema: str, slot_name: str) -> None:
        self.dsn = dsn
        self.schema = schema
        self.slot_name = slot_name
        self._conn: psycopg.Connection[Any] | None = None
        self._max_written_position = 0
        # The time partitions known to exist: a batch outside them creates its partitions first
        # (cdc/store/retention.py); in the steady state a few comparisons.
        self._partitions = PartitionCache(schema)

    # -- connection ------------------------------------------------------------
    def connect(self, *, lock: bool = True) -> None:
        """Connect, check the store's format and (``lock``) take the slot's active-daemon lock."""
        if self._conn is not None and not self._conn.closed:
            return
        try:
            self._conn = psycopg.connect(
                self.dsn, autocommit=False, connect_timeout=10, application_name="cdc-writer"
            )
            with self._conn.cursor() as cur:
                cur.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(self.schema)))
                # The slot moves on once a batch commits: that commit must be durable.
                cur.execute("SET synchronous_commit = on")
                check_format(cur, self.schema)
                if lock:
                    # One active daemon per slot: a session-level advisory lock on the store,
                    # released by the server the moment this connection dies.
                    cur.execute(
                        "SELECT pg_try_advisory_lock(hashtext(%s))", (lock_key(self.schema, self.slot_name),)
                    )
                    locked = cur.fetchone()
                    if not locked or not locked[0]:
                        raise StandbyError(
                            f"another cdc daemon is active on slot {self.slot_name!r}; standing by"
                        )
                cur.execute("SELECT coalesce(max(position), 0) FROM changes")
                found = cur.fetchone()
                self._max_written_position = int(found[0]) if found else 0
                self._partitions.load(self._conn)
            self._conn.commit()
        except psycopg.OperationalError as exc:
            self.close()
            # Imported here: cdc.config (pydantic, yaml) is not loaded in the writer process.
            from cdc.config import redact_dsn

            raise StoreUnavailableError(
                f"cannot reach the history store ({redact_dsn(self.dsn)}): {error_text(exc)}"
            ) from exc
        except BaseException:
            self.close()
            raise

    @property
    def backend_pid(self) -> int | None:
        conn = self._conn
        if conn is None or conn.closed:
            return None
        return conn.info.backend_pid

    def record_daemon(self, pid: int | None = None) -> None:
        """Note in capture_state which daemon (``pid``, default this process) is active."""
        with self._guard():
            self.conn.execute(
                "UPDATE capture_state SET daemon_host = %s, daemon_pid = %s, updated_at = now() WHERE slot_name = %s",
                (socket.gethostname(), pid or os.getpid(), self.slot_name),
            )
            self.conn.commit()

    def clear_daemon(self, pid: int) -> None:
        """The daemon ``pid`` stopped: forget it in capture_state (``cdc status`` shows no stale
        pid), unless another daemon recorded itself meanwhile. Without the active lock."""
        with (
            psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn,
            conn.cursor() as cur,
        ):
            cur.execute(
                sql.SQL(
                    "UPDATE {}.capture_state SET daemon_host = NULL, daemon_pid = NULL, updated_at = now() "
                    "WHERE slot_name = %s AND daemon_pid = %s AND daemon_host = %s"
                ).format(sql.Identifier(self.schema)),
                (self.slot_name, pid, socket.gethostname()),
            )

    def record_error(self, message: str) -> None:
        """Note the daemon's last error without taking the active lock (any instance may)."""
        with (
            psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn,
            conn.cursor() as cur,
        ):
            cur.execute(
                sql.SQL(
                    "UPDATE {}.capture_state SET last_error = %s, last_error_at = now() WHERE slot_name = %s"
                ).format(sql.Identifier(self.schema)),
                (message[:2000], self.slot_name),
            )

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    @property
    def conn(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self.connect()
        assert self._conn is not None
        return self._conn

    # -- state -----------------------------------------------------------------
    def load_state(self) -> CaptureState | None:
        with self._guard():
            with self.conn.cursor() as cur:
                cur.execute(
                    "SELECT acked_lsn, baseline_lsn, baseline_done, source_system_id "
                    "FROM capture_state WHERE slot_name = %s",
                    (self.slot_name,),
                )
                row = cur.fetchone()
            self.conn.rollback()
        if row is None:
            return None
        return CaptureState(self.slot_name, int(row[0]), row[1], bool(row[2]), row[3])

    # -- writing ---------------------------------------------------------------
    DEADLOCK_RETRIES = 5

    def write(self, batch: StoreBatch) -> None:
        """Write the batch and its ack LSN in one store transaction.

        A deadlock (the pruner dropping a partition while this batch writes) rolls the
        transaction back; the batch is written again, which is safe because it is idempotent.
        """
        for attempt in range(self.DEADLOCK_RETRIES):
            try:
                self._write_once(batch)
                return
            except psycopg.errors.DeadlockDetected:
                if attempt == self.DEADLOCK_RETRIES - 1:
                    raise StoreUnavailableError("history store write kept deadlocking") from None
                time.sleep(0.05 * (attempt + 1))

    def _write_once(self, batch: StoreBatch) -> None:
        with self._guard():
            conn = self.conn
            self._ensure_partitions(batch)
            try:
                with conn.cursor() as cur:
                    replayed = [p for p in batch.fresh if p <= self._max_written_position]
                    if replayed:
                        # Written before a crash, in part (a large transaction's first batches):
                        # what is there goes, the transaction is written whole again.
                        for table in ("changes", "transactions", "context_changes"):
                            cur.execute(
                                sql.SQL("DELETE FROM {} WHERE position = ANY(%s)").format(
                                    sql.Identifier(table)
                                ),
                                (replayed,),
                            )
                    _copy(cur, CHANGES_COPY, batch.changes)
                    _copy(cur, TRANSACTIONS_COPY, batch.transactions)
                    _copy(cur, CONTEXT_CHANGES_COPY, batch.context_changes)
                    if batch.backfill:
                        apply_chunks(cur, batch.backfill)
                    if batch.pending:
                        cur.execute(fill_pending_sql(batch.pending))
                    if batch.actor_sequences:
                        cur.execute(
                            "INSERT INTO actor_sequences (actor, last_seq) SELECT a.actor, a.last_seq "
                            "FROM json_to_recordset(%s::json) AS a(actor text, last_seq bigint) "
                            "ON CONFLICT (actor) DO UPDATE "
                            "SET last_seq = greatest(actor_sequences.last_seq, EXCLUDED.last_seq)",
                            (
                                orjson.dumps(
                                    [{"actor": a, "last_seq": s} for a, s in batch.actor_sequences.items()]
                                ).decode(),
                            ),
                        )
                    if batch.request_errors:
                        cur.execute(
                            "INSERT INTO request_errors (lsn, request_id, reported_at, error_type, message, "
                            "location, db_user, backend_pid, client_addr, xid, reporter_pid) "
                            "SELECT e.lsn, e.request_id, e.reported_at, e.error_type, e.message, e.location, "
                            "e.db_user, e.backend_pid, e.client_addr, e.xid, e.reporter_pid "
                            "FROM json_to_recordset(%s::json) "
                            "AS e(lsn bigint, request_id text, reported_at timestamptz, error_type text, "
                            "message text, location text, db_user text, backend_pid integer, "
                            "client_addr text, xid bigint, reporter_pid integer) ON CONFLICT (lsn) DO NOTHING",
                            (orjson.dumps(batch.request_errors).decode(),),
                        )
                    if batch.ack_lsn is not None:
                        cur.execute(
                            "UPDATE capture_state SET acked_lsn = greatest(acked_lsn, %s), updated_at = now() "
                            "WHERE slot_name = %s",
                            (batch.ack_lsn, self.slot_name),
                        )
                conn.commit()
            except BaseException:
                if not conn.closed:
                    conn.rollback()
                raise
        self._max_written_position = max(self._max_written_position, batch.max_position)

    def _guard(self) -> _StoreGuard:
        return _StoreGuard(self)

    def _ensure_partitions(self, batch: StoreBatch) -> None:
        """Create the partitions the batch's commit times need, if any is missing.

        Committed before the batch's own transaction, so the batch never holds the partition
        lock. Never waits for a prune and gives up under a short lock timeout: the rows then
        land in the DEFAULT partition, which the pruner empties later."""
        if batch.min_us is None or batch.max_us is None:
            return
        lo, hi = from_us(batch.min_us), from_us(batch.max_us)
        if not self._partitions.covers(lo, hi):
            self._partitions.ensure(self.conn, (lo, hi))


def _copy(cur: psycopg.Cursor[Any], statement: str, parts: list[bytes]) -> None:
    if not parts:
        return
    with cur.copy(statement) as copy:
        for part in parts:
            copy.write(part)


def fill_pending_sql(positions: list[int]) -> str:
    """The statement filling the ``pending`` columns of the rows at ``positions``, in order.

    Each such row takes, for each pending column, the value of the row's previous image (the
    latest earlier change with the same key: committed, or of the same transaction when the row
    is a rolled-back attempt; none after a DELETE). A column with no previous value is left out
    of the image and the row is flagged INCOMPLETE; a value filled with an oversize reference
    flags it OVERSIZE. Rows are done one at a time in (position,
    ordinal) order, so a row sees the fill of an earlier one of the same batch. JSON (never
    jsonb) functions only: an image holds values up to capture.max_value_bytes, and jsonb
    refuses strings over 256 MB. One seek per partition on ``changes_row`` per row.
    """
    literal = "{" + ",".join(str(int(p)) for p in positions) + "}"
    return f"""DO $fill$
DECLARE
    r record;
    prev_image text;
    prev_op "char";
    prev_pos bigint;
    prev_ord integer;
    renamed record;
    cols text[];
    ikeys text[];
    ivals text[];
    pkeys text[];
    pvals text[];
    parts text[];
    col text;
    i integer;
    missing boolean;
    oversize boolean;
BEGIN
    FOR r IN
        SELECT c.position, c.ordinal, c.committed_at, c.table_id, c.schema_id, c.flags, c.image, c.pending,
               coalesce(c.old_key_text, c.key_text) AS k
        FROM changes c
        WHERE c.position = ANY('{literal}'::bigint[]) AND c.pending IS NOT NULL
        ORDER BY c.position, c.ordinal
    LOOP
        prev_image := NULL;
        prev_op := NULL;
        SELECT p.image, p.op, p.position, p.ordinal INTO prev_image, prev_op, prev_pos, prev_ord
        FROM changes_all p
        WHERE p.table_id = r.table_id AND p.key_hash = hashtextextended(r.k COLLATE "C", 0)
          AND p.key_text = r.k
          AND (p.position, p.ordinal) < (r.position, r.ordinal)
          AND (p.flags & 1 = 0 OR (r.flags & 1 = 1 AND p.position = r.position))
        ORDER BY p.position DESC, p.ordinal DESC
        LIMIT 1;
        IF prev_op IS DISTINCT FROM 'D' AND prev_image IS NOT NULL THEN
            SELECT array_agg(e.key), array_agg(e.value::text) INTO pkeys, pvals
            FROM json_each(prev_image::json) e;
            -- columns renamed since the previous image (docs/ddl.md) carry their new names
            IF to_regclass('ddl_events') IS NOT NULL THEN  -- `cdc setup` of an earlier release did not create it
                FOR renamed IN
                    SELECT d.details -> 'renamed' AS m FROM ddl_events d
                    WHERE d.table_id = r.table_id AND d.details ? 'renamed'
                      AND (d.position, d.ordinal) > (prev_pos, prev_ord) AND (d.position, d.ordinal) <= (r.position, r.ordinal)
                    ORDER BY d.position, d.ordinal, d.seq
                LOOP
                    pkeys := ARRAY(SELECT coalesce(renamed.m ->> u.k, u.k) FROM unnest(pkeys) WITH ORDINALITY AS u(k, n) ORDER BY u.n);
                END LOOP;
            END IF;
        ELSE
            pkeys := '{{}}';
            pvals := '{{}}';
        END IF;
        SELECT array_agg(e.key), array_agg(e.value::text) INTO ikeys, ivals FROM json_each(r.image::json) e;
        SELECT array_agg(x.col ->> 'name' ORDER BY x.n) INTO cols
        FROM table_schemas s, jsonb_array_elements(s.columns) WITH ORDINALITY AS x(col, n)
        WHERE s.schema_id = r.schema_id;
        parts := '{{}}';
        missing := false;
        oversize := false;
        FOREACH col IN ARRAY coalesce(cols, ikeys || r.pending) LOOP
            IF col = ANY(r.pending) THEN
                i := array_position(pkeys, col);
                IF i IS NULL THEN
                    missing := true;
                    CONTINUE;
                END IF;
                parts := parts || (to_json(col)::text || ':' || pvals[i]);
                oversize := oversize OR starts_with(pvals[i], '{{"$cdc":"oversize"');
            ELSE
                i := array_position(ikeys, col);
                IF i IS NOT NULL THEN
                    parts := parts || (to_json(col)::text || ':' || ivals[i]);
                END IF;
            END IF;
        END LOOP;
        UPDATE changes
        SET image = '{{' || array_to_string(parts, ',') || '}}', pending = NULL,
            flags = flags | CASE WHEN missing THEN {INCOMPLETE} ELSE 0 END | CASE WHEN oversize THEN {OVERSIZE} ELSE 0 END
        WHERE position = r.position AND ordinal = r.ordinal AND committed_at = r.committed_at;
    END LOOP;
END
$fill$"""


class _StoreGuard:
    """Turns connection failures into StoreUnavailableError (retryable) and drops the connection."""

    def __init__(self, writer: StoreWriter) -> None:
        self.writer = writer

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, psycopg.errors.DeadlockDetected):
            return  # rolled back already; write() retries the batch on the same connection
        if isinstance(exc, psycopg.OperationalError | psycopg.errors.AdminShutdown):
            self.writer.close()
            raise StoreUnavailableError(f"history store write failed: {error_text(exc)}") from exc
        if isinstance(exc, psycopg.errors.DiskFull | psycopg.errors.InsufficientResources):
            self.writer.close()
            raise StoreUnavailableError(f"history store is out of space: {error_text(exc)}") from exc
