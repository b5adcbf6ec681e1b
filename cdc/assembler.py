"""Transaction assembler: from pgoutput messages to transactions of row mutations.

Input is the payload of each XLogData frame with its WAL position; output is events:
a finished transaction (committed or rolled back) whose mutations are produced lazily,
a non-transactional logical message, or a schema seen for the first time.

What it does:
- buffers each transaction (streamed or not) until its outcome is known, keeping the
  raw payloads in memory up to a bound and spilling the largest transaction to a temp
  file beyond it, so a transaction of any size costs bounded memory;
- keeps a relation cache of every schema version (a streamed transaction's Relation
  messages apply to it first and to everyone once it commits, as pgoutput assumes);
- stitches request context: each change carries the ``cdc.context`` message in force
  at its own position in the transaction, as verified by the given reader (a message
  that fails verification leaves the changes after it without context);
- marks changes of aborted streamed transactions and rolled-back savepoints
  ``rolled_back``;
- fills before images and unchanged TOAST values from the last image it has seen of
  the row; what it has not seen is left for the store to fill (``fill_before``,
  ``fill_after``) from its last stored image, never a placeholder.

It does no network or database I/O; the only I/O is its spill files.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

import orjson

from cdc.context import CONTEXT_PREFIX, RequestContext
from cdc.errors import ProtocolError
from cdc.protocol.frames import pg_time_to_datetime
from cdc.protocol.pgoutput import (
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
    Update,
    decode_message,
)
from cdc.values import Converter, converter_for

Row = dict[str, Any]
# Images of rows changed by a rolled-back part of the transaction being replayed.
LocalImages = dict[tuple[str, tuple[Any, ...]], tuple[Row, tuple[str, ...]] | None]
# Given a relation whose protocol key flags do not name the row (REPLICA IDENTITY FULL or
# NOTHING), return its primary key columns, or None when it has none (the whole row is the key).
PrimaryKeyLookup = Callable[[Relation], tuple[str, ...] | None]
# Given a cdc.context message's content, its LSN and its transaction's xid, the verified context
# or None (cdc.context.ContextVerifier.context): unverified content is never used.
ContextReader = Callable[[bytes, int, int], RequestContext | None]

COMMITTED = "committed"
ROLLED_BACK = "rolled_back"

_ENTRY_HEADER = struct.Struct("!QII")  # lsn, subxid, payload length
_ENTRY_OVERHEAD = 96  # rough per-entry bytes of Python objects kept in memory


@dataclass(frozen=True, slots=True)
class TableSchema:
    """One version of a captured table's schema."""

    relation_oid: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[Column, ...]
    key_columns: tuple[str, ...]  # empty: the whole row names it
    converters: tuple[Converter, ...] = field(compare=False, repr=False)
    fingerprint: str = ""
    column_names: tuple[str, ...] = field(default=(), compare=False, repr=False)
    # (name, converter) of the columns whose text is converted (integers, booleans).
    typed_columns: tuple[tuple[str, Callable[[str], Any]], ...] = field(default=(), compare=False, repr=False)
    # (column, policy) of the columns a redaction policy applies to (set by cdc.policies).
    policies: tuple[tuple[str, str], ...] = ()

    @property
    def table(self) -> str:
        return f"{self.namespace}.{self.name}"

    def columns_json(self) -> list[dict[str, Any]]:
        policies = dict(self.policies)
        return [
            {
                "name": c.name,
                "type_oid": c.type_oid,
                "type_modifier": c.type_modifier,
                "key": c.name in self.key_columns,
                **({"policy": policies[c.name]} if c.name in policies else {}),
            }
            for c in self.columns
        ]


