"""Backfill watermarks in the capture loop (docs/baseline.md "Backfill").

`cdc backfill` reads a table in chunks; around each chunk it commits two transactional logical
messages (prefix ``cdc.backfill``): the low watermark before the read, the high one after the
chunk is staged in the store. Here, in WAL order: a low watermark opens a window; while it is
open, the keys that committed changes of its table touch are collected from the ``changes``
COPY lines the core made (table_id, key_text, old_key_text; never an image); the high watermark
closes it and hands the store writer the chunk and those keys, in the batch that acknowledges
the high watermark's position (cdc/store/backfill.py writes the rest of the chunk there as
SNAPSHOT rows: every row the stream changed meanwhile is newer in the stream), with the low
watermark's transaction (where the first chunk of a table recorded again after an inexact
rewrite puts its reset, before the window's changes).

A high watermark whose low one this session did not see (capture restarted in between, after
the slot moved past it) cannot be vouched for: the chunk is discarded and read again. So is a
keyless table's chunk (the whole table in one window) when the table changed in the window,
and a window that collected more keys than ``MAX_KEYS``. Messages of another slot's backfill are
ignored; a message that does not parse is logged and ignored (any role can write one: at worst
a forged watermark makes a window longer, or a chunk be read again).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import orjson
import structlog

from cdc.capture.batches import BatchBuilder
from cdc.capture.model import PG_EPOCH_OFFSET_US, ROLLED_BACK, ChunkSource, FinishedTransaction
from cdc.lsn import format_lsn
from cdc.metrics import Metrics
from cdc.store.backfill import ChunkDone

log = structlog.get_logger("cdc.backfill")

#: The prefix of backfill watermark messages.
PREFIX = "cdc.backfill"
#: A window collecting more keys than this is given up (the chunk is read again).
MAX_KEYS = 1_000_000

_NULL = b"\\N"
_UNESCAPE = {b"\\\\": b"\\", b"\\t": b"\t", b"\\n": b"\n", b"\\r": b"\r"}


@dataclass(frozen=True, slots=True)
class Watermark:
    """A parsed watermark message."""

    chunk: int
    table_id: int
    edge: str  # "low" | "high"
    keyed: bool


def parse_watermark(content: bytes, slot: str) -> Watermark | None:
    """The watermark a ``cdc.backfill`` message carries for ``slot`` (None: another slot's, or
    not one)."""
    try:
        data = orjson.loads(content)
        if not isinstance(data, dict) or data.get("slot") != slot:
            return None
        edge = data["edge"]
        if edge not in ("low", "high"):
            return None
        return Watermark(int(data["chunk"]), int(data["table_id"]), str(edge), bool(data.get("keyed", True)))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        log.warning("backfill_message_ignored")
        return None


def watermark_message(slot: str, chunk: int, table_id: int, edge: str, *, keyed: bool) -> str:
    """The content of a watermark message (what `cdc backfill` emits)."""
    return orjson.dumps(
        {"slot": slot, "chunk": chunk, "table_id": table_id, "edge": edge, "keyed": keyed}
    ).decode()


def copy_unescape(field: bytes) -> str:
    """A COPY text field's value (the escapes the capture core writes)."""
    if b"\\" not in field:
        return field.decode()
    out = bytearray()
    i = 0
    while i < len(field):
        pair = field[i : i + 2]
        if pair in _UNESCAPE:
            out += _UNESCAPE[pair]
            i += 2
        else:
            out += field[i : i + 1]
            i += 1
    return out.decode()


@dataclass(slots=True)
class _Window:
    chunk: int
    table_id: int
    keyed: bool
    opened_at: int  # the low watermark's position
    opened_committed_at: str  # ... its transaction's commit time (COPY text) and xid: where a
    opened_xid: int  # re-record's reset goes (cdc/store/backfill.py)
    keys: set[bytes] = field(default_factory=set)
    truncated: bool = False
    changed: bool = False  # any committed change of the table (what a keyless window needs)
    overflow: bool = False


class _Tee:
    """The transaction's change lines, read once by the batch builder, seen here on the way."""

    __slots__ = ("_see", "_source")

    def __init__(self, source: ChunkSource, see: Callable[[bytes], None]) -> None:
        self._source = source
        self._see = see

    def chunks(self, max_bytes: int) -> Iterator[bytes]:
        for chunk in self._source.chunks(max_bytes):
            self._see(chunk)
            yield chunk


