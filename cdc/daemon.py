"""The capture daemon: signals, the session loop, health and readiness.

The loop is the only place that catches every exception: each capture session
(cdc/capture/session.py: connect, stream, write) is an error boundary; retryable errors back
off and start a new session, fatal ones stop the daemon with their exit code. Signal handlers
only set flags. The slot is acknowledged only up to the last position whose store
transaction has committed (cdc/capture/ack.py).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from types import FrameType
from typing import Any

import psycopg
import structlog

from cdc.capture.session import CaptureSession
from cdc.config import Config, load_config
from cdc.context import ContextVerifier, RequestContext
from cdc.errors import CdcError, StandbyError, error_text
from cdc.exit_codes import ExitCode
from cdc.logs import configure_logging
from cdc.lsn import format_lsn
from cdc.metrics import Metrics
from cdc.store.writer import StoreWriter

log = structlog.get_logger("cdc.daemon")

EXIT_OK = ExitCode.OK


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
        # store.timeout_seconds makes the daemon unready (see CaptureSession._watch_writes).
        self.store_write_started: float | None = None
        # The loop beats at least once a second; a minute of silence means it is stuck.
        self.health_max_age_seconds = max(60.0, 3 * config.capture.status_interval_seconds)
        # Context and error messages are used only when their MAC verifies (cdc/context.py).
        self.verifier = ContextVerifier(on_reject=self._message_rejected)
        # Sessions warned about a session-level request id (db_user, backend_pid, request_id).
        self._session_level_warned: OrderedDict[tuple[str, int, str | None], None] = OrderedDict()

    def _message_rejected(self, prefix: str, lsn: int, reason: str) -> None:
        log.warning("context_message_rejected", prefix=prefix, lsn=format_lsn(lsn), reason=reason)
        self.metrics.context_rejected.labels(prefix=prefix).inc()

    def session_level_request_id(self, ctx: RequestContext, lsn: int) -> None:
        """A context whose request id was carried over from an earlier transaction of its session
        (a session-level SET, not SET LOCAL: behind a pooler, another client's transactions get
        it): counted each time, logged once per session and request id."""
        self.metrics.session_level_request_ids.inc()
        seen = (ctx.db_user, ctx.backend_pid, ctx.request_id)
        if seen in self._session_level_warned:
            return
        self._session_level_warned[seen] = None
        if len(self._session_level_warned) > 1024:
            self._session_level_warned.popitem(last=False)
        log.warning(
            "request_id_from_session_setting",
            lsn=format_lsn(lsn),
            request_id=ctx.request_id,
            db_user=ctx.db_user,
            backend_pid=ctx.backend_pid,
            hint="set the request id with SET LOCAL (or set_config(..., true)) so that it ends with "
            "its transaction",
        )

    # -- control ---------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

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
                    self.record_error(exc.message)
                    self.forget_daemon()
                    log.error("daemon_stopped", error=exc.message, hint=exc.hint, exit_code=exc.exit_code)
                    return exc.exit_code
                # Logged first: recording it needs the store, which may be the one failing.
                log.warning(
                    "capture_interrupted",
                    error=exc.message,
                    hint=exc.hint,
                    retry_in_seconds=round(backoff, 2),
                )
                self.record_error(exc.message)
            except Exception as exc:  # the cycle's error boundary: log, back off, retry
                # error_text: the server's message, never its CONTEXT (which can quote row values).
                self.last_error = f"{type(exc).__name__}: {error_text(exc)}"
                self.metrics.errors.labels(kind=type(exc).__name__).inc()
                self.record_error(self.last_error)
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
        self.forget_daemon()
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

    def report_error(self, message: str) -> None:
        """A problem that does not stop capture: the daemon's last error, for `cdc status`."""
        self.last_error = message
        self.record_error(message)

    def record_error(self, message: str) -> None:
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

    def forget_daemon(self) -> None:
        """Best effort, on the way out: this daemon is no longer the store's active one."""
        try:
            writer = StoreWriter(
                self.config.require_store(), self.config.store.schema_name, self.config.source.slot
            )
            try:
                writer.clear_daemon(os.getpid())
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
        if (old.source, old.store, old.capture, old.context, old.columns) != (
            new.source,
            new.store,
            new.capture,
            new.context,
            new.columns,
        ):
            raise _Reload("capture settings changed: reconnecting")
        log.info("config_reloaded", action="applied without reconnecting")

    def _session(self) -> None:
        CaptureSession(self).run()


class _Reload(CdcError):  # noqa: N818 - internal control flow, never escapes run()
    retryable = True
