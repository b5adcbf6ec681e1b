"""From the capture core's events to store batches (docs/store.md "Transactions and context").

A ``BatchBuilder`` takes finished transactions and non-transactional messages, in WAL order,
and fills ``Batch``es: the ``changes`` COPY text the core made (never parsed here), one
``transactions`` line per transaction with a change or a context, ``context_changes`` lines when
the context changes inside a transaction, the actors' sequence numbers, ``request_errors`` rows
from ``cdc.error`` messages, the committed_at range, the positions to fill ``pending`` columns
of, and the ack LSN. A transaction larger than a batch is split: only the batch carrying its
last change carries its transaction row and its ack.

Context and error messages are verified in one place (``verified_context``, ``verified_error``:
the daemon's :class:`cdc.context.ContextVerifier`, which checks each message's MAC under the
source's key, and a context's transaction): one that does not verify is ignored, reported once
per LSN (log ``context_message_rejected``, metric ``cdc_context_messages_rejected_total``), and a
rejected context flags its transaction CONTEXT_REJECTED (docs/security.md "Request attribution").
A rolled-back transaction keeps the core's MAYBE_INCOMPLETE, and gets it whenever the walsender
does not stream every change as it decodes it (``every_change_streamed``, docs/store.md). A
verified context whose request id was carried over from an earlier transaction (a session-level
SET, not SET LOCAL: sql/context.sql) is reported once through ``on_session_level``.
The changes after a rejected context keep the context in force before it. No I/O here except
through the ``actor_last_seq`` callback (the registry's store connection), once per actor and
session, and the verifier's key reload (the source's catalog connection) after a failed MAC.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import orjson

from cdc.capture.model import MAYBE_INCOMPLETE, PG_EPOCH_OFFSET_US, FinishedTransaction, LogicalMessage
from cdc.context import (
    CONTEXT_PREFIX,
    ERROR_PREFIX,
    ContextVerifier,
    ReportedError,
    RequestContext,
)
from cdc.store.writer import StoreBatch

#: Transaction flag: a context message failed verification and was ignored.
CONTEXT_REJECTED = 4

#: Bytes of `changes` COPY text asked of the core at a time.
CHUNK_BYTES = 4 * 1024 * 1024
#: A batch stops growing at this many bytes of COPY text (one chunk may go over it alone).
BATCH_MAX_BYTES = 32 * 1024 * 1024
#: Verified contexts remembered by their transaction and message bytes (then the cache starts again).
CONTEXT_CACHE = 4096

_NULL = b"\\N"


def verified_context(verifier: ContextVerifier, content: bytes, lsn: int, xid: int) -> RequestContext | None:
    """The context a ``cdc.context`` message at ``lsn`` of transaction ``xid`` carries, or None when
    it does not verify (no MAC, a wrong one, signed in another transaction, malformed)."""
    return verifier.context(content, lsn, xid)


def verified_error(verifier: ContextVerifier, content: bytes, lsn: int) -> ReportedError | None:
    """The error a ``cdc.error`` message at ``lsn`` reports, or None when it does not verify."""
    return verifier.error(content, lsn)


def copy_text(value: str) -> bytes:
    """``value`` escaped for a COPY text field."""
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r").encode()


class _Context(NamedTuple):
    """A verified context as stored: its document (COPY-escaped JSON) and indexed fields (a
    tuple: one is made per transaction)."""

    document: bytes
    request_id: bytes
    actor: str | None
    actor_field: bytes


def _context(ctx: RequestContext) -> _Context:
    # The document leaves out keys with no value (docs/store.md "Transactions and context").
    doc = {k: v for k, v in ctx.as_json().items() if v is not None and v != {}}
    # JSON escapes every control character: only backslashes need COPY escaping.
    document = orjson.dumps(doc).replace(b"\\", b"\\\\")
    return _Context(
        document,
        copy_text(ctx.request_id) if ctx.request_id is not None else _NULL,
        ctx.actor,
        copy_text(ctx.actor) if ctx.actor is not None else _NULL,
    )


@dataclass(slots=True)
class Batch:
    """A store batch being built, with what the daemon's metrics need once it is written."""

    store: StoreBatch = field(default_factory=StoreBatch)
    started: float = field(default_factory=time.monotonic)
    nbytes: int = 0
    counts: dict[tuple[int, str, bool], int] = field(default_factory=dict)  # (table_id, op, rolled back)
    statuses: Counter[str] = field(default_factory=Counter)  # transactions by status
    last_committed_us: int | None = None  # Unix time of its last transaction's commit (lag metric)

    @property
    def rows(self) -> int:
        return self.store.rows


