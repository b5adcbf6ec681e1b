"""`cdc backfill`: the rows of tables that joined capture, recorded while `cdc run` captures.

A watermark-based, chunked read (the DBLog paper; Debezium's incremental snapshots; Sequin's
backfills), docs/baseline.md "Backfill". For each chunk of a table (the next ``chunk_rows`` rows
in primary-key order after the last chunk's last key):

1. a low watermark: a transactional logical message (``cdc.backfill``, the chunk's id) is
   committed on the source; then the transactions that held an xid at that moment are waited
   for, so that every transaction the read below does not see commits after the watermark;
2. the chunk is read (COPY text, one short REPEATABLE READ transaction), turned into SNAPSHOT
   ``changes`` lines by the capture core and staged in the store (``backfill_rows``);
3. a high watermark is committed;
4. the daemon, which collected the keys that captured changes touched between the two
   watermarks, has the store writer write the rest of the chunk as SNAPSHOT rows at the high
   watermark's position, in the store transaction that acknowledges that position
   (cdc/capture/backfill.py, cdc/store/backfill.py); this waits for that.

No long transaction on the source; exact when rows change meanwhile (a row the stream changed
between the watermarks is left to the stream, whose change is newer); resumable after a crash
of either process (``baselines.resume_after``: the last key done; a chunk the daemon could not
vouch for is read again). A table without a key is read whole in one window, written only when
it did not change meanwhile (else read again, up to ``KEYLESS_ATTEMPTS`` times).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg
import structlog
from psycopg import sql

from cdc.baseline import relation_desc, relation_scope, table_sizes
from cdc.capture.backfill import PREFIX, copy_unescape, watermark_message
from cdc.capture.engine import Core
from cdc.capture.model import RelationDesc, RelationInfo, now_us
from cdc.capture.registry import Registry
from cdc.config import Config, format_table, normalize_table
from cdc.connections import connect
from cdc.errors import (
    CdcError,
    SetupError,
    SourceUnavailableError,
    StoreUnavailableError,
    UsageError,
    error_text,
)
from cdc.lsn import format_lsn, parse_lsn
from cdc.policies import column_hasher
from cdc.progress import Progress
from cdc.publications import PublicationResult, inserts_publication, publication_kind, streamed
from cdc.source import SourceTable, describe_table, published_tables
from cdc.store.writer import lock_taken
from cdc.stream.replication import OUTPUT_SETTINGS, options_string

log = structlog.get_logger("cdc.backfill")

#: A keyless table is read again at most this many times when it keeps changing meanwhile.
KEYLESS_ATTEMPTS = 20
#: Seconds between two "still waiting" log lines.
NOTICE_SECONDS = 10.0

ROWS_COPY = (
    "COPY backfill_rows (position, ordinal, committed_at, table_id, schema_id, op, flags, lsn, xid, key_text, "
    "image, before, old_key_text, pending) FROM STDIN"
)


@dataclass(frozen=True, slots=True)
class Outcome:
    state: str  # 'd' written, 'x' discarded
    kept: int
    reason: str | None


def _no_relations(desc: RelationDesc) -> RelationInfo:
    raise AssertionError("a backfill decodes no Relation message")


class Backfiller:
    """Backfills tables, one thread per table (up to ``baseline.workers`` at once)."""

    def __init__(
        self,
        config: Config,
        progress: Progress,
        *,
        chunk_rows: int | None = None,
        stop: threading.Event | None = None,
        restart: bool = False,
    ) -> None:
        self.config = config
        self.progress = progress
        self.chunk_rows = chunk_rows or config.baseline.chunk_rows
        self.slot = config.source.slot
        self.schema = config.store.schema_name
        self.source_dsn = config.require_source()
        self.store_dsn = config.require_store()
        self.stop = stop if stop is not None else threading.Event()
        self.restart = restart  # start over even where a backfill is done
        self.errors: list[BaseException] = []
        self.rows: dict[str, int] = {}

    # -- connections ------------------------------------------------------------------
    def _source(self) -> psycopg.Connection[Any]:
        """Autocommit (the watermarks); ``transaction()`` blocks are REPEATABLE READ READ ONLY (a chunk's read)."""
        conn = connect(
            self.source_dsn,
            "source",
            autocommit=True,
            options=options_string(OUTPUT_SETTINGS),
            application_name="cdc-backfill",
        )
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        return conn

    def _store(self) -> psycopg.Connection[Any]:
        conn = connect(self.store_dsn, "store", autocommit=True, application_name="cdc-backfill")
        try:
            conn.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(self.schema)))
        except psycopg.OperationalError as exc:
            conn.close()
            raise StoreUnavailableError(f"backfill: cannot reach the store: {error_text(exc)}") from exc
        return conn

    # -- the run -----------------------------------------------------------------------
    def run(self, tables: list[SourceTable]) -> dict[str, int]:
        """Backfill ``tables``; the rows recorded per table."""
        if not tables:
            return {}
        work = list(tables)
        lock = threading.Lock()

        def worker() -> None:
            while not self.stop.is_set():
                with lock:
                    if not work:
                        return
                    table = work.pop(0)
                try:
                    self._table(table)
                except BaseException as exc:  # noqa: BLE001 - reported by run()
                    with lock:
                        self.errors.append(exc)
                    self.stop.set()
                    return

        threads = [
            threading.Thread(target=worker, name=f"cdc-backfill-{i}", daemon=True)
            for i in range(min(len(work), self.config.baseline.worker_count()))
        ]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.2)
        except BaseException:
            self.stop.set()
            for thread in threads:
                thread.join(10)
            raise
        if self.errors:
            error = self.errors[0]
            if isinstance(error, CdcError | KeyboardInterrupt):
                raise error
            if isinstance(error, psycopg.OperationalError):
                raise SourceUnavailableError(f"backfill interrupted: {error_text(error)}") from error
            if isinstance(error, psycopg.Error):
                raise SetupError(f"backfill failed: {error_text(error)}") from error
            raise error
        return dict(self.rows)

    def _table(self, table: SourceTable) -> None:
        source = self._source()
        store = self._store()
        registry = Registry(
            self.store_dsn,
            self.schema,
            policies=self.config.columns,
            catalog=source,
            source_timeout=self.config.source.timeout_seconds,
            store_timeout=self.config.store.timeout_seconds,
        )
        try:
            _TableBackfill(self, table, source, store, registry).run()
        finally:
            registry.close()
            source.close()
            store.close()


