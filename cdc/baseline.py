"""The baseline `cdc setup` records: every published table's rows at the slot's consistent point.

The rows are read in the snapshot the slot exported (``CREATE_REPLICATION_SLOT ... SNAPSHOT
'export'``), so the baseline and the slot's first change meet exactly. Tables are read in
parallel, and a large table in block ranges (``WHERE ctid >= '(a,0)' AND ctid < '(b,0)'``, a TID
range scan on PostgreSQL 14+), by ``workers`` threads, each with its own source connection in
the exported snapshot (``SET TRANSACTION SNAPSHOT``) and its own store connection. A range is
read as the source's COPY text, turned into ``changes`` lines by the capture core
(``Core.snapshot_lines``: no row is parsed here) and COPYed into the store in one store
transaction with its progress in ``baselines`` (docs/baseline.md).

All or nothing per table: until a table's ``baselines`` row is ``done`` readers refuse to answer
for it, and a baseline that did not finish (a signal, a crash, a lost connection) is removed and
started again by the next ``cdc setup`` (:func:`discard_unfinished`), since the snapshot it read
died with the setup session.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import structlog
from psycopg import sql

from cdc.capture.engine import Core
from cdc.capture.failover import record_gap, record_slot_created
from cdc.capture.model import PG_EPOCH_OFFSET_US, ColumnDesc, RelationDesc, RelationInfo, format_time, now_us
from cdc.capture.registry import Registry
from cdc.config import Config
from cdc.errors import CdcError, SetupError, SourceUnavailableError, StoreUnavailableError, error_text
from cdc.lsn import format_lsn
from cdc.policies import column_hasher
from cdc.progress import Progress
from cdc.source import SourceTable, published_tables
from cdc.store.writer import CHANGES_COPY, StoreBatch, StoreWriter, lock_key
from cdc.stream.replication import OUTPUT_SETTINGS, options_string

log = structlog.get_logger("cdc.baseline")

#: Bytes of source COPY text converted and written at a time.
CHUNK_BYTES = 4 * 1024 * 1024
#: A table is read in block ranges of at least this many pages (8 KiB each): 32 MiB.
RANGE_MIN_PAGES = 4_096
#: A table is cut in at most this many ranges per worker.
RANGES_PER_WORKER = 4
#: ``transactions.origin`` of the baseline's transaction row.
BASELINE_ORIGIN = "cdc.baseline"


@dataclass(frozen=True, slots=True)
class Unit:
    """One read: a table, or one block range of it (``end_block`` exclusive, None: to the end)."""

    table: SourceTable
    info: RelationInfo
    first_block: int | None = None
    end_block: int | None = None

    def where(self) -> sql.Composable:
        if self.first_block is None and self.end_block is None:
            return sql.SQL("")
        parts = []
        if self.first_block is not None:
            parts.append(sql.SQL("ctid >= {}::tid").format(sql.Literal(f"({self.first_block},0)")))
        if self.end_block is not None:
            parts.append(sql.SQL("ctid < {}::tid").format(sql.Literal(f"({self.end_block},0)")))
        return sql.SQL(" WHERE ") + sql.SQL(" AND ").join(parts)


@dataclass
class _Shared:
    """What the workers share: ordinals, per-table counts, the first error."""

    next_ordinal: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    units_left: dict[int, int] = field(default_factory=dict)  # table_id -> ranges not done
    error: BaseException | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def ordinals(self, count: int) -> int:
        """Reserve ``count`` ordinals; the first."""
        with self.lock:
            first = self.next_ordinal
            self.next_ordinal += count
            return first


def relation_desc(table: SourceTable, position: int) -> RelationDesc:
    """The Relation message pgoutput would send for ``table`` (registered at ``position``)."""
    return RelationDesc(
        table.oid,
        table.schema,
        table.name,
        table.replica_identity,
        tuple(ColumnDesc(c.name, c.type_oid, c.type_modifier, c.is_key) for c in table.columns),
        position,
    )


def table_sizes(conn: psycopg.Connection[Any], oids: list[int]) -> dict[int, tuple[int | None, int]]:
    """oid -> (estimated rows or None when never analyzed, pages) from pg_class."""
    rows = conn.execute(
        "SELECT c.oid, c.reltuples::bigint, c.relpages FROM pg_catalog.pg_class c WHERE c.oid = ANY(%s)",
        (oids,),
    ).fetchall()
    return {int(r[0]): (int(r[1]) if r[1] is not None and r[1] >= 0 else None, int(r[2])) for r in rows}


def block_count(conn: psycopg.Connection[Any], table: SourceTable) -> int:
    """The table's size in blocks now (relpages may be stale)."""
    row = conn.execute(
        "SELECT pg_catalog.pg_relation_size(%s::oid) / current_setting('block_size')::bigint", (table.oid,)
    ).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def plan_units(
    conn: psycopg.Connection[Any], tables: list[tuple[SourceTable, RelationInfo]], workers: int
) -> list[Unit]:
    """The reads: one per small table, block ranges for a large one; largest first."""
    units: list[tuple[int, Unit]] = []
    for table, info in tables:
        blocks = block_count(conn, table)
        ranges = min(max(1, blocks // RANGE_MIN_PAGES), max(1, workers * RANGES_PER_WORKER))
        if ranges <= 1:
            units.append((blocks, Unit(table, info)))
            continue
        step = -(-blocks // ranges)
        for i in range(ranges):
            first = i * step
            end = None if i == ranges - 1 else (i + 1) * step  # the last range takes what grew meanwhile
            units.append((step, Unit(table, info, first if i else None, end)))
    units.sort(key=lambda u: -u[0])
    return [u for _, u in units]


def relation_scope(conn: psycopg.Connection[Any], oid: int) -> sql.Composable:
    """``ONLY`` for a plain table; nothing for a partitioned one, read with its partitions (it is
    published through its root: docs/ddl.md)."""
    row = conn.execute("SELECT relkind FROM pg_catalog.pg_class WHERE oid = %s", (oid,)).fetchone()
    return sql.SQL("" if row and row[0] == "p" else "ONLY ")


def read_copy(conn: psycopg.Connection[Any], unit: Unit, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The unit's rows as COPY text, in chunks of whole lines of about ``chunk_bytes``.

    COPY's text format prints each value with its type's output function, exactly as pgoutput
    sends it (a ::text cast would not: true vs t, char(n) padding, inet masks)."""
    table = unit.table
    if not table.columns:
        return
    select = sql.SQL("COPY (SELECT {} FROM {}{}{}) TO STDOUT").format(
        sql.SQL(", ").join(sql.Identifier(c.name) for c in table.columns),
        relation_scope(conn, table.oid),
        sql.Identifier(table.schema, table.name),
        unit.where(),
    )
    buffer = bytearray()
    with conn.cursor().copy(select) as copy:
        for data in copy:
            buffer += data
            if len(buffer) >= chunk_bytes:
                yield bytes(buffer)
                buffer.clear()
    if buffer:
        yield bytes(buffer)


def truncate_line(position: int, ordinal: int, when: bytes, table_id: int, schema_id: int) -> bytes:
    """A ``changes`` line: TRUNCATE of the table (a baseline after a gap starts it afresh)."""
    fields = (b"%d" % position, b"%d" % ordinal, when, b"%d" % table_id, b"%d" % schema_id)
    return b"\t".join((*fields, b"T", b"0", b"%d" % position, *(b"\\N",) * 6)) + b"\n"


def discard_unfinished(conn: psycopg.Connection[Any], slot: str) -> int:
    """Remove what an unfinished baseline of ``slot`` left (rows at its position, its
    ``baselines`` rows); the number of change rows removed. In the store schema (search_path)."""
    row = conn.execute(
        "SELECT baseline_lsn, baseline_done FROM capture_state WHERE slot_name = %s", (slot,)
    ).fetchone()
    if row is None or row[0] is None or row[1]:
        return 0
    position = int(row[0])
    removed = 0
    with conn.transaction():
        for table in ("changes", "transactions", "context_changes"):
            cur = conn.execute(
                sql.SQL("DELETE FROM {} WHERE position = %s").format(sql.Identifier(table)), (position,)
            )
            if table == "changes":
                removed = cur.rowcount
        conn.execute("DELETE FROM baselines WHERE kind = 'b' AND position = %s", (position,))
    if removed:
        log.info("baseline_discarded", lsn=format_lsn(position), rows=removed)
    return removed


class Baseline:
    """Records the rows of ``tables`` at ``position`` from the exported ``snapshot``."""

    def __init__(
        self,
        config: Config,
        snapshot: str,
        position: int,
        writer: StoreWriter,
        progress: Progress,
        *,
        gap: bool = False,
        workers: int | None = None,
        report: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.source_dsn = config.require_source()
        self.store_dsn = config.require_store()
        self.schema = config.store.schema_name
        self.snapshot = snapshot
        self.position = position
        self.writer = writer
        self.progress = progress
        self.gap = gap
        self.workers = max(1, workers if workers is not None else config.baseline.worker_count())
        self.report = report
        self.when = now_us()  # PostgreSQL epoch, as the core takes it
        self.when_text = format_time(self.when).encode()

    # -- connections ------------------------------------------------------------------
    def _source(self) -> psycopg.Connection[Any]:
        try:
            conn = psycopg.connect(
                self.source_dsn,
                connect_timeout=10,
                options=options_string(OUTPUT_SETTINGS),
                application_name="cdc-baseline",
            )
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.read_only = True
            conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(self.snapshot)))
        except psycopg.OperationalError as exc:
            raise SourceUnavailableError(f"baseline: cannot read the source: {error_text(exc)}") from exc
        except psycopg.Error as exc:
            raise SetupError(
                f"baseline: the slot's snapshot is gone ({error_text(exc)})",
                hint="run `cdc setup` again: it starts the baseline over",
            ) from exc
        return conn

    def _store(self) -> psycopg.Connection[Any]:
        try:
            conn = psycopg.connect(self.store_dsn, connect_timeout=10, application_name="cdc-baseline")
            conn.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(self.schema)))
            conn.commit()
        except psycopg.OperationalError as exc:
            raise StoreUnavailableError(f"baseline: cannot reach the store: {error_text(exc)}") from exc
        return conn

    # -- the run -----------------------------------------------------------------------
    def run(self, tables: list[SourceTable]) -> int:
        """Record every table; the number of change rows written (ordinals used)."""
        catalog = self._source()
        registry = Registry(
            self.store_dsn,
            self.schema,
            policies=self.config.columns,
            catalog=catalog,
            source_timeout=self.config.source.timeout_seconds,
            store_timeout=self.config.store.timeout_seconds,
            report=self.report,
        )
        try:
            described = [(t, registry.describe(relation_desc(t, self.position))) for t in tables]
            units = plan_units(catalog, described, self.workers)
            sizes = table_sizes(catalog, [t.oid for t in tables])
        finally:
            registry.close()
            catalog.close()
        shared = _Shared(next_ordinal=0)
        for unit in units:
            shared.units_left[unit.info.table_id] = shared.units_left.get(unit.info.table_id, 0) + 1
        self._start(described, units, sizes, shared)
        work: queue.SimpleQueue[Unit | None] = queue.SimpleQueue()
        for unit in units:
            work.put(unit)
        threads = []
        for i in range(min(self.workers, len(units))):
            work.put(None)
            thread = threading.Thread(
                target=self._worker, args=(work, shared), name=f"cdc-baseline-{i}", daemon=True
            )
            thread.start()
            threads.append(thread)
        try:
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.2)
        except BaseException:
            shared.stop.set()  # ^C: the workers roll back what they hold and stop
            for thread in threads:
                thread.join(10)
            raise
        if shared.error is not None:
            raise shared.error
        return shared.next_ordinal

    def _start(
        self,
        described: list[tuple[SourceTable, RelationInfo]],
        units: list[Unit],
        sizes: dict[int, tuple[int | None, int]],
        shared: _Shared,
    ) -> None:
        """``baselines`` rows (running), the partition of the baseline's time, TRUNCATEs after a gap."""
        batch = StoreBatch()
        batch.span(self.when + PG_EPOCH_OFFSET_US)
        if self.gap:
            # History before the gap may hold rows deleted meanwhile: each table starts afresh.
            for _table, info in described:
                batch.changes.append(
                    truncate_line(
                        self.position, shared.ordinals(1), self.when_text, info.table_id, info.schema_id
                    )
                )
                batch.rows += 1
        batch.max_position = self.position
        self.writer.write(batch)
        conn = self.writer.conn
        with conn.cursor() as cur:
            for table, info in described:
                estimated = sizes.get(table.oid, (None, 0))[0]
                cur.execute(
                    "INSERT INTO baselines (table_id, kind, state, position, complete_from, rows, estimated_rows, "
                    "chunks_total, chunks_done, keyed, resume_after, error, started_at, finished_at, updated_at) "
                    "VALUES (%s, 'b', 'running', %s, NULL, 0, %s, %s, 0, %s, NULL, NULL, now(), NULL, now()) "
                    "ON CONFLICT (table_id) DO UPDATE SET kind = 'b', state = 'running', position = EXCLUDED.position, "
                    "complete_from = NULL, "
                    "rows = 0, estimated_rows = EXCLUDED.estimated_rows, chunks_total = EXCLUDED.chunks_total, "
                    "chunks_done = 0, keyed = EXCLUDED.keyed, resume_after = NULL, error = NULL, "
                    "started_at = now(), finished_at = NULL, updated_at = now()",
                    (
                        info.table_id,
                        self.position,
                        estimated,
                        shared.units_left[info.table_id],
                        not info.keyless,
                    ),
                )
        conn.commit()
        self._estimates = {info.table_id: sizes.get(t.oid, (None, 0))[0] for t, info in described}
        self._started: set[int] = set()

    def _worker(self, work: queue.SimpleQueue[Unit | None], shared: _Shared) -> None:
        source: psycopg.Connection[Any] | None = None
        store: psycopg.Connection[Any] | None = None
        try:
            source = self._source()
            store = self._store()
            core = Core(
                _no_relations,
                skip_through=self.position,
                memory_limit_bytes=self.config.capture.memory_limit_bytes,
                max_value_bytes=self.config.capture.max_value_bytes,
                hash_value=column_hasher(self.config.policies.hash_key_bytes()),
            )
            while not shared.stop.is_set():
                unit = work.get()
                if unit is None:
                    return
                self._unit(unit, source, store, core, shared)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
            with shared.lock:
                if shared.error is None:
                    shared.error = _as_cdc_error(exc)
            shared.stop.set()
        finally:
            for conn in (source, store):
                if conn is not None:
                    conn.close()

    def _unit(
        self,
        unit: Unit,
        source: psycopg.Connection[Any],
        store: psycopg.Connection[Any],
        core: Any,
        shared: _Shared,
    ) -> None:
        info, name = unit.info, unit.table.qualified
        with shared.lock:
            first = info.table_id not in self._started
            self._started.add(info.table_id)
        if first:
            self.progress.table(name, self._estimates.get(info.table_id))
        rows = 0
        with store.cursor() as cur:
            with cur.copy(CHANGES_COPY) as copy:
                for data in read_copy(source, unit):
                    if shared.stop.is_set():
                        raise _Interrupted
                    count = data.count(b"\n")
                    lines, n = core.snapshot_lines(
                        info,
                        data,
                        position=self.position,
                        first_ordinal=shared.ordinals(count),
                        committed_at_us=self.when,
                    )
                    copy.write(lines)
                    rows += n
                    self.progress.advance(name, n)
            cur.execute(
                "UPDATE baselines SET rows = rows + %s, chunks_done = chunks_done + 1, "
                "state = CASE WHEN chunks_done + 1 >= chunks_total THEN 'done' ELSE state END, "
                "complete_from = CASE WHEN chunks_done + 1 >= chunks_total THEN position END, "
                "finished_at = CASE WHEN chunks_done + 1 >= chunks_total THEN now() END, updated_at = now() "
                "WHERE table_id = %s",
                (rows, info.table_id),
            )
        store.commit()
        with shared.lock:
            shared.units_left[info.table_id] -= 1
            finished = shared.units_left[info.table_id] == 0
        if finished:
            self.progress.done(name)


def _no_relations(desc: RelationDesc) -> RelationInfo:
    raise AssertionError("a baseline decodes no Relation message")


def published_source_tables(conn: psycopg.Connection[Any], publications: list[str]) -> list[SourceTable]:
    """Every table the publications publish, once each."""
    found: dict[int, SourceTable] = {}
    for name in publications:
        for table in published_tables(conn, name):
            found.setdefault(table.oid, table)
    return sorted(found.values(), key=lambda t: (t.schema, t.name))


def take_slot_lock(writer: StoreWriter, schema: str, slot: str) -> None:
    """The slot's active-daemon lock for the baseline (no daemon may start meanwhile)."""
    row = writer.conn.execute(
        "SELECT pg_try_advisory_lock(hashtext(%s))", (lock_key(schema, slot),)
    ).fetchone()
    writer.conn.commit()
    if not row or not row[0]:
        raise SetupError(
            f"another cdc process (a daemon, or another `cdc setup`) holds slot {slot!r}'s lock and "
            "the slot has no completed baseline",
            hint="wait for the other `cdc setup` to finish, or stop that process and run `cdc setup` again",
        )


class _Interrupted(Exception):  # noqa: N818 - control flow: another worker failed or ^C
    pass


def _as_cdc_error(exc: BaseException) -> BaseException:
    if isinstance(exc, CdcError | KeyboardInterrupt | _Interrupted):
        return exc
    if isinstance(exc, psycopg.OperationalError):
        return SourceUnavailableError(f"baseline interrupted: {error_text(exc)}")
    if isinstance(exc, psycopg.Error):
        return SetupError(f"baseline failed: {error_text(exc)}")
    return exc


def finish(
    writer: StoreWriter,
    slot: str,
    position: int,
    count: int,
    when_us: int,
    *,
    gap_after: int | None,
    created_on: tuple[str, int],
) -> None:
    """The baseline's transaction row, the gap (after a lost slot, with the reason the daemon
    recorded), the server and timeline the slot was created on and ``baseline_done``: one store
    transaction (the baseline becomes the history's start)."""
    conn = writer.conn
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO transactions (position, committed_at, xid, commit_lsn, status, flags, origin, "
            "change_count) VALUES (%s, %s, 0, NULL, 'c', 0, %s, %s) ON CONFLICT DO NOTHING",
            (position, format_time(when_us), BASELINE_ORIGIN, count),
        )
        if gap_after is not None:
            record_gap(cur, slot, gap_after, position)
        record_slot_created(cur, slot, created_on, position)
        cur.execute(
            "UPDATE capture_state SET baseline_done = true, updated_at = now() WHERE slot_name = %s", (slot,)
        )
    conn.commit()
    log.info("baseline_done", lsn=format_lsn(position), rows=count)


__all__ = [
    "BASELINE_ORIGIN",
    "Baseline",
    "Unit",
    "discard_unfinished",
    "finish",
    "plan_units",
    "published_source_tables",
    "read_copy",
    "relation_desc",
    "relation_scope",
    "table_sizes",
    "take_slot_lock",
    "truncate_line",
]
