"""What the capture core takes and gives: shared by both implementations and the daemon.

The capture core (``cdc.capture.engine.Core``) turns replication CopyData frames into, per
finished transaction, the COPY text lines of the ``changes`` table (docs/store.md "COPY format").
Its caller answers, for every distinct Relation message (at the first change using it), what the
registry knows of the table (``RelationInfo``); the core gives back ``FinishedTransaction`` and
``LogicalMessage`` events.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final, Protocol

#: Microseconds from the Unix epoch (1970-01-01) to the PostgreSQL epoch (2000-01-01).
PG_EPOCH_OFFSET_US: Final = 946_684_800_000_000

# Change flags (docs/store.md "Change flags").
ROLLED_BACK: Final = 1
BEFORE_FROM_WAL: Final = 2
INCOMPLETE: Final = 4
OVERSIZE: Final = 8
KEY_UNKNOWN: Final = 16

# Transaction flags (docs/store.md "Transaction flags").
STREAMED: Final = 1
#: A rolled-back transaction the core cannot show was decoded while in progress, so some attempted
#: changes may be missing (PostgreSQL stops decoding a transaction it finds aborted): its abort time
#: is unknown (PostgreSQL 15's Stream Abort has none), a frame of it was sent at or after that time
#: (XLogData sendTime and the abort time are the same server's clock: the walsender was behind),
#: or its first segment never arrived. Decoded in progress means complete only when the walsender
#: streams every change as it decodes it (debug_logical_replication_streaming = immediate): else
#: the changes it buffered since its last segment are dropped at the abort, and the batch builder
#: sets the flag on every rolled-back transaction (cdc/capture/batches.py).
MAYBE_INCOMPLETE: Final = 2
#: ``Txn.last_sent`` of a streamed transaction whose first segment never arrived.
MISSED: Final = (1 << 63) - 1

#: Type oids whose values are JSON numbers (int8, int2, int4, oid, xid) and the boolean's.
INTEGER_TYPE_OIDS: Final = frozenset({20, 21, 23, 26, 28})
BOOL_TYPE_OID: Final = 16

#: The hint of every malformed-message error.
MALFORMED_HINT: Final = (
    "the replication stream is corrupt or the negotiated proto_version is not the one decoded"
)


class Kind(IntEnum):
    """How a column's text value is written in JSON (docs/store.md "Images and values")."""

    TEXT = 0
    INTEGER = 1
    BOOLEAN = 2

    @classmethod
    def for_type(cls, type_oid: int) -> Kind:
        if type_oid in INTEGER_TYPE_OIDS:
            return cls.INTEGER
        if type_oid == BOOL_TYPE_OID:
            return cls.BOOLEAN
        return cls.TEXT


class Policy(IntEnum):
    """A column policy, applied to every image (never to key columns)."""

    NONE = 0
    EXCLUDE = 1
    MASK = 2
    HASH = 3


@dataclass(frozen=True, slots=True)
class ColumnDesc:
    """A column as the Relation message announces it."""

    name: str
    type_oid: int
    type_modifier: int
    flagged_key: bool


@dataclass(frozen=True, slots=True)
class RelationDesc:
    """A decoded Relation message. ``lsn``: as the core describes it, the WAL position of the
    first change using it (pgoutput sends the message itself with wal_start 0)."""

    oid: int
    namespace: str
    name: str
    replica_identity: str  # 'd' 'n' 'f' 'i'
    columns: tuple[ColumnDesc, ...]
    lsn: int


@dataclass(frozen=True, slots=True)
class RelationInfo:
    """What the caller's registry answers for a RelationDesc."""

    table_id: int
    schema_id: int
    names: tuple[str, ...]
    kinds: tuple[Kind, ...]
    policies: tuple[Policy, ...]
    key: tuple[int, ...]  # indices of the key columns, in key order (all columns when keyless)
    keyless: bool
    # Changes of this relation are dropped, never encoded (cdc's own tables on the source, such as
    # the context-signing key, which an all-tables publication sends too: docs/security.md).
    ignored: bool = False


