"""The capture core in pure Python: replication frames in, `changes` COPY lines out.

The reference for ``_core.pyx`` (the compiled core), which mirrors it check for check: both
read the same bytes in the same order, so they raise the same ``ProtocolError`` at the same
point and build the same bytes (tests/unit/test_capture_core.py, test_capture_fuzz.py).

Per change, the COPY line is built when the change arrives, with the relation cache in force
then (a streamed transaction's Relation messages apply to it first, and to everyone once it
commits); what only the transaction's end tells (position, commit time, status, an aborted
subtransaction) is added by ``FinishedTransaction.chunks``. Each buffered change is a record:
a 14-byte header (record length, subxid, flags, split) and the line's middle,
``table_id \\t schema_id \\t op`` (up to ``split``) and ``\\t lsn \\t xid \\t key_text \\t image \\t
before \\t old_key_text \\t pending \\n``. Records are kept in memory up to the memory limit over
all open transactions; beyond it the largest transaction goes to an unlinked temp file.
"""

from __future__ import annotations

import re
import struct
import tempfile
from collections.abc import Callable, Iterator
from typing import IO, Any, Final

import orjson

from cdc.capture import _shared as sh
from cdc.capture import model
from cdc.capture.model import (
    BEFORE_FROM_WAL,
    KEY_UNKNOWN,
    OVERSIZE,
    ROLLED_BACK,
    STREAMED,
    ColumnDesc,
    Event,
    FinishedTransaction,
    LogicalMessage,
    RelationDesc,
    RelationInfo,
)
from cdc.errors import ProtocolError

__all__ = ["Core"]

_u16 = struct.Struct("!H").unpack_from
_u32 = struct.Struct("!I").unpack_from
_i32 = struct.Struct("!i").unpack_from
_u64 = struct.Struct("!Q").unpack_from
_i64 = struct.Struct("!q").unpack_from
_header = struct.Struct("<IIHI")
_pack_header = _header.pack
_HEADER: Final = sh.RECORD_HEADER

_INTEGER: Final = re.compile(rb"0|-?[1-9][0-9]*")
_DATA_TAGS: Final = frozenset(b"RYIUDTM")
_IDENTITIES: Final = frozenset(b"dnfi")
_NULL: Final = b"\\N"


class _Unchanged:
    """An unchanged TOAST value ('u'): no value was sent."""

    __slots__ = ()


_U: Final = _Unchanged()
Raw = bytes | _Unchanged | None


class _Rel:
    """A Relation message body's RelationInfo and what building lines needs from it."""

    __slots__ = ("ids", "info", "is_key", "key", "kinds", "names_json", "natts", "oid", "pending", "policies")

    def __init__(self, oid: int, info: RelationInfo) -> None:
        self.oid = oid
        self.info = info
        self.names_json, self.pending, self.ids, self.kinds, self.policies = sh.relation_texts(info)
        self.natts = len(info.names)
        self.key = list(info.key)
        self.is_key = [False] * self.natts
        for i in info.key:
            self.is_key[i] = True


class _Txn:
    """One open transaction's buffered records (in memory, or spilled to a temp file)."""

    __slots__ = (
        "aborted",
        "change_count",
        "counts",
        "file",
        "first_lsn",
        "flags_or",
        "mem",
        "messages",
        "origin",
        "overlay",
        "pending_count",
        "prefix",
        "spill_dir",
        "streamed",
        "time",
        "xid",
    )

    def __init__(self, xid: int, streamed: bool, first_lsn: int, spill_dir: str | None) -> None:
        self.xid = xid
        self.streamed = streamed
        self.first_lsn = first_lsn
        self.spill_dir = spill_dir
        self.mem = bytearray()
        self.file: IO[bytes] | None = None
        self.change_count = 0
        self.pending_count = 0
        self.origin: str | None = None
        self.messages: list[tuple[int, int, str, bytes]] = []
        self.overlay: dict[int, _Rel] | None = None
        self.aborted: set[int] | None = None
        self.counts: dict[tuple[int, str, int], int] = {}
        self.prefix = b""  # position \t (set when it finishes)
        self.time = b""  # committed_at \t (set when it finishes)
        self.flags_or = 0  # ROLLED_BACK for the whole transaction (set when it finishes)

    def flush(self) -> int:
        """Write the in-memory records to the spill file; return the bytes freed."""
        if self.file is None:
            # Unlinked at once: nothing is left behind if the process dies.
            self.file = tempfile.TemporaryFile(prefix="cdc-spill-", dir=self.spill_dir)  # noqa: SIM115 - closed by close()
        freed = len(self.mem)
        if freed:
            self.file.write(self.mem)
            self.mem = bytearray()
        return freed

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        self.mem = bytearray()

    def _records(self) -> Iterator[bytes | bytearray]:
        if self.file is not None:
            self.file.write(self.mem)
            self.mem = bytearray()
            self.file.flush()
            self.file.seek(0)
            read = self.file.read
            while True:
                block = read(1 << 20)
                if not block:
                    return
                yield block
        yield self.mem

    def chunks(self, max_bytes: int) -> Iterator[bytes]:
        try:
            yield from self._chunks(max_bytes)
        finally:
            self.close()

    def _chunks(self, max_bytes: int) -> Iterator[bytes]:
        prefix = self.prefix
        time = self.time
        flags_or = self.flags_or
        aborted = self.aborted
        out: list[bytes] = []
        size = 0
        ordinal = 0
        carry = b""
        for block in self._records():
            data = carry + block if carry else block
            end = len(data)
            pos = 0
            while pos + _HEADER <= end:
                length, subxid, flags, split = _header.unpack_from(data, pos)
                stop = pos + _HEADER + length
                if stop > end:
                    break
                start = pos + _HEADER
                flags |= flags_or
                if aborted is not None and subxid in aborted:
                    flags |= ROLLED_BACK
                line = b"%s%d\t%s%s\t%d%s" % (
                    prefix,
                    ordinal,
                    time,
                    data[start : start + split],
                    flags,
                    data[start + split : stop],
                )
                ordinal += 1
                if size and size + len(line) > max_bytes:
                    yield b"".join(out)
                    out = []
                    size = 0
                out.append(line)
                size += len(line)
                pos = stop
            carry = bytes(data[pos:])
        if carry:
            raise ProtocolError("spill file truncated")
        if out:
            yield b"".join(out)


