"""Request context carried through the WAL: message prefixes, dataclasses, verification, parsing.

Pure: no psycopg, no I/O. On the source, the SECURITY DEFINER functions cdc.emit_context()
and cdc.report_error() (``sql/context.sql``, installed by :mod:`cdc.source_context`) are the
only writers of two kinds of logical decoding messages, signed with the key of the source's
``cdc.context_key`` table; the daemon reads them back from the slot and accepts them only
through :class:`ContextVerifier` (or :func:`parse_context` / :func:`parse_error` with the key).
Anything else claiming these prefixes (a raw ``pg_logical_emit_message`` from any role) is
refused: it must never be used as context or recorded as an error. Nothing here trusts a
``cdc.heartbeat`` message's content (the daemon only uses its position).

Signed content: the body (compact JSON object) with its MAC appended as the last member::

    <body without its closing brace> ,"mac":"<64 hex digits>"}

where the MAC is HMAC-SHA256(key, prefix || 0x00 || body). The verifier checks the fixed
74-byte suffix, rebuilds the body (``content[:-74] + b"}"``) and compares in constant time,
before any JSON parsing.

``cdc.context`` (transactional, written before the changes it describes)::

    {"request_id": str|null, "actor": str|null, "application_name": str|null,
     "db_user": str, "client_addr": str|null, "backend_pid": int,
     "source": "setting"|"application_name"|"client"|"none", "extra": {str: str}, "xid": int,
     "session_level": bool|null}

``xid`` must be the transaction the message arrives in (its low 32 bits): a signed body
copied into another transaction is refused. ``session_level`` (stamped by the server, source
"setting"): the request id was carried over from an earlier transaction of the session, a
session-level ``SET`` rather than ``SET LOCAL`` (sql/context.sql, "SET or SET LOCAL?").

Trace context: an ``extra`` member ``traceparent`` (the client helper's, or a ``cdc.traceparent``
setting named in ``context.extra_settings``) is taken out of ``extra`` and, when it is a valid W3C
``traceparent`` (:mod:`cdc.tracing`), read as the context's ``trace_id`` and ``span_id``; an
invalid one is dropped, the rest of the context stands. (Top-level ``trace_id`` and ``span_id``
members, valid ones only, are read too: what :meth:`RequestContext.to_content` writes.)

``cdc.error`` (non-transactional, so it survives the rollback it explains)::

    {"request_id": str|null, "error_type": str, "message": str, "location": "file.py:42"|null,
     "actor": str|null, "at": ISO-8601, "db_user": str, "client_addr": str|null,
     "backend_pid": int, "xid": int|null, "reporter_pid": int|null}

``db_user``, ``client_addr``, ``backend_pid``, ``xid`` and ``at`` are stamped by the server.
``xid`` is ``txid_current_if_assigned()``: the 64-bit, epoch-qualified transaction id. The
32-bit xid that pgoutput carries is ``xid & 0xFFFFFFFF`` (see :attr:`ReportedError.xid32`).

The Python side of the ``application_name`` pattern (default
:data:`DEFAULT_APPLICATION_NAME_PATTERN`) lives in :mod:`cdc.context_pattern` and is re-exported
here: :func:`pattern_to_postgres`, :func:`request_id_from_application_name`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final, Literal, TypeVar, cast

import orjson

from cdc.context_pattern import (
    compile_application_name_pattern,
    pattern_to_postgres,
    request_id_from_application_name,
    required_literal,
)
from cdc.errors import ProtocolError
from cdc.tracing import TRACEPARENT_KEY, is_span_id, is_trace_id, parse_traceparent

__all__ = [
    "CONTEXT_PREFIX",
    "DEFAULT_APPLICATION_NAME_PATTERN",
    "DEFAULT_EXTRA_SETTINGS",
    "EMITTED_SETTING",
    "ERROR_PREFIX",
    "HEARTBEAT_PREFIX",
    "MAX_CONTENT_BYTES",
    "MAX_EXTRA_KEYS",
    "MAX_EXTRA_KEY_CHARS",
    "MAX_EXTRA_VALUE_CHARS",
    "MAX_ID_CHARS",
    "MAX_MESSAGE_BYTES",
    "SOURCES",
    "ContextKeys",
    "ContextSource",
    "ContextVerifier",
    "MessageRejectedError",
    "ReportedError",
    "RequestContext",
    "compile_application_name_pattern",
    "context_fingerprint",
    "context_key_id",
    "key_from_pad",
    "key_pads",
    "parse_context",
    "parse_error",
    "pattern_to_postgres",
    "request_id_from_application_name",
    "required_literal",
    "sign_content",
    "truncate_utf8",
    "validate_setting_name",
    "verify_content",
]

CONTEXT_PREFIX: Final = "cdc.context"
ERROR_PREFIX: Final = "cdc.error"
HEARTBEAT_PREFIX: Final = "cdc.heartbeat"

#: The setting holding the fingerprint of the last emitted context (see context_fingerprint).
EMITTED_SETTING: Final = "cdc._emitted"

DEFAULT_APPLICATION_NAME_PATTERN: Final = r"req:(?P<id>[A-Za-z0-9._:-]+)"

#: Extra ``cdc.*`` settings read by the trigger when no list is configured. PostgreSQL cannot
#: enumerate custom (placeholder) settings from SQL (pg_settings hides them), so the trigger
#: reads a known list (each name costs one current_setting() per emission); the client helper
#: sends whatever keys it is given.
DEFAULT_EXTRA_SETTINGS: Final = ("tenant",)

# Size limits, the same on every side (SQL, client, parser).
MAX_MESSAGE_BYTES: Final = 4096  # ReportedError.message, UTF-8 bytes
MAX_EXTRA_KEYS: Final = 50
MAX_EXTRA_KEY_CHARS: Final = 128
MAX_EXTRA_VALUE_CHARS: Final = 1024
MAX_ID_CHARS: Final = 256  # request_id, actor
MAX_CONTENT_BYTES: Final = 1 << 20  # anything bigger is not ours

ContextSource = Literal["setting", "application_name", "client", "none"]
SOURCES: Final[frozenset[str]] = frozenset({"setting", "application_name", "client", "none"})

_UNIT_SEPARATOR: Final = "\x1f"
_T = TypeVar("_T")


def _frozen_mapping(items: Mapping[str, str] | None = None) -> Mapping[str, str]:
    return MappingProxyType(dict(items or {}))


@dataclass(frozen=True, slots=True)
class RequestContext:
    """The context of (part of) a transaction, from a ``cdc.context`` message."""

    request_id: str | None
    actor: str | None
    application_name: str | None
    db_user: str
    client_addr: str | None
    backend_pid: int
    source: ContextSource
    extra: Mapping[str, str] = field(default_factory=_frozen_mapping)
    trace_id: str | None = None  # W3C trace context (cdc.tracing): 32 hex digits
    span_id: str | None = None  # the span that named the request (the traceparent's parent-id)
    #: the request id was carried over from an earlier transaction (a session-level SET)
    session_level: bool = False

    def as_json(self) -> dict[str, Any]:
        """The JSON object of the wire format (also what the store keeps as ``context``); the
        trace members only when there is a trace, ``session_level`` only when true."""
        doc: dict[str, Any] = {
            "request_id": self.request_id,
            "actor": self.actor,
            "application_name": self.application_name,
            "db_user": self.db_user,
            "client_addr": self.client_addr,
            "backend_pid": self.backend_pid,
            "source": self.source,
            "extra": dict(self.extra),
        }
        if self.trace_id is not None:
            doc["trace_id"] = self.trace_id
            doc["span_id"] = self.span_id
        if self.session_level:
            doc["session_level"] = True
        return doc

    def to_content(self) -> str:
        """Compact JSON text, as written with ``pg_logical_emit_message``."""
        return json.dumps(self.as_json(), separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class ReportedError:
    """An error an application reported for a request, from a ``cdc.error`` message."""

    request_id: str | None
    xid: int | None
    error_type: str
    message: str
    location: str | None
    actor: str | None
    at: datetime
    # Stamped by the server (cdc.report_error): who reported it. backend_pid is the session the
    # error belongs to (another connection of the same user may report it for that session with
    # the session's token: reporter_pid is then that connection's).
    db_user: str | None = None
    backend_pid: int | None = None
    client_addr: str | None = None
    reporter_pid: int | None = None

    @property
    def xid32(self) -> int | None:
        """The 32-bit xid, as pgoutput's Begin/Stream Start messages carry it."""
        return None if self.xid is None else self.xid & 0xFFFFFFFF

    def as_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "xid": self.xid,
            "error_type": self.error_type,
            "message": self.message,
            "location": self.location,
            "actor": self.actor,
            "at": self.at.isoformat(),
            "db_user": self.db_user,
            "backend_pid": self.backend_pid,
            "client_addr": self.client_addr,
            "reporter_pid": self.reporter_pid,
        }

    def to_content(self) -> str:
        return json.dumps(self.as_json(), separators=(",", ":"), ensure_ascii=False)


