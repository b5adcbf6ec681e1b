"""Decoder for the pgoutput logical replication messages, protocol versions 1 to 4.

One call turns one message payload (the bytes carried by an XLogData frame) into
one of the slotted dataclasses of :mod:`cdc.protocol.messages` (re-exported here).
Times stay ints (microseconds since 2000-01-01 UTC) and LSNs stay ints, exactly as on
the wire; see ``cdc.protocol.frames`` for conversions.

This module must not do I/O, open sockets, import a database driver or know
anything about the rest of cdc: it only parses bytes. It sits on the hot path,
so it uses precompiled ``struct.Struct`` objects and offsets into one ``bytes``
object instead of small helper calls and copies.

Every malformed payload (truncated, trailing bytes, unknown tags or tuple kinds,
invalid UTF-8, impossible lengths) raises ``cdc.errors.ProtocolError``; no other
exception escapes ``decode``. Error messages name the message type and offsets,
never row values. A bad argument from the caller (an unknown protocol version)
raises ``cdc.errors.UsageError``.

Format reference: PostgreSQL docs, "Logical Replication Message Formats", and
``src/backend/replication/logical/proto.c``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import fields
from typing import Final, TypeAlias

from cdc.errors import ProtocolError, UsageError
from cdc.protocol.messages import (
    UNCHANGED_TOAST,
    Begin,
    BeginPrepare,
    Column,
    Commit,
    CommitPrepared,
    Delete,
    Insert,
    Message,
    Origin,
    PgOutputMessage,
    Prepare,
    Relation,
    RollbackPrepared,
    StreamAbort,
    StreamCommit,
    StreamPrepare,
    StreamStart,
    StreamStop,
    Truncate,
    TupleData,
    Type,
    UnchangedToast,
    Update,
)

__all__ = [
    "UNCHANGED_TOAST",
    "Begin",
    "BeginPrepare",
    "Column",
    "Commit",
    "CommitPrepared",
    "Decoder",
    "Delete",
    "Insert",
    "Message",
    "Origin",
    "PgOutputMessage",
    "Prepare",
    "Relation",
    "RollbackPrepared",
    "StreamAbort",
    "StreamCommit",
    "StreamPrepare",
    "StreamStart",
    "StreamStop",
    "Truncate",
    "TupleData",
    "Type",
    "Update",
    "decode_message",
]

# --------------------------------------------------------------------------- wire layout

_u16 = struct.Struct("!H").unpack_from
_u32 = struct.Struct("!I").unpack_from
_u32x2 = struct.Struct("!II").unpack_from
_u64 = struct.Struct("!Q").unpack_from
_begin = struct.Struct("!QqI").unpack_from  # final_lsn, commit_time, xid
_commit = struct.Struct("!BQQq").unpack_from  # flags, commit_lsn, end_lsn, commit_time
_column_type = struct.Struct("!Ii").unpack_from  # type oid, type modifier
_truncate = struct.Struct("!IB").unpack_from  # number of relations, options
_message = struct.Struct("!BQ").unpack_from  # flags, lsn
_stream_start = struct.Struct("!IB").unpack_from  # xid, first segment
_stream_commit = struct.Struct("!IBQQq").unpack_from  # xid, flags, commit_lsn, end_lsn, time
_abort_info = struct.Struct("!Qq").unpack_from  # abort_lsn, abort_time (protocol 4, parallel)
_begin_prepare = struct.Struct("!QQqI").unpack_from  # prepare_lsn, end_lsn, time, xid
_prepare = struct.Struct("!BQQqI").unpack_from  # flags, lsn, end_lsn, time, xid
_rollback_prepared = struct.Struct("!BQQqqI").unpack_from  # flags, 2 lsns, 2 times, xid

_TUPLE_NEW: Final = 0x4E  # 'N'
_TUPLE_KEY: Final = 0x4B  # 'K'
_TUPLE_OLD: Final = 0x4F  # 'O'

_REPLICA_IDENTITIES: Final = frozenset("dnfi")

_Parser: TypeAlias = Callable[[bytes, bool], PgOutputMessage]

# Everything a parser can raise on malformed bytes besides ProtocolError itself:
# short buffers (struct.error, IndexError) and bad UTF-8 (UnicodeDecodeError is
# a ValueError). Lengths are checked before anything is allocated from them.
_DECODE_ERRORS: Final = (struct.error, IndexError, ValueError)


# A frozen dataclass's generated __init__ stores every field through
# object.__setattr__, which costs about as much as decoding a whole row. The
# row messages are therefore built by allocating the instance and storing
# through the slot descriptors: the same object for a third of the cost.
_new = object.__new__


def _slot_setters(cls: type, names: tuple[str, ...]) -> tuple[Callable[[object, object], None], ...]:
    if tuple(f.name for f in fields(cls)) != names:  # keeps the fast path in step with the class
        raise RuntimeError(f"{cls.__name__} fields changed; update the fast constructor")
    return tuple(cls.__dict__[name].__set__ for name in names)


_insert_xid, _insert_oid, _insert_new = _slot_setters(Insert, ("xid", "relation_oid", "new"))
_update_xid, _update_oid, _update_old, _update_old_kind, _update_new = _slot_setters(
    Update, ("xid", "relation_oid", "old", "old_kind", "new")
)
_delete_xid, _delete_oid, _delete_old, _delete_old_kind = _slot_setters(
    Delete, ("xid", "relation_oid", "old", "old_kind")
)


def _fail(what: str, data: bytes, detail: str) -> ProtocolError:
    return ProtocolError(
        f"malformed pgoutput {what} message ({len(data)} bytes): {detail}",
        hint="the replication stream is corrupt or the negotiated proto_version is not the one decoded",
    )


def _read_tuple(data: bytes, pos: int, what: str) -> tuple[TupleData, int]:
    """Read TupleData starting at ``pos``; return it and the offset after it.

    Hot path: the kind bytes are compared as int literals, and a value length
    running past the end is caught once after the loop (a slice past the end
    just comes back short, and the next read past the end raises IndexError).
    """
    (natts,) = _u16(data, pos)
    pos += 2
    values: list[str | bytes | UnchangedToast | None] = [None] * natts
    for i in range(natts):
        kind = data[pos]
        if kind == 0x74:  # 't': text
            (length,) = _u32(data, pos + 1)
            pos += 5
            stop = pos + length
            values[i] = data[pos:stop].decode()
            pos = stop
        elif kind == 0x6E:  # 'n': NULL (already in place)
            pos += 1
        elif kind == 0x75:  # 'u': unchanged TOAST value
            values[i] = UNCHANGED_TOAST
            pos += 1
        elif kind == 0x62:  # 'b': binary
            (length,) = _u32(data, pos + 1)
            pos += 5
            stop = pos + length
            values[i] = data[pos:stop]
            pos = stop
        else:
            raise _fail(what, data, f"unknown tuple column kind {kind:#04x} at offset {pos}")
    if pos > len(data):
        raise _fail(what, data, f"a column value runs {pos - len(data)} bytes past the end")
    return tuple(values), pos


def _read_string(data: bytes, pos: int, what: str) -> tuple[str, int]:
    """Read a NUL-terminated UTF-8 string at ``pos``; return it and the offset after the NUL."""
    stop = data.find(b"\x00", pos)
    if stop < 0:
        raise _fail(what, data, f"string at offset {pos} is not NUL-terminated")
    return data[pos:stop].decode(), stop + 1


def _check_end(data: bytes, pos: int, what: str) -> None:
    if pos != len(data):
        raise _fail(what, data, f"{len(data) - pos} unexpected trailing bytes at offset {pos}")


# --------------------------------------------------------------------------- parsers
# Each parser gets the whole payload (tag byte at offset 0) and whether the
# decoder is inside a streamed block, and must consume the payload exactly.


def _parse_begin(data: bytes, in_stream: bool) -> Begin:
    final_lsn, commit_time, xid = _begin(data, 1)
    _check_end(data, 21, "Begin")
    return Begin(final_lsn, commit_time, xid)


def _parse_commit(data: bytes, in_stream: bool) -> Commit:
    flags, commit_lsn, end_lsn, commit_time = _commit(data, 1)
    _check_end(data, 26, "Commit")
    return Commit(flags, commit_lsn, end_lsn, commit_time)


def _parse_origin(data: bytes, in_stream: bool) -> Origin:
    (commit_lsn,) = _u64(data, 1)
    name, pos = _read_string(data, 9, "Origin")
    _check_end(data, pos, "Origin")
    return Origin(commit_lsn, name)


def _parse_relation(data: bytes, in_stream: bool) -> Relation:
    if in_stream:
        xid, oid = _u32x2(data, 1)
        pos = 9
    else:
        xid = None
        (oid,) = _u32(data, 1)
        pos = 5
    namespace, pos = _read_string(data, pos, "Relation")
    name, pos = _read_string(data, pos, "Relation")
    identity = chr(data[pos])
    if identity not in _REPLICA_IDENTITIES:
        raise _fail("Relation", data, f"unknown replica identity {identity!r}")
    (natts,) = _u16(data, pos + 1)
    pos += 3
    columns = []
    find = data.find
    for _ in range(natts):
        flags = data[pos]
        stop = find(b"\x00", pos + 1)
        if stop < 0:
            raise _fail("Relation", data, f"column name at offset {pos + 1} is not NUL-terminated")
        column_name = data[pos + 1 : stop].decode()
        type_oid, type_modifier = _column_type(data, stop + 1)
        pos = stop + 9
        columns.append(Column(flags, column_name, type_oid, type_modifier))
    _check_end(data, pos, "Relation")
    return Relation(xid, oid, namespace, name, identity, tuple(columns))


def _parse_type(data: bytes, in_stream: bool) -> Type:
    if in_stream:
        xid, oid = _u32x2(data, 1)
        pos = 9
    else:
        xid = None
        (oid,) = _u32(data, 1)
        pos = 5
    namespace, pos = _read_string(data, pos, "Type")
    name, pos = _read_string(data, pos, "Type")
    _check_end(data, pos, "Type")
    return Type(xid, oid, namespace, name)


def _parse_insert(data: bytes, in_stream: bool) -> Insert:
    if in_stream:
        xid, relation_oid = _u32x2(data, 1)
        pos = 9
    else:
        xid = None
        (relation_oid,) = _u32(data, 1)
        pos = 5
    if data[pos] != _TUPLE_NEW:
        raise _fail("Insert", data, f"expected 'N' at offset {pos}, got {data[pos]:#04x}")
    new, pos = _read_tuple(data, pos + 1, "Insert")
    if pos != len(data):
        raise _fail("Insert", data, f"{len(data) - pos} unexpected trailing bytes at offset {pos}")
    message: Insert = _new(Insert)
    _insert_xid(message, xid)
    _insert_oid(message, relation_oid)
    _insert_new(message, new)
    return message


def _parse_update(data: bytes, in_stream: bool) -> Update:
    if in_stream:
        xid, relation_oid = _u32x2(data, 1)
        pos = 9
    else:
        xid = None
        (relation_oid,) = _u32(data, 1)
        pos = 5
    kind = data[pos]
    old: TupleData | None = None
    old_kind: str | None = None
    if kind in (_TUPLE_KEY, _TUPLE_OLD):
        old_kind = "K" if kind == _TUPLE_KEY else "O"
        old, pos = _read_tuple(data, pos + 1, "Update")
        kind = data[pos]
    if kind != _TUPLE_NEW:
        raise _fail("Update", data, f"expected 'K', 'O' or 'N' at offset {pos}, got {kind:#04x}")
    new, pos = _read_tuple(data, pos + 1, "Update")
    _check_end(data, pos, "Update")
    message: Update = _new(Update)
    _update_xid(message, xid)
    _update_oid(message, relation_oid)
    _update_old(message, old)
    _update_old_kind(message, old_kind)
    _update_new(message, new)
    return message


def _parse_delete(data: bytes, in_stream: bool) -> Delete:
    if in_stream:
        xid, relation_oid = _u32x2(data, 1)
        pos = 9
    else:
        xid = None
        (relation_oid,) = _u32(data, 1)
        pos = 5
    kind = data[pos]
    if kind == _TUPLE_KEY:
        old_kind = "K"
    elif kind == _TUPLE_OLD:
        old_kind = "O"
    else:
        raise _fail("Delete", data, f"expected 'K' or 'O' at offset {pos}, got {kind:#04x}")
    old, pos = _read_tuple(data, pos + 1, "Delete")
    _check_end(data, pos, "Delete")
    message: Delete = _new(Delete)
    _delete_xid(message, xid)
    _delete_oid(message, relation_oid)
    _delete_old(message, old)
    _delete_old_kind(message, old_kind)
    return message


def _parse_truncate(data: bytes, in_stream: bool) -> Truncate:
    if in_stream:
        (xid,) = _u32(data, 1)
        pos = 5
    else:
        xid = None
        pos = 1
    count, options = _truncate(data, pos)
    pos += 5
    if len(data) - pos != 4 * count:
        raise _fail("Truncate", data, f"{count} relation oids announced, {len(data) - pos} bytes left")
    relation_oids = struct.unpack_from(f"!{count}I", data, pos)
    return Truncate(xid, options, relation_oids)


def _parse_message(data: bytes, in_stream: bool) -> Message:
    if in_stream:
        (xid,) = _u32(data, 1)
        pos = 5
    else:
        xid = None
        pos = 1
    flags, lsn = _message(data, pos)
    if flags > 1:
        raise _fail("Message", data, f"unknown flags {flags:#04x}")
    prefix, pos = _read_string(data, pos + 9, "Message")
    (length,) = _u32(data, pos)
    pos += 4
    if len(data) - pos != length:
        raise _fail("Message", data, f"content of {length} bytes announced, {len(data) - pos} bytes left")
    return Message(xid, flags == 1, lsn, prefix, data[pos:])


def _parse_stream_start(data: bytes, in_stream: bool) -> StreamStart:
    xid, first_segment = _stream_start(data, 1)
    if first_segment > 1:
        raise _fail("StreamStart", data, f"first-segment byte is {first_segment}, expected 0 or 1")
    _check_end(data, 6, "StreamStart")
    return StreamStart(xid, first_segment == 1)


def _parse_stream_stop(data: bytes, in_stream: bool) -> StreamStop:
    _check_end(data, 1, "StreamStop")
    return StreamStop()


def _parse_stream_commit(data: bytes, in_stream: bool) -> StreamCommit:
    xid, flags, commit_lsn, end_lsn, commit_time = _stream_commit(data, 1)
    _check_end(data, 30, "StreamCommit")
    return StreamCommit(xid, flags, commit_lsn, end_lsn, commit_time)


def _parse_stream_abort(data: bytes, in_stream: bool) -> StreamAbort:
    # The abort LSN and time follow only when the subscriber asked for
    # streaming 'parallel' (which needs protocol 4); with protocol 4 and
    # streaming 'on' they are absent. Nothing on the wire says which, so the
    # remaining length decides: 8 bytes left -> short form, 24 -> long form.
    xid, subxid = _u32x2(data, 1)
    if len(data) == 25:
        abort_lsn, abort_time = _abort_info(data, 9)
        return StreamAbort(xid, subxid, abort_lsn, abort_time)
    _check_end(data, 9, "StreamAbort")
    return StreamAbort(xid, subxid, None, None)


def _parse_stream_abort_v2(data: bytes, in_stream: bool) -> StreamAbort:
    # Protocols 2 and 3 never carry the abort LSN and time.
    xid, subxid = _u32x2(data, 1)
    _check_end(data, 9, "StreamAbort")
    return StreamAbort(xid, subxid, None, None)


def _parse_begin_prepare(data: bytes, in_stream: bool) -> BeginPrepare:
    prepare_lsn, end_lsn, prepare_time, xid = _begin_prepare(data, 1)
    gid, pos = _read_string(data, 29, "BeginPrepare")
    _check_end(data, pos, "BeginPrepare")
    return BeginPrepare(prepare_lsn, end_lsn, prepare_time, xid, gid)


def _parse_prepare(data: bytes, in_stream: bool) -> Prepare:
    flags, prepare_lsn, end_lsn, prepare_time, xid = _prepare(data, 1)
    gid, pos = _read_string(data, 30, "Prepare")
    _check_end(data, pos, "Prepare")
    return Prepare(flags, prepare_lsn, end_lsn, prepare_time, xid, gid)


def _parse_commit_prepared(data: bytes, in_stream: bool) -> CommitPrepared:
    flags, commit_lsn, end_lsn, commit_time, xid = _prepare(data, 1)
    gid, pos = _read_string(data, 30, "CommitPrepared")
    _check_end(data, pos, "CommitPrepared")
    return CommitPrepared(flags, commit_lsn, end_lsn, commit_time, xid, gid)


def _parse_rollback_prepared(data: bytes, in_stream: bool) -> RollbackPrepared:
    flags, prepare_end_lsn, rollback_end_lsn, prepare_time, rollback_time, xid = _rollback_prepared(data, 1)
    gid, pos = _read_string(data, 38, "RollbackPrepared")
    _check_end(data, pos, "RollbackPrepared")
    return RollbackPrepared(flags, prepare_end_lsn, rollback_end_lsn, prepare_time, rollback_time, xid, gid)


def _parse_stream_prepare(data: bytes, in_stream: bool) -> StreamPrepare:
    flags, prepare_lsn, end_lsn, prepare_time, xid = _prepare(data, 1)
    gid, pos = _read_string(data, 30, "StreamPrepare")
    _check_end(data, pos, "StreamPrepare")
    return StreamPrepare(flags, prepare_lsn, end_lsn, prepare_time, xid, gid)


# tag byte -> (message name, parser, first protocol version that has it)
_MESSAGE_TYPES: Final[dict[int, tuple[str, _Parser, int]]] = {
    ord("B"): ("Begin", _parse_begin, 1),
    ord("C"): ("Commit", _parse_commit, 1),
    ord("O"): ("Origin", _parse_origin, 1),
    ord("R"): ("Relation", _parse_relation, 1),
    ord("Y"): ("Type", _parse_type, 1),
    ord("I"): ("Insert", _parse_insert, 1),
    ord("U"): ("Update", _parse_update, 1),
    ord("D"): ("Delete", _parse_delete, 1),
    ord("T"): ("Truncate", _parse_truncate, 1),
    ord("M"): ("Message", _parse_message, 1),
    ord("S"): ("StreamStart", _parse_stream_start, 2),
    ord("E"): ("StreamStop", _parse_stream_stop, 2),
    ord("c"): ("StreamCommit", _parse_stream_commit, 2),
    ord("A"): ("StreamAbort", _parse_stream_abort, 2),
    ord("b"): ("BeginPrepare", _parse_begin_prepare, 3),
    ord("P"): ("Prepare", _parse_prepare, 3),
    ord("K"): ("CommitPrepared", _parse_commit_prepared, 3),
    ord("r"): ("RollbackPrepared", _parse_rollback_prepared, 3),
    ord("p"): ("StreamPrepare", _parse_stream_prepare, 3),
}

_NAMES: Final[dict[int, str]] = {tag: name for tag, (name, _, _) in _MESSAGE_TYPES.items()}


def _parsers_for(version: int) -> dict[int, _Parser]:
    parsers = {tag: parser for tag, (_, parser, since) in _MESSAGE_TYPES.items() if since <= version}
    if 2 <= version < 4:
        parsers[ord("A")] = _parse_stream_abort_v2
    return parsers


_ALL_PARSERS: Final = _parsers_for(4)


def _unknown_tag(tag: int, version: int) -> ProtocolError:
    name = _NAMES.get(tag)
    if name is None:
        return ProtocolError(f"unknown pgoutput message type {tag:#04x} ({chr(tag)!r})")
    return ProtocolError(
        f"pgoutput {name} message received, but it does not exist in protocol version {version}",
        hint="the Decoder must be built with the proto_version passed to START_REPLICATION",
    )


def _wrap(tag: int, data: bytes, exc: Exception) -> ProtocolError:
    what = _NAMES.get(tag, "?")
    if isinstance(exc, UnicodeDecodeError):
        return _fail(what, data, "a name or text value is not valid UTF-8")
    if isinstance(exc, IndexError):
        return _fail(what, data, "message ends too early")
    return _fail(what, data, f"{type(exc).__name__}: {exc}")


def decode_message(payload: bytes | memoryview, *, in_stream: bool) -> PgOutputMessage:
    """Decode one pgoutput message without any state.

    ``in_stream`` says whether the message sits between StreamStart and
    StreamStop, where Relation, Type, Insert, Update, Delete, Truncate and
    Message carry the xid of the (sub)transaction. Accepts the messages of
    every protocol version up to 4.
    """
    data = payload if type(payload) is bytes else bytes(payload)
    if not data:
        raise ProtocolError("empty pgoutput message")
    tag = data[0]
    parser = _ALL_PARSERS.get(tag)
    if parser is None:
        raise _unknown_tag(tag, 4)
    try:
        return parser(data, in_stream)
    except _DECODE_ERRORS as exc:
        raise _wrap(tag, data, exc) from exc


class Decoder:
    """Decodes the pgoutput messages of one replication session.

    The only state is whether the decoder is inside a streamed block (between
    StreamStart and StreamStop), which decides whether the change messages
    carry a leading xid. A StreamStart inside a block or a StreamStop outside
    one raises ProtocolError and leaves the state as it was. Messages that the
    given ``protocol_version`` does not have (streaming before 2, two-phase
    before 3, abort LSN/time before 4) raise ProtocolError too.
    """

    __slots__ = ("_in_stream", "_parsers", "protocol_version")

    def __init__(self, protocol_version: int = 1) -> None:
        if type(protocol_version) is not int or not 1 <= protocol_version <= 4:
            raise UsageError(f"unsupported pgoutput protocol version {protocol_version!r}: expected 1 to 4")
        self.protocol_version = protocol_version
        self._in_stream = False
        self._parsers = _parsers_for(protocol_version)

    @property
    def in_stream(self) -> bool:
        """True between a StreamStart and its StreamStop."""
        return self._in_stream

    def decode(self, payload: bytes | memoryview) -> PgOutputMessage:
        """Decode one message payload (the bytes of an XLogData frame)."""
        data = payload if type(payload) is bytes else bytes(payload)
        if not data:
            raise ProtocolError("empty pgoutput message")
        tag = data[0]
        parser = self._parsers.get(tag)
        if parser is None:
            raise _unknown_tag(tag, self.protocol_version)
        try:
            message = parser(data, self._in_stream)
        except _DECODE_ERRORS as exc:
            raise _wrap(tag, data, exc) from exc
        if tag == 0x53:  # 'S': StreamStart
            if self._in_stream:
                raise ProtocolError("pgoutput StreamStart received inside a streamed block")
            self._in_stream = True
        elif tag == 0x45:  # 'E': StreamStop
            if not self._in_stream:
                raise ProtocolError("pgoutput StreamStop received outside a streamed block")
            self._in_stream = False
        return message