class _TableBackfill:
    """One table's chunks."""

    def __init__(
        self,
        owner: Backfiller,
        table: SourceTable,
        source: psycopg.Connection[Any],
        store: psycopg.Connection[Any],
        registry: Registry,
    ) -> None:
        self.owner = owner
        self.table = table
        self.source = source
        self.store = store
        self.registry = registry
        self.core = Core(
            _no_relations,
            memory_limit_bytes=owner.config.capture.memory_limit_bytes,
            max_value_bytes=owner.config.capture.max_value_bytes,
            hash_value=column_hasher(owner.config.policies.hash_key_bytes()),
        )
        self.name = table.qualified
        # ONLY for a plain table, nothing for a partitioned one (read with its partitions): read
        # once, a relation's kind does not change (its name may: self.table follows renames).
        self.scope = relation_scope(source, table.oid)

    # -- state --------------------------------------------------------------------------
    def _lsn(self) -> int:
        row = self.source.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        return parse_lsn(row[0]) if row else 0

    def _start(self) -> tuple[RelationInfo, str | None, int]:
        """Register the table, open (or resume) its ``baselines`` row: (info, resume_after, rows)."""
        info = self.registry.describe(relation_desc(self.table, self._lsn()))
        estimated = table_sizes(self.source, [self.table.oid]).get(self.table.oid, (None, 0))[0]
        row = self.store.execute(
            "SELECT kind, state, resume_after, rows FROM baselines WHERE table_id = %s", (info.table_id,)
        ).fetchone()
        resume = row is not None and row[0] == "f" and row[1] != "done" and not self.owner.restart
        if resume:
            assert row is not None
            self.store.execute(
                "UPDATE baselines SET state = 'running', error = NULL, keyed = %s, updated_at = now() "
                "WHERE table_id = %s",
                (not info.keyless, info.table_id),
            )
            return info, row[2], int(row[3])
        # A table recorded again keeps its history readable before it: one complete already
        # (complete_from stays: a row not done has none unless a recording of a complete table
        # was interrupted), or one without a row (complete from its first change) whose history
        # a rewrite left inexact.
        inexact = self.table.oid in inexact_tables(self.store)
        self.store.execute(
            "INSERT INTO baselines (table_id, kind, state, position, complete_from, rows, estimated_rows, "
            "chunks_total, chunks_done, keyed, resume_after, error, started_at, finished_at, updated_at) "
            "VALUES (%s, 'f', 'running', NULL, CASE WHEN %s THEN 0 END, 0, %s, NULL, 0, %s, NULL, NULL, now(), "
            "NULL, now()) "
            "ON CONFLICT (table_id) DO UPDATE SET kind = 'f', state = 'running', position = NULL, rows = 0, "
            "complete_from = baselines.complete_from, "
            "estimated_rows = EXCLUDED.estimated_rows, chunks_total = NULL, chunks_done = 0, keyed = EXCLUDED.keyed, "
            "resume_after = NULL, error = NULL, started_at = now(), finished_at = NULL, updated_at = now()",
            (info.table_id, inexact, estimated, not info.keyless),
        )
        return info, None, 0

    def _wait_streamed(self) -> None:
        """Until the daemon streams from a publication that publishes the table (one created on an
        existing slot is decoded only once the slot has moved past its creation)."""
        owner = self.owner
        noticed = time.monotonic()
        main = owner.config.source.publication
        while not streamed(self.store, self.source, owner.slot, main, self.table.oid):
            if owner.stop.is_set():
                raise KeyboardInterrupt
            if time.monotonic() - noticed > NOTICE_SECONDS:
                noticed = time.monotonic()
                log.warning("backfill_waiting_for_publication", table=self.name)
            time.sleep(0.5)

    def _lock(self) -> None:
        """One `cdc backfill` per table at a time (a session lock on the store)."""
        key = f"cdc-backfill:{self.owner.schema}:{self.table.oid}"
        row = self.store.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (key,)).fetchone()
        if not row or not row[0]:
            raise SetupError(
                f"another `cdc backfill` (or `cdc setup`) is recording {self.name}",
                hint="wait for it to finish; `cdc status` shows its progress",
            )

    def run(self) -> None:
        self._wait_streamed()
        self._lock()
        info, after, done = self._start()
        estimated = table_sizes(self.source, [self.table.oid]).get(self.table.oid, (None, 0))[0]
        self.owner.progress.table(self.name, estimated, rows=done)
        log.info("backfill_started", table=self.name, resume=after is not None)
        attempts = 0
        try:
            self._settle(info)
            while not self.owner.stop.is_set():
                info, current = self._describe(info)
                if current is None:
                    self._fail(info.table_id, "the table was dropped on the source")
                    return
                self.table = current
                chunk, last, final = self._chunk(info, after)
                outcome = self._wait(chunk)
                if outcome.state == "x":
                    attempts += 1
                    log.info("backfill_chunk_again", table=self.name, chunk=chunk, reason=outcome.reason)
                    if info.keyless and attempts >= KEYLESS_ATTEMPTS:
                        reason = (
                            f"the table (without a key) kept changing while it was read ({attempts} times)"
                        )
                        self._fail(info.table_id, reason)
                        raise SetupError(
                            f"backfill of {self.name}: {reason}",
                            hint="run `cdc backfill` again at a quieter time, or give the table a primary key",
                        )
                    continue
                attempts = 0
                self.owner.progress.advance(self.name, outcome.kept)
                if last is not None:
                    after = last
                if final:
                    break
        except BaseException as exc:
            if not isinstance(exc, SetupError):
                self._fail(
                    info.table_id, error_text(exc) if isinstance(exc, psycopg.Error) else type(exc).__name__
                )
            raise
        if not self.owner.stop.is_set():
            self.owner.progress.done(self.name)
            row = self.store.execute(
                "SELECT rows FROM baselines WHERE table_id = %s", (info.table_id,)
            ).fetchone()
            self.owner.rows[self.name] = int(row[0]) if row else 0
            log.info("backfill_done", table=self.name, rows=self.owner.rows[self.name])

    def _fail(self, table_id: int, reason: str) -> None:
        with contextlib.suppress(psycopg.Error):
            self.store.execute(
                "UPDATE baselines SET state = 'failed', error = %s, updated_at = now() WHERE table_id = %s AND kind = 'f'",
                (reason[:2000], table_id),
            )

    def _settle(self, info: RelationInfo) -> None:
        """What a previous run left: a chunk being read is dropped; a staged one gets its high
        watermark again (the run may have died before writing it; a second one is harmless: the
        first the daemon takes writes the chunk, the other finds nothing staged) and is waited for."""
        rows = self.store.execute(
            "SELECT chunk_id, state FROM backfill_chunks WHERE table_id = %s AND state IN ('r', 's') ORDER BY chunk_id",
            (info.table_id,),
        ).fetchall()
        for chunk, state in rows:
            if state == "r":
                with self.store.transaction():
                    self.store.execute(
                        "UPDATE backfill_chunks SET state = 'x', reason = 'the reader stopped', finished_at = now() "
                        "WHERE chunk_id = %s",
                        (chunk,),
                    )
                    self.store.execute("DELETE FROM backfill_rows WHERE position = %s", (chunk,))
            else:
                self._watermark(int(chunk), info.table_id, "high", keyed=not info.keyless)
                outcome = self._wait(int(chunk))
                if outcome.state == "d":
                    self.owner.progress.advance(self.name, outcome.kept)

    def _describe(self, info: RelationInfo) -> tuple[RelationInfo, SourceTable | None]:
        """The table as it is now (its columns may have changed): registered again if so."""
        row = self.source.execute(
            "SELECT n.nspname, c.relname, c.relreplident FROM pg_catalog.pg_class c "
            "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = %s",
            (self.table.oid,),
        ).fetchone()
        if row is None:
            return info, None
        current = describe_table(self.source, self.table.oid, str(row[0]), str(row[1]), str(row[2]))
        if current != self.table:
            info = self.registry.describe(relation_desc(current, self._lsn()))
        return info, current

    # -- one chunk ------------------------------------------------------------------------
    def _watermark(self, chunk: int, table_id: int, edge: str, *, keyed: bool) -> int:
        row = self.source.execute(
            "SELECT pg_logical_emit_message(true, %s, %s)::text",
            (PREFIX, watermark_message(self.owner.slot, chunk, table_id, edge, keyed=keyed)),
        ).fetchone()
        return parse_lsn(row[0]) if row else 0

    def _older_transactions(self) -> None:
        """Wait until every transaction that held an xid when the low watermark committed has
        ended: each one the read does not see then commits after the watermark."""
        rows = self.source.execute(
            "SELECT x::text FROM pg_snapshot_xip(pg_current_snapshot()) AS x"
        ).fetchall()
        xids = [str(r[0]) for r in rows]
        started = time.monotonic()
        noticed = started
        while xids and not self.owner.stop.is_set():
            rows = self.source.execute(
                "SELECT x::text FROM pg_snapshot_xip(pg_current_snapshot()) AS x WHERE x = ANY(%s::xid8[])",
                (xids,),
            ).fetchall()
            xids = [str(r[0]) for r in rows]
            if not xids:
                return
            if time.monotonic() - noticed > NOTICE_SECONDS:
                noticed = time.monotonic()
                log.warning(
                    "backfill_waiting_for_transactions",
                    table=self.name,
                    transactions=len(xids),
                    seconds=round(noticed - started),
                )
            time.sleep(0.01)

    def _key_columns(self, info: RelationInfo) -> list[tuple[str, str]]:
        """(name, type) of the key columns, in key order."""
        names = [info.names[i] for i in info.key]
        rows = self.source.execute(
            "SELECT attname, pg_catalog.format_type(atttypid, atttypmod) FROM pg_catalog.pg_attribute "
            "WHERE attrelid = %s AND attname = ANY(%s)",
            (self.table.oid, names),
        ).fetchall()
        types = {str(r[0]): str(r[1]) for r in rows}
        return [(n, types[n]) for n in names]

    def _select(self, info: RelationInfo, after: str | None) -> tuple[sql.Composed, list[str], list[int]]:
        """The chunk's COPY (SELECT ...), its parameters, and the key columns' positions."""
        table = self.table
        columns = sql.SQL(", ").join(sql.Identifier(c.name) for c in table.columns)
        relation = sql.Composed([self.scope, sql.Identifier(table.schema, table.name)])
        if info.keyless:
            return sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT").format(columns, relation), [], []
        keys = self._key_columns(info)
        key_list = sql.SQL(", ").join(sql.Identifier(n) for n, _ in keys)
        where: sql.Composable = sql.SQL("")
        params: list[str] = []
        if after is not None:
            values = orjson.loads(after)
            where = sql.SQL(" WHERE ({}) > ({})").format(
                key_list, sql.SQL(", ").join(sql.SQL("%s::" + t) for _, t in keys)
            )
            params = [str(v) for v in values]
        query = sql.SQL("COPY (SELECT {} FROM {}{} ORDER BY {} LIMIT {}) TO STDOUT").format(
            columns, relation, where, key_list, sql.Literal(self.owner.chunk_rows)
        )
        positions = [[c.name for c in table.columns].index(n) for n, _ in keys]
        return query, params, positions

    def _chunk(self, info: RelationInfo, after: str | None) -> tuple[int, str | None, bool]:
        """Read one chunk between its watermarks: (chunk id, its last key, whether it ends the table)."""
        found = self.store.execute(
            "INSERT INTO backfill_chunks (table_id, state, range_after) VALUES (%s, 'r', %s) RETURNING chunk_id",
            (info.table_id, after),
        ).fetchone()
        assert found is not None
        chunk = int(found[0])
        keyed = not info.keyless
        low = self._watermark(chunk, info.table_id, "low", keyed=keyed)
        self._older_transactions()
        query, params, positions = self._select(info, after)
        when = now_us()
        count = 0
        last_line = b""
        with self.store.transaction():
            with self.source.transaction(), self.store.cursor() as cur, cur.copy(ROWS_COPY) as copy:
                for data in _copy_chunks(self.source, query, params):
                    lines, n = self.core.snapshot_lines(
                        info, data, position=chunk, first_ordinal=count, committed_at_us=when
                    )
                    copy.write(lines)
                    count += n
                    last_line = data[data.rstrip(b"\n").rfind(b"\n") + 1 :].rstrip(b"\n")
            last = None
            if keyed and count:
                fields = last_line.split(b"\t")
                last = orjson.dumps([copy_unescape(fields[i]) for i in positions]).decode()
            final = not keyed or count < self.owner.chunk_rows
            self.store.execute(
                "UPDATE backfill_chunks SET state = 's', rows = %s, range_last = %s, last_chunk = %s "
                "WHERE chunk_id = %s",
                (count, last, final, chunk),
            )
        high = self._watermark(chunk, info.table_id, "high", keyed=keyed)
        log.debug(
            "backfill_chunk_staged",
            table=self.name,
            chunk=chunk,
            rows=count,
            lsn=format_lsn(high),
            low=format_lsn(low),
        )
        return chunk, last, final

    def _wait(self, chunk: int) -> Outcome:
        """Until the daemon wrote (or discarded) the chunk."""
        started = noticed = time.monotonic()
        delay = 0.005
        while True:
            row = self.store.execute(
                "SELECT state, kept, reason FROM backfill_chunks WHERE chunk_id = %s", (chunk,)
            ).fetchone()
            if row is None:
                return Outcome("x", 0, "the chunk is gone")
            if row[0] in ("d", "x"):
                return Outcome(str(row[0]), int(row[1] or 0), row[2])
            if self.owner.stop.is_set():
                raise KeyboardInterrupt
            now = time.monotonic()
            if now - noticed > NOTICE_SECONDS:
                noticed = now
                running = lock_taken(self.owner.store_dsn, self.owner.schema, self.owner.slot)
                log.warning(
                    "backfill_waiting_for_daemon",
                    table=self.name,
                    chunk=chunk,
                    seconds=round(now - started),
                    daemon_running=running,
                )
            time.sleep(delay)
            delay = min(0.2, delay * 2)


