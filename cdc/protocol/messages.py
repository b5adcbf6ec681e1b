"""The pgoutput logical replication messages, protocol versions 1 to 4, as slotted dataclasses.

What :mod:`cdc.protocol.pgoutput` decodes each message payload into. The classes are treated as
immutable (not ``frozen``: a frozen dataclass's ``__init__`` sets each field through
``object.__setattr__``, 3.6x the cost, per message). Times stay ints (microseconds since
2000-01-01 UTC) and LSNs stay ints, exactly as on the wire; see ``cdc.protocol.frames`` for
conversions. Like the decoder, this module knows nothing of the rest of cdc.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, TypeAlias

__all__ = [
    "UNCHANGED_TOAST",
    "Begin",
    "BeginPrepare",
    "Column",
    "Commit",
    "CommitPrepared",
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
]


class UnchangedToast:
    """The value of a TOASTed column the change did not touch (tuple kind ``'u'``).

    PostgreSQL does not send such values again; the old value still holds.
    There is exactly one instance, ``UNCHANGED_TOAST``; compare with ``is``.
    """

    __slots__ = ()
    _instance: UnchangedToast | None = None

    def __new__(cls) -> UnchangedToast:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED_TOAST"

    def __reduce__(self) -> str:
        return "UNCHANGED_TOAST"

    def __copy__(self) -> UnchangedToast:
        return self

    def __deepcopy__(self, memo: object) -> UnchangedToast:
        return self


UNCHANGED_TOAST: Final = UnchangedToast()

#: One row image: ``None`` for SQL NULL (kind ``'n'``), ``UNCHANGED_TOAST`` (``'u'``),
#: ``str`` for a value in text format (``'t'``), ``bytes`` for binary format (``'b'``).
TupleData: TypeAlias = tuple[str | bytes | UnchangedToast | None, ...]


# --------------------------------------------------------------------------- messages


@dataclass(slots=True, unsafe_hash=True)
class Column:
    """One column of a Relation message."""

    flags: int
    name: str
    type_oid: int
    type_modifier: int

    @property
    def is_key(self) -> bool:
        """True if the column is part of the replica identity (flag bit 1)."""
        return bool(self.flags & 1)


@dataclass(slots=True, unsafe_hash=True)
class Begin:
    """'B': start of a (non-streamed) transaction."""

    final_lsn: int
    commit_time: int
    xid: int


@dataclass(slots=True, unsafe_hash=True)
class Commit:
    """'C': end of a transaction."""

    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: int


@dataclass(slots=True, unsafe_hash=True)
class Origin:
    """'O': the replication origin the transaction came from."""

    commit_lsn: int
    name: str


@dataclass(slots=True, unsafe_hash=True)
class Relation:
    """'R': the shape of a table, sent before the first change to it in a session."""

    xid: int | None
    oid: int
    namespace: str  # "" means pg_catalog
    name: str
    replica_identity: str  # 'd' default, 'n' nothing, 'f' full, 'i' index
    columns: tuple[Column, ...]


@dataclass(slots=True, unsafe_hash=True)
class Type:
    """'Y': a non-builtin data type used by a column of a following Relation."""

    xid: int | None
    oid: int
    namespace: str
    name: str


@dataclass(slots=True, unsafe_hash=True)
class Insert:
    """'I': a new row."""

    xid: int | None
    relation_oid: int
    new: TupleData


@dataclass(slots=True, unsafe_hash=True)
class Update:
    """'U': a changed row; ``old`` is present when the key changed ('K') or identity is FULL ('O')."""

    xid: int | None
    relation_oid: int
    old: TupleData | None
    old_kind: str | None
    new: TupleData


@dataclass(slots=True, unsafe_hash=True)
class Delete:
    """'D': a deleted row: its key columns ('K') or the whole old row ('O')."""

    xid: int | None
    relation_oid: int
    old: TupleData
    old_kind: str


@dataclass(slots=True, unsafe_hash=True)
class Truncate:
    """'T': TRUNCATE of one or more tables."""

    xid: int | None
    options: int
    relation_oids: tuple[int, ...]

    @property
    def cascade(self) -> bool:
        """TRUNCATE ... CASCADE."""
        return bool(self.options & 1)

    @property
    def restart_identity(self) -> bool:
        """TRUNCATE ... RESTART IDENTITY."""
        return bool(self.options & 2)


@dataclass(slots=True, unsafe_hash=True)
class Message:
    """'M': a logical decoding message from ``pg_logical_emit_message``."""

    xid: int | None
    transactional: bool
    lsn: int
    prefix: str
    content: bytes


@dataclass(slots=True, unsafe_hash=True)
class StreamStart:
    """'S' (protocol 2+): start of a block of changes of an in-progress transaction."""

    xid: int
    first_segment: bool


@dataclass(slots=True, unsafe_hash=True)
class StreamStop:
    """'E' (protocol 2+): end of a streamed block."""


@dataclass(slots=True, unsafe_hash=True)
class StreamCommit:
    """'c' (protocol 2+): commit of a streamed transaction."""

    xid: int
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: int


@dataclass(slots=True, unsafe_hash=True)
class StreamAbort:
    """'A' (protocol 2+): abort of a streamed transaction (``subxid == xid``) or subtransaction.

    ``abort_lsn`` and ``abort_time`` are on the wire only with protocol 4 and
    ``streaming 'parallel'``; otherwise they are ``None``.
    """

    xid: int
    subxid: int
    abort_lsn: int | None
    abort_time: int | None


@dataclass(slots=True, unsafe_hash=True)
class BeginPrepare:
    """'b' (protocol 3+): start of a transaction being prepared (two-phase)."""

    prepare_lsn: int
    end_lsn: int
    prepare_time: int
    xid: int
    gid: str


@dataclass(slots=True, unsafe_hash=True)
class Prepare:
    """'P' (protocol 3+): PREPARE TRANSACTION."""

    flags: int
    prepare_lsn: int
    end_lsn: int
    prepare_time: int
    xid: int
    gid: str


@dataclass(slots=True, unsafe_hash=True)
class CommitPrepared:
    """'K' (protocol 3+): COMMIT PREPARED."""

    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: int
    xid: int
    gid: str


@dataclass(slots=True, unsafe_hash=True)
class RollbackPrepared:
    """'r' (protocol 3+): ROLLBACK PREPARED."""

    flags: int
    prepare_end_lsn: int
    rollback_end_lsn: int
    prepare_time: int
    rollback_time: int
    xid: int
    gid: str


@dataclass(slots=True, unsafe_hash=True)
class StreamPrepare:
    """'p' (protocol 3+): PREPARE TRANSACTION of a streamed transaction."""

    flags: int
    prepare_lsn: int
    end_lsn: int
    prepare_time: int
    xid: int
    gid: str


PgOutputMessage: TypeAlias = (
    Begin
    | Commit
    | Origin
    | Relation
    | Type
    | Insert
    | Update
    | Delete
    | Truncate
    | Message
    | StreamStart
    | StreamStop
    | StreamCommit
    | StreamAbort
    | BeginPrepare
    | Prepare
    | CommitPrepared
    | RollbackPrepared
    | StreamPrepare
)
