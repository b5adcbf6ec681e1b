"""The capture daemon: replication stream → assembler → history store → acknowledgement.

The loop is the only place that catches every exception: each session (connect,
stream, write) is an error boundary; retryable errors back off and reconnect, fatal
ones stop the daemon with their exit code. Signal handlers only set flags. The slot is
acknowledged only up to the last position whose store transaction has committed.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from types import FrameType
from typing import Any

import psycopg
import structlog

from cdc.assembler import COMMITTED, Assembler, FinishedTransaction, LogicalMessage
from cdc.config import Config, load_config, redact_dsn
from cdc.context import ERROR_PREFIX, HEARTBEAT_PREFIX, ContextKeys, ContextVerifier, RequestContext
from cdc.errors import (
    CdcError,
    SetupError,
    SlotLostError,
    SourceUnavailableError,
    StandbyError,
    StoreUnavailableError,
    error_text,
)
from cdc.logs import configure_logging
from cdc.lsn import format_lsn
from cdc.metrics import Metrics
from cdc.policies import ColumnPolicies
from cdc.protocol.frames import PrimaryKeepalive, XLogData
from cdc.protocol.pgoutput import Relation
from cdc.source import is_internal, primary_key
from cdc.source_context import read_context_keys
from cdc.store.retention import Pruner
from cdc.store.writer import Batch, StoreWriter, TransactionRow
from cdc.stream.replication import ReplicationStream, choose_options
from cdc.watchdog import Deadline, abort, probe_session

log = structlog.get_logger("cdc.daemon")

EXIT_OK = 0


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        metrics: Metrics | None = None,
        config_path: str | None = None,
        reload: Callable[[], Config] | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else Metrics()
        self._config_path = config_path
        self._reload = reload or (lambda: load_config(self._config_path))
        self._stop = threading.Event()
        self._reload_requested = False
        self.last_heartbeat = time.monotonic()
        self.streaming = False
        self.last_error: str | None = None
        self.acked_lsn = 0
        self.standby = False
        # When the store write in progress began (None: none is): one lasting longer than
        # store.timeout_seconds makes the daemon unready (see _Session._watch_writes).
        self.store_write_started: float | None = None
        # The loop beats at least once a second; a minute of silence means it is stuck.
        self.health_max_age_seconds = max(60.0, 3 * config.capture.status_interval_seconds)
        # Context and error messages are used only when their MAC verifies (cdc/context.py).
        self.verifier = ContextVerifier(on_reject=self._message_rejected)

    def _message_rejected(self, prefix: str, lsn: int, reason: str) -> None:
        log.warning("context_message_rejected", prefix=prefix, lsn=format_lsn(lsn), reason=reason)
        self.metrics.context_rejected.labels(prefix=prefix).inc()

    # -- control ---------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        def stop(signum: int, _frame: FrameType | None) -> None:
            log.info("signal_received", signal=signal.Signals(signum).name)
            self._stop.set()

        def hup(_signum: int, _frame: FrameType | None) -> None:
            self._reload_requested = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, hup)

    def beat(self) -> None:
        self.last_heartbeat = time.monotonic()
        self.metrics.heartbeat_seconds.set(time.time())

    # -- main loop -------------------------------------------------------------
    def run(self) -> int:
        """Capture until stopped; return the process exit code."""
        backoff = self.config.reconnect.initial_backoff_seconds
        log.info("daemon_started", pid=os.getpid(), slot=self.config.source.slot)
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._session()
            except StandbyError as exc:
                if not self.standby:
                    log.info("standby", reason=exc.message)
                self.standby = True
                self.metrics.standby.set(1)
                self._wait(self.STANDBY_POLL_SECONDS)
                continue
            except _Reload as exc:
                log.info("config_reloaded", action=exc.message)
                continue
            except CdcError as exc:
                self.last_error = str(exc)
                self.metrics.errors.labels(kind=type(exc).__name__).inc()
                if not exc.retryable:
                    self._record_error(exc.message)
                    log.error("daemon_stopped", error=exc.message, hint=exc.hint, exit_code=exc.exit_code)
                    return exc.exit_code
                # Logged first: recording it needs the store, which may be the one failing.
                log.warning(
                    "capture_interrupted",
                    error=exc.message,
                    hint=exc.hint,
                    retry_in_seconds=round(backoff, 2),
                )
                self._record_error(exc.message)
            except Exception as exc:  # the cycle's error boundary: log, back off, retry
                # error_text: the server's message, never its CONTEXT (which can quote row values).
                self.last_error = f"{type(exc).__name__}: {error_text(exc)}"
                self.metrics.errors.labels(kind=type(exc).__name__).inc()
                self._record_error(self.last_error)
                log.error(
                    "capture_failed",
                    error=self.last_error,
                    sqlstate=getattr(exc, "sqlstate", None),
                    retry_in_seconds=round(backoff, 2),
                    # A traceback for a bug; not for a database error, whose text can quote rows.
                    exc_info=not isinstance(exc, psycopg.Error),
                )
            finally:
                self.streaming = False
                self.metrics.streaming.set(0)
            if self._stop.is_set():
                break
            if time.monotonic() - started > 30:
                backoff = self.config.reconnect.initial_backoff_seconds
            self.metrics.reconnects.inc()
            self._wait(backoff)
            backoff = min(backoff * 2, self.config.reconnect.max_backoff_seconds)
        log.info("daemon_stopped", exit_code=EXIT_OK, acked_lsn=format_lsn(self.acked_lsn))
        return EXIT_OK

    STANDBY_POLL_SECONDS = 1.0

    def _wait(self, seconds: float) -> None:
        """Sleep until stopped, beating: waiting on purpose is not being stuck."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            self.beat()
            self._stop.wait(min(1.0, max(0.0, deadline - time.monotonic())))

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Liveness: the main loop beat recently (it beats at least every second)."""
        age = time.monotonic() - self.last_heartbeat
        return age <= self.health_max_age_seconds, {
            "heartbeat_age_seconds": round(age, 3),
            "standby": self.standby,
        }

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Readiness: streaming (store reachable: no write outlasts store.timeout_seconds), or
        a healthy standby."""
        ok, detail = self.health()
        detail.update({"streaming": self.streaming, "acked_lsn": format_lsn(self.acked_lsn)})
        started = self.store_write_started
        if started is not None and time.monotonic() - started > self.config.store.timeout_seconds:
            detail["store_write_seconds"] = round(time.monotonic() - started, 1)
            return False, detail
        return ok and (self.streaming or self.standby), detail

    def _record_error(self, message: str) -> None:
        """Best effort: leave the last error where `cdc status` can read it."""
        try:
            writer = StoreWriter(
                self.config.require_store(), self.config.store.schema_name, self.config.source.slot
            )
            try:
                writer.record_error(message)
            finally:
                writer.close()
        except (CdcError, psycopg.Error):
            pass

    def reload_if_requested(self) -> None:
        """Apply a SIGHUP: reload the config; reconnect when a connection setting changed."""
        if not self._reload_requested:
            return
        self._reload_requested = False
        try:
            new = self._reload()
        except CdcError as exc:
            log.error("config_reload_failed", error=exc.message)
            return
        old = self.config
        self.config = new
        configure_logging(new.logging.level, new.logging.format)
        if (old.source, old.store, old.capture, old.context) != (
            new.source,
            new.store,
            new.capture,
            new.context,
        ):
            raise _Reload("capture settings changed: reconnecting")
        log.info("config_reloaded", action="applied without reconnecting")

    def _session(self) -> None:
        cfg = self.config
        source_dsn, store_dsn = cfg.require_source(), cfg.require_store()
        writer = StoreWriter(store_dsn, cfg.store.schema_name, cfg.source.slot)
        stream = ReplicationStream(
            source_dsn, connect_timeout=cfg.source.connect_timeout_seconds, timeout=cfg.source.timeout_seconds
        )
        catalog: psycopg.Connection[Any] | None = None
        try:
            writer.connect()
            if self.standby:
                log.info("standby_taking_over", slot=cfg.source.slot)
            self.standby = False
            self.metrics.standby.set(0)
            with Deadline(writer.conn, cfg.store.timeout_seconds, _store_silent):
                state = writer.load_state()
            if state is None or not state.baseline_done:
                raise SetupError(
                    f"the store has no completed setup for slot {cfg.source.slot!r}",
                    hint="run `cdc setup` (it creates the slot and records the baseline)",
                )
            stream.connect()
            if state.source_system_id and stream.system_id and state.source_system_id != stream.system_id:
                raise SetupError(
                    f"the source is a different server (system id {stream.system_id}) from the one this "
                    f"history was captured from ({state.source_system_id})",
                    hint="point source.dsn at the original server, or use another store schema",
                )
            slot = stream.slot_info(cfg.source.slot)
            if slot is None:
                raise SlotLostError(
                    f"replication slot {cfg.source.slot!r} does not exist on the source "
                    f"({redact_dsn(source_dsn)}): changes since it was dropped were not captured",
                    hint="run `cdc setup --recreate-slot`; the history records a gap and a new baseline",
                )
            if slot[2] == "lost":
                raise SlotLostError(
                    f"replication slot {cfg.source.slot!r} was invalidated (wal_status=lost): "
                    "the WAL it needed was removed",
                    hint="run `cdc setup --recreate-slot`; raise max_slot_wal_keep_size to avoid it",
                )
            options = choose_options(
                stream.server_version,
                cfg.source.slot,
                cfg.source.publication,
                state.acked_lsn,
                cfg.source.stream_in_progress,
            )
            stream.close()
            stream.connect(
                {"debug_logical_replication_streaming": "immediate"} if options.stream_immediately else {}
            )
            catalog = psycopg.connect(source_dsn, autocommit=True, connect_timeout=10)
            keys: dict[int, tuple[str, ...] | None] = {}

            def lookup(relation: Relation) -> tuple[str, ...] | None:
                if relation.oid not in keys:
                    assert catalog is not None
                    try:
                        with Deadline(catalog, cfg.source.timeout_seconds, _source_silent):
                            keys[relation.oid] = primary_key(catalog, relation.oid)
                    except psycopg.OperationalError as exc:
                        raise SourceUnavailableError(f"cannot read a table's primary key: {exc}") from exc
                return keys[relation.oid]

            def context_keys() -> ContextKeys | None:
                assert catalog is not None
                with Deadline(catalog, cfg.source.timeout_seconds, _source_silent):
                    return read_context_keys(catalog)

            if self.verifier.use(context_keys) is None:
                log.warning("context_key_unavailable", hint="run `cdc setup`: context messages are refused")
            assembler = Assembler(
                primary_key=lookup,
                memory_limit_bytes=cfg.capture.memory_limit_bytes,
                spill_dir=str(cfg.capture.spill_dir) if cfg.capture.spill_dir else None,
                skip_through=state.acked_lsn,
                read_context=self.verifier.context,
            )
            stream.start(options)
            self.streaming = True
            self.metrics.streaming.set(1)
            self.acked_lsn = state.acked_lsn
            log.info(
                "streaming_started",
                lsn=format_lsn(state.acked_lsn),
                protocol=options.protocol_version,
                streaming=options.streaming,
                immediate=options.stream_immediately,
                server_version=stream.server_version,
            )
            with Deadline(writer.conn, cfg.store.timeout_seconds, _store_silent):
                writer.record_daemon()
            # Only the active instance prunes, on its own thread and connection.
            pruner = Pruner(store_dsn, cfg.store.schema_name, cfg.retention, metrics=self.metrics)
            prune_stop = threading.Event()
            prune_thread = pruner.start(prune_stop)
            try:
                _Session(self, stream, writer, assembler, catalog).loop()
            finally:
                prune_stop.set()
                prune_thread.join(timeout=30)
                pruner.close()
        finally:
            stream.close()
            writer.close()
            if catalog is not None:
                catalog.close()


