"""The arguments of the HTTP API and the pages: paths and query parameters, checked and parsed.

Every problem is a :class:`~cdc.errors.UsageError` (HTTP 400) naming the argument; a version the
store has not caught up with is a :class:`VersionAheadError` (HTTP 409).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote_to_bytes

from starlette.requests import Request

from cdc.cli_readers import parse_time
from cdc.errors import UsageError
from cdc.lsn import format_lsn, parse_lsn
from cdc.query import STATUSES, Key, Store
from cdc.web.limits import (
    DEFAULT_LIMIT,
    MAX_AFTER_CHARS,
    MAX_CURSOR_CHARS,
    MAX_KEY_CHARS,
    MAX_LIMIT,
    MAX_TEXT_CHARS,
)

_LSN_MAX = 2**64 - 1
_CURSOR_RE = re.compile(r"([0-9]{1,18})-([0-9]{1,9})", re.ASCII)
_VERSION_RE = re.compile(r"[0-9]{1,19}|[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}", re.ASCII)
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class VersionAheadError(UsageError):
    """A version the history store has not caught up with yet (HTTP 409: retry later)."""


def check_text(value: str, what: str, max_chars: int = MAX_TEXT_CHARS) -> str:
    """``value`` if it is a sane argument: not too long, no NUL, valid Unicode."""
    if len(value) > max_chars:
        raise UsageError(f"invalid {what}: longer than {max_chars} characters")
    if "\x00" in value:
        raise UsageError(f"invalid {what}: contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"invalid {what}: not valid Unicode") from None
    return value


def _check_json(value: Any, what: str) -> None:
    if isinstance(value, str):
        check_text(value, what, MAX_AFTER_CHARS)
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(k, what, MAX_AFTER_CHARS)
            _check_json(v, what)
    elif isinstance(value, list):
        for v in value:
            _check_json(v, what)


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError("number out of range")
    return number


def _no_constant(text: str) -> Any:
    raise ValueError(f"{text} is not valid JSON")


def parse_key(text: str, what: str = "key", max_chars: int = MAX_KEY_CHARS) -> Key:
    """A row key from a URL: scalar text as given, or a JSON object for a composite key."""
    check_text(text, what, max_chars)
    if not text.strip():
        raise UsageError(f"invalid {what}: empty")
    if not text.lstrip().startswith("{"):
        return text
    try:
        value = json.loads(text, parse_float=_finite_float, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise UsageError(
            f"invalid {what}: not valid JSON; a composite key is a JSON object such as "
            '{"a": 1, "b": "x"} (URL-encoded)'
        ) from None
    if not isinstance(value, dict) or not value:
        raise UsageError(f"invalid {what}: expected a non-empty JSON object")
    _check_json(value, what)
    return value


def parse_version(text: str, what: str = "version") -> int:
    """An integer version or ``X/Y``."""
    check_text(text, what, 64)
    if _VERSION_RE.fullmatch(text) is None:
        raise UsageError(f"invalid {what} {text!r}: expected X/Y (e.g. 0/16B3748) or an integer")
    value = parse_lsn(text)
    if value > _LSN_MAX:
        raise UsageError(f"invalid {what} {text!r}: larger than any LSN")
    return value


def parse_when(text: str, what: str, *, end: bool = False) -> datetime:
    """A time: ISO 8601 (naive: UTC), ``now``, or a duration ago (``24h``)."""
    check_text(text, what, 64)
    try:
        return parse_time(text, utc=True, end=end)
    except UsageError as exc:
        raise UsageError(f"{what}: {exc.message}") from None
    except (OverflowError, ValueError):
        if end:  # the end of the last representable day
            with contextlib.suppress(UsageError, OverflowError, ValueError):
                parse_time(text, utc=True)
                return datetime.max.replace(tzinfo=UTC)
        raise UsageError(f"invalid {what} {text!r}: out of range") from None


def parse_limit(
    text: str | None, default: int = DEFAULT_LIMIT, maximum: int = MAX_LIMIT, *, what: str = "limit"
) -> int:
    if text is None or text == "":
        return default
    check_text(text, what, 32)
    try:
        value = int(text.strip())
    except ValueError:
        raise UsageError(f"invalid {what} {text!r}: expected an integer from 1 to {maximum}") from None
    if not 1 <= value <= maximum:
        raise UsageError(f"invalid {what} {value}: expected an integer from 1 to {maximum}")
    return value


def parse_bool(text: str | None, what: str) -> bool:
    if text is None or text == "":
        return False
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise UsageError(f"invalid {what} {text[:32]!r}: expected true or false")


def format_cursor(cursor: tuple[int, int] | None) -> str | None:
    """A mutation-log cursor as text (``position-ordinal``)."""
    return None if cursor is None else f"{cursor[0]}-{cursor[1]}"


def parse_cursor(text: str) -> tuple[int, int]:
    check_text(text, "cursor", MAX_CURSOR_CHARS)
    match = _CURSOR_RE.fullmatch(text)
    if match is None:
        raise UsageError("invalid cursor: pass the 'next' value of the previous page")
    return int(match.group(1)), int(match.group(2))


def allow_params(request: Request, *names: str) -> None:
    """Refuse query parameters the endpoint does not know (a misspelt filter must not be ignored)."""
    unknown = sorted(set(request.query_params.keys()) - set(names))
    if unknown:
        expected = ", ".join(names) if names else "none"
        raise UsageError(f"unknown query parameter {unknown[0][:40]!r}: expected {expected}")


def query_text(request: Request, name: str, max_chars: int = MAX_TEXT_CHARS) -> str | None:
    """A query parameter, None when absent or empty (HTML forms send empty fields)."""
    value = request.query_params.get(name)
    if value is None or value == "":
        return None
    return check_text(value, name, max_chars)


def path_segments(request: Request) -> list[str]:
    """The request path's segments, each percent-decoded on its own (``%2F`` stays in its segment)."""
    raw = request.scope.get("raw_path")
    if not isinstance(raw, bytes):
        return request.url.path.split("/")
    root = str(request.scope.get("root_path") or "").encode("utf-8")
    if root and raw.startswith(root):
        raw = raw[len(root) :]
    try:
        return [unquote_to_bytes(part).decode("utf-8") for part in raw.split(b"/")]
    except UnicodeDecodeError:
        raise UsageError("invalid path: not valid UTF-8 once percent-decoded") from None


