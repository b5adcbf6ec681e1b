"""W3C traceparent: strict parsing (cdc.tracing), the context messages that carry a trace
(cdc.context) and the middlewares' handling of the header (cdc.middleware)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc import client
from cdc.context import (
    CONTEXT_PREFIX,
    ContextKeys,
    RequestContext,
    context_key_id,
    parse_context,
    sign_content,
)
from cdc.middleware import ASGIMiddleware, WSGIMiddleware, current_request_id, current_trace
from cdc.tracing import TraceContext, is_span_id, is_trace_id, parse_traceparent

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{SPAN}-01"
KEY = bytes(range(32))
KEYS = ContextKeys(KEY, context_key_id(KEY))


# ============================================================================ parse_traceparent


def test_the_w3c_example() -> None:
    trace = parse_traceparent(VALID)
    assert trace == TraceContext(TRACE, SPAN, 1)
    assert trace is not None and trace.sampled and trace.traceparent == VALID
    not_sampled = parse_traceparent(f"00-{TRACE}-{SPAN}-00")
    assert not_sampled is not None and not not_sampled.sampled


@pytest.mark.parametrize(
    "value",
    [
        f"  {VALID}\t",  # optional whitespace around a header value
        f"00-{TRACE}-{SPAN}-ff",  # unknown flags are kept, not refused
        f"01-{TRACE}-{SPAN}-01",  # a future version, read by the version-00 layout
        f"cc-{TRACE}-{SPAN}-01-what-the-future-adds",
    ],
)
def test_valid_values(value: str) -> None:
    trace = parse_traceparent(value)
    assert trace is not None and (trace.trace_id, trace.span_id) == (TRACE, SPAN)


@pytest.mark.parametrize(
    "value",
    [
        None,
        b"00-" + TRACE.encode() + b"-" + SPAN.encode() + b"-01",  # bytes: not a header value here
        42,
        "",
        VALID.upper(),  # upper-case hex is invalid
        f"00-{TRACE.upper()}-{SPAN}-01",
        f"00-{TRACE}-{SPAN.upper()}-01",
        f"ff-{TRACE}-{SPAN}-01",  # version ff is forbidden
        f"00-{'0' * 32}-{SPAN}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE}-{SPAN}-01-extra",  # version 00 has nothing after the flags
        f"00-{TRACE}-{SPAN}-011",
        f"01-{TRACE}-{SPAN}-01x",  # a future version's extra part starts with '-'
        f"00-{TRACE[:-1]}-{SPAN}-01",
        f"00-{TRACE}0-{SPAN}-01",
        f"00-{TRACE}-{SPAN[:-1]}-01",
        f"00-{TRACE}-{SPAN}-1",
        f"0-{TRACE}-{SPAN}-01",
        f"00_{TRACE}_{SPAN}_01",
        f"00-{TRACE}-{SPAN}-0g",
        f"00-{TRACE[:-1]}z-{SPAN}-01",
        f"00-{TRACE}-{SPAN}-01, 00-{TRACE}-{SPAN}-01",  # two headers folded into one
        f"{VALID}\n",
        f"01-{TRACE}-{SPAN}-01-" + "a" * 600,  # unreasonably long
    ],
)
def test_invalid_values_are_ignored(value: object) -> None:
    assert parse_traceparent(value) is None


def test_ids() -> None:
    assert is_trace_id(TRACE) and is_span_id(SPAN)
    for bad in (None, "", TRACE.upper(), "0" * 32, TRACE[:-1], TRACE + "0", 7):
        assert not is_trace_id(bad)
    for bad in (None, "", SPAN.upper(), "0" * 16, SPAN[:-1], SPAN + "0", TRACE):
        assert not is_span_id(bad)


@given(st.text(max_size=80))
def test_any_text_parses_or_is_none(text: str) -> None:
    trace = parse_traceparent(text)
    if trace is not None:
        assert is_trace_id(trace.trace_id) and is_span_id(trace.span_id) and 0 <= trace.flags <= 255


@given(
    st.from_regex(r"[0-9a-f]{32}", fullmatch=True).filter(is_trace_id),
    st.from_regex(r"[0-9a-f]{16}", fullmatch=True).filter(is_span_id),
    st.integers(0, 255),
)
def test_roundtrip(trace_id: str, span_id: str, flags: int) -> None:
    trace = TraceContext(trace_id, span_id, flags)
    assert parse_traceparent(trace.traceparent) == trace


def test_tracing_module_is_pure() -> None:
    code = "import sys, cdc.tracing; assert 'psycopg' not in sys.modules, 'psycopg imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ============================================================================ the context message


def signed_context(**changes: Any) -> bytes:
    body = {
        "request_id": "r1",
        "actor": None,
        "application_name": "web",
        "db_user": "app",
        "client_addr": None,
        "backend_pid": 7,
        "source": "client",
        "extra": {"tenant": "acme"},
        "xid": 730,
        **changes,
    }
    return sign_content(CONTEXT_PREFIX, json.dumps(body, separators=(",", ":")).encode(), KEY)


def test_the_traceparent_of_extra_becomes_the_contexts_trace() -> None:
    ctx = parse_context(signed_context(extra={"tenant": "acme", "traceparent": VALID}), KEYS, xid=730)
    assert (ctx.trace_id, ctx.span_id) == (TRACE, SPAN)
    assert ctx.extra == {"tenant": "acme"}
    assert ctx.as_json()["trace_id"] == TRACE and ctx.as_json()["span_id"] == SPAN
    assert parse_context(sign_content(CONTEXT_PREFIX, ctx.to_content().encode(), KEY), KEYS) == ctx


@pytest.mark.parametrize(
    "traceparent", [VALID.upper(), f"00-{'0' * 32}-{SPAN}-01", "garbage", "", f"{VALID}-x"]
)
def test_an_invalid_traceparent_is_dropped_and_the_context_stands(traceparent: str) -> None:
    ctx = parse_context(signed_context(extra={"tenant": "acme", "traceparent": traceparent}), KEYS, xid=730)
    assert (ctx.request_id, ctx.trace_id, ctx.span_id) == ("r1", None, None)
    assert ctx.extra == {"tenant": "acme"}
    assert "trace_id" not in ctx.as_json()


def test_top_level_trace_members_are_read_when_valid() -> None:
    ctx = parse_context(signed_context(trace_id=TRACE, span_id=SPAN), KEYS)
    assert (ctx.trace_id, ctx.span_id) == (TRACE, SPAN)
    ctx = parse_context(signed_context(trace_id=TRACE, span_id="nope"), KEYS)
    assert (ctx.trace_id, ctx.span_id) == (TRACE, None)
    for bad in (TRACE.upper(), 12, ["x"], "0" * 32):
        ctx = parse_context(signed_context(trace_id=bad, span_id=SPAN), KEYS)
        assert (ctx.trace_id, ctx.span_id) == (None, None)
    # the body's own members win over a traceparent in extra
    other = "0af7651916cd43dd8448eb211c80319c"
    ctx = parse_context(signed_context(trace_id=other, extra={"traceparent": VALID}), KEYS)
    assert ctx.trace_id == other and "traceparent" not in ctx.extra


def test_a_context_without_trace_is_unchanged() -> None:
    ctx = parse_context(signed_context(), KEYS, xid=730)
    assert ctx == RequestContext("r1", None, "web", "app", None, 7, "client", {"tenant": "acme"})
    assert "trace_id" not in ctx.as_json() and "span_id" not in ctx.as_json()


# ============================================================================ middlewares


def _wsgi(seen: list[Any]) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        seen.append((current_request_id(), current_trace(), environ["cdc.request_id"], environ["cdc.trace"]))
        start_response("200 OK", [])
        return iter([b"ok"])

    return app


def test_wsgi_middleware_takes_the_traceparent() -> None:
    seen: list[Any] = []
    headers: list[Any] = []
    mw = WSGIMiddleware(_wsgi(seen))
    b"".join(mw({"HTTP_X_REQUEST_ID": "abc", "HTTP_TRACEPARENT": VALID}, lambda s, h: headers.append(h)))
    assert seen[-1] == ("abc", TraceContext(TRACE, SPAN, 1), "abc", TraceContext(TRACE, SPAN, 1))
    assert current_trace() is None and current_request_id() is None  # nothing leaks out
    b"".join(mw({"HTTP_X_REQUEST_ID": "abc", "HTTP_TRACEPARENT": VALID.upper()}, lambda s, h: None))
    assert seen[-1] == ("abc", None, "abc", None)  # invalid: ignored, no error

    by_trace = WSGIMiddleware(_wsgi(seen), request_id_from_trace=True)
    b"".join(
        by_trace({"HTTP_X_REQUEST_ID": "abc", "HTTP_TRACEPARENT": VALID}, lambda s, h: headers.append(h))
    )
    assert seen[-1][0] == TRACE and headers[-1] == [("X-Request-ID", TRACE)]
    b"".join(by_trace({"HTTP_X_REQUEST_ID": "abc", "HTTP_TRACEPARENT": "junk"}, lambda s, h: None))
    assert seen[-1][:2] == ("abc", None)  # no valid trace: the header's id

    custom = WSGIMiddleware(_wsgi(seen), trace_header="X-Trace-Parent")
    b"".join(custom({"HTTP_X_TRACE_PARENT": VALID}, lambda s, h: None))
    assert seen[-1][1] == TraceContext(TRACE, SPAN, 1)


def test_the_configured_default_names_requests_by_their_trace() -> None:
    seen: list[Any] = []
    try:
        client.configure(request_id_from_trace=True)
        b"".join(WSGIMiddleware(_wsgi(seen))({"HTTP_TRACEPARENT": VALID}, lambda s, h: None))
        b"".join(
            WSGIMiddleware(_wsgi(seen), request_id_from_trace=False)(
                {"HTTP_TRACEPARENT": VALID}, lambda s, h: None
            )
        )
    finally:
        client.configure()
    assert seen[0][0] == TRACE
    assert seen[1][0] != TRACE and seen[1][1] == TraceContext(TRACE, SPAN, 1)


def test_asgi_middleware_takes_the_traceparent() -> None:
    seen: list[Any] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append((current_request_id(), current_trace(), scope["state"]["trace"]))
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def run(headers: list[tuple[bytes, bytes]], **options: Any) -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await ASGIMiddleware(app, **options)({"type": "http", "headers": headers}, None, send)
        assert current_trace() is None
        return sent

    tp = VALID.encode()
    asyncio.run(run([(b"x-request-id", b"r-1"), (b"traceparent", tp)]))
    assert seen[-1] == ("r-1", TraceContext(TRACE, SPAN, 1), TraceContext(TRACE, SPAN, 1))
    asyncio.run(run([(b"x-request-id", b"r-1"), (b"traceparent", tp), (b"traceparent", tp)]))
    assert seen[-1] == ("r-1", None, None)  # two traceparent headers: invalid
    sent = asyncio.run(run([(b"traceparent", tp)], request_id_from_trace=True))
    assert seen[-1][0] == TRACE and sent[0]["headers"] == [(b"x-request-id", TRACE.encode())]
    asyncio.run(run([(b"traceparent", b"00-zz")], request_id_from_trace=True))
    assert seen[-1][1] is None and seen[-1][0] != TRACE


def test_the_client_exports_the_trace_api() -> None:
    assert client.current_trace is current_trace
    assert client.WSGIMiddleware is WSGIMiddleware and client.TraceContext is TraceContext
