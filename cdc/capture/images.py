"""Encoding for the pure-Python capture core: per-relation texts, ``key_text``, images with
column policies, oversize and hashed values, and snapshot rows (mirrored by
``_core_images.pxi``; docs/store.md "The key" and "Images and values").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import orjson

from cdc.capture import _shared as sh
from cdc.capture import model
from cdc.capture.model import OVERSIZE, ColumnDesc, RelationDesc, RelationInfo
from cdc.capture.pgoutput import INTEGER, Raw, U
from cdc.errors import ProtocolError

_NULL: Final = b"\\N"


class Rel:
    """A Relation message body's RelationInfo and what building lines needs from it. Made
    from the message alone (``info`` None, ``desc`` kept), it is described when the first
    change using it arrives (``setup``): pgoutput sends Relation messages without a position."""

    __slots__ = (
        "desc",
        "ids",
        "ignored",
        "info",
        "is_key",
        "key",
        "kinds",
        "names_json",
        "natts",
        "oid",
        "pending",
        "policies",
        "table_id",
    )

    info: RelationInfo | None

    def __init__(self, oid: int, info: RelationInfo | None, desc: RelationDesc | None = None) -> None:
        self.oid = oid
        self.desc = desc
        self.info = None
        if info is not None:
            self.setup(info)

    def setup(self, info: RelationInfo) -> None:
        self.info = info
        self.table_id = info.table_id
        self.ignored = info.ignored
        self.names_json, self.pending, self.ids, self.kinds, self.policies = sh.relation_texts(info)
        self.natts = len(info.names)
        self.key = list(info.key)
        self.is_key = [False] * self.natts
        for i in info.key:
            self.is_key[i] = True


def key_text(rel: Rel, raws: list[Raw], jsons: list[bytes | None]) -> tuple[bytes | None, int]:
    """The COPY-escaped key_text (None when a key column is unknown) and OVERSIZE."""
    parts = []
    flags = 0
    for i in rel.key:
        raw = raws[i]
        if raw is None:
            parts.append(b"null")
        elif raw is U:
            return None, 0
        else:
            json = jsons[i]
            if json is None:
                json = sh.oversize_json(raw, True)  # type: ignore[arg-type]
                flags = OVERSIZE
            parts.append(json)
    return b"[" + b", ".join(parts) + b"]", flags


def row_image(
    rel: Rel,
    raws: list[Raw],
    jsons: list[bytes | None],
    only_key: bool,
    hash_value: Callable[[bytes], str] | None,
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
        elif raw is U:
            unknown.append(i)
        elif policy == sh.MASK:
            parts.append(names[i] + sh.MASKED)
        elif policy == sh.HASH:
            parts.append(names[i] + sh.hashed_json(hash_value, raw))  # type: ignore[arg-type]
        else:
            json = jsons[i]
            if json is None:
                json = sh.oversize_json(raw, False)  # type: ignore[arg-type]
                flags = OVERSIZE
            parts.append(names[i] + json)
    return b"{" + b",".join(parts) + b"}", flags, unknown


# -- snapshots -------------------------------------------------------------------------------


def snapshot_lines(
    info: RelationInfo,
    copy_rows: bytes,
    *,
    position: int,
    first_ordinal: int,
    committed_at_us: int,
    max_value: int,
    hash_value: Callable[[bytes], str] | None,
) -> tuple[bytes, int]:
    """COPY TO text rows of a table as `changes` lines of op S; the lines and their count."""
    natts = len(info.names)
    desc = RelationDesc(0, "", "", "d", tuple(ColumnDesc(n, 0, -1, False) for n in info.names), 0)
    model.check_info(desc, info, hash_value is not None)
    try:
        text = model.format_time(committed_at_us)
    except ValueError:
        raise ProtocolError(f"snapshot time {committed_at_us} is out of range") from None
    rel = Rel(0, info)
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
            jsons[i] = _snapshot_json(raw, rel.kinds[i], row, i, max_value)
        key, flags = key_text(rel, raws, jsons)
        line_image, image_flags, _ = row_image(rel, raws, jsons, False, hash_value)
        out.append(
            b"%s%d%s%d%s%s\t%s\t\\N\t\\N\t\\N\n"
            % (head, ordinal, middle, flags | image_flags, lsn_xid, key, line_image)
        )
        ordinal += 1
    return b"".join(out), ordinal - first_ordinal


def _snapshot_json(raw: bytes, kind: int, row: int, column: int, max_value: int) -> bytes | None:
    if kind == 1:
        if INTEGER.fullmatch(raw) is None:
            raise sh.bad_snapshot(row, f"column {column} is not an integer")
        return raw if len(raw) <= max_value else None
    if kind == 2:
        if raw not in {b"t", b"f"}:
            raise sh.bad_snapshot(row, f"column {column} is not a boolean")
        if len(raw) > max_value:
            return None
        return b"true" if raw == b"t" else b"false"
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise sh.bad_snapshot(row, f"column {column} is not valid UTF-8") from None
    if len(raw) > max_value:
        return None
    return orjson.dumps(text).replace(b"\\", b"\\\\")


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