class Windows:
    """The open backfill windows of one capture session."""

    def __init__(self, slot: str, metrics: Metrics | None = None, *, max_keys: int = MAX_KEYS) -> None:
        self.slot = slot
        self.metrics = metrics
        self.max_keys = max_keys
        self.open: dict[int, _Window] = {}  # chunk -> window
        self._tables: dict[int, list[_Window]] = {}  # table_id -> its open windows

    def _marks(self, txn: FinishedTransaction) -> list[Watermark]:
        marks = []
        for _ordinal, _lsn, prefix, content in txn.messages:
            if prefix == PREFIX:
                mark = parse_watermark(content, self.slot)
                if mark is not None:
                    marks.append(mark)
        return marks

    def before(self, txn: FinishedTransaction) -> tuple[FinishedTransaction, list[Watermark]]:
        """Open the windows the transaction's low watermarks start; make its change lines seen
        when an open window's table changed. The transaction to hand the batch builder, and its
        high watermarks (for :meth:`after`)."""
        marks = self._marks(txn) if txn.messages and txn.status == "c" else []
        for mark in marks:
            if mark.edge == "low":
                self._open(mark, txn)
        if not self._tables or txn.status != "c" or not txn.change_count:
            return txn, [m for m in marks if m.edge == "high"]
        if any(table_id in self._tables for table_id, _op, _rb in txn.counts):
            source = txn._source
            if source is not None:
                txn = dataclasses.replace(txn, _source=_Tee(source, self._see))
        return txn, [m for m in marks if m.edge == "high"]

    def after(self, builder: BatchBuilder, txn: FinishedTransaction, highs: list[Watermark]) -> None:
        """Close the windows of the transaction's high watermarks: each chunk goes to the store
        writer with the batch that acknowledges the transaction."""
        for mark in highs:
            window = self.open.pop(mark.chunk, None)
            if window is not None:
                self._tables[window.table_id].remove(window)
                if not self._tables[window.table_id]:
                    del self._tables[window.table_id]
            item: ChunkDone = {
                "chunk": mark.chunk,
                "table_id": mark.table_id,
                "position": txn.position,
                "committed_at": txn.committed_at_text,
                "xid": txn.xid,
                "commit_lsn": txn.commit_lsn,
                "keyless": not mark.keyed,
            }
            reason = self._reason(window, mark)
            if reason is not None:
                item["discard"] = reason
            elif window is not None:
                item["truncated"] = window.truncated
                item["keys"] = sorted(copy_unescape(k) for k in window.keys)
                item["opened_at"] = window.opened_at
                item["opened_committed_at"] = window.opened_committed_at
                item["opened_xid"] = window.opened_xid
            store = builder.batch().store
            store.backfill.append(item)
            store.span(txn.committed_at_us + PG_EPOCH_OFFSET_US)
            log.debug(
                "backfill_window_closed",
                chunk=mark.chunk,
                table_id=mark.table_id,
                lsn=format_lsn(txn.position),
                keys=len(window.keys) if window is not None else None,
                discarded=reason is not None,
            )

    @staticmethod
    def _reason(window: _Window | None, mark: Watermark) -> str | None:
        if window is None:
            return "its low watermark was not seen (capture restarted in between)"
        if window.table_id != mark.table_id:
            return "its watermarks name different tables"
        if window.overflow:
            return "too many changes of the table between its watermarks"
        if not window.keyed and (window.changed or window.truncated):
            return "the table (without a key) changed while it was read"
        return None

    def _open(self, mark: Watermark, txn: FinishedTransaction) -> None:
        # A newer low watermark of the same table supersedes an older window (its backfill
        # restarted): the old chunk can only be discarded now.
        for old in list(self._tables.get(mark.table_id, ())):
            old.overflow = True
        window = _Window(mark.chunk, mark.table_id, mark.keyed, txn.position, txn.committed_at_text, txn.xid)
        self.open[mark.chunk] = window
        self._tables.setdefault(mark.table_id, []).append(window)

    def _see(self, data: bytes) -> None:
        """Collect the keys of the open windows' tables from ``changes`` COPY lines."""
        tables = self._tables
        for line in data.splitlines():
            head = line.split(b"\t", 10)
            if len(head) < 11:
                continue
            try:
                table_id = int(head[3])
            except ValueError:
                continue
            windows = tables.get(table_id)
            if not windows:
                continue
            if int(head[6]) & ROLLED_BACK:
                continue  # a rolled-back savepoint: the row did not change
            op = head[5]
            tail = head[10].rsplit(b"\t", 2)
            old_key = tail[1] if len(tail) == 3 else _NULL
            for window in windows:
                window.changed = True
                if op == b"T":
                    window.truncated = True
                    continue
                if not window.keyed or window.overflow:
                    continue
                keys = window.keys
                if head[9] != _NULL:
                    keys.add(head[9])
                if old_key != _NULL:
                    keys.add(old_key)
                if len(keys) > self.max_keys:
                    window.overflow = True
                    keys.clear()