def _copy_chunks(conn: psycopg.Connection[Any], query: sql.Composed, params: list[str]) -> Iterator[bytes]:
    """COPY text of ``query`` in chunks of whole lines."""
    buffer = bytearray()
    with conn.cursor().copy(query, params or None) as copy:
        for data in copy:
            buffer += data
            if len(buffer) >= 4 * 1024 * 1024:
                cut = buffer.rfind(b"\n") + 1
                yield bytes(buffer[:cut])
                del buffer[:cut]
    if buffer:
        yield bytes(buffer)


# ============================================================================ what to backfill


def needing_backfill(
    config: Config,
    source: psycopg.Connection[Any],
    store: psycopg.Connection[Any],
    tables: list[SourceTable],
    *,
    joined: list[int] | None = None,
    explicit_list: bool,
) -> list[SourceTable]:
    """The published ``tables`` whose rows are not (all) in the history: a backfill not done, or
    none at all for a table that joined capture (``joined``, or any table of a publication that
    lists tables: a table created later under "all tables" started empty and needs none), and
    every table whose history a rewrite left inexact (docs/ddl.md)."""
    rows = store.execute(
        "SELECT t.relation_oid, b.state FROM tables t LEFT JOIN baselines b USING (table_id) "
        "WHERE t.dropped_position IS NULL"
    ).fetchall()
    known = {int(r[0]): r[1] for r in rows}
    wanted = set(joined or ()) | inexact_tables(store)
    out = []
    for table in tables:
        state = known.get(table.oid)
        if (
            table.oid in wanted
            or (state is not None and state != "done")
            or (state is None and explicit_list)
        ):
            out.append(table)
    return out