def build_schema(relation: Relation, primary_key: PrimaryKeyLookup | None) -> TableSchema:
    flagged = tuple(c.name for c in relation.columns if c.is_key)
    if relation.replica_identity in ("d", "i") and flagged:
        key_columns = flagged
    else:
        # FULL flags every column; NOTHING flags none: ask for the primary key instead.
        looked_up = primary_key(relation) if primary_key is not None else None
        names = {c.name for c in relation.columns}
        key_columns = looked_up if looked_up and set(looked_up) <= names else ()
    schema = TableSchema(
        relation_oid=relation.oid,
        namespace=relation.namespace,
        name=relation.name,
        replica_identity=relation.replica_identity,
        columns=relation.columns,
        key_columns=key_columns,
        converters=tuple(converter_for(c.type_oid) for c in relation.columns),
    )
    digest = hashlib.sha256(
        json.dumps(
            [schema.table, relation.oid, relation.replica_identity, list(key_columns), schema.columns_json()],
            sort_keys=True,
        ).encode()
    ).hexdigest()[:32]
    return TableSchema(
        relation_oid=schema.relation_oid,
        namespace=schema.namespace,
        name=schema.name,
        replica_identity=schema.replica_identity,
        columns=schema.columns,
        key_columns=schema.key_columns,
        converters=schema.converters,
        fingerprint=digest,
        column_names=tuple(c.name for c in relation.columns),
        typed_columns=tuple(
            (c.name, convert)
            for c, convert in zip(relation.columns, schema.converters, strict=True)
            if convert
        ),
    )


@dataclass(slots=True)
class Mutation:
    """One row change, ready for the store. Images map column name to stored value."""

    position: int
    ordinal: int
    lsn: int
    xid: int
    committed_at: datetime
    table: str
    op: str
    key: Row | None
    old_key: Row | None
    before: Row | None
    after: Row | None
    changed: list[str] | None
    status: str
    context: RequestContext | None
    schema: TableSchema | None
    # What the store must fill from its last committed image of the row (the one at
    # ``old_key`` or ``key``) before this position: the whole before image, some of
    # its columns, or after-image columns sent as unchanged TOAST.
    fill_before: bool | tuple[str, ...] = False
    fill_after: tuple[str, ...] = ()

    @property
    def version(self) -> int | None:
        return self.position if self.status == COMMITTED else None

    @property
    def request_id(self) -> str | None:
        return self.context.request_id if self.context is not None else None


@dataclass(slots=True)
class FinishedTransaction:
    """A transaction whose outcome is known. ``mutations()`` may be iterated once."""

    xid: int
    position: int
    commit_lsn: int | None
    status: str
    committed_at: datetime
    origin: str | None
    _replay: Callable[[], Iterator[Mutation]]

    def mutations(self) -> Iterator[Mutation]:
        return self._replay()


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    """A non-transactional logical message (e.g. ``cdc.error``, ``cdc.heartbeat``)."""

    lsn: int
    prefix: str
    content: bytes


Event = FinishedTransaction | LogicalMessage


class _TxnBuffer:
    """The raw payloads of one transaction, in memory or spilled to a temp file."""

    __slots__ = (
        "aborted_subxids",
        "entries",
        "file",
        "first_lsn",
        "memory_bytes",
        "origin",
        "relations",
        "spill_dir",
        "streamed",
        "xid",
    )

    def __init__(self, xid: int, streamed: bool, first_lsn: int, spill_dir: str | None) -> None:
        self.xid = xid
        self.streamed = streamed
        self.first_lsn = first_lsn
        self.entries: list[tuple[int, int, bytes]] = []
        self.memory_bytes = 0
        self.file: IO[bytes] | None = None
        self.aborted_subxids: set[int] = set()
        self.origin: str | None = None
        self.spill_dir = spill_dir

    def append(self, lsn: int, subxid: int, payload: bytes) -> int:
        """Add one entry; return the bytes of memory it added."""
        if self.file is not None:
            self.file.write(_ENTRY_HEADER.pack(lsn, subxid, len(payload)))
            self.file.write(payload)
            return 0
        self.entries.append((lsn, subxid, payload))
        added = len(payload) + _ENTRY_OVERHEAD
        self.memory_bytes += added
        return added

    def spill(self) -> int:
        """Move the in-memory entries to a temp file; return the bytes of memory freed."""
        if self.file is None:
            # Unlinked at once: nothing is left behind if the process dies.
            self.file = tempfile.TemporaryFile(prefix="cdc-spill-", dir=self.spill_dir)  # noqa: SIM115 - closed by close()
        for lsn, subxid, payload in self.entries:
            self.file.write(_ENTRY_HEADER.pack(lsn, subxid, len(payload)))
            self.file.write(payload)
        freed = self.memory_bytes
        self.entries = []
        self.memory_bytes = 0
        return freed

    def __iter__(self) -> Iterator[tuple[int, int, bytes]]:
        if self.file is None:
            yield from self.entries
            return
        self.file.flush()
        self.file.seek(0)
        header_size = _ENTRY_HEADER.size
        while True:
            header = self.file.read(header_size)
            if not header:
                break
            if len(header) != header_size:
                raise ProtocolError("spill file truncated")
            lsn, subxid, size = _ENTRY_HEADER.unpack(header)
            yield lsn, subxid, self.file.read(size)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        self.entries = []


