"""Writes captured transactions to the history store.

One call to ``write`` is one store transaction: the batch's mutations (COPY), the
transactions it finishes, the requests they touched, and the new acknowledged LSN.
Nothing is acknowledged to the source before that commit returns, so a crash at any
point loses nothing; a transaction written again after a crash collides on
(position, ordinal) and is skipped, so nothing is recorded twice.

Before images and unchanged TOAST values the assembler could not fill are filled here,
with one query per batch, from the row's last committed image in the store.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import psycopg
from psycopg import sql

from cdc.assembler import COMMITTED, Mutation, TableSchema
from cdc.config import redact_dsn
from cdc.context import ReportedError
from cdc.errors import SetupError, StandbyError, StoreUnavailableError, error_text
from cdc.store.retention import PartitionCache

_MUTATION_COLUMNS = (
    "position, ordinal, version, lsn, xid, committed_at, table_name, op, key, old_key, "
    "before, after, changed, status, request_id, context, schema_id, actor, actor_seq"
)


@dataclass(slots=True)
class TransactionRow:
    position: int
    xid: int
    commit_lsn: int | None
    status: str
    committed_at: datetime
    origin: str | None
    mutation_count: int = 0
    # request id -> (context json, committed?, actor)
    requests: dict[str, tuple[dict[str, Any], bool, str | None]] = field(default_factory=dict)


@dataclass(slots=True)
class Batch:
    mutations: list[Mutation] = field(default_factory=list)
    transactions: list[TransactionRow] = field(default_factory=list)
    errors: list[ReportedError] = field(default_factory=list)
    ack_lsn: int | None = None

    def __len__(self) -> int:
        return len(self.mutations)

    def empty(self) -> bool:
        return not self.mutations and not self.transactions and not self.errors and self.ack_lsn is None


@dataclass(frozen=True, slots=True)
class CaptureState:
    slot_name: str
    acked_lsn: int
    baseline_lsn: int | None
    baseline_done: bool
    source_system_id: str | None


def _copy_text(value: str) -> bytes:
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r").encode()


_NULL = b"\\N"


def _json_field(value: Any) -> bytes:
    if value is None:
        return _NULL
    # JSON escapes every control character, so only backslashes need COPY escaping.
    return orjson.dumps(value).replace(b"\\", b"\\\\")


def _json_param(rows: list[dict[str, Any]]) -> str:
    """Rows as one JSON document, read back by ``json_to_recordset`` (datetimes as RFC 3339)."""
    return orjson.dumps(rows).decode()


_ARRAYS: dict[tuple[str, ...], bytes] = {}


def _array_field(values: Sequence[str] | None) -> bytes:
    if values is None:
        return _NULL
    key = tuple(values)
    found = _ARRAYS.get(key)
    if found is None:
        quoted = ",".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values)
        found = _copy_text("{" + quoted + "}")
        if len(_ARRAYS) < 10_000:  # column lists repeat: a few per table
            _ARRAYS[key] = found
    return found


class StoreWriter:
    """The daemon's connection to the store. Not thread-safe; one per daemon."""

    def __init__(self, dsn: str, schema: str, slot_name: str) -> None:
        self.dsn = dsn
        self.schema = schema
        self.slot_name = slot_name
        self._conn: psycopg.Connection[Any] | None = None
        self._schema_ids: dict[str, int] = {}
        self._max_written_position = 0
        # (retention) The time partitions known to exist: a batch outside them creates its
        # partitions first (cdc/store/retention.py); in the steady state a few comparisons.
        self._partitions = PartitionCache(schema)

    # -- connection ------------------------------------------------------------
    def connect(self) -> None:
        if self._conn is not None and not self._conn.closed:
            return
        try:
            self._conn = psycopg.connect(self.dsn, autocommit=False, connect_timeout=10)
            with self._conn.cursor() as cur:
                cur.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(self.schema)))
                # The slot moves on once a batch commits: that commit must be durable.
                cur.execute("SET synchronous_commit = on")
                cur.execute("SELECT to_regclass('mutations') IS NOT NULL")
                row = cur.fetchone()
                if not row or not row[0]:
                    raise SetupError(
                        f"the history store has no schema {self.schema!r}",
                        hint="run `cdc setup` first",
                    )
                cur.execute("SELECT to_regclass('mutations_all') IS NOT NULL")  # (retention)
                row = cur.fetchone()
                if not row or not row[0]:
                    raise SetupError(
                        f"the history store schema {self.schema!r} predates partitioning",
                        hint="stop the daemon and run `cdc setup`: it converts the store in place",
                    )
                # One active daemon per slot: a session-level advisory lock on the store,
                # released by the server the moment this connection dies.
                cur.execute(
                    "SELECT pg_try_advisory_lock(hashtext(%s))", (f"cdc:{self.schema}:{self.slot_name}",)
                )
                locked = cur.fetchone()
                if not locked or not locked[0]:
                    raise StandbyError(
                        f"another cdc daemon is active on slot {self.slot_name!r}; standing by"
                    )
                cur.execute("SELECT coalesce(max(position), 0) FROM mutations")
                found = cur.fetchone()
                self._max_written_position = int(found[0]) if found else 0
                self._partitions.load(self._conn)  # (retention)
            self._conn.commit()
        except psycopg.OperationalError as exc:
            self.close()
            raise StoreUnavailableError(
                f"cannot reach the history store ({redact_dsn(self.dsn)}): {exc}"
            ) from exc
        except BaseException:
            self.close()
            raise

    def record_daemon(self) -> None:
        """Note in capture_state which daemon is active (for `cdc status`)."""
        with self._guard():
            self.conn.execute(
                "UPDATE capture_state SET daemon_host = %s, daemon_pid = %s, updated_at = now() WHERE slot_name = %s",
                (socket.gethostname(), os.getpid(), self.slot_name),
            )
            self.conn.commit()

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

    def ping(self) -> bool:
        try:
            with self.conn.cursor() as cur:
                cur.execute("SELECT 1")
            self.conn.rollback()
            return True
        except (psycopg.Error, StoreUnavailableError):
            self.close()
            return False

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

    def write(self, batch: Batch) -> None:
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

    def _write_once(self, batch: Batch) -> None:
        with self._guard():
            conn = self.conn
            self._ensure_partitions(batch)  # (retention) in a short transaction of its own
            try:
                with conn.cursor() as cur:
                    if batch.mutations:
                        self._fill_from_store(cur, batch.mutations)
                        self._copy_mutations(cur, batch.mutations)
                    if batch.transactions:
                        self._insert_transactions(cur, batch.transactions)
                    if batch.errors:
                        self._record_errors(cur, batch.errors)
                    if batch.ack_lsn is not None:
                        cur.execute(
                            "UPDATE capture_state SET acked_lsn = greatest(acked_lsn, %s), updated_at = now() "
                            "WHERE slot_name = %s",
                            (batch.ack_lsn, self.slot_name),
                        )
                conn.commit()
            except BaseException:
                # Schema ids assigned in the rolled-back transaction no longer exist.
                self._schema_ids.clear()
                if not conn.closed:
                    conn.rollback()
                raise
        if batch.mutations:
            self._max_written_position = max(self._max_written_position, batch.mutations[-1].position)

    def _guard(self) -> _StoreGuard:
        return _StoreGuard(self)

    def _ensure_partitions(self, batch: Batch) -> None:
        """(retention) Create the partitions the batch's commit times need, if any is missing.

        Committed before the batch's own transaction, so the batch never holds the partition
        lock. Never waits for a prune and gives up under a short lock timeout: the rows then
        land in the DEFAULT partition, which the pruner empties later."""
        times = [m.committed_at for m in batch.mutations] + [t.committed_at for t in batch.transactions]
        if not times or self._partitions.covers(min(times), max(times)):
            return
        self._partitions.ensure(self.conn, times)

    def schema_id(self, cur: psycopg.Cursor[Any], schema: TableSchema, position: int) -> int:
        found = self._schema_ids.get(schema.fingerprint)
        if found is not None:
            return found
        cur.execute(
            "INSERT INTO table_schemas (table_name, relation_oid, replica_identity, key_columns, columns, "
            "fingerprint, first_position) VALUES (%s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (fingerprint) DO UPDATE SET "
            "first_position = least(table_schemas.first_position, EXCLUDED.first_position) RETURNING schema_id",
            (
                schema.table,
                schema.relation_oid,
                schema.replica_identity,
                list(schema.key_columns),
                json.dumps(schema.columns_json()),
                schema.fingerprint,
                position,
            ),
        )
        row = cur.fetchone()
        assert row is not None
        self._schema_ids[schema.fingerprint] = int(row[0])
        return int(row[0])

    def _fill_from_store(self, cur: psycopg.Cursor[Any], mutations: list[Mutation]) -> None:
        needs = [m for m in mutations if m.fill_before is not False or m.fill_after]
        if not needs:
            return
        # One JSON document per query, not arrays: psycopg dumps list parameters element by
        # element in Python (a fifth of the daemon's CPU at small transactions); orjson is C.
        lookups = [
            {
                "i": i,
                "t": m.table,
                "k": m.old_key if m.old_key is not None else (m.key or {}),
                "p": m.position,
                "o": m.ordinal,
            }
            for i, m in enumerate(needs, start=1)
        ]
        # (retention) Two passes, so that a row's last image costs an index seek in the recent
        # partitions (this interval and the previous one), not one in every partition. A hit
        # there is the last image only if it is newer than every committed position stored
        # outside them (older partitions, mutations_keep): checked with one max() per batch;
        # the rows without such a hit are looked up everywhere (mutations_all: all partitions
        # and the keyframes of pruned rows).
        cut = self._partitions.recent_cut(min(m.committed_at for m in needs))
        cur.execute(
            "SELECT n.i, p.after, coalesce(p.position > o.m, false) FROM ("
            "  SELECT coalesce(greatest((SELECT max(position) FROM mutations WHERE committed_at < %s "
            "  AND version IS NOT NULL), (SELECT max(position) FROM mutations_keep WHERE version IS NOT NULL)), -1) AS m"
            ") o CROSS JOIN json_to_recordset(%s::json) AS n(i int, t text, k jsonb, p bigint, o int) "
            "LEFT JOIN LATERAL (SELECT m.after, m.position FROM mutations m WHERE m.committed_at >= %s "
            "AND m.table_name = n.t AND m.key = n.k AND m.version IS NOT NULL "
            "AND (m.position, m.ordinal) < (n.p, n.o) "
            "ORDER BY m.position DESC, m.ordinal DESC LIMIT 1) p ON true",
            (cut, _json_param(lookups), cut),
        )
        images: dict[int, dict[str, Any] | None] = {}
        missing: list[dict[str, Any]] = []
        for i, after, exact in cur.fetchall():
            if exact:
                images[int(i)] = after
            else:
                missing.append(lookups[int(i) - 1])
        if missing:
            cur.execute(
                "SELECT n.i, p.after FROM json_to_recordset(%s::json) AS n(i int, t text, k jsonb, p bigint, o int) "
                "LEFT JOIN LATERAL (SELECT m.after FROM mutations_all m WHERE m.table_name = n.t "
                "AND m.key = n.k AND m.version IS NOT NULL AND (m.position, m.ordinal) < (n.p, n.o) "
                "ORDER BY m.position DESC, m.ordinal DESC LIMIT 1) p ON true",
                (_json_param(missing),),
            )
            for i, after in cur.fetchall():
                images[int(i)] = after
        for index, mutation in enumerate(needs, start=1):
            _apply_fill(mutation, images.get(index))

    def _copy_mutations(self, cur: psycopg.Cursor[Any], mutations: list[Mutation]) -> None:
        direct = mutations[0].position > self._max_written_position
        target = "mutations" if direct else "_staging"
        if not direct:
            cur.execute(
                "CREATE TEMP TABLE IF NOT EXISTS _staging (LIKE mutations INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
            )
        lines: list[bytes] = []
        schema_ids: dict[str, bytes] = {}
        # Per batch, by identity: a transaction's mutations share their context and commit time.
        contexts: dict[int, bytes] = {}
        times: dict[datetime, bytes] = {}
        next_seq = self._reserve_actor_seqs(cur, mutations)
        for m in mutations:
            actor = m.context.actor if m.context is not None else None
            actor_seq = _NULL
            if actor is not None:
                actor_seq = str(next_seq[actor]).encode()
                next_seq[actor] += 1
            schema_id = _NULL
            if m.schema is not None:
                schema_id = schema_ids.get(m.schema.fingerprint, b"")
                if not schema_id:
                    schema_id = str(self.schema_id(cur, m.schema, m.position)).encode()
                    schema_ids[m.schema.fingerprint] = schema_id
            position = str(m.position).encode()
            committed_at = times.get(m.committed_at)
            if committed_at is None:
                committed_at = times[m.committed_at] = m.committed_at.isoformat().encode()
            context = _NULL
            if m.context is not None:
                context = contexts.get(id(m.context), b"")
                if not context:
                    context = contexts[id(m.context)] = _json_field(m.context.as_json())
            lines.append(
                b"\t".join(
                    (
                        position,
                        str(m.ordinal).encode(),
                        position if m.status == COMMITTED else _NULL,
                        str(m.lsn).encode(),
                        str(m.xid).encode(),
                        committed_at,
                        _copy_text(m.table),
                        m.op.encode(),
                        _json_field(m.key),
                        _json_field(m.old_key),
                        _json_field(m.before),
                        _json_field(m.after),
                        _array_field(m.changed),
                        m.status.encode(),
                        _copy_text(m.request_id) if m.request_id is not None else _NULL,
                        context,
                        schema_id,
                        _copy_text(actor) if actor is not None else _NULL,
                        actor_seq,
                    )
                )
            )
        data = b"\n".join(lines) + b"\n"
        with cur.copy(f"COPY {target} ({_MUTATION_COLUMNS}) FROM STDIN") as copy:
            copy.write(data)
        if not direct:
            # (retention) The key is (position, ordinal, committed_at): committed_at is the commit
            # time from the WAL, the same on a replay, except for a rolled-back transaction before
            # PG16 (the daemon's clock when the abort arrived): those rows also skip a stored
            # (position, ordinal).
            cur.execute(
                f"INSERT INTO mutations ({_MUTATION_COLUMNS}) SELECT {_MUTATION_COLUMNS} FROM _staging s "
                "WHERE s.status = 'committed' OR NOT EXISTS (SELECT 1 FROM mutations m "
                "WHERE m.position = s.position AND m.ordinal = s.ordinal) "
                "ON CONFLICT (position, ordinal, committed_at) DO NOTHING"
            )
            cur.execute("TRUNCATE _staging")

    def _reserve_actor_seqs(self, cur: psycopg.Cursor[Any], mutations: list[Mutation]) -> dict[str, int]:
        """Reserve a range of each actor's sequence for this batch; return each range's start."""
        counts = Counter(m.context.actor for m in mutations if m.context is not None and m.context.actor)
        if not counts:
            return {}
        actors = sorted(counts)
        cur.execute(
            "INSERT INTO actor_sequences (actor, last_seq) SELECT a.actor, a.n "
            "FROM json_to_recordset(%s::json) AS a(actor text, n bigint) "
            "ON CONFLICT (actor) DO UPDATE SET last_seq = actor_sequences.last_seq + EXCLUDED.last_seq "
            "RETURNING actor, last_seq",
            (_json_param([{"actor": a, "n": counts[a]} for a in actors]),),
        )
        return {str(actor): int(last) - counts[str(actor)] + 1 for actor, last in cur.fetchall()}

    def _insert_transactions(self, cur: psycopg.Cursor[Any], transactions: list[TransactionRow]) -> None:
        # (retention) Keyed on (position, committed_at); as for mutations, a rolled-back
        # transaction replayed with another abort time is skipped by its position alone.
        # One statement per batch, whatever its number of (small) transactions.
        cur.execute(
            "INSERT INTO transactions (position, xid, version, commit_lsn, status, committed_at, origin, "
            "mutation_count, request_ids) "
            "SELECT t.position, t.xid, CASE WHEN t.status = 'committed' THEN t.position END, t.commit_lsn, "
            "t.status, t.committed_at, t.origin, t.mutation_count, t.request_ids "
            "FROM json_to_recordset(%s::json) AS t(position bigint, xid bigint, commit_lsn bigint, status text, "
            "committed_at timestamptz, origin text, mutation_count integer, request_ids text[]) "
            "WHERE t.status = 'committed' OR NOT EXISTS (SELECT 1 FROM transactions x WHERE x.position = t.position) "
            "ON CONFLICT (position, committed_at) DO NOTHING",
            (
                _json_param(
                    [
                        {
                            "position": t.position,
                            "xid": t.xid,
                            "commit_lsn": t.commit_lsn,
                            "status": t.status,
                            "committed_at": t.committed_at,
                            "origin": t.origin,
                            "mutation_count": t.mutation_count,
                            "request_ids": sorted(t.requests),
                        }
                        for t in transactions
                    ]
                ),
            ),
        )
        # Requests: aggregated per batch, then one upsert.
        merged: dict[str, list[Any]] = {}
        for txn in transactions:
            for request_id, (context, committed, actor) in txn.requests.items():
                row = merged.get(request_id)
                if row is None:
                    merged[request_id] = [actor, context, txn.committed_at, txn.committed_at, 0, 0, []]
                    row = merged[request_id]
                row[0] = actor or row[0]
                row[2] = min(row[2], txn.committed_at)
                row[3] = max(row[3], txn.committed_at)
                row[4 if committed else 5] += 1
                # the sessions of the request's (verified) contexts: whose errors are its own
                session = [context.get("db_user"), context.get("backend_pid")]
                if session not in row[6]:
                    row[6].append(session)
        if merged:
            cur.execute(
                "INSERT INTO requests (request_id, actor, context, first_seen_at, last_seen_at, "
                "committed_count, rolled_back_count, sessions) "
                "SELECT r.request_id, r.actor, r.context, r.first_seen_at, r.last_seen_at, r.committed_count, "
                "r.rolled_back_count, r.sessions FROM json_to_recordset(%s::json) AS r(request_id text, actor text, "
                "context jsonb, first_seen_at timestamptz, last_seen_at timestamptz, committed_count integer, "
                "rolled_back_count integer, sessions jsonb) "
                "ON CONFLICT (request_id) DO UPDATE SET "
                "actor = coalesce(EXCLUDED.actor, requests.actor), "
                "context = coalesce(requests.context, EXCLUDED.context), "
                "last_seen_at = greatest(requests.last_seen_at, EXCLUDED.last_seen_at), "
                "first_seen_at = least(requests.first_seen_at, EXCLUDED.first_seen_at), "
                "committed_count = requests.committed_count + EXCLUDED.committed_count, "
                "rolled_back_count = requests.rolled_back_count + EXCLUDED.rolled_back_count, "
                # bounded: a request spread over more sessions keeps its first 1000
                "sessions = (SELECT coalesce(jsonb_agg(s ORDER BY n), '[]') FROM ("
                "  SELECT s, min(n) AS n FROM jsonb_array_elements(requests.sessions || EXCLUDED.sessions) "
                "  WITH ORDINALITY AS e(s, n) GROUP BY s ORDER BY min(n) LIMIT 1000) AS u)",
                (
                    _json_param(
                        [
                            {
                                "request_id": request_id,
                                "actor": row[0],
                                "context": row[1],
                                "first_seen_at": row[2],
                                "last_seen_at": row[3],
                                "committed_count": row[4],
                                "rolled_back_count": row[5],
                                "sessions": row[6],
                            }
                            for request_id, row in merged.items()
                        ]
                    ),
                ),
            )

    def _record_errors(self, cur: psycopg.Cursor[Any], errors: Iterable[ReportedError]) -> None:
        # One error per request. A later one replaces it unless the stored one is the request's own
        # (reported by one of its sessions, or proven by a session token) and the new one is
        # neither proven nor from the same session: another session cannot push the request's own
        # root cause out (readers decide attribution, cdc/query.py).
        for error in errors:
            if not error.request_id:
                continue
            cur.execute(
                "INSERT INTO requests AS r (request_id, actor, context, first_seen_at, last_seen_at, error_type, "
                "error_message, error_location, error_at, error_db_user, error_backend_pid, error_client_addr, "
                "error_xid, error_proven) VALUES (%s, %s, NULL, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                f"ON CONFLICT (request_id) DO UPDATE SET {_ERROR_UPDATE}, "
                "actor = coalesce(r.actor, EXCLUDED.actor), "
                "last_seen_at = greatest(r.last_seen_at, EXCLUDED.last_seen_at)",
                (
                    error.request_id,
                    error.actor,
                    error.at,
                    error.at,
                    error.error_type,
                    error.message,
                    error.location,
                    error.at,
                    error.db_user,
                    error.backend_pid,
                    error.client_addr,
                    error.xid,
                    error.reporter_pid is not None,
                ),
            )


