"""The capture core in pure Python: replication frames in, `changes` COPY lines out.

The reference for ``_core.pyx`` (the compiled core), which mirrors it check for check: both
read the same bytes in the same order, so they raise the same ``ProtocolError`` at the same
point and build the same bytes (tests/unit/test_capture_core.py, test_capture_fuzz.py).

Per change, the COPY line is built when the change arrives, with the relation cache in force
then (a streamed transaction's Relation messages apply to it first, and to everyone once it
commits); what only the transaction's end tells (position, commit time, status, an aborted
subtransaction) is added by ``FinishedTransaction.chunks``. Buffered changes are records
(``buffers.py``) kept in memory up to the memory limit over all open transactions; beyond it
the largest transaction goes to an unlinked temp file.

This module is the state machine (frames, transactions, relations, changes); ``pgoutput.py``
reads messages and tuples, ``images.py`` builds keys, images and snapshot lines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, Final

from cdc.capture import _shared as sh
from cdc.capture import images, libpq, model
from cdc.capture.buffers import Txn, spill_largest
from cdc.capture.images import Rel, key_text, row_image
from cdc.capture.model import (
    BEFORE_FROM_WAL,
    KEY_UNKNOWN,
    MAYBE_INCOMPLETE,
    MISSED,
    ROLLED_BACK,
    STREAMED,
    Event,
    FinishedTransaction,
    LogicalMessage,
    RelationDesc,
    RelationInfo,
)
from cdc.capture.pgoutput import (
    DATA_TAGS,
    Raw,
    U,
    end,
    exact,
    i64,
    need,
    parse_relation,
    read_tuple,
    string,
    u32,
    u64,
)
from cdc.errors import ProtocolError

__all__ = ["Core"]

_NULL: Final = b"\\N"


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
        self._relations: dict[int, Rel] = {}
        self._by_body: dict[bytes, Rel] = {}
        self._streams: dict[int, Txn] = {}
        self._prepared: dict[str, Txn] = {}
        self._current: Txn | None = None
        self._streaming: Txn | None = None
        self._events: list[Event] = []
        self.server_wal_end = 0
        self.last_received_lsn = 0
        self._sent = 0  # sendTime of the XLogData frame being read
        self.reply_requested = False
        self.memory_bytes = 0
        self.spilled_transactions = 0
        #: How drain() reads frames: always psycopg's get_copy_data here (None before the first).
        self.drain_path: libpq.DrainPath | None = None

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
        """Feed every frame ``pgconn`` (a psycopg PGconn) has ready; how many, or -1 when
        COPY ended (the result is left for the caller to read)."""
        if self.drain_path is None:
            self.drain_path = "psycopg"
            libpq.note("psycopg", "the pure-Python core")
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
            wal_start = u64(data, 1)[0]
            wal_end = u64(data, 9)[0]
            self._sent = i64(data, 17)[0]
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
            wal_end = u64(data, 1)[0]
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
        if tag in DATA_TAGS:
            what = sh.NAMES[tag]
            txn = self._streaming
            if txn is not None:
                if size < 5:
                    raise sh.short(what, size, 1)
                subxid = u32(p, 1)[0]
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
                exact(p, 21, what)
                xid = u32(p, 17)[0]
            else:
                need(p, 1, 28, what)
                xid = u32(p, 25)[0]
                end(p, string(p, 29, what)[1], what)
            self._current = Txn(xid, False, wal_start, self._spill_dir)
        elif tag == 0x43:  # 'C' Commit
            exact(p, 26, what)
            if self._current is None:
                raise sh.out_of_place(what, "without Begin")
            txn, self._current = self._current, None
            self._finish(txn, u64(p, 10)[0], u64(p, 2)[0], "c", i64(p, 18)[0], wal_start, what, size)
        elif tag == 0x53:  # 'S' StreamStart
            exact(p, 6, what)
            if p[5] > 1:
                raise sh.malformed(what, size, f"first-segment byte is {p[5]}, expected 0 or 1")
            xid = u32(p, 1)[0]
            txn = self._streams.get(xid)
            if txn is None:
                txn = self._streams[xid] = Txn(xid, True, wal_start, self._spill_dir)
                if not p[5]:  # not its first segment: earlier changes were never received
                    txn.last_sent = MISSED
            txn.last_sent = max(txn.last_sent, self._sent)
            self._streaming = txn
        elif tag == 0x45:  # 'E' StreamStop
            exact(p, 1, what)
            if self._streaming is None:
                raise sh.out_of_place(what, "outside a streamed block")
            txn = self._streaming
            txn.last_sent = max(txn.last_sent, self._sent)
            self._streaming = None
        elif tag == 0x63:  # 'c' StreamCommit
            exact(p, 30, what)
            xid = u32(p, 1)[0]
            txn = self._pop_stream(xid) or Txn(xid, True, wal_start, None)
            self._finish(txn, u64(p, 14)[0], u64(p, 6)[0], "c", i64(p, 22)[0], wal_start, what, size)
        elif tag == 0x41:  # 'A' StreamAbort
            if size not in {9, 25}:
                raise sh.malformed(what, size, "expected 9 or 25 bytes")
            xid = u32(p, 1)[0]
            subxid = u32(p, 5)[0]
            abort_lsn = u64(p, 9)[0] if size == 25 else 0
            abort_time = i64(p, 17)[0] if size == 25 else None
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
            # Decoded in progress only if its last frame went out before it aborted (model.py).
            behind = abort_time is None or found.last_sent >= abort_time
            self._finish(
                found,
                position,
                None,
                "r",
                abort_time,
                wal_start,
                what,
                size,
                MAYBE_INCOMPLETE if behind else 0,
            )
        elif tag == 0x4F:  # 'O' Origin
            need(p, 1, 8, what)
            name, pos = string(p, 9, what)
            end(p, pos, what)
            target = self._streaming or self._current
            if target is not None:
                target.origin = name
        elif tag == 0x50:  # 'P' Prepare
            need(p, 1, 29, what)
            gid, pos = string(p, 30, what)
            end(p, pos, what)
            if self._current is None:
                raise sh.out_of_place(what, "without BeginPrepare")
            txn, self._current = self._current, None
            self._prepared[gid] = txn
        elif tag == 0x70:  # 'p' StreamPrepare
            need(p, 1, 29, what)
            gid, pos = string(p, 30, what)
            end(p, pos, what)
            xid = u32(p, 26)[0]
            self._prepared[gid] = self._pop_stream(xid) or Txn(xid, True, wal_start, None)
        elif tag == 0x4B:  # 'K' CommitPrepared
            need(p, 1, 29, what)
            gid, pos = string(p, 30, what)
            end(p, pos, what)
            xid = u32(p, 26)[0]
            txn = self._prepared.pop(gid, None) or Txn(xid, False, wal_start, None)
            self._finish(txn, u64(p, 10)[0], u64(p, 2)[0], "c", i64(p, 18)[0], wal_start, what, size)
        else:  # 'r' RollbackPrepared
            need(p, 1, 37, what)
            gid, pos = string(p, 38, what)
            end(p, pos, what)
            xid = u32(p, 34)[0]
            txn = self._prepared.pop(gid, None) or Txn(xid, False, wal_start, None)
            self._finish(txn, u64(p, 10)[0], None, "r", i64(p, 26)[0], wal_start, what, size)

    # -- finishing ---------------------------------------------------------------------------
    def _finish(
        self,
        txn: Txn,
        position: int,
        commit_lsn: int | None,
        status: str,
        when: int | None,
        wal_start: int,
        what: str,
        size: int,
        extra_flags: int = 0,
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
                flags=(STREAMED if txn.streamed else 0) | extra_flags,
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
        txn: Txn,
        subxid: int,
        flags: int,
        table_id: int,
        op: str,
        head: bytes,
        tail: bytes,
        pending: bool,
    ) -> None:
        self.memory_bytes += txn.append(subxid, flags, table_id, op, head, tail, pending)
        if self.memory_bytes > self._limit:
            self._spill_largest()

    def _pop_stream(self, xid: int) -> Txn | None:
        return self._streams.pop(xid, None)

    def _spill_largest(self) -> None:
        candidates = list(self._streams.values()) + list(self._prepared.values())
        if self._current is not None:
            candidates.append(self._current)
        freed, spilled = spill_largest(candidates, self.memory_bytes - self._limit // 2)
        self.memory_bytes -= freed
        self.spilled_transactions += spilled

    # -- messages ----------------------------------------------------------------------------
    def _logical_message(self, p: bytes, off: int, wal_start: int, txn: Txn | None) -> None:
        what = "Message"
        need(p, off, 9, what)
        flags = p[off]
        if flags > 1:
            raise sh.malformed(what, len(p), f"unknown flags {flags:#04x}")
        lsn = u64(p, off + 1)[0]
        prefix, pos = string(p, off + 9, what)
        need(p, pos, 4, what)
        length = u32(p, pos)[0]
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
        need(p, off, 4, what)
        pos = string(p, off + 4, what)[1]
        pos = string(p, pos, what)[1]
        end(p, pos, what)

    def _relation(self, txn: Txn, p: bytes, off: int, wal_start: int) -> None:
        body = p[off:]
        rel = self._by_body.get(body)
        if rel is None:
            desc = parse_relation(p, off, wal_start)
            rel = Rel(desc.oid, None, desc)  # described at its first change (_rel)
            if len(self._by_body) >= sh.RELATION_CACHE_LIMIT:
                self._by_body.clear()
            self._by_body[body] = rel
        if txn.streamed:
            if txn.overlay is None:
                txn.overlay = {}
            txn.overlay[rel.oid] = rel
        else:
            self._relations[rel.oid] = rel

    def _rel(self, txn: Txn, oid: int, what: str, lsn: int) -> Rel:
        if txn.overlay is not None:
            rel = txn.overlay.get(oid)
            if rel is not None:
                if rel.info is None:
                    self._describe_rel(rel, lsn)
                return rel
        rel = self._relations.get(oid)
        if rel is None:
            raise sh.unknown_relation(what, oid)
        if rel.info is None:
            self._describe_rel(rel, lsn)
        return rel

    def _describe_rel(self, rel: Rel, lsn: int) -> None:
        """Describe a relation at the position of the change that uses it first (``lsn``): the
        Relation message before it has none (its names hold from there, docs/store.md)."""
        desc = rel.desc
        assert desc is not None
        if lsn:
            desc = replace(desc, lsn=lsn)
        info = self._describe(desc)
        model.check_info(desc, info, self._hash_value is not None)
        rel.setup(info)

    # -- changes -----------------------------------------------------------------------------
    def _insert(self, txn: Txn, p: bytes, off: int, subxid: int, lsn: int) -> None:
        what = "Insert"
        need(p, off, 4, what)
        rel = self._rel(txn, u32(p, off)[0], what, lsn)
        if rel.ignored:
            return
        pos = off + 4
        need(p, pos, 1, what)
        if p[pos] != 0x4E:
            raise sh.malformed(what, len(p), f"expected 'N' at offset {pos}, got {p[pos]:#04x}")
        raws, jsons, pos = read_tuple(rel, p, pos + 1, what, False, self._max_value)
        end(p, pos, what)
        key, flags = key_text(rel, raws, jsons)
        image, image_flags, _ = row_image(rel, raws, jsons, False, self._hash_value)
        tail = b"\t%d\t%s\t%s\t%s\t\\N\t\\N\t\\N\n" % (lsn, _xid(txn, subxid), key, image)
        self._append(txn, subxid, flags | image_flags, rel.table_id, "I", rel.ids + b"I", tail, False)

    def _update(self, txn: Txn, p: bytes, off: int, subxid: int, lsn: int) -> None:
        what = "Update"
        size = len(p)
        need(p, off, 4, what)
        rel = self._rel(txn, u32(p, off)[0], what, lsn)
        if rel.ignored:
            return
        pos = off + 4
        need(p, pos, 1, what)
        kind = p[pos]
        old: list[Raw] | None = None
        old_jsons: list[bytes | None] = []
        if kind in {0x4B, 0x4F}:  # 'K' 'O'
            old, old_jsons, pos = read_tuple(rel, p, pos + 1, what, True, self._max_value)
            need(p, pos, 1, what)
            if p[pos] != 0x4E:
                raise sh.malformed(what, size, f"expected 'N' at offset {pos}, got {p[pos]:#04x}")
        elif kind != 0x4E:
            raise sh.malformed(what, size, f"expected 'K', 'O' or 'N' at offset {pos}, got {kind:#04x}")
        new, jsons, pos = read_tuple(rel, p, pos + 1, what, True, self._max_value)
        end(p, pos, what)
        flags = 0
        full = kind == 0x4F
        if old is not None:
            is_key = rel.is_key
            for i in range(rel.natts):
                if new[i] is U and (full or is_key[i]) and old[i] is not U:
                    new[i] = old[i]
                    jsons[i] = old_jsons[i]
        key, key_flags = key_text(rel, new, jsons)
        if key is None:
            flags |= KEY_UNKNOWN
        image, image_flags, unknown = row_image(rel, new, jsons, False, self._hash_value)
        flags |= key_flags | image_flags
        before = _NULL
        old_key: bytes | None = None
        if old is not None:
            if full:
                before, before_flags, _ = row_image(rel, old, old_jsons, False, self._hash_value)
                flags |= BEFORE_FROM_WAL | before_flags
            old_key, old_key_flags = key_text(rel, old, old_jsons)
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
        self._append(txn, subxid, flags, rel.table_id, "U", rel.ids + b"U", tail, bool(unknown))

    def _delete(self, txn: Txn, p: bytes, off: int, subxid: int, lsn: int) -> None:
        what = "Delete"
        need(p, off, 4, what)
        rel = self._rel(txn, u32(p, off)[0], what, lsn)
        if rel.ignored:
            return
        pos = off + 4
        need(p, pos, 1, what)
        kind = p[pos]
        if kind not in {0x4B, 0x4F}:
            raise sh.malformed(what, len(p), f"expected 'K' or 'O' at offset {pos}, got {kind:#04x}")
        old, jsons, pos = read_tuple(rel, p, pos + 1, what, True, self._max_value)
        end(p, pos, what)
        key, flags = key_text(rel, old, jsons)
        if key is None:
            flags |= KEY_UNKNOWN
        full = kind == 0x4F
        image, image_flags, _ = row_image(rel, old, jsons, not full, self._hash_value)
        flags |= image_flags
        if full:
            flags |= BEFORE_FROM_WAL
        tail = b"\t%d\t%s\t%s\t%s\t\\N\t\\N\t\\N\n" % (
            lsn,
            _xid(txn, subxid),
            _NULL if key is None else key,
            image,
        )
        self._append(txn, subxid, flags, rel.table_id, "D", rel.ids + b"D", tail, False)

    def _truncate(self, txn: Txn, p: bytes, off: int, subxid: int, lsn: int) -> None:
        what = "Truncate"
        size = len(p)
        need(p, off, 5, what)
        count = u32(p, off)[0]
        pos = off + 5
        if size - pos != 4 * count:
            raise sh.malformed(what, size, f"{count} relation oids announced, {size - pos} bytes left")
        rels = [self._rel(txn, u32(p, pos + 4 * i)[0], what, lsn) for i in range(count)]
        rels = [rel for rel in rels if not rel.ignored]
        tail = b"\t%d\t%s\t\\N\t\\N\t\\N\t\\N\t\\N\n" % (lsn, _xid(txn, subxid))
        for rel in rels:
            self._append(txn, subxid, 0, rel.table_id, "T", rel.ids + b"T", tail, False)

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
        return images.snapshot_lines(
            info,
            copy_rows,
            position=position,
            first_ordinal=first_ordinal,
            committed_at_us=committed_at_us,
            max_value=self._max_value,
            hash_value=self._hash_value,
        )


def _xid(txn: Txn, subxid: int) -> bytes:
    return _NULL if subxid == txn.xid else b"%d" % subxid
