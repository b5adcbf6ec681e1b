"""Encoders of pgoutput messages and XLogData frames: the inverse of ``pgoutput``/``frames``.

For tests, fuzzing and benchmarks (synthetic replication streams); the daemon never sends
these. ``xid`` is given for messages inside a streamed block (it follows the tag there).
Tuple values: ``None`` (NULL, 'n'), ``UNCHANGED`` ('u'), or ``bytes``/``str`` (text, 't').
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

UNCHANGED: Final = object()

Value = bytes | str | object | None


def xlog(wal_start: int, payload: bytes, wal_end: int | None = None, send_time: int = 0) -> bytes:
    """A 'w' CopyData frame carrying one pgoutput message."""
    return (
        b"w" + struct.pack("!QQq", wal_start, wal_start if wal_end is None else wal_end, send_time) + payload
    )


def keepalive(wal_end: int, reply: bool = False, send_time: int = 0) -> bytes:
    return b"k" + struct.pack("!QqB", wal_end, send_time, 1 if reply else 0)


def _xid(xid: int | None) -> bytes:
    return b"" if xid is None else struct.pack("!I", xid)


def _cstr(text: str | bytes) -> bytes:
    return (text.encode() if isinstance(text, str) else text) + b"\x00"


def begin(final_lsn: int, commit_time: int, xid: int) -> bytes:
    return b"B" + struct.pack("!QqI", final_lsn, commit_time, xid)


def commit(commit_lsn: int, end_lsn: int, commit_time: int, flags: int = 0) -> bytes:
    return b"C" + struct.pack("!BQQq", flags, commit_lsn, end_lsn, commit_time)


def origin(commit_lsn: int, name: str) -> bytes:
    return b"O" + struct.pack("!Q", commit_lsn) + _cstr(name)


def relation(
    oid: int,
    namespace: str,
    name: str,
    identity: str,
    columns: Sequence[tuple[int, str | bytes, int, int]],  # (flags, name, type oid, type modifier)
    xid: int | None = None,
) -> bytes:
    out = [b"R", _xid(xid), struct.pack("!I", oid), _cstr(namespace), _cstr(name), identity.encode()]
    out.append(struct.pack("!H", len(columns)))
    for flags, column, type_oid, modifier in columns:
        out.append(bytes([flags]) + _cstr(column) + struct.pack("!Ii", type_oid, modifier))
    return b"".join(out)


def type_message(oid: int, namespace: str, name: str, xid: int | None = None) -> bytes:
    return b"Y" + _xid(xid) + struct.pack("!I", oid) + _cstr(namespace) + _cstr(name)


def tuple_data(values: Sequence[Value]) -> bytes:
    out = [struct.pack("!H", len(values))]
    for value in values:
        if value is None:
            out.append(b"n")
        elif value is UNCHANGED:
            out.append(b"u")
        else:
            raw = value.encode() if isinstance(value, str) else value
            assert isinstance(raw, bytes)
            out.append(b"t" + struct.pack("!I", len(raw)) + raw)
    return b"".join(out)


def insert(oid: int, new: Sequence[Value], xid: int | None = None) -> bytes:
    return b"I" + _xid(xid) + struct.pack("!I", oid) + b"N" + tuple_data(new)


def update(
    oid: int,
    new: Sequence[Value],
    old: Sequence[Value] | None = None,
    old_kind: str = "K",
    xid: int | None = None,
) -> bytes:
    head = b"U" + _xid(xid) + struct.pack("!I", oid)
    if old is not None:
        head += old_kind.encode() + tuple_data(old)
    return head + b"N" + tuple_data(new)


def delete(oid: int, old: Sequence[Value], old_kind: str = "K", xid: int | None = None) -> bytes:
    return b"D" + _xid(xid) + struct.pack("!I", oid) + old_kind.encode() + tuple_data(old)


def truncate(oids: Sequence[int], options: int = 0, xid: int | None = None) -> bytes:
    return (
        b"T"
        + _xid(xid)
        + struct.pack("!IB", len(oids), options)
        + b"".join(struct.pack("!I", o) for o in oids)
    )


def message(prefix: str, content: bytes, transactional: bool, lsn: int = 0, xid: int | None = None) -> bytes:
    return (
        b"M"
        + _xid(xid)
        + struct.pack("!BQ", 1 if transactional else 0, lsn)
        + _cstr(prefix)
        + struct.pack("!I", len(content))
        + content
    )


def stream_start(xid: int, first: bool) -> bytes:
    return b"S" + struct.pack("!IB", xid, 1 if first else 0)


def stream_stop() -> bytes:
    return b"E"


def stream_commit(xid: int, commit_lsn: int, end_lsn: int, commit_time: int, flags: int = 0) -> bytes:
    return b"c" + struct.pack("!IBQQq", xid, flags, commit_lsn, end_lsn, commit_time)


def stream_abort(xid: int, subxid: int, abort_lsn: int | None = None, abort_time: int | None = None) -> bytes:
    out = b"A" + struct.pack("!II", xid, subxid)
    if abort_lsn is not None:
        out += struct.pack("!Qq", abort_lsn, abort_time or 0)
    return out


def begin_prepare(prepare_lsn: int, end_lsn: int, prepare_time: int, xid: int, gid: str) -> bytes:
    return b"b" + struct.pack("!QQqI", prepare_lsn, end_lsn, prepare_time, xid) + _cstr(gid)


def prepare(prepare_lsn: int, end_lsn: int, prepare_time: int, xid: int, gid: str) -> bytes:
    return b"P" + struct.pack("!BQQqI", 0, prepare_lsn, end_lsn, prepare_time, xid) + _cstr(gid)


def stream_prepare(prepare_lsn: int, end_lsn: int, prepare_time: int, xid: int, gid: str) -> bytes:
    return b"p" + struct.pack("!BQQqI", 0, prepare_lsn, end_lsn, prepare_time, xid) + _cstr(gid)


def commit_prepared(commit_lsn: int, end_lsn: int, commit_time: int, xid: int, gid: str) -> bytes:
    return b"K" + struct.pack("!BQQqI", 0, commit_lsn, end_lsn, commit_time, xid) + _cstr(gid)


def rollback_prepared(
    prepare_end_lsn: int, rollback_end_lsn: int, prepare_time: int, rollback_time: int, xid: int, gid: str
) -> bytes:
    return (
        b"r"
        + struct.pack("!BQQqqI", 0, prepare_end_lsn, rollback_end_lsn, prepare_time, rollback_time, xid)
        + _cstr(gid)
    )