# The stored error is replaced unless it came from a session of the request and the new one
# does not (see StoreWriter._record_errors).
_ERROR_REPLACES = (
    "(r.error_type IS NULL OR EXCLUDED.error_proven OR (r.error_db_user, r.error_backend_pid) IS NOT DISTINCT "
    "FROM (EXCLUDED.error_db_user, EXCLUDED.error_backend_pid) OR NOT (r.error_proven OR r.sessions @> "
    "jsonb_build_array(jsonb_build_array(r.error_db_user, r.error_backend_pid))))"
)
_ERROR_UPDATE = ", ".join(
    f"{c} = CASE WHEN {_ERROR_REPLACES} THEN EXCLUDED.{c} ELSE r.{c} END"
    for c in (
        "error_type",
        "error_message",
        "error_location",
        "error_at",
        "error_db_user",
        "error_backend_pid",
        "error_client_addr",
        "error_xid",
        "error_proven",
    )
)


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


def _apply_fill(mutation: Mutation, image: dict[str, Any] | None) -> None:
    """Complete a mutation from the row's last stored image (None: the store has none)."""
    if mutation.fill_before is True:
        mutation.before = dict(image) if image is not None else None
    elif mutation.fill_before:
        before = mutation.before if mutation.before is not None else {}
        for column in mutation.fill_before:
            if image is not None and column in image:
                before[column] = image[column]
        mutation.before = before
    if mutation.fill_after and mutation.after is not None:
        before = mutation.before or {}
        for column in mutation.fill_after:
            if column in before:
                mutation.after[column] = before[column]
            elif image is not None and column in image:
                mutation.after[column] = image[column]
    mutation.fill_before = False
    mutation.fill_after = ()
    if mutation.op == "UPDATE" and mutation.after is not None:
        before = mutation.before or {}
        names = mutation.schema.column_names if mutation.schema is not None else tuple(mutation.after)
        mutation.changed = [
            c for c in names if c in mutation.after and (c not in before or before[c] != mutation.after[c])
        ]
    elif mutation.op == "DELETE" and mutation.before is not None:
        mutation.changed = list(mutation.before)