class _ImageCache:
    """Last committed image of recently changed rows, bounded (LRU)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # value: (image, columns of the image still unknown here)
        self._rows: OrderedDict[tuple[str, tuple[Any, ...]], tuple[Row, tuple[str, ...]]] = OrderedDict()

    def get(self, table: str, key: tuple[Any, ...]) -> tuple[Row, tuple[str, ...]] | None:
        found = self._rows.get((table, key))
        if found is not None:
            self._rows.move_to_end((table, key))
        return found

    def put(self, table: str, key: tuple[Any, ...], image: Row | None, unknown: tuple[str, ...] = ()) -> None:
        if image is None:
            # Deleted: remember absence so a re-insert is not mistaken for a stale image.
            self._rows.pop((table, key), None)
            return
        self._rows[(table, key)] = (image, unknown)
        self._rows.move_to_end((table, key))
        if len(self._rows) > self.capacity:
            self._rows.popitem(last=False)

    def drop_table(self, table: str) -> None:
        for cache_key in [k for k in self._rows if k[0] == table]:
            del self._rows[cache_key]

    def __len__(self) -> int:
        return len(self._rows)


def _cache_key(schema: TableSchema, key: Row) -> tuple[Any, ...]:
    """A cheap hashable form of a key (values in key-column order) for the image cache."""
    names = schema.key_columns
    if len(names) == 1:  # the usual case; a generator costs more than the lookup
        return (key.get(names[0]),)
    return tuple([key.get(name) for name in names])


def key_text(key: Row) -> str:
    """Canonical text of a key, for dict lookups (and the same jsonb the store keeps)."""
    return orjson.dumps(key, option=orjson.OPT_SORT_KEYS).decode()


class Assembler:
    """Feeds on (wal_start, payload) pairs; yields events in commit order."""

    def __init__(
        self,
        *,
        primary_key: PrimaryKeyLookup | None = None,
        memory_limit_bytes: int = 64 * 1024 * 1024,
        spill_dir: str | None = None,
        image_cache_rows: int = 20_000,
        skip_through: int = 0,
        read_context: ContextReader | None = None,
    ) -> None:
        self._primary_key = primary_key
        self._read_context = read_context  # None: context messages are ignored
        self.memory_limit_bytes = memory_limit_bytes
        self._spill_dir = spill_dir
        self._relations: dict[int, TableSchema] = {}
        self._buffers: dict[int, _TxnBuffer] = {}
        self._prepared: dict[str, _TxnBuffer] = {}
        self._current: _TxnBuffer | None = None  # the open non-streamed transaction
        self._streaming: _TxnBuffer | None = None  # the streamed transaction of the open block
        self._images = _ImageCache(image_cache_rows)
        self.memory_bytes = 0
        self.spilled_transactions = 0
        # Transactions at or before this position are already in the store: skip them.
        self.skip_through = skip_through
        # Streaming every transaction resends its Relation messages: build each schema once.
        self._schemas: dict[tuple[Any, ...], TableSchema] = {}
        self._schemas_by_body: dict[bytes, TableSchema] = {}

    # -- state -----------------------------------------------------------------
    @property
    def open_transactions(self) -> int:
        return len(self._buffers) + len(self._prepared) + (1 if self._current is not None else 0)

    def relation(self, oid: int) -> TableSchema | None:
        return self._relations.get(oid)

    # -- input -----------------------------------------------------------------
    def feed(self, wal_start: int, payload: bytes) -> list[Event]:
        """Consume one pgoutput message; return the events it completes."""
        if not payload:
            raise ProtocolError("empty pgoutput message")
        kind = payload[0]
        if self._streaming is not None and kind in _DATA_KINDS:
            if len(payload) < 5:
                raise ProtocolError("streamed change too short to carry an xid")
            subxid = int.from_bytes(payload[1:5], "big")
            if kind == _MESSAGE and not (payload[5] & 1 if len(payload) > 5 else 0):
                return [self._non_transactional(decode_message(payload, in_stream=True), wal_start)]
            self._buffer_append(self._streaming, wal_start, subxid, payload)
            return []
        if self._current is not None and kind in _DATA_KINDS:
            if kind == _MESSAGE and len(payload) > 1 and not (payload[1] & 1):
                return [self._non_transactional(decode_message(payload, in_stream=False), wal_start)]
            self._buffer_append(self._current, wal_start, self._current.xid, payload)
            return []
        message = decode_message(payload, in_stream=self._streaming is not None)
        return self._control(message, wal_start)

    def _non_transactional(self, message: PgOutputMessage, wal_start: int) -> LogicalMessage:
        assert isinstance(message, Message)
        return LogicalMessage(lsn=message.lsn or wal_start, prefix=message.prefix, content=message.content)

    def _control(self, message: PgOutputMessage, wal_start: int) -> list[Event]:
        match message:
            case Begin(xid=xid):
                self._current = _TxnBuffer(xid, False, wal_start, self._spill_dir)
            case BeginPrepare(xid=xid):
                self._current = _TxnBuffer(xid, False, wal_start, self._spill_dir)
            case Commit(commit_lsn=commit_lsn, end_lsn=end_lsn, commit_time=commit_time):
                buffer = self._take_current("Commit")
                return self._finish(buffer, end_lsn, commit_lsn, COMMITTED, commit_time)
            case Prepare(gid=gid) | StreamPrepare(gid=gid):
                buffer = (
                    self._take_current("Prepare")
                    if isinstance(message, Prepare)
                    else self._pop_buffer(message.xid) or _TxnBuffer(message.xid, True, 0, None)
                )
                self._prepared[gid] = buffer
            case CommitPrepared(gid=gid, commit_lsn=commit_lsn, end_lsn=end_lsn, commit_time=commit_time):
                buffer = self._pop_prepared(gid) or _TxnBuffer(message.xid, False, 0, None)
                return self._finish(buffer, end_lsn, commit_lsn, COMMITTED, commit_time)
            case RollbackPrepared(gid=gid):
                buffer = self._pop_prepared(gid) or _TxnBuffer(message.xid, False, 0, None)
                return self._finish(
                    buffer, message.rollback_end_lsn, None, ROLLED_BACK, message.rollback_time
                )
            case StreamStart(xid=xid):
                if xid not in self._buffers:
                    self._buffers[xid] = _TxnBuffer(xid, True, wal_start, self._spill_dir)
                self._streaming = self._buffers[xid]
            case StreamStop():
                self._streaming = None
            case StreamCommit(xid=xid, commit_lsn=commit_lsn, end_lsn=end_lsn, commit_time=commit_time):
                buffer = self._pop_buffer(xid) or _TxnBuffer(xid, True, 0, None)
                return self._finish(buffer, end_lsn, commit_lsn, COMMITTED, commit_time)
            case StreamAbort(xid=xid, subxid=subxid, abort_lsn=abort_lsn, abort_time=abort_time):
                if subxid != xid:
                    streamed = self._buffers.get(xid)
                    if streamed is not None:
                        streamed.aborted_subxids.add(subxid)
                    return []
                found = self._pop_buffer(xid)
                if found is None:
                    return []
                # The abort record's start LSN can equal the end LSN of an earlier commit;
                # +1 keeps rolled-back positions distinct from every version.
                position = (abort_lsn if abort_lsn else wal_start) + 1
                return self._finish(found, position, None, ROLLED_BACK, abort_time)
            case Origin(name=name):
                target = self._streaming or self._current
                if target is not None:
                    target.origin = name
            case Message(transactional=False):
                return [self._non_transactional(message, wal_start)]
            case Relation() | Type() | Insert() | Update() | Delete() | Truncate() | Message():
                # Outside any transaction: pgoutput sends none of these; ignore defensively.
                pass
            case _:
                raise ProtocolError(f"unexpected message {type(message).__name__}")
        return []

    def _pop_buffer(self, xid: int) -> _TxnBuffer | None:
        return self._buffers.pop(xid, None)

    def _pop_prepared(self, gid: str) -> _TxnBuffer | None:
        return self._prepared.pop(gid, None)

    def _take_current(self, what: str) -> _TxnBuffer:
        buffer = self._current
        if buffer is None:
            raise ProtocolError(f"{what} without Begin")
        self._current = None
        return buffer

    def _buffer_append(self, buffer: _TxnBuffer, lsn: int, subxid: int, payload: bytes) -> None:
        self.memory_bytes += buffer.append(lsn, subxid, payload)
        if self.memory_bytes > self.memory_limit_bytes:
            self._spill_largest()

    def _spill_largest(self) -> None:
        candidates = list(self._buffers.values()) + list(self._prepared.values())
        if self._current is not None:
            candidates.append(self._current)
        while self.memory_bytes > self.memory_limit_bytes // 2 and candidates:
            largest = max(candidates, key=lambda b: b.memory_bytes)
            if largest.memory_bytes == 0:
                break
            if largest.file is None:
                self.spilled_transactions += 1
            self.memory_bytes -= largest.spill()
            candidates.remove(largest)

    # -- output ----------------------------------------------------------------
    def _finish(
        self,
        buffer: _TxnBuffer,
        position: int,
        commit_lsn: int | None,
        status: str,
        when: int | None,
    ) -> list[Event]:
        self.memory_bytes -= buffer.memory_bytes
        committed_at = pg_time_to_datetime(when) if when is not None else datetime.now(UTC)
        if position <= self.skip_through:
            buffer.close()
            return []

        def replay() -> Iterator[Mutation]:
            try:
                yield from self._replay(buffer, position, status, committed_at)
            finally:
                buffer.close()

        return [
            FinishedTransaction(
                xid=buffer.xid,
                position=position,
                commit_lsn=commit_lsn,
                status=status,
                committed_at=committed_at,
                origin=buffer.origin,
                _replay=replay,
            )
        ]

    def _replay(
        self, buffer: _TxnBuffer, position: int, status: str, committed_at: datetime
    ) -> Iterator[Mutation]:
        overlay: dict[int, TableSchema] = {}
        local_images: LocalImages = {}
        context: RequestContext | None = None
        ordinal = 0
        rolled_back_txn = status != COMMITTED
        aborted = buffer.aborted_subxids
        relation_body = 5 if buffer.streamed else 1  # a streamed message carries its xid first
        for lsn, subxid, payload in buffer:
            if payload[0] == _RELATION:
                # Streaming every transaction resends its Relation messages: the same bytes
                # (after the xid) give the same schema, without decoding them again.
                known = self._schemas_by_body.get(payload[relation_body:])
                if known is not None:
                    if buffer.streamed:
                        overlay[known.relation_oid] = known
                    else:
                        self._relations[known.relation_oid] = known
                    continue
            message = decode_message(payload, in_stream=buffer.streamed)
            if isinstance(message, Message):
                if message.prefix == CONTEXT_PREFIX:
                    read = self._read_context
                    context = read(message.content, lsn, buffer.xid) if read is not None else None
                continue
            if isinstance(message, Relation):
                schema = self._schema_for(message)
                if len(self._schemas_by_body) > 10_000:
                    self._schemas_by_body.clear()
                self._schemas_by_body[payload[relation_body:]] = schema
                if buffer.streamed:
                    overlay[message.oid] = schema
                else:
                    self._relations[message.oid] = schema
                continue
            if isinstance(message, Type):
                continue
            row_status = ROLLED_BACK if rolled_back_txn or subxid in aborted else COMMITTED
            for mutation in self._mutations_of(
                message, overlay, local_images, row_status, position, lsn, subxid, committed_at, context
            ):
                mutation.ordinal = ordinal
                ordinal += 1
                yield mutation
        if status == COMMITTED and overlay:
            self._relations.update(overlay)

    def _schema_for(self, relation: Relation) -> TableSchema:
        key = (relation.oid, relation.namespace, relation.name, relation.replica_identity, relation.columns)
        schema = self._schemas.get(key)
        if schema is None:
            if len(self._schemas) > 10_000:
                self._schemas.clear()
            schema = build_schema(relation, self._primary_key)
            self._schemas[key] = schema
        return schema

    def _schema(self, oid: int, overlay: dict[int, TableSchema]) -> TableSchema:
        schema = overlay.get(oid) or self._relations.get(oid)
        if schema is None:
            raise ProtocolError(f"change for relation {oid} before its Relation message")
        return schema

    def _mutations_of(
        self,
        message: PgOutputMessage,
        overlay: dict[int, TableSchema],
        local_images: LocalImages,
        status: str,
        position: int,
        lsn: int,
        xid: int,
        committed_at: datetime,
        context: RequestContext | None,
    ) -> Iterator[Mutation]:
        if isinstance(message, Truncate):
            for oid in message.relation_oids:
                schema = self._schema(oid, overlay)
                if status == COMMITTED:
                    self._images.drop_table(schema.table)
                yield Mutation(
                    position,
                    0,
                    lsn,
                    xid,
                    committed_at,
                    schema.table,
                    "TRUNCATE",
                    None,
                    None,
                    None,
                    None,
                    None,
                    status,
                    context,
                    schema,
                )
            return
        if isinstance(message, Insert):
            schema = self._schema(message.relation_oid, overlay)
            after, unknown = _image(schema, message.new)
            key = _key(schema, after)
            mutation = Mutation(
                position,
                0,
                lsn,
                xid,
                committed_at,
                schema.table,
                "INSERT",
                key,
                None,
                None,
                after,
                list(after),
                status,
                context,
                schema,
            )
            if unknown:
                # An INSERT never carries unchanged TOAST; treat as a protocol surprise.
                raise ProtocolError(f"INSERT into {schema.table} with unchanged TOAST columns")
            self._remember(schema, key, after, (), status, local_images)
            yield mutation
            return
        if isinstance(message, Update):
            schema = self._schema(message.relation_oid, overlay)
            yield self._update(
                schema, message, status, position, lsn, xid, committed_at, context, local_images
            )
            return
        if isinstance(message, Delete):
            schema = self._schema(message.relation_oid, overlay)
            old, old_unknown = _image(schema, message.old)
            key = _key(schema, old)
            before: Row | None
            fill_before: bool | tuple[str, ...] = False
            if message.old_kind == "O":
                before, fill_before = old, old_unknown
            else:
                before, fill_before = self._last_image(schema, key, status, local_images)
            mutation = Mutation(
                position,
                0,
                lsn,
                xid,
                committed_at,
                schema.table,
                "DELETE",
                key,
                None,
                before,
                None,
                list(before) if before is not None and not fill_before else None,
                status,
                context,
                schema,
                fill_before=fill_before,
            )
            self._remember(schema, key, None, (), status, local_images)
            yield mutation
            return
        raise ProtocolError(f"unexpected {type(message).__name__} inside a transaction")

    def _update(
        self,
        schema: TableSchema,
        message: Update,
        status: str,
        position: int,
        lsn: int,
        xid: int,
        committed_at: datetime,
        context: RequestContext | None,
        local_images: LocalImages,
    ) -> Mutation:
        after, toast = _image(schema, message.new)
        old_key: Row | None = None
        before: Row | None = None
        fill_before: bool | tuple[str, ...] = False
        if message.old is not None:
            old, old_unknown = _image(schema, message.old)
            old_key = _key(schema, old)
            if message.old_kind == "O":
                before, fill_before = old, old_unknown
        key = _key(schema, after) if not toast or not schema.key_columns else _key_partial(schema, after)
        if key is None:
            # A key column sent as unchanged TOAST (huge text key): the key did not change.
            key = old_key if old_key is not None else {}
        lookup_key = old_key if old_key is not None else key
        if before is None:
            before, fill_before = self._last_image(schema, lookup_key, status, local_images)
        if old_key is not None and old_key == key:
            old_key = None
        fill_after: tuple[str, ...] = ()
        if toast:
            known = before if before is not None else {}
            missing = []
            for column in toast:
                if column in known and not (isinstance(fill_before, tuple) and column in fill_before):
                    after[column] = known[column]
                else:
                    missing.append(column)
            fill_after = tuple(missing)
        changed: list[str] | None = None
        if before is not None and fill_before is False and not fill_after:
            changed = [
                c for c in schema.column_names if c in after and (c not in before or before[c] != after[c])
            ]
        self._remember(schema, key, after, fill_after, status, local_images, moved_from=old_key)
        return Mutation(
            position,
            0,
            lsn,
            xid,
            committed_at,
            schema.table,
            "UPDATE",
            key,
            old_key,
            before,
            after,
            changed,
            status,
            context,
            schema,
            fill_before=fill_before,
            fill_after=fill_after,
        )

    def _last_image(
        self,
        schema: TableSchema,
        key: Row,
        status: str,
        local_images: LocalImages,
    ) -> tuple[Row | None, bool | tuple[str, ...]]:
        """The row's last image we know of, and what the store must still fill in it."""
        text = _cache_key(schema, key)
        if status != COMMITTED and (schema.table, text) in local_images:
            local = local_images[(schema.table, text)]
            if local is None:
                return None, False
            return dict(local[0]), local[1] or False
        cached = self._images.get(schema.table, text)
        if cached is None:
            return None, True
        image, unknown = cached
        return dict(image), unknown or False

    def _remember(
        self,
        schema: TableSchema,
        key: Row,
        image: Row | None,
        unknown: tuple[str, ...],
        status: str,
        local_images: LocalImages,
        moved_from: Row | None = None,
    ) -> None:
        if not schema.key_columns:
            return  # keyless rows are named by their content; the server sends full images
        text = _cache_key(schema, key)
        if status == COMMITTED:
            if moved_from is not None and moved_from != key:
                self._images.put(schema.table, _cache_key(schema, moved_from), None)
            self._images.put(schema.table, text, image, unknown)
        else:
            if moved_from is not None and moved_from != key:
                local_images[(schema.table, _cache_key(schema, moved_from))] = None
            local_images[(schema.table, text)] = (image, unknown) if image is not None else None