class Core:
    """Replication CopyData frames in; finished transactions (as COPY lines) and logical
    messages out. See cdc/capture/model.py and docs/store.md."""

    def __init__(
        self,
        describe: Callable[[RelationDesc], RelationInfo],
        *,
        skip_through: int = 0,
        memory_limit_bytes: int = 64 << 20,
        spill_dir: str | None = None,
        max_value_bytes: int = 64 << 20,
        hash_value: Callable[[bytes], str] | None = None,
    ) -> None:
        self._describe = describe
        self._skip_through = skip_through
        self._limit = memory_limit_bytes
        self._spill_dir = spill_dir
        self._max_value = max_value_bytes
        self._hash_value = hash_value
        self._relations: dict[int, _Rel] = {}
        self._by_body: dict[bytes, _Rel] = {}
        self._streams: dict[int, _Txn] = {}
        self._prepared: dict[str, _Txn] = {}
        self._current: _Txn | None = None
        self._streaming: _Txn | None = None
        self._events: list[Event] = []
        self.server_wal_end = 0
        self.last_received_lsn = 0
        self.reply_requested = False
        self.memory_bytes = 0
        self.spilled_transactions = 0

    # -- state -------------------------------------------------------------------------------
    @property
    def open_transactions(self) -> int:
        return len(self._streams) + len(self._prepared) + (1 if self._current is not None else 0)

    def relation(self, oid: int) -> RelationInfo | None:
        rel = self._relations.get(oid)
        return rel.info if rel is not None else None

    def pop_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    # -- input -------------------------------------------------------------------------------
    def drain(self, pgconn: Any) -> int:
        count = 0
        get = pgconn.get_copy_data
        while True:
            nbytes, data = get(1)
            if nbytes > 0:
                self.feed(data)
                count += 1
            elif nbytes == 0:
                return count
            elif nbytes == -1:
                return -1
            else:
                raise ProtocolError(
                    f"reading the replication stream failed (get_copy_data returned {nbytes})"
                )

    def feed(self, copy_data: bytes) -> None:
        data = copy_data if type(copy_data) is bytes else bytes(copy_data)
        size = len(data)
        if size == 0:
            raise ProtocolError("empty CopyData frame in the replication stream")
        tag = data[0]
        if tag == 0x77:  # 'w' XLogData
            if size < 25:
                raise ProtocolError(f"malformed XLogData frame: {size} bytes, the header alone is 25")
            wal_start = _u64(data, 1)[0]
            wal_end = _u64(data, 9)[0]
            self.server_wal_end = max(self.server_wal_end, wal_end)
            self.last_received_lsn = wal_start
            self._message(data[25:], wal_start)
        elif tag == 0x6B:  # 'k' primary keepalive
            if size != 18:
                raise ProtocolError(f"malformed primary keepalive frame: {size} bytes, expected 18")
            reply = data[17]
            if reply > 1:
                raise ProtocolError(
                    f"malformed primary keepalive frame: reply-requested byte is {reply}, expected 0 or 1"
                )
            wal_end = _u64(data, 1)[0]
            self.server_wal_end = max(self.server_wal_end, wal_end)
            if reply:
                self.reply_requested = True
        else:
            raise ProtocolError(f"unknown CopyData frame type {tag:#04x} in the replication stream")

    def _message(self, p: bytes, wal_start: int) -> None:
        size = len(p)
        if size == 0:
            raise ProtocolError("empty pgoutput message")
        tag = p[0]
        if tag in _DATA_TAGS:
            what = sh.NAMES[tag]
            txn = self._streaming
            if txn is not None:
                if size < 5:
                    raise sh.short(what, size, 1)
                subxid = _u32(p, 1)[0]
                off = 5
            else:
                txn = self._current
                subxid = txn.xid if txn is not None else 0
                off = 1
            if tag == 0x4D:  # 'M'
                self._logical_message(p, off, wal_start, txn)
                return
            if txn is None:
                raise sh.out_of_place(what, "outside a transaction")
            if tag == 0x49:  # 'I'
                self._insert(txn, p, off, subxid, wal_start)
            elif tag == 0x55:  # 'U'
                self._update(txn, p, off, subxid, wal_start)
            elif tag == 0x44:  # 'D'
                self._delete(txn, p, off, subxid, wal_start)
            elif tag == 0x52:  # 'R'
                self._relation(txn, p, off, wal_start)
            elif tag == 0x54:  # 'T'
                self._truncate(txn, p, off, subxid, wal_start)
            else:  # 'Y'
                self._type(p, off)
            return
        name = sh.NAMES.get(tag)
        if name is None:
            raise sh.unknown_tag(tag)
        what = name
        if self._streaming is not None and tag not in {0x45, 0x4F}:  # StreamStop, Origin
            raise sh.out_of_place(what, "inside a streamed block")
        if self._current is not None and tag not in (0x43, 0x50, 0x4F):  # Commit, Prepare, Origin
            raise sh.out_of_place(what, "inside a transaction")
        if tag in {0x42, 0x62}:  # 'B' Begin, 'b' BeginPrepare
            if tag == 0x42:
                _exact(p, 21, what)
                xid = _u32(p, 17)[0]
            else:
                _need(p, 1, 28, what)
                xid = _u32(p, 25)[0]
                _end(p, _string(p, 29, what)[1], what)
            self._current = _Txn(xid, False, wal_start, self._spill_dir)
        elif tag == 0x43:  # 'C' Commit
            _exact(p, 26, what)
            if self._current is None:
                raise sh.out_of_place(what, "without Begin")
            txn, self._current = self._current, None
            self._finish(txn, _u64(p, 10)[0], _u64(p, 2)[0], "c", _i64(p, 18)[0], wal_start, what, size)
        elif tag == 0x53:  # 'S' StreamStart
            _exact(p, 6, what)
            if p[5] > 1:
                raise sh.malformed(what, size, f"first-segment byte is {p[5]}, expected 0 or 1")
            xid = _u32(p, 1)[0]
            txn = self._streams.get(xid)
            if txn is None:
                txn = self._streams[xid] = _Txn(xid, True, wal_start, self._spill_dir)
            self._streaming = txn
        elif tag == 0x45:  # 'E' StreamStop
            _exact(p, 1, what)
            if self._streaming is None:
                raise sh.out_of_place(what, "outside a streamed block")
            self._streaming = None
        elif tag == 0x63:  # 'c' StreamCommit
            _exact(p, 30, what)
            xid = _u32(p, 1)[0]
            txn = self._pop_stream(xid) or _Txn(xid, True, wal_start, None)
            self._finish(txn, _u64(p, 14)[0], _u64(p, 6)[0], "c", _i64(p, 22)[0], wal_start, what, size)
        elif tag == 0x41:  # 'A' StreamAbort
            if size not in {9, 25}:
                raise sh.malformed(what, size, "expected 9 or 25 bytes")
            xid = _u32(p, 1)[0]
            subxid = _u32(p, 5)[0]
            abort_lsn = _u64(p, 9)[0] if size == 25 else 0
            abort_time = _i64(p, 17)[0] if size == 25 else None
            if subxid != xid:
                streamed = self._streams.get(xid)
                if streamed is not None:
                    if streamed.aborted is None:
                        streamed.aborted = set()
                    streamed.aborted.add(subxid)
                return
            found = self._streams.pop(xid, None)
            if found is None:
                return
            # The abort record's start LSN can equal the end LSN of an earlier commit;
            # +1 keeps rolled-back positions distinct from every version.
            position = (abort_lsn if abort_lsn else wal_start) + 1
            self._finish(found, position, None, "r", abort_time, wal_start, what, size)
        elif tag == 0x4F:  # 'O' Origin
            _need(p, 1, 8, what)
            name, pos = _string(p, 9, what)
            _end(p, pos, what)
            target = self._streaming or self._current
            if target is not None:
                target.origin = name
        elif tag == 0x50:  # 'P' Prepare
            _need(p, 1, 29, what)
            gid, pos = _string(p, 30, what)
            _end(p, pos, what)
            if self._current is None:
                raise sh.out_of_place(what, "without BeginPrepare")
            txn, self._current = self._current, None
            self._prepared[gid] = txn
        elif tag == 0x70:  # 'p' StreamPrepare
            _need(p, 1, 29, what)
            gid, pos = _string(p, 30, what)
            _end(p, pos, what)
            xid = _u32(p, 26)[0]
            self._prepared[gid] = self._pop_stream(xid) or _Txn(xid, True, wal_start, None)
        elif tag == 0x4B:  # 'K' CommitPrepared
            _need(p, 1, 29, what)
            gid, pos = _string(p, 30, what)
            _end(p, pos, what)
            xid = _u32(p, 26)[0]
            txn = self._prepared.pop(gid, None) or _Txn(xid, False, wal_start, None)
            self._finish(txn, _u64(p, 10)[0], _u64(p, 2)[0], "c", _i64(p, 18)[0], wal_start, what, size)
        else:  # 'r' RollbackPrepared
            _need(p, 1, 37, what)
            gid, pos = _string(p, 38, what)
            _end(p, pos, what)
            xid = _u32(p, 34)[0]
            txn = self._prepared.pop(gid, None) or _Txn(xid, False, wal_start, None)
            self._finish(txn, _u64(p, 10)[0], None, "r", _i64(p, 26)[0], wal_start, what, size)

    # -- finishing ---------------------------------------------------------------------------
    def _finish(
        self,
        txn: _Txn,
        position: int,
        commit_lsn: int | None,
        status: str,
        when: int | None,
        wal_start: int,
        what: str,
        size: int,
    ) -> None:
        self.memory_bytes -= len(txn.mem)
        if status == "c" and txn.overlay:
            self._relations.update(txn.overlay)
        txn.overlay = None
        if position <= self._skip_through:
            txn.close()
            return
        if when is None:
            when = model.now_us()
        try:
            text = model.format_time(when)
        except ValueError:
            txn.close()
            raise sh.malformed(what, size, f"time {when} is out of range") from None
        rolled_back = status == "r"
        txn.prefix = b"%d\t" % position
        txn.time = text.encode() + b"\t"
        txn.flags_or = ROLLED_BACK if rolled_back else 0
        aborted = txn.aborted
        counts: dict[tuple[int, str, bool], int] = {}
        for (table_id, op, subxid), n in txn.counts.items():
            key = (table_id, op, rolled_back or (aborted is not None and subxid in aborted))
            counts[key] = counts.get(key, 0) + n
        self._events.append(
            FinishedTransaction(
                xid=txn.xid,
                position=position,
                commit_lsn=commit_lsn,
                committed_at_us=when,
                committed_at_text=text,
                status=status,
                flags=STREAMED if txn.streamed else 0,
                origin=txn.origin,
                change_count=txn.change_count,
                pending_count=txn.pending_count,
                first_lsn=txn.first_lsn,
                last_lsn=wal_start,
                messages=txn.messages,
                counts=counts,
                _source=txn,
            )
        )

    # -- buffering ---------------------------------------------------------------------------
    def _append(
        self,
        txn: _Txn,
        subxid: int,
        flags: int,
        table_id: int,
        op: str,
        head: bytes,
        tail: bytes,
        pending: bool,
    ) -> None:
        mem = txn.mem
        mem += _pack_header(len(head) + len(tail), subxid, flags, len(head))
        mem += head
        mem += tail
        added = _HEADER + len(head) + len(tail)
        txn.change_count += 1
        if pending:
            txn.pending_count += 1
        key = (table_id, op, subxid)
        counts = txn.counts
        counts[key] = counts.get(key, 0) + 1
        self.memory_bytes += added
        if txn.file is not None and len(mem) >= sh.SPILL_FLUSH_BYTES:
            self.memory_bytes -= txn.flush()
        if self.memory_bytes > self._limit:
            self._spill_largest()

    def _pop_stream(self, xid: int) -> _Txn | None:
        return self._streams.pop(xid, None)

    def _spill_largest(self) -> None:
        candidates = list(self._streams.values()) + list(self._prepared.values())
        if self._current is not None:
            candidates.append(self._current)
        while self.memory_bytes > self._limit // 2 and candidates:
            largest = candidates[0]
            for txn in candidates:
                if len(txn.mem) > len(largest.mem):
                    largest = txn
            if not largest.mem:
                break
            if largest.file is None:
                self.spilled_transactions += 1
            self.memory_bytes -= largest.flush()
            candidates.remove(largest)

    # -- messages ----------------------------------------------------------------------------
    def _logical_message(self, p: bytes, off: int, wal_start: int, txn: _Txn | None) -> None:
        what = "Message"
        _need(p, off, 9, what)
        flags = p[off]
        if flags > 1:
            raise sh.malformed(what, len(p), f"unknown flags {flags:#04x}")
        lsn = _u64(p, off + 1)[0]
        prefix, pos = _string(p, off + 9, what)
        _need(p, pos, 4, what)
        length = _u32(p, pos)[0]
        pos += 4
        if len(p) - pos != length:
            raise sh.malformed(
                what, len(p), f"content of {length} bytes announced, {len(p) - pos} bytes left"
            )
        content = p[pos:]
        if not flags:
            self._events.append(LogicalMessage(lsn or wal_start, prefix, content))
            return
        if txn is None:
            raise sh.out_of_place(what, "outside a transaction")
        txn.messages.append((txn.change_count, lsn or wal_start, prefix, content))

    def _type(self, p: bytes, off: int) -> None:
        what = "Type"
        _need(p, off, 4, what)
        pos = _string(p, off + 4, what)[1]
        pos = _string(p, pos, what)[1]
        _end(p, pos, what)

    def _relation(self, txn: _Txn, p: bytes, off: int, wal_start: int) -> None:
        body = p[off:]
        rel = self._by_body.get(body)
        if rel is None:
            desc = _parse_relation(p, off, wal_start)
            info = self._describe(desc)
            model.check_info(desc, info, self._hash_value is not None)
            rel = _Rel(desc.oid, info)
            if len(self._by_body) >= sh.RELATION_CACHE_LIMIT:
                self._by_body.clear()
            self._by_body[body] = rel
        if txn.streamed:
            if txn.overlay is None:
                txn.overlay = {}
            txn.overlay[rel.oid] = rel
        else:
            self._relations[rel.oid] = rel

    def _rel(self, txn: _Txn, oid: int, what: str) -> _Rel:
        if txn.overlay is not None:
            rel = txn.overlay.get(oid)
            if rel is not None:
                return rel
        rel = self._relations.get(oid)
        if rel is None:
            raise sh.unknown_relation(what, oid)
        return rel

    # -- changes -----------------------------------------------------------------------------
    def _tuple(
        self, rel: _Rel, p: bytes, pos: int, what: str, allow_u: bool
    ) -> tuple[list[Raw], list[bytes | None], int]:
        """Read TupleData at ``pos``: per column the raw text (None for NULL, _U for unchanged)
        and its JSON (None for NULL, unchanged and oversize values); the offset after it."""
        size = len(p)
        _need(p, pos, 2, what)
        natts = _u16(p, pos)[0]
        if natts != rel.natts:
            raise sh.malformed(
                what, size, f"tuple of {natts} columns for relation {rel.oid} whose schema has {rel.natts}"
            )
        pos += 2
        raws: list[Raw] = [None] * natts
        jsons: list[bytes | None] = [None] * natts
        kinds = rel.kinds
        max_value = self._max_value
        for i in range(natts):
            if pos >= size:
                raise sh.short(what, size, pos)
            kind = p[pos]
            if kind == 0x74:  # 't'
                if pos + 5 > size:
                    raise sh.short(what, size, pos + 1)
                length = _u32(p, pos + 1)[0]
                start = pos + 5
                pos = start + length
                if pos > size:
                    raise sh.short(what, size, start)
                raw = p[start:pos]
                raws[i] = raw
                column_kind = kinds[i]
                if column_kind == 0:
                    try:
                        text = raw.decode()
                    except UnicodeDecodeError:
                        raise _bad_text(what, size, start) from None
                    if length <= max_value:
                        jsons[i] = orjson.dumps(text).replace(b"\\", b"\\\\")
                elif column_kind == 1:
                    if _INTEGER.fullmatch(raw) is None:
                        _check_text(raw, what, size, start)
                        raise sh.malformed(what, size, f"value at offset {start} is not an integer")
                    if length <= max_value:
                        jsons[i] = raw
                else:
                    if raw == b"t":
                        json = b"true"
                    elif raw == b"f":
                        json = b"false"
                    else:
                        _check_text(raw, what, size, start)
                        raise sh.malformed(what, size, f"value at offset {start} is not a boolean")
                    if length <= max_value:
                        jsons[i] = json
            elif kind == 0x6E:  # 'n'
                pos += 1
            elif kind == 0x75:  # 'u'
                if not allow_u:
                    raise sh.malformed(what, size, f"unchanged TOAST value at offset {pos}")
                raws[i] = _U
                pos += 1
            elif kind == 0x62:  # 'b'
                raise sh.malformed(
                    what, size, f"binary value at offset {pos} (binary 'true' is not supported)"
                )
            else:
                raise sh.malformed(what, size, f"unknown tuple column kind {kind:#04x} at offset {pos}")
        return raws, jsons, pos

    def _key_text(self, rel: _Rel, raws: list[Raw], jsons: list[bytes | None]) -> tuple[bytes | None, int]:
        """The COPY-escaped key_text (None when a key column is unknown) and OVERSIZE."""
        parts = []
        flags = 0
        for i in rel.key:
            raw = raws[i]
            if raw is None:
                parts.append(b"null")
            elif raw is _U:
                return None, 0
            else:
                json = jsons[i]
                if json is None:
                    json = sh.oversize_json(raw, True)  # type: ignore[arg-type]
                    flags = OVERSIZE
                parts.append(json)
        return b"[" + b", ".join(parts) + b"]", flags

    def _image(
        self, rel: _Rel, raws: list[Raw], jsons: list[bytes | None], only_key: bool
    ) -> tuple[bytes, int, list[int]]:
        """The COPY-escaped image, OVERSIZE, and the columns left out as unknown."""
        parts = []
        flags = 0
        unknown = []
        names = rel.names_json
        policies = rel.policies
        for i in range(rel.natts):
            if only_key and not rel.is_key[i]:
                continue
            raw = raws[i]
            policy = policies[i]
            if policy == sh.EXCLUDE or raw is None:
                parts.append(names[i] + b"null")
            elif raw is _U:
                unknown.append(i)
            elif policy == sh.MASK:
                parts.append(names[i] + sh.MASKED)
            elif policy == sh.HASH:
                parts.append(names[i] + sh.hashed_json(self._hash_value, raw))  # type: ignore[arg-type]
            else:
                json = jsons[i]
                if json is None:
                    json = sh.oversize_json(raw, False)  # type: ignore[arg-type]
                    flags = OVERSIZE
                parts.append(names[i] + json)
        return b"{" + b",".join(parts) + b"}", flags, unknown

    def _insert(self, txn: _Txn, p: bytes, off: int, subxid: int, lsn: int) -> None:
        what = "Insert"
        _need(p, off, 4, what)
        rel = self._rel(txn, _u32(p, off)[0], what)
        pos = off + 4
        _need(p, pos, 1, what)
        if p[pos] != 0x4E:
            raise sh.malformed(what, len(p), f"expected 'N' at offset {pos}, got {p[pos]:#04x}")
        raws, jsons, pos = self._tuple(rel, p, pos + 1, what, False)
        _end(p, pos, what)
        key, flags = self._key_text(rel, raws, jsons)
        image, image_flags, _ = self._image(rel, raws, jsons, False)
        tail = b"\t%d\t%s\t%s\t%s\t\\N\t\\N\t\\N\n" % (lsn, _xid(txn, subxid), key, image)
        self._append(txn, subxid, flags | image_flags, rel.info.table_id, "I", rel.ids + b"I", tail, False)

    def _update(self, txn: _Txn, p: bytes, off: int, subxid: int, lsn: int) -> None:
        what = "Update"
        size = len(p)
        _need(p, off, 4, what)
        rel = self._rel(txn, _u32(p, off)[0], what)
        pos = off + 4
        _need(p, pos, 1, what)
        kind = p[pos]
        old: list[Raw] | None = None
        old_jsons: list[bytes | None] = []
        if kind in {0x4B, 0x4F}:  # 'K' 'O'
            old, old_jsons, pos = self._tuple(rel, p, pos + 1, what, True)
            _need(p, pos, 1, what)
            if p[pos] != 0x4E:
                raise sh.malformed(what, size, f"expected 'N' at offset {pos}, got {p[pos]:#04x}")
        elif kind != 0x4E:
            raise sh.malformed(what, size, f"expected 'K', 'O' or 'N' at offset {pos}, got {kind:#04x}")
        new, jsons, pos = self._tuple(rel, p, pos + 1, what, True)
        _end(p, pos, what)
        flags = 0
        full = kind == 0x4F
        if old is not None:
            is_key = rel.is_key
            for i in range(rel.natts):
                if new[i] is _U and (full or is_key[i]) and old[i] is not _U:
                    new[i] = old[i]
                    jsons[i] = old_jsons[i]
        key, key_flags = self._key_text(rel, new, jsons)
        if key is None:
            flags |= KEY_UNKNOWN
        image, image_flags, unknown = self._image(rel, new, jsons, False)
        flags |= key_flags | image_flags
        before = _NULL
        old_key: bytes | None = None
        if old is not None:
            if full:
                before, before_flags, _ = self._image(rel, old, old_jsons, False)
                flags |= BEFORE_FROM_WAL | before_flags
            old_key, old_key_flags = self._key_text(rel, old, old_jsons)
            if old_key is not None and old_key != key:
                flags |= old_key_flags
            else:
                old_key = None
        pending = _NULL
        if unknown:
            pending = b"{" + b",".join([rel.pending[i] for i in unknown]) + b"}"
        tail = b"\t%d\t%s\t%s\t%s\t%s\t%s\t%s\n" % (
            lsn,
            _xid(txn, subxid),
            _NULL if key is None else key,
            image,
            before,
            _NULL if old_key is None else old_key,
            pending,
        )
        self._append(txn, subxid, flags, rel.info.table_id, "U", rel.ids + b"U", tail, bool(unknown))

    def _delete(self, txn: _Txn, p: bytes, off: int, subxid: int, lsn: int) -> None:
        what = "Delete"
        _need(p, off, 4, what)
        rel = self._rel(txn, _u32(p, off)[0], what)
        pos = off + 4
        _need(p, pos, 1, what)
        kind = p[pos]
        if kind not in {0x4B, 0x4F}:
            raise sh.malformed(what, len(p), f"expected 'K' or 'O' at offset {pos}, got {kind:#04x}")
        old, jsons, pos = self._tuple(rel, p, pos + 1, what, True)
        _end(p, pos, what)
        key, flags = self._key_text(rel, old, jsons)
        if key is None:
            flags |= KEY_UNKNOWN
        full = kind == 0x4F
        image, image_flags, _ = self._image(rel, old, jsons, not full)
        flags |= image_flags
        if full:
            flags |= BEFORE_FROM_WAL
        tail = b"\t%d\t%s\t%s\t%s\t\\N\t\\N\t\\N\n" % (
            lsn,
            _xid(txn, subxid),
            _NULL if key is None else key,
            image,
        )
        self._append(txn, subxid, flags, rel.info.table_id, "D", rel.ids + b"D", tail, False)

    def _truncate(self, txn: _Txn, p: bytes, off: int, subxid: int, lsn: int) -> None:
        what = "Truncate"
        size = len(p)
        _need(p, off, 5, what)
        count = _u32(p, off)[0]
        pos = off + 5
        if size - pos != 4 * count:
            raise sh.malformed(what, size, f"{count} relation oids announced, {size - pos} bytes left")
        rels = [self._rel(txn, _u32(p, pos + 4 * i)[0], what) for i in range(count)]
        tail = b"\t%d\t%s\t\\N\t\\N\t\\N\t\\N\t\\N\n" % (lsn, _xid(txn, subxid))
        for rel in rels:
            self._append(txn, subxid, 0, rel.info.table_id, "T", rel.ids + b"T", tail, False)

    # -- snapshots ---------------------------------------------------------------------------
    def snapshot_lines(
        self,
        info: RelationInfo,
        copy_rows: bytes,
        *,
        position: int,
        first_ordinal: int,
        committed_at_us: int,
    ) -> tuple[bytes, int]:
        natts = len(info.names)
        desc = RelationDesc(0, "", "", "d", tuple(ColumnDesc(n, 0, -1, False) for n in info.names), 0)
        model.check_info(desc, info, self._hash_value is not None)
        try:
            text = model.format_time(committed_at_us)
        except ValueError:
            raise ProtocolError(f"snapshot time {committed_at_us} is out of range") from None
        rel = _Rel(0, info)
        data = bytes(copy_rows)
        if not data:
            return b"", 0
        if data[-1] != 0x0A:
            raise sh.bad_snapshot(data.count(b"\n"), "the last line is not complete")
        head = b"%d\t" % position
        middle = b"\t%s\t%sS\t" % (text.encode(), rel.ids)
        lsn_xid = b"\t%d\t\\N\t" % position
        out = []
        ordinal = first_ordinal
        for row, line in enumerate(data[:-1].split(b"\n")):
            fields = line.split(b"\t")
            if len(fields) != natts:
                raise sh.bad_snapshot(row, f"{len(fields)} fields for {natts} columns")
            raws: list[Raw] = [None] * natts
            jsons: list[bytes | None] = [None] * natts
            for i, field in enumerate(fields):
                if field == _NULL:
                    continue
                raw = _copy_unescape(field, row, i) if b"\\" in field else field
                raws[i] = raw
                jsons[i] = self._snapshot_json(raw, rel.kinds[i], row, i)
            key, flags = self._key_text(rel, raws, jsons)
            image, image_flags, _ = self._image(rel, raws, jsons, False)
            out.append(
                b"%s%d%s%d%s%s\t%s\t\\N\t\\N\t\\N\n"
                % (head, ordinal, middle, flags | image_flags, lsn_xid, key, image)
            )
            ordinal += 1
        return b"".join(out), ordinal - first_ordinal

    def _snapshot_json(self, raw: bytes, kind: int, row: int, column: int) -> bytes | None:
        if kind == 1:
            if _INTEGER.fullmatch(raw) is None:
                raise sh.bad_snapshot(row, f"column {column} is not an integer")
            return raw if len(raw) <= self._max_value else None
        if kind == 2:
            if raw not in {b"t", b"f"}:
                raise sh.bad_snapshot(row, f"column {column} is not a boolean")
            if len(raw) > self._max_value:
                return None
            return b"true" if raw == b"t" else b"false"
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise sh.bad_snapshot(row, f"column {column} is not valid UTF-8") from None
        if len(raw) > self._max_value:
            return None
        return orjson.dumps(text).replace(b"\\", b"\\\\")


