"""One capture session, in the daemon's process: the replication stream in, batches out.

A session starts the store writer process (cdc/capture/writer_process.py: it takes the slot's
lock and reads the capture state), checks the source and the slot, opens the replication
stream, and loops: wait on the stream's socket and the writer's pipe; read every ready message
into the capture core (``core.drain``); turn its events into batches (cdc/capture/batches.py);
hand a batch to the writer at once when it is idle, else let the next one grow (group commit)
up to capture.batch_max_rows / batch_max_seconds, with at most two batches in flight (then the
stream is not read: back-pressure); answer keepalives, send standby status updates with the
acknowledged LSN (cdc/capture/ack.py), write heartbeats when idle, watch the slot, reload the
config. A watchdog thread abandons a store write that outlasts store.timeout_seconds while the
store no longer works on it (the writer process is killed).

Every failure ends the session with a CdcError (or the driver's error); the daemon's loop
(cdc/daemon.py) is the error boundary that backs off and starts a new one. Either process
dying ends the session: the other is stopped here.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from typing import Any, Protocol

import psycopg
import structlog

from cdc.capture.ack import Acknowledgement
from cdc.capture.backfill import Windows
from cdc.capture.batches import Batch, BatchBuilder
from cdc.capture.checks import TableChecks
from cdc.capture.ddl import DdlHandler
from cdc.capture.engine import Core
from cdc.capture.failover import SwitchLog, same_source, verify_source
from cdc.capture.model import FinishedTransaction, LogicalMessage, RelationDesc, RelationInfo
from cdc.capture.registry import Registry
from cdc.capture.writer_process import Ready, WriterParams, WriterProcess
from cdc.config import Config
from cdc.context import HEARTBEAT_PREFIX, ContextKeys, ContextVerifier, RequestContext
from cdc.errors import (
    SetupError,
    SlotLostError,
    SourceUnavailableError,
    StandbyError,
    StoreUnavailableError,
    error_text,
)
from cdc.lsn import format_lsn
from cdc.metrics import Metrics
from cdc.policies import column_hasher
from cdc.publications import session_publications
from cdc.source_context import read_context_keys
from cdc.store.prune import Pruner
from cdc.store.writer import lock_taken
from cdc.stream.replication import ReplicationStream, choose_options
from cdc.watchdog import Deadline, probe_session


class Daemon(Protocol):
    """What a session uses of the daemon (cdc/daemon.py) that runs it."""

    config: Config
    metrics: Metrics
    verifier: ContextVerifier  # context and error messages: their MACs (cdc/context.py)
    standby: bool
    streaming: bool
    acked_lsn: int
    store_write_started: float | None  # when the write in progress began (the watchdog's)

    @property
    def stopping(self) -> bool: ...

    def beat(self) -> None: ...

    def reload_if_requested(self) -> None: ...

    def report_error(self, message: str) -> None: ...

    def session_level_request_id(self, ctx: RequestContext, lsn: int) -> None: ...


log = structlog.get_logger("cdc.daemon")

#: Batches handed to the writer and not yet written, at most.
MAX_IN_FLIGHT = 2
#: A moved acknowledgement is sent to the slot within this many seconds (status_interval_seconds
#: bounds the silence otherwise): the slot's confirmed and restart positions follow the store
#: closely, so a new session decodes little again (with streaming, the walsender spills every
#: change it decodes before the confirmed position to disk) and little WAL is retained.
ACK_STATUS_SECONDS = 1.0
#: How often the loop beats, checks for a reload and the slot (which has its own, longer
#: interval): a bound on how late any of them is noticed.
HOUSEKEEPING_SECONDS = 0.05

_OPS = {"I": "INSERT", "U": "UPDATE", "D": "DELETE", "T": "TRUNCATE", "S": "SNAPSHOT"}


class _Stopping(Exception):  # noqa: N818 - control flow inside the session only
    """The daemon is stopping while a large transaction waits for the writer."""


class CaptureSession:
    """Connect, stream and write until the daemon stops or something fails."""

    write_abandoned: str | None = None  # why the store watchdog killed the writer

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.config = daemon.config
        self.cfg = daemon.config.capture
        self.metrics = daemon.metrics
        self.slot = daemon.config.source.slot
        self.in_flight: OrderedDict[int, Batch] = OrderedDict()
        self.batch_ids = 0
        self.last_status = 0.0
        self.sent_lsn = 0  # the acknowledgement last sent to the slot
        self.last_data = time.monotonic()
        self.last_slot_check = 0.0
        self.last_lag_warning = 0.0
        self.spilled = 0

    # ============================================================ setup and teardown
    def run(self) -> None:
        cfg = self.config
        source_dsn, store_dsn = cfg.require_source(), cfg.require_store()
        if self.daemon.standby and lock_taken(store_dsn, cfg.store.schema_name, self.slot):
            # Still held: no writer process is started just to find that out again.
            raise StandbyError(f"another cdc daemon is active on slot {self.slot!r}; standing by")
        writer = WriterProcess(
            WriterParams(
                store_dsn,
                cfg.store.schema_name,
                self.slot,
                os.getpid(),
                cfg.logging.level,
                cfg.logging.format,
            )
        )
        stream = ReplicationStream(
            source_dsn, connect_timeout=cfg.source.connect_timeout_seconds, timeout=cfg.source.timeout_seconds
        )
        catalog: psycopg.Connection[Any] | None = None
        registry: Registry | None = None
        clean = False
        try:
            ready = self._wait_ready(writer)
            if ready is None:
                return  # stopped while the writer was starting
            state = ready.state
            daemon = self.daemon
            if daemon.standby:
                log.info("standby_taking_over", slot=self.slot)
            daemon.standby = False
            self.metrics.standby.set(0)
            if state is None or not state.baseline_done:
                raise SetupError(
                    f"the store has no completed setup for slot {self.slot!r}",
                    hint="run `cdc setup` (it creates the slot and records the baseline)",
                )
            stream.connect()
            if state.source_system_id and stream.system_id and state.source_system_id != stream.system_id:
                raise SetupError(
                    f"the source is a different server (system id {stream.system_id}) from the one this "
                    f"history was captured from ({state.source_system_id})",
                    hint="point source.dsn at the original server, or use another store schema",
                )
            source = verify_source(
                stream,
                source_dsn,
                slot=self.slot,
                acked_lsn=state.acked_lsn,
                switches=SwitchLog(
                    store_dsn, cfg.store.schema_name, self.slot, timeout=cfg.store.timeout_seconds
                ),
                metrics=self.metrics,
                timeout=cfg.source.timeout_seconds,
                connect_timeout=cfg.source.connect_timeout_seconds,
            )
            publications = session_publications(cfg, source_dsn, store_dsn)
            options = choose_options(
                stream.server_version,
                self.slot,
                ",".join(publications),
                state.acked_lsn,
                cfg.source.stream_in_progress,
            )
            stream.close()
            stream.connect(
                {"debug_logical_replication_streaming": "immediate"} if options.stream_immediately else {}
            )
            same_source(stream, source)
            try:
                catalog = psycopg.connect(source_dsn, autocommit=True, connect_timeout=10)
            except psycopg.OperationalError as exc:
                raise SourceUnavailableError(f"cannot reach the source: {error_text(exc)}") from exc
            self._use_context_keys(catalog)
            registry = Registry(
                store_dsn,
                cfg.store.schema_name,
                policies=cfg.columns,
                catalog=catalog,
                source_timeout=cfg.source.timeout_seconds,
                store_timeout=cfg.store.timeout_seconds,
                report=daemon.report_error,
            )

            ddl = DdlHandler.for_source(registry, catalog)

            def describe(desc: RelationDesc) -> RelationInfo:
                # The core gives the position of the change that follows the Relation message
                # (which has none); only a change without one falls back to the server's.
                if not desc.lsn:
                    desc = replace(desc, lsn=core.server_wal_end)
                return ddl.relation(desc, registry.describe(desc))  # schema changes (cdc/capture/ddl.py)

            core = Core(
                describe,
                skip_through=state.acked_lsn,
                memory_limit_bytes=cfg.capture.memory_limit_bytes,
                spill_dir=str(cfg.capture.spill_dir) if cfg.capture.spill_dir else None,
                max_value_bytes=cfg.capture.max_value_bytes,
                hash_value=column_hasher(cfg.policies.hash_key_bytes()),
            )
            stream.start(options)
            daemon.streaming = True
            self.metrics.streaming.set(1)
            daemon.acked_lsn = state.acked_lsn
            log.info(
                "streaming_started",
                lsn=format_lsn(state.acked_lsn),
                protocol=options.protocol_version,
                streaming=options.streaming,
                immediate=options.stream_immediately,
                server_version=stream.server_version,
                writer_pid=writer.pid,
            )
            self.writer, self.stream, self.core, self.registry, self.catalog = (
                writer,
                stream,
                core,
                registry,
                catalog,
            )
            self.ack = Acknowledgement(state.acked_lsn, idle_interval=self.cfg.status_interval_seconds)
            self.windows = Windows(self.slot, self.metrics)
            self.checks = TableChecks(cfg, self.metrics, daemon.report_error, streaming=publications)
            ddl.core = core
            self.ddl = ddl
            self.builder = BatchBuilder(
                max_rows=self.cfg.batch_max_rows,
                actor_last_seq=registry.actor_last_seq,
                verifier=daemon.verifier,
                every_change_streamed=options.stream_immediately,
                on_session_level=daemon.session_level_request_id,
            )
            with self._pruner(store_dsn), self._watchdog(writer, store_dsn):
                self._loop()
                self._finish()
            clean = True
        finally:
            daemon = self.daemon
            daemon.store_write_started = None
            writer.stop(timeout=cfg.store.timeout_seconds if clean else 1.0)
            stream.close()
            if registry is not None:
                registry.close()
            if catalog is not None:
                catalog.close()

    def _use_context_keys(self, catalog: psycopg.Connection[Any]) -> None:
        """Read the source's context keys now, and let the verifier read them again on the
        catalog connection when a message fails under the keys it holds (a rotation)."""
        timeout = self.config.source.timeout_seconds

        def context_keys() -> ContextKeys | None:
            try:
                with Deadline(catalog, timeout, _source_silent):
                    return read_context_keys(catalog)
            except psycopg.Error as exc:
                raise SourceUnavailableError(f"cannot read the context key: {error_text(exc)}") from exc

        keys = self.daemon.verifier.use(context_keys)
        if keys is None:
            log.warning(
                "context_key_unavailable",
                hint="run `cdc setup` (as the role the daemon connects as): context and error messages are refused",
            )
        else:
            log.info("context_keys_loaded", key_id=keys.key_id, previous_key_id=keys.previous_key_id)

    def _wait_ready(self, writer: WriterProcess) -> Ready | None:
        """The writer process connected and holds the slot's lock (None: the daemon is stopping)."""
        deadline = time.monotonic() + self.config.store.timeout_seconds + 30  # + the process start
        while not self.daemon.stopping:
            self.daemon.beat()  # starting a process is not being stuck
            ready = writer.ready(1.0)
            if ready is not None:
                return ready
            if time.monotonic() > deadline:
                raise StoreUnavailableError(
                    "the store writer process did not get ready in time",
                    hint="check the history store server",
                )
        return None

    @contextmanager
    def _pruner(self, store_dsn: str) -> Iterator[None]:
        """Only the active instance prunes, on its own thread and connection."""
        cfg = self.config
        pruner = Pruner(store_dsn, cfg.store.schema_name, cfg.retention, metrics=self.metrics)
        stop = threading.Event()
        thread = pruner.start(stop)
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=30)
            pruner.close()

    @contextmanager
    def _watchdog(self, writer: WriterProcess, store_dsn: str) -> Iterator[None]:
        stop = threading.Event()
        thread = threading.Thread(
            target=self._watch_writes, args=(stop, writer, store_dsn), name="cdc-store-watchdog", daemon=True
        )
        thread.start()
        try:
            yield
        finally:
            stop.set()

    # ============================================================ the loop
    def _loop(self) -> None:
        daemon, core, stream, writer, builder = self.daemon, self.core, self.stream, self.writer, self.builder
        pgconn = stream.pgconn
        source, pipe = pgconn.socket, writer.fileno()
        max_seconds = self.cfg.batch_max_seconds
        housekeeping = 0.0
        try:
            while not daemon.stopping:
                now = time.monotonic()
                if now - housekeeping >= HOUSEKEEPING_SECONDS:
                    # Not per message: at tens of thousands of messages a second, these checks
                    # alone would cost several percent of the loop.
                    housekeeping = now
                    daemon.beat()
                    daemon.reload_if_requested()
                    self._watch_slot(now)
                    if self.checks.due(now):
                        with Deadline(self.catalog, self.config.source.timeout_seconds, _source_silent):
                            self.checks.run(self.catalog, self.registry.conn)
                        if self.checks.restart_wanted:
                            return  # a publication became usable: the next session streams from it
                self._replies()
                self._group_commit()
                blocked = builder.full and len(self.in_flight) >= MAX_IN_FLIGHT
                timeout = HOUSEKEEPING_SECONDS
                current = builder.current
                if current is not None and not blocked:
                    timeout = max(0.0, min(timeout, current.started + max_seconds - time.monotonic()))
                try:
                    readable, _, _ = select.select([pipe] if blocked else [source, pipe], [], [], timeout)
                except OSError as exc:
                    raise SourceUnavailableError(f"replication stream broken: {exc}") from exc
                if blocked:
                    self._send_status()  # the walsender hears from us while the store catches up
                    continue
                if source in readable:
                    try:
                        pgconn.consume_input()
                    except psycopg.Error as exc:
                        raise SourceUnavailableError(f"replication stream broken: {error_text(exc)}") from exc
                received = core.last_received_lsn
                try:
                    count = core.drain(pgconn)
                except psycopg.Error as exc:
                    raise SourceUnavailableError(f"replication stream broken: {error_text(exc)}") from exc
                if count < 0:
                    raise stream.ended()
                if count:
                    stream.heard()
                    if core.last_received_lsn != received:
                        self.last_data = time.monotonic()
                    for event in core.pop_events():
                        self._event(event)
                    if core.reply_requested:
                        core.reply_requested = False
                        self._group_commit()
                        self._send_status(force=True)
                elif source not in readable:
                    stream.watch_silence()
                self._keepalive_advance()
                self._send_status()
        except _Stopping:
            return

    def _event(self, event: FinishedTransaction | LogicalMessage) -> None:
        if isinstance(event, LogicalMessage) and event.prefix == HEARTBEAT_PREFIX:
            self._idle_ack(event.lsn)
            return
        highs = None
        if isinstance(event, FinishedTransaction):
            if event.messages:
                event = self.ddl.expand(event)  # schema changes (cdc/capture/ddl.py)
            event, highs = self.windows.before(event)  # backfill watermarks (cdc/capture/backfill.py)
        for full in self.builder.add(event):
            self._hand(full, wait=True)
        if highs:
            assert isinstance(event, FinishedTransaction)
            self.windows.after(self.builder, event, highs)

    def _keepalive_advance(self) -> None:
        """Everything before the server's WAL end is handled when no transaction is open: the
        slot (and the store's version) may move on although captured tables are idle."""
        self._idle_ack(self.core.server_wal_end)

    def _idle_ack(self, lsn: int) -> None:
        if not lsn or self.core.open_transactions:
            return
        current = self.builder.current
        building = current.store.ack_lsn if current is not None else None
        if current is not None and current.store.rows and lsn > (building or 0):
            self.builder.ack(lsn)  # rides with the batch being built: no write of its own
            return
        target = self.ack.idle_advance(lsn, quiet=True, building=building)
        if target is not None:
            self.builder.ack(target)

    def _group_commit(self) -> None:
        """Hand the batch being built when the writer is idle, or it is full or old enough."""
        current = self.builder.current
        if current is None or len(self.in_flight) >= MAX_IN_FLIGHT:
            return
        if (
            not self.in_flight
            or self.builder.full
            or time.monotonic() - current.started >= self.cfg.batch_max_seconds
        ):
            batch = self.builder.take()
            assert batch is not None
            self._hand(batch, wait=False)

    def _hand(self, batch: Batch, *, wait: bool) -> None:
        """Send a batch to the writer; with ``wait``, first wait for room (back-pressure), unless
        the daemon is stopping (the transaction being split is dropped: its ack was not sent, it
        comes back in the next session)."""
        while len(self.in_flight) >= MAX_IN_FLIGHT:
            if not wait:
                raise AssertionError("no room for a batch")
            self._wait_writer(1.0)
            if self.daemon.stopping:
                raise _Stopping
        self.batch_ids += 1
        store = batch.store
        self.writer.send(self.batch_ids, store)
        # The writer has its own copy: the COPY text is not kept here while it writes.
        store.changes, store.transactions, store.context_changes = [], [], []
        if not self.in_flight:
            self.daemon.store_write_started = time.monotonic()
        self.in_flight[self.batch_ids] = batch
        self.ack.handed(store.ack_lsn)

    def _wait_writer(self, timeout: float) -> None:
        """Wait for the writer's next reply (at most ``timeout``), beating and reporting status."""
        with suppress(OSError):
            select.select([self.writer.fileno()], [], [], timeout)
        self.daemon.beat()  # a slow store is not a stuck loop
        self._replies()
        self._send_status()

    def _replies(self) -> None:
        try:
            replies = self.writer.replies()
        except StoreUnavailableError as exc:
            if self.write_abandoned is not None:
                raise StoreUnavailableError(
                    f"history store write abandoned: {self.write_abandoned}",
                    hint="check the network path to the store and the store server",
                ) from exc
            raise
        for reply in replies:
            batch = self.in_flight.pop(reply.batch_id)
            self._written(batch, reply.seconds)
            self.daemon.store_write_started = time.monotonic() if self.in_flight else None

    def _written(self, batch: Batch, seconds: float) -> None:
        metrics = self.metrics
        metrics.store_write_seconds.observe(seconds)
        metrics.batch_rows.observe(batch.rows)
        for (table_id, op, rolled_back), count in batch.counts.items():
            metrics.mutations.labels(
                table=self.registry.table_name(table_id),
                op=_OPS.get(str(op), str(op)),
                status="rolled_back" if rolled_back else "committed",
            ).inc(count)
        for status, count in batch.statuses.items():
            metrics.transactions.labels(status="committed" if status == "c" else "rolled_back").inc(count)
        if self.ack.written(batch.store.ack_lsn):
            self.daemon.acked_lsn = self.ack.acked_lsn
            metrics.written_lsn.set(self.ack.acked_lsn)
            if batch.last_committed_us is not None:
                metrics.lag_seconds.set(max(0.0, time.time() - batch.last_committed_us / 1e6))
            elif not batch.statuses and not self.in_flight:
                metrics.lag_seconds.set(0)  # an idle acknowledgement: everything received is stored
            log.debug("batch_written", lsn=format_lsn(self.ack.acked_lsn), rows=batch.rows)

    def _finish(self) -> None:
        """Stopping: write what was built, wait for the writer, tell the slot."""
        deadline = time.monotonic() + self.config.store.timeout_seconds
        batch = self.builder.take()
        if batch is not None:
            while len(self.in_flight) >= MAX_IN_FLIGHT and time.monotonic() < deadline:
                self._wait_writer(min(1.0, deadline - time.monotonic()))
            if len(self.in_flight) < MAX_IN_FLIGHT:
                self._hand(batch, wait=False)
        while self.in_flight and time.monotonic() < deadline:
            self._wait_writer(min(1.0, deadline - time.monotonic()))
        self._send_status(force=True)

    # ============================================================ the source
    def _send_status(self, force: bool = False) -> None:
        now = time.monotonic()
        flushed = self.ack.flush_lsn()
        interval = self.cfg.status_interval_seconds
        if flushed != self.sent_lsn:
            interval = min(interval, ACK_STATUS_SECONDS)
        if not force and now - self.last_status < interval:
            return
        self.stream.send_status(flushed, flushed, flushed)
        self.last_status = now
        self.sent_lsn = flushed
        core, metrics = self.core, self.metrics
        metrics.received_lsn.set(core.last_received_lsn or None)  # 0: nothing received yet
        metrics.open_transactions.set(core.open_transactions)
        metrics.buffered_bytes.set(core.memory_bytes)
        metrics.server_wal_lsn.set(core.server_wal_end or None)  # 0: no keepalive yet
        spilled = core.spilled_transactions
        if spilled > self.spilled:
            metrics.spilled_transactions.inc(spilled - self.spilled)
            self.spilled = spilled
        self.ack.publish(metrics, core.server_wal_end)

    def _watch_slot(self, now: float) -> None:
        """Every status interval: slot health, retained WAL, lag, and a heartbeat when idle."""
        if now - self.last_slot_check < self.cfg.status_interval_seconds:
            return
        self.last_slot_check = now
        timeout = self.config.source.timeout_seconds
        try:
            with Deadline(self.catalog, timeout, _source_silent):
                row = self.catalog.execute(
                    "SELECT wal_status, safe_wal_size, (pg_current_wal_lsn() - restart_lsn)::bigint "
                    "FROM pg_replication_slots WHERE slot_name = %s",
                    (self.slot,),
                ).fetchone()
        except psycopg.Error as exc:
            raise SourceUnavailableError(f"cannot read the slot's state: {error_text(exc)}") from exc
        if row is None:
            raise SlotLostError(
                f"replication slot {self.slot!r} was dropped while capturing",
                hint="run `cdc setup --recreate-slot`; the history records a gap and a new baseline",
            )
        wal_status, safe_size, retained = row
        for status in ("reserved", "extended", "unreserved", "lost"):
            self.metrics.slot_wal_status.labels(status=status).set(1 if status == wal_status else 0)
        # NULL is no sample: safe_wal_size is NULL under max_slot_wal_keep_size = -1 (no limit).
        self.metrics.slot_retained_wal_bytes.set(retained)
        self.metrics.slot_safe_wal_size_bytes.set(safe_size)
        if wal_status == "lost":
            raise SlotLostError(
                f"replication slot {self.slot!r} was invalidated (wal_status=lost)",
                hint="run `cdc setup --recreate-slot`; raise max_slot_wal_keep_size to avoid it",
            )
        server_wal_end = self.core.server_wal_end
        lag = max(0, server_wal_end - self.ack.acked_lsn) if server_wal_end else 0
        max_lag = self.cfg.max_lag_bytes
        if (wal_status == "unreserved" or lag > max_lag) and now - self.last_lag_warning > 60:
            self.last_lag_warning = now
            log.warning(
                "capture_falling_behind",
                lag_bytes=lag,
                retained_wal_bytes=retained,
                wal_status=wal_status,
                max_lag_bytes=max_lag,
            )
        interval = self.cfg.heartbeat_interval_seconds
        if interval > 0 and now - self.last_data >= interval:
            # Nothing published changed lately: a non-transactional message gives the slot
            # a decodable position to move to, so WAL written elsewhere is not held back.
            try:
                with Deadline(self.catalog, timeout, _source_silent):
                    self.catalog.execute(
                        "SELECT pg_logical_emit_message(false, %s, now()::text)", (HEARTBEAT_PREFIX,)
                    )
            except psycopg.Error as exc:
                raise SourceUnavailableError(f"cannot write a heartbeat: {error_text(exc)}") from exc
            self.metrics.heartbeats.inc()
            self.last_data = now

    # ============================================================ the store watchdog
    def _watch_writes(self, stop: threading.Event, writer: WriterProcess, dsn: str) -> None:
        """A write outlasting store.timeout_seconds is logged (the daemon is unready meanwhile,
        see Daemon.ready) and the store is checked on a new connection. When it cannot be
        reached, or no longer works on the write (the write's packets are lost), the writer
        process is killed: the write fails, nothing of it was acknowledged, and the session
        starts again. A write the store is still running (slow, waiting for a lock) is left
        alone."""
        daemon = self.daemon
        timeout = self.config.store.timeout_seconds
        reported: float | None = None  # start time of the write reported as stalled
        next_probe = 0.0
        while not stop.wait(min(1.0, timeout / 4)):
            started = daemon.store_write_started
            if started is None or time.monotonic() - started < timeout:
                if reported is not None and started != reported:
                    log.info("store_write_resumed")
                    reported = None
                continue
            if reported != started:
                reported, next_probe = started, 0.0
                log.warning(
                    "store_write_stalled",
                    seconds=round(time.monotonic() - started, 1),
                    timeout_seconds=timeout,
                )
            pid = writer.backend_pid
            if pid is None or time.monotonic() < next_probe:
                continue
            reason = probe_session(dsn, pid, timeout=min(10.0, timeout / 2), idle_after=timeout / 2)
            if daemon.store_write_started != started:
                continue  # finished meanwhile
            if reason is None:
                next_probe = time.monotonic() + timeout / 2
                continue
            log.warning("store_write_abandoned", reason=reason, seconds=round(time.monotonic() - started, 1))
            self.write_abandoned = reason
            writer.kill()


def _source_silent(what: str) -> SourceUnavailableError:
    return SourceUnavailableError(f"the source went silent: a catalog query had {what}")
