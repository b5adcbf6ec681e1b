"""Reading pgoutput messages for the pure-Python capture core: bounds checks, strings,
Relation bodies and TupleData (mirrored by ``_core_pgoutput.pxi``).

Every read is checked against the message's length first, so a malformed message raises
``ProtocolError`` naming the message and the offset, never a value.
"""

from __future__ import annotations

import re
import struct
from typing import Final, Protocol

import orjson

from cdc.capture import _shared as sh
from cdc.capture.model import ColumnDesc, RelationDesc
from cdc.errors import ProtocolError

u16 = struct.Struct("!H").unpack_from
u32 = struct.Struct("!I").unpack_from
i32 = struct.Struct("!i").unpack_from
u64 = struct.Struct("!Q").unpack_from
i64 = struct.Struct("!q").unpack_from

INTEGER: Final = re.compile(rb"0|-?[1-9][0-9]*")
DATA_TAGS: Final = frozenset(b"RYIUDTM")
_IDENTITIES: Final = frozenset(b"dnfi")


class Unchanged:
    """An unchanged TOAST value ('u'): no value was sent."""

    __slots__ = ()


U: Final = Unchanged()


class TupleShape(Protocol):
    """What :func:`read_tuple` needs of a relation (``cdc.capture.images.Rel`` has it)."""

    @property
    def oid(self) -> int: ...
    @property
    def natts(self) -> int: ...
    @property
    def kinds(self) -> list[int]: ...


#: A column's raw text: bytes, None for NULL, ``U`` for an unchanged TOAST value.
Raw = bytes | Unchanged | None


def need(p: bytes, pos: int, n: int, what: str) -> None:
    if pos + n > len(p):
        raise sh.short(what, len(p), pos)


def exact(p: bytes, size: int, what: str) -> None:
    if len(p) < size:
        raise sh.short(what, len(p), len(p))
    end(p, size, what)


def end(p: bytes, pos: int, what: str) -> None:
    if pos != len(p):
        raise sh.malformed(what, len(p), f"{len(p) - pos} unexpected trailing bytes at offset {pos}")


def string(p: bytes, pos: int, what: str) -> tuple[str, int]:
    """The NUL-terminated UTF-8 string at ``pos`` and the offset after its NUL."""
    stop = p.find(b"\x00", pos)
    if stop < 0:
        raise sh.malformed(what, len(p), f"string at offset {pos} is not NUL-terminated")
    try:
        return p[pos:stop].decode(), stop + 1
    except UnicodeDecodeError:
        raise bad_text(what, len(p), pos) from None


def bad_text(what: str, size: int, pos: int) -> ProtocolError:
    return sh.malformed(what, size, f"text at offset {pos} is not valid UTF-8")


def check_text(raw: bytes, what: str, size: int, pos: int) -> None:
    try:
        raw.decode()
    except UnicodeDecodeError:
        raise bad_text(what, size, pos) from None


def parse_relation(p: bytes, off: int, wal_start: int) -> RelationDesc:
    """The Relation message body at ``off`` (after the tag and a streamed block's xid)."""
    what = "Relation"
    size = len(p)
    need(p, off, 4, what)
    oid = u32(p, off)[0]
    namespace, pos = string(p, off + 4, what)
    name, pos = string(p, pos, what)
    need(p, pos, 3, what)
    identity = p[pos]
    if identity not in _IDENTITIES:
        raise sh.malformed(what, size, f"unknown replica identity {identity:#04x} at offset {pos}")
    natts = u16(p, pos + 1)[0]
    pos += 3
    columns = []
    for _ in range(natts):
        need(p, pos, 1, what)
        flags = p[pos]
        column, pos = string(p, pos + 1, what)
        need(p, pos, 8, what)
        columns.append(ColumnDesc(column, u32(p, pos)[0], i32(p, pos + 4)[0], bool(flags & 1)))
        pos += 8
    end(p, pos, what)
    return RelationDesc(oid, namespace or "pg_catalog", name, chr(identity), tuple(columns), wal_start)


def read_tuple(
    rel: TupleShape, p: bytes, pos: int, what: str, allow_u: bool, max_value: int
) -> tuple[list[Raw], list[bytes | None], int]:
    """Read TupleData at ``pos``: per column the raw text (None for NULL, U for unchanged)
    and its JSON (None for NULL, unchanged and oversize values); the offset after it."""
    size = len(p)
    need(p, pos, 2, what)
    natts = u16(p, pos)[0]
    if natts != rel.natts:
        raise sh.malformed(
            what, size, f"tuple of {natts} columns for relation {rel.oid} whose schema has {rel.natts}"
        )
    pos += 2
    raws: list[Raw] = [None] * natts
    jsons: list[bytes | None] = [None] * natts
    kinds = rel.kinds
    for i in range(natts):
        if pos >= size:
            raise sh.short(what, size, pos)
        kind = p[pos]
        if kind == 0x74:  # 't'
            if pos + 5 > size:
                raise sh.short(what, size, pos + 1)
            length = u32(p, pos + 1)[0]
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
                    raise bad_text(what, size, start) from None
                if length <= max_value:
                    jsons[i] = orjson.dumps(text).replace(b"\\", b"\\\\")
            elif column_kind == 1:
                if INTEGER.fullmatch(raw) is None:
                    check_text(raw, what, size, start)
                    raise sh.malformed(what, size, f"value at offset {start} is not an integer")
                if length <= max_value:
                    jsons[i] = raw
            else:
                if raw == b"t":
                    json = b"true"
                elif raw == b"f":
                    json = b"false"
                else:
                    check_text(raw, what, size, start)
                    raise sh.malformed(what, size, f"value at offset {start} is not a boolean")
                if length <= max_value:
                    jsons[i] = json
        elif kind == 0x6E:  # 'n'
            pos += 1
        elif kind == 0x75:  # 'u'
            if not allow_u:
                raise sh.malformed(what, size, f"unchanged TOAST value at offset {pos}")
            raws[i] = U
            pos += 1
        elif kind == 0x62:  # 'b'
            raise sh.malformed(what, size, f"binary value at offset {pos} (binary 'true' is not supported)")
        else:
            raise sh.malformed(what, size, f"unknown tuple column kind {kind:#04x} at offset {pos}")
    return raws, jsons, pos
