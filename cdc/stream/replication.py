"""The replication connection: the only code that speaks the streaming protocol.

psycopg 3 has no replication API, but a ``replication="database"`` connection accepts
``START_REPLICATION`` and enters COPY_BOTH; frames are read with ``get_copy_data``
(non-blocking, waiting on the socket) and standby status updates are written with
``put_copy_data``. Frame parsing lives in ``cdc.protocol.frames``; this module only
moves bytes and decides which options the server supports.

Nothing here waits without a deadline (``timeout``): a silent source (packets dropped, a
hung server or proxy) is a broken connection, raised as ``SourceUnavailableError`` so the
daemon reconnects. Queries run under a ``cdc.watchdog.Deadline``; the stream, which may
rightly be quiet, is pinged (a status update asking for a reply, which the walsender answers
at once) after a third of the timeout without a message, and given up after the timeout.
"""

from __future__ import annotations

import select
import time
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog
from psycopg import sql
from psycopg.pq import DiagnosticField, ExecStatus

from cdc.config import redact_dsn
from cdc.errors import SetupError, SlotLostError, SourceUnavailableError
from cdc.lsn import format_lsn, parse_lsn
from cdc.protocol.frames import (
    PrimaryKeepalive,
    StandbyStatusUpdate,
    XLogData,
    encode_standby_status,
    now_pg_time,
    parse_copy_data,
)
from cdc.source_hosts import connected_host
from cdc.watchdog import Deadline

log = structlog.get_logger("cdc.stream")

# Session settings fixing the text form of values, whatever the server's defaults are:
# stored values must not depend on who configured the server.
OUTPUT_SETTINGS = {
    "datestyle": "ISO, MDY",
    "intervalstyle": "postgres",
    "extra_float_digits": "1",
    "bytea_output": "hex",
    "timezone": "UTC",
    "client_encoding": "UTF8",
}


def options_string(settings: dict[str, str]) -> str:
    return " ".join(f"-c {name}={value.replace(' ', chr(92) + ' ')}" for name, value in settings.items())


@dataclass(frozen=True, slots=True)
class StreamOptions:
    slot: str
    publication: str
    start_lsn: int
    protocol_version: int
    streaming: str  # off | on | parallel
    stream_immediately: bool  # PG16+: debug_logical_replication_streaming=immediate


def choose_options(
    server_version: int, slot: str, publication: str, start_lsn: int, stream_in_progress: str
) -> StreamOptions:
    """The highest protocol the server offers, with streaming as configured."""
    major = server_version // 10000
    if major >= 16:
        protocol, streaming = 4, "parallel"  # parallel: Stream Abort carries abort LSN and time
    elif major == 15:
        protocol, streaming = 3, "on"
    elif major == 14:
        protocol, streaming = 2, "on"
    else:
        protocol, streaming = 1, "off"
    immediate = stream_in_progress != "off" and major >= 16
    if stream_in_progress == "on" and major < 16:
        # Streaming stays on (large transactions), but not every transaction is streamed.
        immediate = False
    return StreamOptions(slot, publication, start_lsn, protocol, streaming, immediate)


def start_command(options: StreamOptions) -> sql.Composed:
    """The START_REPLICATION command for ``options`` (pgoutput, logical messages on)."""
    return sql.SQL(
        "START_REPLICATION SLOT {} LOGICAL {} (proto_version {}, publication_names {}, messages 'true'{})"
    ).format(
        sql.Identifier(options.slot),
        sql.SQL(format_lsn(options.start_lsn)),
        sql.Literal(str(options.protocol_version)),
        sql.Literal(options.publication),
        sql.SQL(", streaming {}").format(sql.Literal(options.streaming))
        if options.streaming != "off"
        else sql.SQL(""),
    )