# -- helpers ---------------------------------------------------------------------------------


def _need(p: bytes, pos: int, n: int, what: str) -> None:
    if pos + n > len(p):
        raise sh.short(what, len(p), pos)


def _exact(p: bytes, size: int, what: str) -> None:
    if len(p) < size:
        raise sh.short(what, len(p), len(p))
    _end(p, size, what)


def _end(p: bytes, pos: int, what: str) -> None:
    if pos != len(p):
        raise sh.malformed(what, len(p), f"{len(p) - pos} unexpected trailing bytes at offset {pos}")


def _string(p: bytes, pos: int, what: str) -> tuple[str, int]:
    stop = p.find(b"\x00", pos)
    if stop < 0:
        raise sh.malformed(what, len(p), f"string at offset {pos} is not NUL-terminated")
    try:
        return p[pos:stop].decode(), stop + 1
    except UnicodeDecodeError:
        raise _bad_text(what, len(p), pos) from None


def _bad_text(what: str, size: int, pos: int) -> ProtocolError:
    return sh.malformed(what, size, f"text at offset {pos} is not valid UTF-8")


def _check_text(raw: bytes, what: str, size: int, pos: int) -> None:
    try:
        raw.decode()
    except UnicodeDecodeError:
        raise _bad_text(what, size, pos) from None