def inexact_tables(store: psycopg.Connection[Any]) -> set[int]:
    """The relation oids of the live tables with an inexact rewrite not resolved yet (a rewrite
    too large to record: `cdc backfill` records them again, docs/ddl.md)."""
    found = store.execute("SELECT to_regclass('ddl_events') IS NOT NULL").fetchone()
    if not found or not found[0]:
        return set()
    rows = store.execute(
        "SELECT DISTINCT t.relation_oid FROM ddl_events e JOIN tables t USING (table_id) "
        "WHERE (e.details ->> 'inexact')::boolean AND e.resolved_position IS NULL "
        "AND t.dropped_position IS NULL"
    ).fetchall()
    return {int(r[0]) for r in rows}


def backfill_joined(
    config: Config,
    source: psycopg.Connection[Any],
    store: psycopg.Connection[Any],
    tables: list[SourceTable],
    pubs: PublicationResult,
    report: Any,
    progress: Progress | None,
) -> None:
    """`cdc setup` on an installation that captures already: backfill the tables that joined."""
    todo = needing_backfill(
        config, source, store, tables, joined=pubs.joined, explicit_list=pubs.kind == "list"
    )
    if not todo:
        return
    names = ", ".join(t.qualified for t in todo)
    if not lock_taken(config.require_store(), config.store.schema_name, config.source.slot):
        mark_pending(config, source, todo)
        report.warnings.append(
            f"{len(todo)} table(s) joined capture and need a backfill ({names}): the daemon is not running; "
            "start `cdc run`, then run `cdc backfill` (their history is incomplete until then)"
        )
        return
    own = progress is None
    progress = progress if progress is not None else Progress("backfill", terminal=False)
    progress.rename("backfill")
    try:
        done = Backfiller(config, progress).run(todo)
    finally:
        if own:
            progress.close()
    report.did(
        f"store: {len(done)} table(s) that joined capture backfilled while the daemon runs "
        f"({sum(done.values()):,} rows)"
    )


