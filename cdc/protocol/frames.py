"""CopyBoth frames of PostgreSQL's streaming replication protocol, and time helpers.

Parses the CopyData payloads a walsender sends during START_REPLICATION
(XLogData 'w', primary keepalive 'k'; standby status updates 'r' too, for tests
and tools) and encodes the standby status update the client sends back.
Server times are ints: microseconds since 2000-01-01 00:00 UTC, as on the wire.

This module must not do I/O, open sockets or import a database driver: it only
turns bytes into values and back. Malformed frames raise
``cdc.errors.ProtocolError``; bad arguments from the caller (a naive datetime,
an LSN that does not fit in 64 bits) raise ``cdc.errors.UsageError``.

Format reference: PostgreSQL docs, "Streaming Replication Protocol".
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from cdc.errors import ProtocolError, UsageError

__all__ = [
    "PG_EPOCH_OFFSET_US",
    "PrimaryKeepalive",
    "StandbyStatusUpdate",
    "XLogData",
    "datetime_to_pg_time",
    "encode_standby_status",
    "now_pg_time",
    "parse_copy_data",
    "pg_time_to_datetime",
]

#: Microseconds from the Unix epoch (1970-01-01) to the PostgreSQL epoch (2000-01-01).
PG_EPOCH_OFFSET_US: Final = 946_684_800_000_000

_PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)
_ONE_US: Final = timedelta(microseconds=1)


@dataclass(slots=True, unsafe_hash=True)
class XLogData:
    """'w': a chunk of WAL data; for logical replication ``payload`` is one pgoutput message."""

    wal_start: int
    wal_end: int
    send_time: int
    payload: bytes


@dataclass(slots=True, unsafe_hash=True)
class PrimaryKeepalive:
    """'k': the server's current WAL end; ``reply_requested`` asks for a status update now."""

    wal_end: int
    send_time: int
    reply_requested: bool


@dataclass(slots=True, unsafe_hash=True)
class StandbyStatusUpdate:
    """'r': the client's progress report (sent by the client, parsed for tests and tools)."""

    written: int
    flushed: int
    applied: int
    send_time: int
    reply_requested: bool


_XLOG_HEADER = struct.Struct("!QQq")  # wal_start, wal_end, send_time
_KEEPALIVE = struct.Struct("!QqB")  # wal_end, send_time, reply_requested
_STATUS = struct.Struct("!QQQqB")  # written, flushed, applied, send_time, reply_requested
_STATUS_FRAME = struct.Struct("!cQQQqB")  # the same with the 'r' tag in front

_XLOG_HEADER_END: Final = 1 + _XLOG_HEADER.size  # 25
_KEEPALIVE_LEN: Final = 1 + _KEEPALIVE.size  # 18
_STATUS_LEN: Final = 1 + _STATUS.size  # 34

_TAG_XLOG: Final = 0x77  # 'w'
_TAG_KEEPALIVE: Final = 0x6B  # 'k'
_TAG_STATUS: Final = 0x72  # 'r'


def _reply_flag(value: int, what: str) -> bool:
    if value > 1:
        raise ProtocolError(f"malformed {what} frame: reply-requested byte is {value}, expected 0 or 1")
    return value == 1


def parse_copy_data(data: bytes | memoryview) -> XLogData | PrimaryKeepalive | StandbyStatusUpdate:
    """Parse one CopyData payload of a replication stream ('w', 'k' or 'r')."""
    if type(data) is not bytes and (not isinstance(data, memoryview) or data.format != "B"):
        data = bytes(data)  # bytearray, or a memoryview whose items are not single bytes
    size = len(data)
    if size == 0:
        raise ProtocolError("empty CopyData frame in the replication stream")
    tag = data[0]
    if tag == _TAG_XLOG:
        if size < _XLOG_HEADER_END:
            raise ProtocolError(f"malformed XLogData frame: {size} bytes, the header alone is 25")
        wal_start, wal_end, send_time = _XLOG_HEADER.unpack_from(data, 1)
        return XLogData(wal_start, wal_end, send_time, bytes(data[_XLOG_HEADER_END:]))
    if tag == _TAG_KEEPALIVE:
        if size != _KEEPALIVE_LEN:
            raise ProtocolError(f"malformed primary keepalive frame: {size} bytes, expected 18")
        wal_end, send_time, reply = _KEEPALIVE.unpack_from(data, 1)
        return PrimaryKeepalive(wal_end, send_time, _reply_flag(reply, "primary keepalive"))
    if tag == _TAG_STATUS:
        if size != _STATUS_LEN:
            raise ProtocolError(f"malformed standby status update frame: {size} bytes, expected 34")
        written, flushed, applied, send_time, reply = _STATUS.unpack_from(data, 1)
        return StandbyStatusUpdate(
            written, flushed, applied, send_time, _reply_flag(reply, "standby status update")
        )
    raise ProtocolError(f"unknown CopyData frame type {tag:#04x} ({chr(tag)!r}) in the replication stream")


def encode_standby_status(
    written: int, flushed: int, applied: int, send_time: int, reply_requested: bool = False
) -> bytes:
    """Encode a standby status update ('r') to send as CopyData.

    ``written``/``flushed``/``applied`` are LSNs (0 to 2**64-1), ``send_time``
    is microseconds since 2000-01-01 UTC (see ``now_pg_time``).
    """
    try:
        return _STATUS_FRAME.pack(b"r", written, flushed, applied, send_time, 1 if reply_requested else 0)
    except struct.error as exc:
        raise UsageError(
            "cannot encode standby status update: LSNs must be ints in 0..2**64-1 "
            "and send_time an int in the signed 64-bit range"
        ) from exc


def pg_time_to_datetime(us: int) -> datetime:
    """Convert microseconds since 2000-01-01 UTC into an aware UTC datetime."""
    try:
        return _PG_EPOCH + timedelta(microseconds=us)
    except OverflowError as exc:
        raise ProtocolError(f"server timestamp {us} is outside the range Python datetimes can hold") from exc


def datetime_to_pg_time(dt: datetime) -> int:
    """Convert an aware datetime into microseconds since 2000-01-01 UTC."""
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise UsageError(f"datetime {dt.isoformat()} has no time zone; pass an aware datetime")
    return (dt - _PG_EPOCH) // _ONE_US


def now_pg_time() -> int:
    """The current time in microseconds since 2000-01-01 UTC."""
    return time.time_ns() // 1000 - PG_EPOCH_OFFSET_US