# --------------------------------------------------------------------------------------------
# Signing and verification (the Python twin of the signing in cdc.emit_context() and cdc.report_error(), sql/context.sql).

_MAC_OPEN: Final = b',"mac":"'
_MAC_HEX: Final = 64
MAC_SUFFIX_BYTES: Final = len(_MAC_OPEN) + _MAC_HEX + 2  # ,"mac":"<64 hex>"}
_HEX_DIGITS: Final = frozenset(b"0123456789abcdef")
_BLOCK: Final = 64  # SHA-256 block size


def key_pads(key: bytes) -> tuple[bytes, bytes]:
    """HMAC's inner and outer pads of ``key`` (at most 64 bytes): what cdc.context_key stores."""
    if len(key) > _BLOCK:
        raise ValueError("a context key has at most 64 bytes")
    padded = key.ljust(_BLOCK, b"\0")
    return bytes(b ^ 0x36 for b in padded), bytes(b ^ 0x5C for b in padded)


def key_from_pad(ipad: bytes) -> bytes:
    """The key behind an inner pad (zero-padded to 64 bytes: the same HMAC as the key itself)."""
    return bytes(b ^ 0x36 for b in ipad)


def context_key_id(key: bytes) -> str:
    """The public name of a key: 8 hex digits of HMAC(key, "cdc key id")."""
    return hmac.new(key, b"cdc key id", hashlib.sha256).hexdigest()[:8]