def _xid(txn: _Txn, subxid: int) -> bytes:
    return _NULL if subxid == txn.xid else b"%d" % subxid


def _parse_relation(p: bytes, off: int, wal_start: int) -> RelationDesc:
    what = "Relation"
    size = len(p)
    _need(p, off, 4, what)
    oid = _u32(p, off)[0]
    namespace, pos = _string(p, off + 4, what)
    name, pos = _string(p, pos, what)
    _need(p, pos, 3, what)
    identity = p[pos]
    if identity not in _IDENTITIES:
        raise sh.malformed(what, size, f"unknown replica identity {identity:#04x} at offset {pos}")
    natts = _u16(p, pos + 1)[0]
    pos += 3
    columns = []
    for _ in range(natts):
        _need(p, pos, 1, what)
        flags = p[pos]
        column, pos = _string(p, pos + 1, what)
        _need(p, pos, 8, what)
        columns.append(ColumnDesc(column, _u32(p, pos)[0], _i32(p, pos + 4)[0], bool(flags & 1)))
        pos += 8
    _end(p, pos, what)
    return RelationDesc(oid, namespace or "pg_catalog", name, chr(identity), tuple(columns), wal_start)


_ESCAPES: Final = {ord("b"): 8, ord("f"): 12, ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("v"): 11}
_OCTAL: Final = frozenset(b"01234567")
_HEX: Final = frozenset(b"0123456789abcdefABCDEF")


def _copy_unescape(field: bytes, row: int, column: int) -> bytes:
    """A field of COPY TO text format with its backslash escapes resolved."""
    out = bytearray()
    i = 0
    n = len(field)
    while i < n:
        c = field[i]
        i += 1
        if c != 0x5C:
            out.append(c)
            continue
        if i >= n:
            raise sh.bad_snapshot(row, f"column {column} ends with a lone backslash")
        c = field[i]
        i += 1
        if c in _OCTAL:
            value = c - 0x30
            for _ in range(2):
                if i < n and field[i] in _OCTAL:
                    value = value * 8 + field[i] - 0x30
                    i += 1
                else:
                    break
            out.append(value & 0xFF)
        elif c == 0x78 and i < n and field[i] in _HEX:  # 'x'
            value = int(chr(field[i]), 16)
            i += 1
            if i < n and field[i] in _HEX:
                value = value * 16 + int(chr(field[i]), 16)
                i += 1
            out.append(value)
        else:
            out.append(_ESCAPES.get(c, c))
    return bytes(out)
