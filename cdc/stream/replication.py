"""The replication connection: the only code that speaks the streaming protocol.

psycopg 3 has no replication API, but a ``replication="database"`` connection accepts
``START_REPLICATION`` and enters COPY_BOTH; frames are read with ``get_copy_data``
(non-blocking, waiting on the socket) and standby status updates are written with
``put_copy_data``. Frame parsing lives in ``cdc.protocol.frames``; this module only
moves bytes and decides which options the server supports.
"""

from __future__ import annotations

import select
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

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


class ReplicationStream:
    """One START_REPLICATION session; closed and reopened by the daemon on failure."""

    def __init__(self, dsn: str, *, connect_timeout: float = 10) -> None:
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self._conn: psycopg.Connection[Any] | None = None
        self.options: StreamOptions | None = None
        self.server_version = 0
        self.system_id: str | None = None
        self.last_received_lsn = 0

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
        row = self._conn.execute("IDENTIFY_SYSTEM").fetchone()
        self.system_id = str(row[0]) if row else None

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
        command = sql.SQL(
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
        try:
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

    def read(self, timeout: float) -> XLogData | PrimaryKeepalive | StandbyStatusUpdate | None:
        """The next frame, or None when none arrives within ``timeout`` seconds."""
        conn = self._conn
        if conn is None:
            raise SourceUnavailableError("replication connection is closed")
        pgconn = conn.pgconn
        deadline = time.monotonic() + timeout
        while True:
            try:
                nbytes, data = pgconn.get_copy_data(1)
            except psycopg.Error as exc:
                raise SourceUnavailableError(f"replication stream broken: {exc}") from exc
            if nbytes > 0:
                frame = parse_copy_data(bytes(data))
                if isinstance(frame, XLogData):
                    self.last_received_lsn = max(self.last_received_lsn, frame.wal_end, frame.wal_start)
                return frame
            if nbytes < 0:
                message = pgconn.get_error_message()
                raise SourceUnavailableError(
                    f"the source ended replication: {message or 'connection closed'}".strip()
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                ready, _, _ = select.select([pgconn.socket], [], [], remaining)
                if ready:
                    pgconn.consume_input()
            except (OSError, psycopg.Error) as exc:
                raise SourceUnavailableError(f"replication stream broken: {exc}") from exc

    def send_status(self, written: int, flushed: int, applied: int, reply: bool = False) -> None:
        conn = self._conn
        if conn is None:
            return
        pgconn = conn.pgconn
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