def _mac(prefix: str, body: bytes, key: bytes) -> bytes:
    return hmac.new(key, prefix.encode() + b"\0" + body, hashlib.sha256).hexdigest().encode()


def sign_content(prefix: str, body: bytes, key: bytes) -> bytes:
    """``body`` (a JSON object's bytes) with its MAC appended, as the signing functions write it."""
    if not body.endswith(b"}") or body.rstrip() == b"{}":
        raise ValueError("the body must be a non-empty JSON object")
    return body[:-1] + _MAC_OPEN + _mac(prefix, body, key) + b'"}'


@dataclass(frozen=True, slots=True)
class ContextKeys:
    """The keys a verifier accepts: the current one and, after a rotation, the previous one."""

    key: bytes
    key_id: str
    previous: bytes | None = None
    previous_key_id: str | None = None

    def __repr__(self) -> str:  # never the key itself
        return f"ContextKeys(key_id={self.key_id!r}, previous_key_id={self.previous_key_id!r})"


class MessageRejectedError(ProtocolError):
    """A ``cdc.context`` or ``cdc.error`` message that must not be used; ``reason`` says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def verify_content(prefix: str, content: bytes, keys: ContextKeys | None) -> bytes:
    """The signed body of ``content`` when its MAC verifies under one of ``keys``.

    Raises :class:`MessageRejectedError` with reason ``no_key``, ``unsigned`` or ``bad_mac``. The
    comparison is constant-time (``hmac.compare_digest``).
    """
    if keys is None:
        raise MessageRejectedError("no_key", f"{prefix} message: no key to verify it with")
    data = bytes(content)
    if (
        len(data) <= MAC_SUFFIX_BYTES + 1
        or data[-2:] != b'"}'
        or data[-MAC_SUFFIX_BYTES : -MAC_SUFFIX_BYTES + len(_MAC_OPEN)] != _MAC_OPEN
    ):
        raise MessageRejectedError("unsigned", f"{prefix} message: no MAC")
    mac = data[-_MAC_HEX - 2 : -2]
    if not _HEX_DIGITS.issuperset(mac):
        raise MessageRejectedError("unsigned", f"{prefix} message: malformed MAC")
    body = data[:-MAC_SUFFIX_BYTES] + b"}"
    for key in (keys.key, keys.previous):
        if key is not None and hmac.compare_digest(_mac(prefix, body, key), mac):
            return body
    raise MessageRejectedError("bad_mac", f"{prefix} message: the MAC does not verify")


# --------------------------------------------------------------------------------------------
# Parsing. Both parsers raise ProtocolError, and only ProtocolError, on malformed content.


def truncate_utf8(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` UTF-8 bytes, ending with "…" when cut."""
    data = text.encode("utf-8", errors="surrogatepass")
    if len(data) <= max_bytes:
        return text
    marker = "…"
    room = max(0, max_bytes - len(marker.encode()))
    return data[:room].decode("utf-8", errors="ignore") + marker


