"""W3C Trace Context: the ``traceparent`` header that OpenTelemetry propagates.

``traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01`` is
``version-trace_id-parent_id-trace_flags``. :func:`parse_traceparent` validates it strictly, as
the W3C recommendation (Trace Context, Level 1, section 3.2) asks of a receiver, and returns None
for anything else, never raising: an invalid header is ignored (the request simply has no trace),
and never an error for the application.

- every field is lower-case hexadecimal of its exact length (2, 32, 16, 2 digits), separated by
  ``-``; upper case is invalid;
- version ``ff`` is invalid; version ``00`` has nothing after the flags; a higher (future)
  version is read by the version-00 layout, and may have more after a ``-`` following the flags;
- a trace id or parent (span) id of all zeros is invalid;
- spaces and tabs around the value (HTTP's optional whitespace) are ignored; a value with several
  headers folded into one (``a, b``) is invalid.

Pure: no I/O. The client helper and the middlewares (:mod:`cdc.client`, :mod:`cdc.middleware`)
send the trace id and span id with the request's context; the daemon reads them back
(:mod:`cdc.context`) with :func:`is_trace_id` and :func:`is_span_id`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

__all__ = [
    "TRACEPARENT_KEY",
    "TraceContext",
    "is_span_id",
    "is_trace_id",
    "parse_traceparent",
]

#: The context's ``extra`` member that carries a traceparent (from the client helper, or a
#: ``cdc.traceparent`` setting named in ``context.extra_settings``); the daemon lifts it out.
TRACEPARENT_KEY: Final = "traceparent"

_VERSION_00_LENGTH: Final = 55
#: Longer values are not read (a future version may add fields, not kilobytes).
_MAX_LENGTH: Final = 512
_LAYOUT: Final = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_TRACE_ID: Final = re.compile(r"[0-9a-f]{32}")
_SPAN_ID: Final = re.compile(r"[0-9a-f]{16}")
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16


@dataclass(frozen=True, slots=True)
class TraceContext:
    """A valid ``traceparent``: the trace, the caller's span (``parent-id``) and the flags."""

    trace_id: str  # 32 lower-case hex digits, not all zeros
    span_id: str  # 16 lower-case hex digits, not all zeros: the span that made the call
    flags: int = 0  # bit 0: sampled

    @property
    def sampled(self) -> bool:
        return bool(self.flags & 1)

    @property
    def traceparent(self) -> str:
        """The version-00 header value."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}"


def is_trace_id(value: object) -> bool:
    """32 lower-case hex digits, not all zeros."""
    return isinstance(value, str) and value != _ZERO_TRACE and _TRACE_ID.fullmatch(value) is not None


def is_span_id(value: object) -> bool:
    """16 lower-case hex digits, not all zeros."""
    return isinstance(value, str) and value != _ZERO_SPAN and _SPAN_ID.fullmatch(value) is not None


def parse_traceparent(value: object) -> TraceContext | None:
    """The trace context of a ``traceparent`` value, or None when it is not a valid one (any type,
    any text: never raises)."""
    if not isinstance(value, str):
        return None
    text = value.strip(" \t")
    if len(text) < _VERSION_00_LENGTH or len(text) > _MAX_LENGTH:
        return None
    match = _LAYOUT.match(text)
    if match is None:
        return None
    version, trace_id, span_id, flags = match.groups()
    if version == "ff" or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    if len(text) > _VERSION_00_LENGTH and (version == "00" or text[_VERSION_00_LENGTH] != "-"):
        return None
    return TraceContext(trace_id, span_id, int(flags, 16))