def resolve_version(store: Store, version: int | None, at: datetime | None) -> tuple[int | None, bool]:
    """The version to read (``version``, the one at ``at``, else the current one) and whether it is exact.

    Not exact: below the history floor, or nothing stored at/before ``at``; reads then give nothing.
    A version ahead of the store raises :class:`UsageError`.
    """
    if version is not None and at is not None:
        raise UsageError("give at most one of version or at")
    if at is not None:
        found = store.version_at_timestamp(at)
        if found is None:
            return None, False
        return found, store.check_version(found)
    current = store.current_version()
    if version is None:
        version = current
        if version is None:
            return None, False
    if current is not None and version > current:
        raise VersionAheadError(
            f"version {format_lsn(version)} is ahead of the history store "
            f"(stored up to {format_lsn(current)})",
            hint="capture has not caught up yet: retry shortly",
        )
    return version, store.check_version(version)


@dataclass(frozen=True)
class Window:
    """The time, status, op and cursor filters a list of mutations shares (the log, a search)."""

    since: datetime | None = None
    until: datetime | None = None
    status: str | None = None
    op: str | None = None
    cursor: tuple[int, int] | None = None

    @classmethod
    def from_request(cls, request: Request, ops: Sequence[str], *, ops_are: str = "expected") -> Window:
        """``ops``: the operations allowed (``ops_are`` words the error: "expected one of ...")."""
        since_text, until_text = query_text(request, "since", 64), query_text(request, "until", 64)
        status = query_text(request, "status", 32)
        if status is not None and status not in STATUSES:
            raise UsageError(f"invalid status {status!r}: expected one of {', '.join(STATUSES)}")
        op = query_text(request, "op", 32)
        if op is not None and op not in ops:
            raise UsageError(f"invalid op {op!r}: {ops_are} one of {', '.join(ops)}")
        cursor_text = query_text(request, "cursor", MAX_CURSOR_CHARS)
        return cls(
            since=parse_when(since_text, "since") if since_text is not None else None,
            until=parse_when(until_text, "until", end=True) if until_text is not None else None,
            status=status,
            op=op,
            cursor=parse_cursor(cursor_text) if cursor_text is not None else None,
        )