class _Reload(CdcError):  # noqa: N818 - internal control flow, never escapes run()
    retryable = True


def _source_silent(what: str) -> SourceUnavailableError:
    return SourceUnavailableError(f"the source went silent: a catalog query had {what}")


def _store_silent(what: str) -> StoreUnavailableError:
    return StoreUnavailableError(f"the history store went silent: a query had {what}")


class _Session:
    """One streaming session: read frames, assemble, write batches, acknowledge."""

    write_abandoned: str | None = None  # why the store watchdog shut the write's connection

    def __init__(
        self,
        daemon: Daemon,
        stream: ReplicationStream,
        writer: StoreWriter,
        assembler: Assembler,
        catalog: psycopg.Connection[Any],
    ) -> None:
        self.daemon = daemon
        self.cfg = daemon.config.capture
        self.metrics = daemon.metrics
        self.stream = stream
        self.writer = writer
        self.assembler = assembler
        self.catalog = catalog
        self.policies = ColumnPolicies.from_config(daemon.config)
        self.slot = daemon.config.source.slot
        self.batch = Batch()
        self.batch_started: float | None = None
        # Store writes overlap decoding: one writer thread, FIFO, so acks stay in order.
        self.pending: queue.Queue[Batch | None] = queue.Queue(maxsize=2)
        # Batches handed to the writer and batches written: equal when it is idle, and then a
        # finished transaction goes at once (low lag); while it writes, the next batch grows
        # (group commit: batches as large as the store's speed requires). Each counter is
        # written by one thread only, so no lock.
        self.batches_handed = 0
        self.batches_written = 0
        self.writer_error: BaseException | None = None
        self.writer_thread = threading.Thread(
            target=self._write_batches, name="cdc-store-writer", daemon=True
        )
        self.acked = daemon.acked_lsn  # written to the store and acknowledged
        self.finished_position = self.acked  # last finished transaction (maybe not yet written)
        self.server_wal_end = 0
        self.last_status = 0.0
        self.last_write = 0.0
        self.last_data = time.monotonic()
        self.last_slot_check = 0.0
        self.last_lag_warning = 0.0

    #: How often the loop beats, checks for a reload, the writer's error and the slot (which
    #: has its own, longer interval): a bound on how late any of them is noticed.
    HOUSEKEEPING_SECONDS = 0.05

    def loop(self) -> None:
        self.writer_thread.start()
        watch_stop = threading.Event()
        threading.Thread(
            target=self._watch_writes, args=(watch_stop,), name="cdc-store-watchdog", daemon=True
        ).start()
        try:
            self._loop()
            self._flush()
        finally:
            try:
                self._drain()
            finally:
                watch_stop.set()
        self._raise_writer_error()
        self._send_status(force=True)

    def _loop(self) -> None:
        daemon = self.daemon
        housekeeping = 0.0
        while not daemon._stop.is_set():
            now = time.monotonic()
            if now - housekeeping >= self.HOUSEKEEPING_SECONDS:
                # Not per message: at tens of thousands of messages a second, the heartbeat
                # gauge and these checks alone cost several percent of the loop.
                housekeeping = now
                self._raise_writer_error()
                daemon.beat()
                daemon.reload_if_requested()
                self._watch_slot()
            timeout = 1.0
            if self.batch_started is not None:
                timeout = max(0.0, self.batch_started + self.cfg.batch_max_seconds - time.monotonic())
            frame = self.stream.read(timeout)
            if isinstance(frame, XLogData):
                self.last_data = time.monotonic()
                for event in self.assembler.feed(frame.wal_start, frame.payload):
                    self._handle(event)
            elif isinstance(frame, PrimaryKeepalive):
                self.server_wal_end = max(self.server_wal_end, frame.wal_end)
                self.metrics.server_wal_lsn.set(frame.wal_end)
                if (
                    frame.wal_end > max(self.acked, self.batch.ack_lsn or 0)
                    and self.assembler.open_transactions == 0
                    and not self.batch.mutations
                    and time.monotonic() - self.last_write >= self.cfg.status_interval_seconds
                ):
                    # Nothing in flight: everything before the server's WAL end is handled,
                    # so the slot (and the store's version) may move on even when captured
                    # tables are idle, and no WAL is held back for them.
                    self.batch.ack_lsn = frame.wal_end
                    self._mark_batch()
                if frame.reply_requested:
                    self._flush()
                    self._send_status(force=True)
            if self.batch_started is not None and (
                self.batches_handed == self.batches_written
                or len(self.batch) >= self.cfg.batch_max_rows
                or time.monotonic() - self.batch_started >= self.cfg.batch_max_seconds
            ):
                self._flush()
            self._send_status()

    def _watch_slot(self) -> None:
        """Every status interval: slot health, retained WAL, lag, and a heartbeat when idle."""
        now = time.monotonic()
        if now - self.last_slot_check < self.cfg.status_interval_seconds:
            return
        self.last_slot_check = now
        timeout = self.daemon.config.source.timeout_seconds
        try:
            with Deadline(self.catalog, timeout, _source_silent):
                row = self.catalog.execute(
                    "SELECT wal_status, safe_wal_size, (pg_current_wal_lsn() - restart_lsn)::bigint "
                    "FROM pg_replication_slots WHERE slot_name = %s",
                    (self.slot,),
                ).fetchone()
        except psycopg.Error as exc:
            raise SourceUnavailableError(f"cannot read the slot's state: {exc}") from exc
        if row is None:
            raise SlotLostError(
                f"replication slot {self.slot!r} was dropped while capturing",
                hint="run `cdc setup --recreate-slot`; the history records a gap and a new baseline",
            )
        wal_status, safe_size, retained = row
        for status in ("reserved", "extended", "unreserved", "lost"):
            self.metrics.slot_wal_status.labels(status=status).set(1 if status == wal_status else 0)
        if retained is not None:
            self.metrics.slot_retained_wal_bytes.set(retained)
        if safe_size is not None:
            self.metrics.slot_safe_wal_size_bytes.set(safe_size)
        if wal_status == "lost":
            raise SlotLostError(
                f"replication slot {self.slot!r} was invalidated (wal_status=lost)",
                hint="run `cdc setup --recreate-slot`; raise max_slot_wal_keep_size to avoid it",
            )
        lag = max(0, self.server_wal_end - self.acked) if self.server_wal_end else 0
        max_lag = self.daemon.config.capture.max_lag_bytes
        if (wal_status == "unreserved" or lag > max_lag) and now - self.last_lag_warning > 60:
            self.last_lag_warning = now
            log.warning(
                "capture_falling_behind",
                lag_bytes=lag,
                retained_wal_bytes=retained,
                wal_status=wal_status,
                max_lag_bytes=max_lag,
            )
        interval = self.daemon.config.capture.heartbeat_interval_seconds
        if interval > 0 and now - self.last_data >= interval:
            # Nothing published changed lately: a non-transactional message gives the slot
            # a decodable position to move to, so WAL written elsewhere is not held back.
            try:
                with Deadline(self.catalog, timeout, _source_silent):
                    self.catalog.execute(
                        "SELECT pg_logical_emit_message(false, %s, now()::text)", (HEARTBEAT_PREFIX,)
                    )
            except psycopg.Error as exc:
                raise SourceUnavailableError(f"cannot write a heartbeat: {exc}") from exc
            self.metrics.heartbeats.inc()
            self.last_data = now

    def _handle(self, event: FinishedTransaction | LogicalMessage) -> None:
        if isinstance(event, LogicalMessage):
            if event.prefix == HEARTBEAT_PREFIX:
                if (
                    self.assembler.open_transactions == 0
                    and not self.batch.mutations
                    and event.lsn > self.acked
                ):
                    self.batch.ack_lsn = max(event.lsn, self.batch.ack_lsn or 0)
                    self._mark_batch()
            elif event.prefix == ERROR_PREFIX:
                error = self.daemon.verifier.error(event.content, event.lsn)
                if error is not None:
                    self.batch.errors.append(error)
                    self._mark_batch()
            return
        txn = TransactionRow(
            event.position, event.xid, event.commit_lsn, event.status, event.committed_at, event.origin
        )
        policies = self.policies
        seen: dict[str, tuple[RequestContext, bool]] = {}
        for mutation in event.mutations():
            if is_internal(mutation.table):
                continue  # cdc's own tables (the signing key) are never stored
            if policies:
                policies.apply(mutation)
            txn.mutation_count += 1
            context = mutation.context
            if context is not None and context.request_id:
                request_id = context.request_id
                last = seen.get(request_id)
                committed = mutation.status == COMMITTED or (last is not None and last[1])
                # A transaction's mutations share their context object: its JSON once, not per row.
                if last is None or last[0] is not context or last[1] != committed:
                    seen[request_id] = (context, committed)
                    txn.requests[request_id] = (context.as_json(), committed, context.actor)
            self.batch.mutations.append(mutation)
            self._mark_batch()
            if len(self.batch.mutations) >= self.cfg.batch_max_rows:
                self._flush()  # a chunk of a large transaction; its ack comes with its last chunk
        self.batch.transactions.append(txn)
        self.finished_position = max(self.finished_position, event.position)
        self.batch.ack_lsn = max(self.finished_position, self.batch.ack_lsn or 0)
        self._mark_batch()

    def _mark_batch(self) -> None:
        if self.batch_started is None:
            self.batch_started = time.monotonic()

    def _flush(self) -> None:
        """Hand the batch to the store writer thread (blocks while two batches are pending)."""
        self._raise_writer_error()
        batch = self.batch
        if batch.empty():
            self.batch_started = None
            return
        self.batch = Batch()
        self.batch_started = None
        self.last_write = time.monotonic()
        self.batches_handed += 1
        while True:
            try:
                self.pending.put(batch, timeout=1.0)
                break
            except queue.Full:
                self._raise_writer_error()
                self.daemon.beat()  # a slow store is not a stuck loop
                self._send_status()

    def _raise_writer_error(self) -> None:
        if self.writer_error is not None:
            if self.write_abandoned is not None and isinstance(self.writer_error, StoreUnavailableError):
                raise StoreUnavailableError(
                    f"history store write abandoned: {self.write_abandoned}",
                    hint="check the network path to the store and the store server",
                ) from self.writer_error
            raise self.writer_error

    def _write_batches(self) -> None:
        """The store writer thread: batches in order, each one store transaction then its ack."""
        while True:
            batch = self.pending.get()
            if batch is None:
                return
            try:
                started = time.perf_counter()
                self.daemon.store_write_started = time.monotonic()
                self.writer.write(batch)
            except BaseException as exc:  # noqa: BLE001 - handed to the main loop, which owns error handling
                self.daemon.store_write_started = None
                self.writer_error = exc
                while self.pending.get() is not None:  # drop the rest: nothing after is acked
                    pass
                return
            self.daemon.store_write_started = None
            self._written(batch, time.perf_counter() - started)
            self.batches_written += 1

    def _watch_writes(self, stop: threading.Event) -> None:
        """The store watchdog thread: a write outlasting store.timeout_seconds is logged (the
        daemon is unready meanwhile, see Daemon.ready) and the store is checked on a new
        connection. When it cannot be reached, or no longer works on the write (the write's
        packets are lost), the write's connection is shut: the write fails, nothing of it was
        acknowledged, and the session starts again. A write the store is still running (slow,
        waiting for a lock) is left alone."""
        daemon = self.daemon
        timeout = daemon.config.store.timeout_seconds
        dsn = daemon.config.require_store()
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
            conn = self.writer._conn  # the writer thread's connection; only its socket is touched
            if conn is None or time.monotonic() < next_probe:
                continue
            try:
                pid = conn.info.backend_pid
            except psycopg.Error:
                continue  # closed meanwhile: the write is failing already
            reason = probe_session(dsn, pid, timeout=min(10.0, timeout / 2), idle_after=timeout / 2)
            if daemon.store_write_started != started:
                continue  # finished meanwhile
            if reason is None:
                next_probe = time.monotonic() + timeout / 2
                continue
            log.warning("store_write_abandoned", reason=reason, seconds=round(time.monotonic() - started, 1))
            self.write_abandoned = reason
            abort(conn)

    def _written(self, batch: Batch, elapsed: float) -> None:
        self.metrics.store_write_seconds.observe(elapsed)
        self.metrics.batch_rows.observe(len(batch.mutations))
        counts = Counter((m.table, m.op, m.status) for m in batch.mutations)
        for (table, op, status), count in counts.items():
            self.metrics.mutations.labels(table=table, op=op, status=status).inc(count)
        for t in batch.transactions:
            self.metrics.transactions.labels(status=t.status).inc()
        if batch.ack_lsn is not None:
            self.acked = max(self.acked, batch.ack_lsn)
            self.daemon.acked_lsn = self.acked
            self.metrics.written_lsn.set(self.acked)
            if batch.transactions:
                lag = (datetime.now(UTC) - batch.transactions[-1].committed_at).total_seconds()
                self.metrics.lag_seconds.set(max(0.0, lag))
            log.debug("batch_written", lsn=format_lsn(self.acked), mutations=len(batch.mutations))

    def _drain(self) -> None:
        """Write what is pending and stop the writer thread."""
        self.pending.put(None)
        self.writer_thread.join()

    def _update_gauges(self) -> None:
        self.metrics.received_lsn.set(self.stream.last_received_lsn)
        self.metrics.open_transactions.set(self.assembler.open_transactions)
        self.metrics.buffered_bytes.set(self.assembler.memory_bytes)

    def _send_status(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_status < self.cfg.status_interval_seconds:
            return
        flushed = self.acked
        self.stream.send_status(flushed, flushed, flushed)
        self._update_gauges()
        self.last_status = now
        self.metrics.confirmed_lsn.set(flushed)
        if self.server_wal_end:
            self.metrics.lag_bytes.set(max(0, self.server_wal_end - flushed))