def _load_object(content: bytes, what: str) -> dict[str, Any]:
    if not isinstance(content, bytes | bytearray | memoryview):
        raise ProtocolError(f"{what} message: content is {type(content).__name__}, not bytes")
    if len(content) > MAX_CONTENT_BYTES:
        raise ProtocolError(f"{what} message: {len(content)} bytes, more than {MAX_CONTENT_BYTES}")
    try:
        # orjson: C speed on the hot path (a message per transaction); like the reject hook
        # it had, it refuses NaN/Infinity, and invalid UTF-8.
        value = orjson.loads(bytes(content))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"{what} message: not UTF-8 JSON ({type(exc).__name__})") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} message: JSON {type(value).__name__}, not an object")
    return cast(dict[str, Any], value)


def _opt_str(obj: Mapping[str, Any], key: str, what: str, limit: int | None = None) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProtocolError(f"{what} message: {key!r} is {type(value).__name__}, not a string")
    if _has_surrogates(value):
        raise ProtocolError(f"{what} message: {key!r} is not valid Unicode")
    if limit is not None and len(value) > limit:
        value = value[:limit]
    return value


def _req_str(obj: Mapping[str, Any], key: str, what: str, limit: int | None = None) -> str:
    if key not in obj:
        raise ProtocolError(f"{what} message: {key!r} is missing")
    value = _opt_str(obj, key, what, limit)
    if value is None:
        raise ProtocolError(f"{what} message: {key!r} is null")
    return value


