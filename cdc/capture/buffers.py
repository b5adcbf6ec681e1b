"""Open transactions' buffered records for the pure-Python capture core (mirrored by
``_core_txn.pxi``): in memory, or spilled to an unlinked temp file; COPY lines at the end.

A record is a 14-byte header (record length, subxid, flags, split) and the line's middle,
``table_id \\t schema_id \\t op`` (up to ``split``) and the rest from ``\\t lsn`` to ``\\n``;
``Txn.chunks`` adds what only the transaction's end tells (position, ordinal, time, status).
"""

from __future__ import annotations

import struct
import tempfile
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Final

from cdc.capture import _shared as sh
from cdc.capture.model import ROLLED_BACK
from cdc.errors import ProtocolError

if TYPE_CHECKING:
    from cdc.capture.images import Rel

_header = struct.Struct("<IIHI")
_pack_header = _header.pack
_HEADER: Final = sh.RECORD_HEADER


class Txn:
    """One open transaction's buffered records (in memory, or spilled to a temp file)."""

    __slots__ = (
        "aborted",
        "change_count",
        "counts",
        "file",
        "first_lsn",
        "flags_or",
        "last_sent",
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
        self.overlay: dict[int, Rel] | None = None
        self.aborted: set[int] | None = None
        self.counts: dict[tuple[int, str, int], int] = {}
        self.prefix = b""  # position \t (set when it finishes)
        self.time = b""  # committed_at \t (set when it finishes)
        self.flags_or = 0  # ROLLED_BACK for the whole transaction (set when it finishes)
        # sendTime of its latest Stream Start/Stop frame (PostgreSQL epoch µs); MISSED when its
        # first segment was never received (model.MAYBE_INCOMPLETE)
        self.last_sent = 0

    def append(
        self, subxid: int, flags: int, table_id: int, op: str, head: bytes, tail: bytes, pending: bool
    ) -> int:
        """Buffer one change's record; return how many bytes of memory that took (net of a
        flush to the spill file)."""
        mem = self.mem
        mem += _pack_header(len(head) + len(tail), subxid, flags, len(head))
        mem += head
        mem += tail
        added = _HEADER + len(head) + len(tail)
        self.change_count += 1
        if pending:
            self.pending_count += 1
        key = (table_id, op, subxid)
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1
        if self.file is not None and len(mem) >= sh.SPILL_FLUSH_BYTES:
            added -= self.flush()
        return added

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


def spill_largest(candidates: list[Txn], excess: int) -> tuple[int, int]:
    """Spill the largest in-memory transactions until ``excess`` bytes are freed (or none is
    left in memory); return the bytes freed and how many transactions spilled for the first
    time."""
    freed = 0
    spilled = 0
    while freed < excess and candidates:
        largest = candidates[0]
        for txn in candidates:
            if len(txn.mem) > len(largest.mem):
                largest = txn
        if not largest.mem:
            break
        if largest.file is None:
            spilled += 1
        freed += largest.flush()
        candidates.remove(largest)
    return freed, spilled