_DATA_KINDS = frozenset(b"RYIUDTM")
_MESSAGE = ord("M")
_RELATION = ord("R")


def _image(schema: TableSchema, values: TupleData) -> tuple[Row, tuple[str, ...]]:
    """Row image of a tuple, and the columns sent as unchanged TOAST (absent from it)."""
    if len(values) != len(schema.columns):
        raise ProtocolError(
            f"tuple of {len(values)} columns for {schema.table} whose schema has {len(schema.columns)}"
        )
    row: Row = dict(zip(schema.column_names, values, strict=True))
    unknown: tuple[str, ...] = ()
    if UNCHANGED_TOAST in values:  # a C-level scan; rare
        unknown = tuple(n for n, v in zip(schema.column_names, values, strict=True) if v is UNCHANGED_TOAST)
        for name in unknown:
            del row[name]
    for name, convert in schema.typed_columns:
        value = row.get(name)
        if value is not None:
            row[name] = convert(value)
    return row, unknown


def _key(schema: TableSchema, image: Row) -> Row:
    if not schema.key_columns:
        return dict(image)
    return {name: image.get(name) for name in schema.key_columns}


def _key_partial(schema: TableSchema, image: Row) -> Row | None:
    if any(name not in image for name in schema.key_columns):
        return None
    return _key(schema, image)


def spill_dir_usable(path: str | None) -> str | None:
    """Return a problem with the spill directory, or None when it can be written."""
    target = path or tempfile.gettempdir()
    if not os.path.isdir(target):
        return f"spill directory {target} does not exist"
    if not os.access(target, os.W_OK):
        return f"spill directory {target} is not writable"
    return None