def _opt_int(obj: Mapping[str, Any], key: str, what: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{what} message: {key!r} is {type(value).__name__}, not an integer")
    if value < 0 or value >= 1 << 64:
        raise ProtocolError(f"{what} message: {key!r} is out of range")
    return value


def _opt_bool(obj: Mapping[str, Any], key: str, what: str) -> bool:
    """A boolean member; false when missing or null."""
    value = obj.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ProtocolError(f"{what} message: {key!r} is {type(value).__name__}, not a boolean")
    return value


def _has_surrogates(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _extra_value(value: Any) -> str | None:
    """Extra values are strings; other JSON scalars are kept as their JSON text."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool | int):
        text = json.dumps(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            return None
        text = json.dumps(value)
    else:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
    if _has_surrogates(text):
        return None
    return text[:MAX_EXTRA_VALUE_CHARS]


def _parse_extra(value: Any, what: str) -> Mapping[str, str]:
    if value is None:
        return _frozen_mapping()
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} message: 'extra' is {type(value).__name__}, not an object")
    extra: dict[str, str] = {}
    for key in sorted(value):
        if len(extra) >= MAX_EXTRA_KEYS:
            break
        if _has_surrogates(key):
            continue
        text = _extra_value(value[key])
        if text is not None:
            extra[key[:MAX_EXTRA_KEY_CHARS]] = text
    return _frozen_mapping(extra)


def _trace_of(obj: Mapping[str, Any], extra: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(trace id, span id) of a context body: its own valid members, else its extra's valid
    traceparent, else none (an invalid trace is ignored, never a reason to refuse the context)."""
    trace_id, span_id = obj.get("trace_id"), obj.get("span_id")
    if is_trace_id(trace_id):
        return cast(str, trace_id), (cast(str, span_id) if is_span_id(span_id) else None)
    trace = parse_traceparent(extra.get(TRACEPARENT_KEY))
    return (trace.trace_id, trace.span_id) if trace is not None else (None, None)


def parse_context(content: bytes, keys: ContextKeys | None, *, xid: int | None = None) -> RequestContext:
    """Verify and parse a ``cdc.context`` message; ``xid``: the (32-bit) transaction it came in.

    Raises :class:`MessageRejectedError` (a :class:`ProtocolError`) when the MAC does not verify or
    the message belongs to another transaction, :class:`ProtocolError` (only) when malformed.
    Missing nullable fields read as null and unknown fields are ignored (older or newer
    writers); the types of present fields are checked.
    """
    what = CONTEXT_PREFIX
    body = verify_content(what, content, keys)
    try:
        obj = _load_object(body, what)
        source = obj.get("source")
        if not isinstance(source, str) or source not in SOURCES:
            raise ProtocolError(f"{what} message: 'source' is not one of {sorted(SOURCES)}")
        pid = _opt_int(obj, "backend_pid", what)
        if pid is None:
            raise ProtocolError(f"{what} message: 'backend_pid' is missing")
        signed_xid = _opt_int(obj, "xid", what)
        if xid is not None and (signed_xid is None or signed_xid & 0xFFFFFFFF != xid & 0xFFFFFFFF):
            raise MessageRejectedError("other_transaction", f"{what} message: signed for another transaction")
        extra = _parse_extra(obj.get("extra"), what)
        trace_id, span_id = _trace_of(obj, extra)
        if TRACEPARENT_KEY in extra:
            extra = _frozen_mapping({k: v for k, v in extra.items() if k != TRACEPARENT_KEY})
        return RequestContext(
            request_id=_opt_str(obj, "request_id", what, MAX_ID_CHARS),
            actor=_opt_str(obj, "actor", what, MAX_ID_CHARS),
            application_name=_opt_str(obj, "application_name", what),
            db_user=_req_str(obj, "db_user", what),
            client_addr=_opt_str(obj, "client_addr", what),
            backend_pid=pid,
            source=cast(ContextSource, source),
            extra=extra,
            trace_id=trace_id,
            span_id=span_id,
            session_level=_opt_bool(obj, "session_level", what),
        )
    except ProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - the contract: nothing but ProtocolError escapes
        raise ProtocolError(f"{what} message: malformed ({type(exc).__name__})") from None


def parse_error(content: bytes, keys: ContextKeys | None) -> ReportedError:
    """Verify and parse a ``cdc.error`` message. Raises :class:`MessageRejectedError` when the MAC
    does not verify, :class:`ProtocolError` (only) when malformed."""
    what = ERROR_PREFIX
    body = verify_content(what, content, keys)
    try:
        obj = _load_object(body, what)
        at_text = _req_str(obj, "at", what)
        try:
            at = datetime.fromisoformat(at_text)
        except ValueError:
            raise ProtocolError(f"{what} message: 'at' is not an ISO-8601 timestamp") from None
        at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
        message = _req_str(obj, "message", what)
        pid = _opt_int(obj, "backend_pid", what)
        if pid is None:
            raise ProtocolError(f"{what} message: 'backend_pid' is missing")
        return ReportedError(
            request_id=_opt_str(obj, "request_id", what, MAX_ID_CHARS),
            xid=_opt_int(obj, "xid", what),
            error_type=_req_str(obj, "error_type", what, 256),
            message=truncate_utf8(message, MAX_MESSAGE_BYTES),
            location=_opt_str(obj, "location", what, 1024),
            actor=_opt_str(obj, "actor", what, MAX_ID_CHARS),
            at=at,
            db_user=_req_str(obj, "db_user", what),
            backend_pid=pid,
            client_addr=_opt_str(obj, "client_addr", what),
            reporter_pid=_opt_int(obj, "reporter_pid", what),
        )
    except ProtocolError:
        raise
    except Exception as exc:  # noqa: BLE001 - the contract: nothing but ProtocolError escapes
        raise ProtocolError(f"{what} message: malformed ({type(exc).__name__})") from None


class ContextVerifier:
    """The daemon's gate for ``cdc.context`` and ``cdc.error`` messages.

    ``load_keys`` reads the source's keys (the daemon passes a reader over its catalog
    connection at the start of each session); a message whose MAC fails under the keys held
    reloads them first, so a key rotated while the daemon runs is picked up at once. Reloads
    are rationed (a burst of :attr:`RELOAD_BURST`, then one per :attr:`RELOAD_SECONDS`), so a
    stream of forged messages costs the source at most one query a second. A refused message
    returns None and is reported once per (prefix, LSN) through ``on_reject(prefix, lsn,
    reason)``; its content never leaves here.
    """

    RELOAD_SECONDS = 1.0
    RELOAD_BURST = 3.0
    _REMEMBERED = 4096  # rejected (prefix, LSN) pairs kept to report each once

    def __init__(
        self,
        load_keys: Callable[[], ContextKeys | None] | None = None,
        *,
        on_reject: Callable[[str, int, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keys: ContextKeys | None = None
        self._load = load_keys
        self._on_reject = on_reject
        self._clock = clock
        self._reloads = self.RELOAD_BURST  # reloads allowed now (refilled one per RELOAD_SECONDS)
        self._refilled_at = clock()
        self._rejected: OrderedDict[tuple[str, int], None] = OrderedDict()
        if load_keys is not None:
            self.reload()

    def use(self, load_keys: Callable[[], ContextKeys | None]) -> ContextKeys | None:
        """Read the keys now with ``load_keys`` and keep it for later reloads."""
        self._load = load_keys
        return self.reload()

    def reload(self) -> ContextKeys | None:
        if self._load is not None:
            self.keys = self._load()
        return self.keys

    def _may_reload(self) -> bool:
        now = self._clock()
        self._reloads = min(
            self.RELOAD_BURST, self._reloads + (now - self._refilled_at) / self.RELOAD_SECONDS
        )
        self._refilled_at = now
        if self._reloads < 1:
            return False
        self._reloads -= 1
        return True

    def context(self, content: bytes, lsn: int, xid: int | None) -> RequestContext | None:
        """The verified context of a transactional message at ``lsn`` in transaction ``xid``."""
        return self._checked(CONTEXT_PREFIX, lsn, lambda keys: parse_context(content, keys, xid=xid))

    def error(self, content: bytes, lsn: int) -> ReportedError | None:
        """The verified error of a message at ``lsn``."""
        return self._checked(ERROR_PREFIX, lsn, lambda keys: parse_error(content, keys))

    def _checked(self, prefix: str, lsn: int, parse: Callable[[ContextKeys | None], _T]) -> _T | None:
        try:
            return parse(self.keys)
        except MessageRejectedError as exc:
            reason = exc.reason
            if reason in ("bad_mac", "no_key") and self._may_reload():
                try:
                    return parse(self.reload())
                except MessageRejectedError as again:
                    reason = again.reason
                except ProtocolError:
                    reason = "malformed"
        except ProtocolError:
            reason = "malformed"
        self._reject(prefix, lsn, reason)
        return None

    def _reject(self, prefix: str, lsn: int, reason: str) -> None:
        marker = (prefix, lsn)
        if marker in self._rejected:
            return
        self._rejected[marker] = None
        if len(self._rejected) > self._REMEMBERED:
            self._rejected.popitem(last=False)
        if self._on_reject is not None:
            self._on_reject(prefix, lsn, reason)


# --------------------------------------------------------------------------------------------
# Fingerprint: what the trigger compares to decide whether the context changed.


def context_fingerprint(request_id: str | None, application_name: str) -> str:
    """The value of ``cdc._emitted`` after an emission for these raw settings.

    ``request_id`` is the raw ``cdc.request_id`` setting (``None`` and '' are the same). The
    trigger emits again when this changes. Must match ``cdc.context_fingerprint()`` in
    ``sql/context.sql``.
    """
    return (request_id or "") + _UNIT_SEPARATOR + application_name


# --------------------------------------------------------------------------------------------
# Setting names


_SETTING_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")


def validate_setting_name(name: str, what: str = "setting name") -> str:
    """A custom setting name part (``tenant`` in ``cdc.tenant``), lower-cased. ValueError if bad."""
    if not _SETTING_PART.fullmatch(name) or len(name) > MAX_EXTRA_KEY_CHARS:
        raise ValueError(f"{what} {name!r}: must be a letter or _ then letters, digits, _ or $")
    return name.lower()