class ReplicationStream:
    """One START_REPLICATION session; closed and reopened by the daemon on failure."""

    def __init__(self, dsn: str, *, connect_timeout: float = 10, timeout: float = 30) -> None:
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self._conn: psycopg.Connection[Any] | None = None
        self.options: StreamOptions | None = None
        self.server_version = 0
        self.system_id: str | None = None
        # The server this connection reached (libpq picks one among a multi-host DSN's), its
        # timeline and whether it is a standby: what cdc/capture/failover.py checks.
        self.host = ""
        self.timeline = 0
        self.in_hot_standby = False
        self.last_received_lsn = 0
        # Silence watch: when the last message came, when the first unanswered ping went out,
        # and the last positions reported (a ping repeats them: it never acknowledges more).
        self._heard_at = time.monotonic()
        self._ping_at: float | None = None
        self._last_ping = 0.0
        self._status = (0, 0, 0)
        self._notices: list[_Notice] = []

    def _deadline(self) -> Deadline:
        """No query on the source may wait longer than ``timeout``."""
        return Deadline(self._conn_or_raise(), self.timeout, self._silent)

    def _silent(self, what: str) -> SourceUnavailableError:
        return SourceUnavailableError(f"the source went silent ({redact_dsn(self.dsn)}): {what}")

    def _conn_or_raise(self) -> psycopg.Connection[Any]:
        if self._conn is None:
            raise SourceUnavailableError("replication connection is closed")
        return self._conn

    def connect(self, settings: dict[str, str] | None = None) -> None:
        all_settings = dict(OUTPUT_SETTINGS)
        all_settings.update(settings or {})
        try:
            self._conn = psycopg.connect(
                self.dsn,
                replication="database",
                autocommit=True,
                connect_timeout=int(self.connect_timeout),
                options=options_string(all_settings),
            )
        except psycopg.OperationalError as exc:
            text = str(exc)
            if "replication" in text and ("permission" in text or "must be" in text or "pg_hba" in text):
                raise SetupError(
                    f"the source refuses replication connections ({redact_dsn(self.dsn)}): {text.strip()}",
                    hint="grant the REPLICATION attribute (ALTER ROLE ... REPLICATION) and allow "
                    "'replication' in pg_hba.conf",
                ) from exc
            raise SourceUnavailableError(
                f"cannot reach the source ({redact_dsn(self.dsn)}): {text.strip()}"
            ) from exc
        self.server_version = self._conn.info.server_version
        # The walsender reports some trouble as warnings, not errors (PostgreSQL 18 skips a
        # publication that does not exist with a WARNING): collected, then read by read().
        self._conn.add_notice_handler(lambda diag: self._notices.append(_Notice.of(diag)))
        try:
            with self._deadline():
                row = self._conn.execute("IDENTIFY_SYSTEM").fetchone()
        except psycopg.OperationalError as exc:
            raise SourceUnavailableError(f"cannot identify the source: {exc}") from exc
        self.system_id = str(row[0]) if row else None
        self.timeline = int(row[1]) if row else 0
        self.host = connected_host(self._conn)
        self.in_hot_standby = self._conn.info.parameter_status("in_hot_standby") == "on"

    def timeline_history(self, timeline: int) -> str:
        """The server's history file of ``timeline`` (> 1): the timelines it descends from."""
        try:
            with self._deadline():
                row = self._conn_or_raise().execute(f"TIMELINE_HISTORY {int(timeline)}").fetchone()
        except psycopg.OperationalError as exc:
            raise SourceUnavailableError(f"cannot read the source's timeline history: {exc}") from exc
        content = row[1] if row else b""
        return content.decode() if isinstance(content, bytes) else str(content or "")

    def slot_info(self, slot: str) -> tuple[str, int | None, str | None] | None:
        """(plugin, confirmed_flush_lsn, wal_status) of the slot, or None if it does not exist.

        Asked on a normal connection: replication connections cannot read the catalog views.
        """
        try:
            with psycopg.connect(
                self.dsn, autocommit=True, connect_timeout=int(self.connect_timeout)
            ) as conn:
                has_wal_status = conn.info.server_version >= 130000
                wal_status = "wal_status" if has_wal_status else "NULL"
                with Deadline(conn, self.timeout, self._silent):
                    row = conn.execute(
                        f"SELECT plugin, confirmed_flush_lsn::text, {wal_status} "
                        "FROM pg_replication_slots WHERE slot_name = %s AND database = current_database()",
                        (slot,),
                    ).fetchone()
        except psycopg.OperationalError as exc:
            raise SourceUnavailableError(f"cannot reach the source ({redact_dsn(self.dsn)}): {exc}") from exc
        if row is None:
            return None
        confirmed = parse_lsn(row[1]) if row[1] else None
        return str(row[0]), confirmed, row[2]

    def start(self, options: StreamOptions) -> None:
        assert self._conn is not None
        command = start_command(options)
        try:
            with self._deadline():
                self._conn.execute(command)
        except psycopg.errors.UndefinedObject as exc:
            raise SlotLostError(
                f"replication slot {options.slot!r} does not exist on the source: "
                "changes made since it was dropped are lost to capture",
                hint="run `cdc setup` to create it again (a gap will be recorded); "
                "check who dropped it (pg_replication_slots)",
            ) from exc
        except psycopg.errors.ObjectNotInPrerequisiteState as exc:
            raise SlotLostError(
                f"replication slot {options.slot!r} can no longer be used: {exc}",
                hint="the slot was invalidated (max_slot_wal_keep_size?); run `cdc teardown` then "
                "`cdc setup` to start a new baseline",
            ) from exc
        except psycopg.errors.ObjectInUse as exc:
            raise SourceUnavailableError(
                f"replication slot {options.slot!r} is in use by another process"
            ) from exc
        except psycopg.OperationalError as exc:
            raise SourceUnavailableError(f"replication stopped: {exc}") from exc
        except psycopg.Error as exc:
            raise SetupError(f"START_REPLICATION failed: {exc}") from exc
        self.options = options
        self._heard_at = time.monotonic()
        self._ping_at = None
        self._status = (options.start_lsn, options.start_lsn, options.start_lsn)

    def read(self, timeout: float) -> XLogData | PrimaryKeepalive | StandbyStatusUpdate | None:
        """The next frame, or None when none arrives within ``timeout`` seconds.

        Raises SourceUnavailableError when the source ended the stream (with the server's
        error, if it sent one) or stayed silent past ``self.timeout`` although pinged.
        """
        conn = self._conn_or_raise()
        pgconn = conn.pgconn
        deadline = time.monotonic() + timeout
        while True:
            try:
                nbytes, data = pgconn.get_copy_data(1)
            except psycopg.Error as exc:
                raise SourceUnavailableError(f"replication stream broken: {exc}") from exc
            if self._notices:
                self._check_notices()
            if nbytes > 0:
                self._heard_at = time.monotonic()
                self._ping_at = None
                frame = parse_copy_data(bytes(data))
                if isinstance(frame, XLogData):
                    self.last_received_lsn = max(self.last_received_lsn, frame.wal_end, frame.wal_start)
                return frame
            if nbytes < 0:
                raise self._ended(pgconn)
            remaining = max(0.0, deadline - time.monotonic())
            try:
                # At most a second per wait, so that silence is checked while waiting.
                ready, _, _ = select.select([pgconn.socket], [], [], min(remaining, 1.0))
                if ready:
                    pgconn.consume_input()
                    continue
            except (OSError, psycopg.Error) as exc:
                raise SourceUnavailableError(f"replication stream broken: {exc}") from exc
            # Nothing buffered, nothing on the socket: is the source still there?
            self._watch_silence()
            if time.monotonic() >= deadline:
                return None

    # -- for a caller reading the stream itself (the capture session: core.drain(pgconn)) --
    @property
    def pgconn(self) -> Any:
        """The libpq connection in COPY_BOTH, for reading CopyData without ``read``."""
        return self._conn_or_raise().pgconn

    def heard(self) -> None:
        """The caller received a message: the source is there."""
        self._heard_at = time.monotonic()
        self._ping_at = None
        if self._notices:
            self._check_notices()

    def watch_silence(self) -> None:
        """The caller found nothing to read: ping a quiet source, give up on a silent one."""
        if self._notices:
            self._check_notices()
        self._watch_silence()

    def ended(self) -> SourceUnavailableError:
        """The error to raise when the caller found that the source ended the COPY."""
        return self._ended(self._conn_or_raise().pgconn)

    def _check_notices(self) -> None:
        """Log what the server said; a publication it skips is an error (nothing captured)."""
        notices, self._notices[:] = list(self._notices), []
        for notice in notices:
            severity = notice.severity
            fields = {
                "severity": severity,
                "sqlstate": notice.sqlstate,
                "message": notice.message,
                "detail": notice.detail,
                "hint": notice.hint,
            }
            if severity == "WARNING":
                log.warning("source_warning", **fields)
            else:
                log.info("source_notice", **fields)
            names = self.options.publication.split(",") if self.options else []
            message = notice.message or ""
            if (
                severity == "WARNING"
                and notice.sqlstate in ("55000", "42704")
                and any(f'"{name}"' in message for name in names)
            ):
                # PostgreSQL 18+ decodes on without the publication: nothing would be captured
                # while the slot moves on. Earlier versions end replication with an error.
                detail = f" ({notice.detail})" if notice.detail else ""
                raise SourceUnavailableError(
                    f"the source skips the publication: {message}{detail}",
                    hint="create the publication (`cdc setup`) or fix source.publication; if it was "
                    "dropped and created again, run `cdc setup --recreate-slot` (a gap is recorded)",
                )

    def _watch_silence(self) -> None:
        """Ping after a third of ``timeout`` without a message; give up after ``timeout``.

        Given up only once a ping has gone unanswered for half the timeout, so a daemon
        that did not read for a while (a slow store) first asks before judging.
        """
        now = time.monotonic()
        silent = now - self._heard_at
        if silent < self.timeout / 3:
            return
        if self._ping_at is not None and silent >= self.timeout and now - self._ping_at >= self.timeout / 2:
            raise SourceUnavailableError(
                f"the source went silent: no message on the replication stream for {silent:.0f}s "
                f"(source.timeout_seconds={self.timeout:g})",
                hint="the network path to the source or the source itself is failing; reconnecting",
            )
        if now - self._last_ping >= self.timeout / 3:
            self._last_ping = now
            if self._ping_at is None:
                self._ping_at = now
            written, flushed, applied = self._status
            self.send_status(written, flushed, applied, reply=True)

    def _ended(self, pgconn: Any) -> SourceUnavailableError:
        """The error for a COPY the server ended: its ErrorResponse comes in the next result."""
        message = sqlstate = hint = None
        deadline = time.monotonic() + min(5.0, self.timeout)
        try:
            for _ in range(10):  # the error, then the end of the command
                while pgconn.is_busy():  # never block on a result: the source may be gone
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError
                    ready, _, _ = select.select([pgconn.socket], [], [], remaining)
                    if ready:
                        pgconn.consume_input()
                result = pgconn.get_result()
                if result is None:
                    break
                if result.status == ExecStatus.FATAL_ERROR and message is None:
                    message = _field(result, DiagnosticField.MESSAGE_PRIMARY) or (
                        result.error_message.decode("utf-8", "replace").strip()
                    )
                    sqlstate = _field(result, DiagnosticField.SQLSTATE)
                    detail = _field(result, DiagnosticField.MESSAGE_DETAIL)
                    if detail:
                        message = f"{message} ({detail})"
                    hint = _field(result, DiagnosticField.MESSAGE_HINT)
        except (OSError, TimeoutError, psycopg.Error):
            pass  # what was read is all there is
        if message is None:
            text = pgconn.get_error_message().strip()
            return SourceUnavailableError(f"the source ended replication: {text or 'connection closed'}")
        if sqlstate == "42704" and hint is None:  # undefined_object: publication (or slot) missing
            hint = "check source.publication and source.slot; `cdc setup` creates them"
        state = f" [SQLSTATE {sqlstate}]" if sqlstate else ""
        return SourceUnavailableError(f"the source ended replication: {message}{state}", hint=hint)

    def send_status(self, written: int, flushed: int, applied: int, reply: bool = False) -> None:
        conn = self._conn
        if conn is None:
            return
        pgconn = conn.pgconn
        self._status = (written, flushed, applied)
        try:
            pgconn.put_copy_data(encode_standby_status(written, flushed, applied, now_pg_time(), reply))
            pgconn.flush()
        except psycopg.Error as exc:
            raise SourceUnavailableError(f"cannot send standby status: {exc}") from exc

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None


@dataclass(frozen=True, slots=True)
class _Notice:
    """A server notice, copied: psycopg's Diagnostic is only valid during the callback."""

    severity: str
    sqlstate: str | None
    message: str | None
    detail: str | None
    hint: str | None

    @classmethod
    def of(cls, diag: psycopg.errors.Diagnostic) -> _Notice:
        return cls(
            diag.severity_nonlocalized or diag.severity or "NOTICE",
            diag.sqlstate,
            diag.message_primary,
            diag.message_detail,
            diag.message_hint,
        )


def _field(result: Any, field: DiagnosticField) -> str | None:
    value = result.error_field(field)
    return value.decode("utf-8", "replace") if value else None