def check_info(desc: RelationDesc, info: RelationInfo, can_hash: bool) -> None:
    """Refuse a RelationInfo that does not fit its Relation message (a bug of the caller)."""
    count = len(desc.columns)
    problems = []
    if not isinstance(info, RelationInfo):
        raise TypeError(f"describe() returned {type(info).__name__}, expected RelationInfo")
    if not (len(info.names) == len(info.kinds) == len(info.policies) == count):
        problems.append(
            f"{len(info.names)} names, {len(info.kinds)} kinds, {len(info.policies)} policies "
            f"for {count} columns"
        )
    if len(set(info.key)) != len(info.key) or any(type(i) is not int or not 0 <= i < count for i in info.key):
        problems.append(f"key indices {info.key} do not name distinct columns")
    elif any(info.policies[i] != Policy.NONE for i in info.key if i < len(info.policies)):
        problems.append("a key column carries a policy")
    if any(p == Policy.HASH for p in info.policies) and not can_hash:
        problems.append("a HASH policy but no hash_value function")
    for name, value in (("table_id", info.table_id), ("schema_id", info.schema_id)):
        if type(value) is not int or not 0 <= value < 1 << 62:
            problems.append(f"{name} {value!r} is not a non-negative integer")
    if any(type(k) is not Kind and k not in (0, 1, 2) for k in info.kinds):
        problems.append("unknown kind")
    if any(type(p) is not Policy and p not in (0, 1, 2, 3) for p in info.policies):
        problems.append("unknown policy")
    if any(type(n) is not str for n in info.names):
        problems.append("column names must be str")
    if problems:
        raise ValueError(f"RelationInfo for relation {desc.oid} does not fit it: " + "; ".join(problems))


class ChunkSource(Protocol):
    """The buffered changes of one finished transaction, as COPY lines."""

    def chunks(self, max_bytes: int) -> Iterator[bytes]: ...


@dataclass(slots=True)
class FinishedTransaction:
    """One committed or rolled-back transaction (with position > skip_through)."""

    xid: int
    position: int
    commit_lsn: int | None
    committed_at_us: int  # commit/abort time, PostgreSQL epoch microseconds
    committed_at_text: str  # as in the COPY lines: 'YYYY-MM-DD HH:MM:SS.ffffff+00'
    status: str  # 'c' committed, 'r' rolled back
    flags: int  # transaction flags: STREAMED, MAYBE_INCOMPLETE
    origin: str | None
    change_count: int
    pending_count: int  # changes with a non-NULL `pending`
    first_lsn: int  # wal_start of the frame that opened it (Begin, BeginPrepare, first Stream Start)
    last_lsn: int  # wal_start of the frame that finished it
    # Transactional logical messages: (ordinal of the next change, lsn, prefix, content).
    messages: list[tuple[int, int, str, bytes]]
    # (table_id, op letter, rolled_back) -> number of changes, for metrics.
    counts: dict[tuple[int, str, bool], int]
    _source: ChunkSource | None = field(default=None, repr=False, compare=False)

    def chunks(self, max_bytes: int) -> Iterator[bytes]:
        """The `changes` COPY lines in ordinal order, in chunks of at most ``max_bytes`` (unless
        one line is larger). May be iterated once; spill files are released at the end."""
        source, self._source = self._source, None
        if source is None:
            raise RuntimeError("the changes of a finished transaction can be read once")
        return source.chunks(max_bytes)


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    """A non-transactional logical message (``cdc.error``, ``cdc.heartbeat``, ...)."""

    lsn: int
    prefix: str
    content: bytes


Event = FinishedTransaction | LogicalMessage

Describe = Callable[[RelationDesc], RelationInfo]
HashValue = Callable[[bytes], str]


def now_us() -> int:
    """The current time in PostgreSQL epoch microseconds (the time of an abort that has none).
    Both implementations look it up here at each use (tests replace it)."""
    return time.time_ns() // 1000 - PG_EPOCH_OFFSET_US


# PostgreSQL epoch microseconds of 0001-01-01 00:00:00 and of 10000-01-01 00:00:00.
MIN_TIME_US: Final = -730_119 * 86_400_000_000
MAX_TIME_US: Final = 2_921_940 * 86_400_000_000


def format_time(us: int) -> str:
    """PostgreSQL epoch microseconds as the COPY text of a timestamptz in UTC
    (``YYYY-MM-DD HH:MM:SS.ffffff+00``). Raises ValueError outside years 1 to 9999."""
    if not MIN_TIME_US <= us < MAX_TIME_US:
        raise ValueError(f"time {us} is out of range")
    days, rest = divmod(us, 86_400_000_000)
    year, month, day = civil_from_days(days + 10_957)  # days from 1970-01-01
    seconds, micros = divmod(rest, 1_000_000)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    return f"{year:04d}-{month:02d}-{day:02d} {hours:02d}:{minutes:02d}:{seconds:02d}.{micros:06d}+00"


def civil_from_days(z: int) -> tuple[int, int, int]:
    """(year, month, day) of a day count from 1970-01-01 (H. Hinnant's algorithm)."""
    z += 719_468
    era = z // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    return (y + 1 if m <= 2 else y), m, d