def mark_pending(config: Config, source: psycopg.Connection[Any], tables: list[SourceTable]) -> None:
    """``baselines`` rows 'pending' for ``tables`` (registered in the store if needed)."""
    row = source.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    position = parse_lsn(row[0]) if row else 0
    registry = Registry(
        config.require_store(), config.store.schema_name, policies=config.columns, catalog=source
    )
    try:
        inexact = inexact_tables(registry.conn)  # complete from their first change: they stay so
        for table in tables:
            info = registry.describe(relation_desc(table, position))
            registry.conn.execute(
                "INSERT INTO baselines (table_id, kind, state, keyed, complete_from) "
                "VALUES (%s, 'f', 'pending', %s, CASE WHEN %s THEN 0 END) "
                "ON CONFLICT (table_id) DO UPDATE SET state = CASE WHEN baselines.kind = 'f' AND "
                "baselines.state <> 'done' THEN baselines.state ELSE 'pending' END, "
                # a recording done (or a baseline) is not resumed: the next one starts over
                "resume_after = CASE WHEN baselines.kind = 'f' AND baselines.state <> 'done' "
                "THEN baselines.resume_after END, rows = CASE WHEN baselines.kind = 'f' AND baselines.state <> 'done' "
                "THEN baselines.rows ELSE 0 END, chunks_done = CASE WHEN baselines.kind = 'f' AND "
                "baselines.state <> 'done' THEN baselines.chunks_done ELSE 0 END, kind = 'f', updated_at = now()",
                (info.table_id, not info.keyless, table.oid in inexact),
            )
    finally:
        registry.close()