def split_lines(data: bytes, lines: int) -> tuple[bytes, bytes]:
    """``data`` cut after its first ``lines`` lines."""
    end = -1
    for _ in range(lines):
        end = data.index(b"\n", end + 1)
    return data[: end + 1], data[end + 1 :]


class BatchBuilder:
    """Fills batches from core events; ``add`` yields each batch a large transaction fills."""

    def __init__(
        self,
        *,
        max_rows: int,
        actor_last_seq: Callable[[str], int],
        verifier: ContextVerifier,
        max_bytes: int = BATCH_MAX_BYTES,
        chunk_bytes: int = CHUNK_BYTES,
        every_change_streamed: bool = False,
        on_session_level: Callable[[RequestContext, int], None] | None = None,
    ) -> None:
        self.max_rows = max_rows
        # Whether the walsender streams every change as it decodes it (PostgreSQL 16+,
        # debug_logical_replication_streaming = immediate). Else a streamed transaction's changes
        # since its last segment are dropped at its abort, whenever it was decoded: every
        # rolled-back transaction may miss some (MAYBE_INCOMPLETE, cdc/capture/model.py).
        self.every_change_streamed = every_change_streamed
        self._on_session_level = on_session_level
        self.max_bytes = max_bytes
        self.chunk_bytes = chunk_bytes
        self._actor_last_seq = actor_last_seq
        self._verifier = verifier
        self._actors: dict[str, int] = {}  # actor -> last sequence number handed out
        # Verified contexts by (transaction, message content): a context is bound to its
        # transaction (a signed body replayed elsewhere must be verified, and refused, again).
        self._contexts: dict[tuple[int, bytes], _Context] = {}
        self.current: Batch | None = None

    # -- the batch being built -----------------------------------------------------
    def batch(self) -> Batch:
        if self.current is None:
            self.current = Batch()
        return self.current

    def take(self) -> Batch | None:
        """The batch built so far (None when there is none); the next one starts empty."""
        batch, self.current = self.current, None
        return batch

    @property
    def full(self) -> bool:
        batch = self.current
        return batch is not None and (batch.store.rows >= self.max_rows or batch.nbytes >= self.max_bytes)

    def ack(self, lsn: int) -> None:
        """Acknowledge up to ``lsn`` with the batch being built (an empty one if needed)."""
        store = self.batch().store
        store.ack_lsn = lsn if store.ack_lsn is None else max(store.ack_lsn, lsn)

    # -- events ----------------------------------------------------------------------
    def add(self, event: FinishedTransaction | LogicalMessage) -> Iterator[Batch]:
        """Add one event; yield the batches it fills (only a large transaction fills any)."""
        if isinstance(event, LogicalMessage):
            if event.prefix == ERROR_PREFIX:
                self._error(event)
            return iter(())
        return self._transaction(event)

    def _error(self, message: LogicalMessage) -> None:
        error = verified_error(self._verifier, message.content, message.lsn)
        if error is None or not error.request_id:
            return
        self.batch().store.request_errors.append(
            {
                "lsn": message.lsn,
                "request_id": error.request_id,
                "reported_at": error.at.isoformat(),
                "error_type": error.error_type,
                "message": error.message,
                "location": error.location,
                # who reported it, as the source stamped it (docs/security.md "Request attribution")
                "db_user": error.db_user,
                "backend_pid": error.backend_pid,
                "client_addr": error.client_addr,
                "xid": error.xid,
                "reporter_pid": error.reporter_pid,
            }
        )

    def _transaction(self, txn: FinishedTransaction) -> Iterator[Batch]:
        spans, rejected = self._spans(txn)
        position = txn.position
        us = txn.committed_at_us + PG_EPOCH_OFFSET_US  # the store batch keeps Unix time
        if txn.change_count:
            first = True
            pending = txn.pending_count
            max_rows, max_bytes = self.max_rows, self.max_bytes
            for data in txn.chunks(self.chunk_bytes):
                chunk = data
                while chunk:
                    batch = self.current
                    if batch is None:
                        batch = self.current = Batch()
                    elif batch.store.rows >= max_rows or batch.nbytes >= max_bytes:  # full
                        self.current = None
                        yield batch
                        batch = self.current = Batch()
                    store = batch.store
                    lines = chunk.count(b"\n")
                    room = max_rows - store.rows
                    if lines > room > 0:
                        part, chunk = split_lines(chunk, room)
                        lines = room
                    else:
                        part, chunk = chunk, b""
                    store.changes.append(part)
                    store.rows += lines
                    batch.nbytes += len(part)
                    store.span(us)
                    store.max_position = max(store.max_position, position)
                    if first:
                        store.fresh.append(position)
                        first = False
                    if pending and (not store.pending or store.pending[-1] != position):
                        store.pending.append(position)
        batch = self.current
        if batch is None:
            batch = self.current = Batch()
        store = batch.store
        flags = txn.flags | (CONTEXT_REJECTED if rejected else 0)
        if txn.status == "r" and not self.every_change_streamed:
            flags |= MAYBE_INCOMPLETE
        self._rows(store, txn, spans, flags)
        counts = batch.counts
        for key, n in txn.counts.items():
            counts[key] = counts.get(key, 0) + n
        batch.statuses[txn.status] += 1
        batch.last_committed_us = us
        if store.ack_lsn is None or position > store.ack_lsn:
            store.ack_lsn = position

    def _spans(self, txn: FinishedTransaction) -> tuple[list[tuple[int, _Context | None]], bool]:
        """The contexts in force over the transaction's changes: (from ordinal, context)."""
        spans: list[tuple[int, _Context | None]] = [(0, None)]
        rejected = False
        count = txn.change_count
        for ordinal, lsn, prefix, content in txn.messages:
            if prefix != CONTEXT_PREFIX:
                continue
            cached = (txn.xid, content)
            ctx = self._contexts.get(cached)
            if ctx is None:
                verified = verified_context(self._verifier, content, lsn, txn.xid)
                if verified is None:
                    rejected = True
                    continue
                if verified.session_level and self._on_session_level is not None:
                    self._on_session_level(verified, lsn)
                ctx = _context(verified)
                if len(self._contexts) >= CONTEXT_CACHE:
                    self._contexts.clear()
                self._contexts[cached] = ctx
            if count and ordinal >= count:
                continue  # after the last change: describes nothing
            start = max(0, ordinal) if count else 0
            last_start, last = spans[-1]
            if last_start == start:
                spans[-1] = (start, ctx)
                if len(spans) > 1 and spans[-2][1] == ctx:
                    spans.pop()
            elif last != ctx:
                spans.append((start, ctx))
        return spans, rejected

    def _sequence(self, actor: str, count: int) -> int:
        """Hand out ``count`` sequence numbers of ``actor``; return the first."""
        last = self._actors.get(actor)
        if last is None:
            last = self._actor_last_seq(actor)
        self._actors[actor] = last + count
        return last + 1

    def _rows(
        self,
        store: StoreBatch,
        txn: FinishedTransaction,
        spans: list[tuple[int, _Context | None]],
        flags: int,
    ) -> None:
        count = txn.change_count
        first = spans[0][1]
        if not count and first is None:
            return
        committed_at = txn.committed_at_text.encode()
        seqs: list[bytes] = []
        for i, (start, ctx) in enumerate(spans):
            end = spans[i + 1][0] if i + 1 < len(spans) else count
            seq = _NULL
            if ctx is not None and ctx.actor is not None and end > start:
                seq = b"%d" % self._sequence(ctx.actor, end - start)
                store.actor_sequences[ctx.actor] = self._actors[ctx.actor]
            seqs.append(seq)
        store.transactions.append(
            b"%d\t%s\t%d\t%s\t%s\t%d\t%s\t%d\t%s\t%s\t%s\t%s\n"
            % (
                txn.position,
                committed_at,
                txn.xid,
                b"%d" % txn.commit_lsn if txn.commit_lsn is not None else _NULL,
                txn.status.encode(),
                flags,
                copy_text(txn.origin) if txn.origin is not None else _NULL,
                count,
                first.request_id if first is not None else _NULL,
                first.actor_field if first is not None else _NULL,
                seqs[0],
                first.document if first is not None else _NULL,
            )
        )
        for (start, ctx), seq in zip(spans[1:], seqs[1:], strict=True):
            assert ctx is not None
            store.context_changes.append(
                b"%d\t%s\t%d\t%s\t%s\t%s\t%s\n"
                % (txn.position, committed_at, start, ctx.request_id, ctx.actor_field, seq, ctx.document)
            )
        store.span(txn.committed_at_us + PG_EPOCH_OFFSET_US)
