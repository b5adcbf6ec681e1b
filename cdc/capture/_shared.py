"""Pieces both capture cores share: message names, error texts, per-relation precomputation.

Everything here runs once per Relation message body or per error, never per change, so the two
implementations (``core.py`` and ``_core.pyx``) build identical bytes and raise identical errors.
"""

from __future__ import annotations

import hashlib
from typing import Final

import orjson

from cdc.capture.model import MALFORMED_HINT, Policy, RelationInfo
from cdc.errors import ProtocolError

NAMES: Final[dict[int, str]] = {
    ord("B"): "Begin",
    ord("C"): "Commit",
    ord("O"): "Origin",
    ord("R"): "Relation",
    ord("Y"): "Type",
    ord("I"): "Insert",
    ord("U"): "Update",
    ord("D"): "Delete",
    ord("T"): "Truncate",
    ord("M"): "Message",
    ord("S"): "StreamStart",
    ord("E"): "StreamStop",
    ord("c"): "StreamCommit",
    ord("A"): "StreamAbort",
    ord("b"): "BeginPrepare",
    ord("P"): "Prepare",
    ord("K"): "CommitPrepared",
    ord("r"): "RollbackPrepared",
    ord("p"): "StreamPrepare",
}

#: How many distinct Relation message bodies are remembered (then the cache starts again).
RELATION_CACHE_LIMIT: Final = 10_000
#: A spilled transaction writes its buffered records out once they reach this size.
SPILL_FLUSH_BYTES: Final = 1 << 16
#: Bytes of a buffered record's header: record length, subxid (u32 each), flags (u16), split (u32).
RECORD_HEADER: Final = 14


def malformed(what: str, size: int, detail: str) -> ProtocolError:
    return ProtocolError(f"malformed pgoutput {what} message ({size} bytes): {detail}", hint=MALFORMED_HINT)


def short(what: str, size: int, pos: int) -> ProtocolError:
    return malformed(what, size, f"ends too early at offset {pos}")


def out_of_place(what: str, where: str) -> ProtocolError:
    return ProtocolError(f"pgoutput {what} message {where}", hint=MALFORMED_HINT)


def unknown_tag(tag: int) -> ProtocolError:
    return ProtocolError(f"unknown pgoutput message type {tag:#04x}", hint=MALFORMED_HINT)


def unknown_relation(what: str, oid: int) -> ProtocolError:
    return ProtocolError(f"pgoutput {what} message for relation {oid} before its Relation message")


def bad_snapshot(row: int, detail: str) -> ProtocolError:
    return ProtocolError(f"malformed COPY row {row} of a snapshot: {detail}")


def copy_escape(text: bytes) -> bytes:
    """Escape for COPY text format: backslash, tab, newline, carriage return."""
    return text.replace(b"\\", b"\\\\").replace(b"\t", b"\\t").replace(b"\n", b"\\n").replace(b"\r", b"\\r")


def array_element(name: str) -> bytes:
    """A text[] element as array_out writes it (quoted where array_in needs it)."""
    raw = name.encode()
    if raw == b"" or raw.lower() == b"null" or any(c in b'{},"\\ \t\n\r\v\f' for c in raw):
        raw = b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return raw


def oversize_json(raw: bytes, key_form: bool) -> bytes:
    """The reference stored instead of an oversize value (docs/store.md), as compact JSON
    (images) or as jsonb prints it (key_text)."""
    digest = hashlib.sha256(raw).hexdigest()
    if key_form:
        return b'{"$cdc": "oversize", "bytes": %d, "sha256": "%s"}' % (len(raw), digest.encode())
    return b'{"$cdc":"oversize","bytes":%d,"sha256":"%s"}' % (len(raw), digest.encode())


def hashed_json(hash_value: object, raw: bytes) -> bytes:
    """The JSON string of ``hash_value(raw)``, COPY-escaped."""
    digest = hash_value(raw)  # type: ignore[operator]
    if type(digest) is not str:
        raise TypeError(f"hash_value returned {type(digest).__name__}, expected str")
    return orjson.dumps(digest).replace(b"\\", b"\\\\")


def relation_texts(info: RelationInfo) -> tuple[list[bytes], list[bytes], bytes, list[int], list[int]]:
    """Per column: the image member prefix (``"name":``, COPY-escaped) and the pending-array
    element (COPY-escaped); the ``table_id\\tschema_id\\t`` prefix; kinds and policies as ints."""
    names_json = [orjson.dumps(name).replace(b"\\", b"\\\\") + b":" for name in info.names]
    pending = [copy_escape(array_element(name)) for name in info.names]
    ids = b"%d\t%d\t" % (info.table_id, info.schema_id)
    return names_json, pending, ids, [int(k) for k in info.kinds], [int(p) for p in info.policies]


MASKED: Final = b'"****"'
EXCLUDE: Final = int(Policy.EXCLUDE)
MASK: Final = int(Policy.MASK)
HASH: Final = int(Policy.HASH)