def resolve_tables(
    config: Config, source: psycopg.Connection[Any], names: list[str], publications: list[str]
) -> list[SourceTable]:
    """The published tables named on the command line (UsageError for one that is not published)."""
    published: dict[str, SourceTable] = {}
    for name in publications:
        for table in published_tables(source, name):
            published[format_table(table.schema, table.name)] = table
    out, missing = [], []
    for name in names:
        key = format_table(*normalize_table(name))
        if key in published:
            out.append(published[key])
        else:
            missing.append(name)
    if missing:
        raise UsageError(
            "not captured (in no publication cdc streams from): " + ", ".join(missing),
            hint="add them to source.tables (or to the publication) and run `cdc setup`",
        )
    return out


def run_backfill(
    config: Config,
    names: list[str],
    progress: Progress,
    *,
    restart: bool = False,
    on_notice: Callable[[str], None] | None = None,
) -> dict[str, int]:
    """`cdc backfill [TABLE ...]`: the named tables (every table needing one without names)."""
    main = config.source.publication
    publications = [main, inserts_publication(main)]
    with (
        connect(config.require_source(), "source", autocommit=True) as source,
        connect(config.require_store(), "store", autocommit=True) as store,
    ):
        store.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(config.store.schema_name)))
        exists = store.execute("SELECT to_regclass('baselines') IS NOT NULL").fetchone()
        if not exists or not exists[0]:
            raise SetupError("the history store has no baselines table", hint="run `cdc setup` first")
        if names:
            tables = resolve_tables(config, source, names, publications)
        else:
            everything = []
            seen: set[int] = set()
            for name in publications:
                for table in published_tables(source, name):
                    if table.oid not in seen:
                        seen.add(table.oid)
                        everything.append(table)
            kind = publication_kind(source, main)
            tables = needing_backfill(config, source, store, everything, explicit_list=kind == "list")
    if not tables:
        return {}
    if on_notice is not None and not lock_taken(
        config.require_store(), config.store.schema_name, config.source.slot
    ):
        on_notice("the daemon is not running: each chunk waits until `cdc run` records it")
    return Backfiller(config, progress, restart=restart).run(tables)
