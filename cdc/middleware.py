"""WSGI and ASGI middleware: the request id and trace context of an HTTP request.

``WSGIMiddleware(app)`` and ``ASGIMiddleware(app)`` take the request id from ``X-Request-ID`` (or
make one) and the W3C trace context from ``traceparent`` (:mod:`cdc.tracing`: validated strictly,
an invalid one ignored), expose both while the application runs (:func:`current_request_id`,
:func:`current_trace`) and echo the request id in the response. ``cdc.client.request(conn)``
without an id uses them: the request's database work is recorded under that id, with the trace id
and span id. With ``request_id_from_trace`` the request id is the trace id whenever the request
carries a valid ``traceparent``. Both are re-exported by :mod:`cdc.client`.
"""

from __future__ import annotations

import contextvars
import re
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, Final

from cdc.tracing import TraceContext, parse_traceparent

__all__ = [
    "ASGIMiddleware",
    "WSGIMiddleware",
    "current_request_id",
    "current_trace",
    "new_request_id",
]

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("cdc_request_id", default=None)
_trace: contextvars.ContextVar[TraceContext | None] = contextvars.ContextVar("cdc_trace", default=None)

#: Incoming request ids accepted from a header; anything else is replaced by a fresh id.
_HEADER_ID: Final = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


class _Settings:
    """Process-wide defaults (``cdc.client.configure``)."""

    request_id_from_trace = False


settings: Final = _Settings()


def current_request_id() -> str | None:
    """The request id of the current HTTP request (set by the middlewares) or ``request()`` block."""
    return _request_id.get()


def current_trace() -> TraceContext | None:
    """The trace context of the current HTTP request (its valid ``traceparent``) or ``request()`` block."""
    return _trace.get()


def new_request_id() -> str:
    """A fresh request id: 32 hex digits (uuid4)."""
    return uuid.uuid4().hex


WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
ASGIApp = Callable[
    [Mapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]
]


def _accept(value: str | None) -> str:
    if value is not None:
        value = value.strip()
        if _HEADER_ID.fullmatch(value):
            return value
    return new_request_id()


def _identify(
    incoming: str | None, traceparent: str | None, from_trace: bool | None
) -> tuple[str, TraceContext | None]:
    trace = parse_traceparent(traceparent)
    use_trace = settings.request_id_from_trace if from_trace is None else from_trace
    if use_trace and trace is not None:
        return trace.trace_id, trace
    return _accept(incoming), trace


def _environ_key(header: str) -> str:
    return "HTTP_" + header.upper().replace("-", "_")


class _ContextIterable:
    """A WSGI response body iterated inside the request's context (so the id stays visible)."""

    def __init__(self, body: Iterable[bytes], ctx: contextvars.Context) -> None:
        self._body = body
        self._iter: Iterator[bytes] | None = None
        self._ctx = ctx

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._iter is None:
            self._iter = self._ctx.run(iter, self._body)
        return self._ctx.run(next, self._iter)

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if callable(close):
            self._ctx.run(close)


class WSGIMiddleware:
    """Take the request id from ``header`` (or make one) and the trace context from
    ``trace_header``, expose them, echo the id in the response.

    The id is visible through :func:`current_request_id` while the application runs and while
    its response body is iterated, and in ``environ["cdc.request_id"]``; the trace context (None
    without a valid ``traceparent``) through :func:`current_trace` and ``environ["cdc.trace"]``. An
    incoming id that is not 1-128 characters of ``A-Z a-z 0-9 . _ : @ / + = -`` is replaced by a
    fresh one. ``request_id_from_trace``: the request id is the trace id when the request has a
    valid ``traceparent`` (None: as ``cdc.client.configure(request_id_from_trace=...)``).
    """

    def __init__(
        self,
        app: WSGIApp,
        header: str = "X-Request-ID",
        *,
        trace_header: str = "traceparent",
        request_id_from_trace: bool | None = None,
    ) -> None:
        self.app = app
        self.header = header
        self.request_id_from_trace = request_id_from_trace
        self._environ_key = _environ_key(header)
        self._trace_key = _environ_key(trace_header)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        rid, trace = _identify(
            environ.get(self._environ_key), environ.get(self._trace_key), self.request_id_from_trace
        )
        environ["cdc.request_id"] = rid
        environ["cdc.trace"] = trace
        lowered = self.header.lower()

        def _start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            headers = [(k, v) for k, v in headers if k.lower() != lowered]
            headers.append((self.header, rid))
            if exc_info is not None:
                return start_response(status, headers, exc_info)
            return start_response(status, headers)

        ctx = contextvars.copy_context()
        ctx.run(_request_id.set, rid)
        ctx.run(_trace.set, trace)
        body = ctx.run(self.app, environ, _start_response)
        return _ContextIterable(body, ctx)


class ASGIMiddleware:
    """The ASGI version of :class:`WSGIMiddleware` (HTTP and WebSocket scopes).

    The id and the trace context are also put in ``scope["state"]["request_id"]`` and
    ``scope["state"]["trace"]`` (Starlette's ``request.state``). A request with more than one
    ``traceparent`` header has no trace (the W3C rule).
    """

    def __init__(
        self,
        app: Any,
        header: str = "X-Request-ID",
        *,
        trace_header: str = "traceparent",
        request_id_from_trace: bool | None = None,
    ) -> None:
        self.app = app
        self.header = header
        self.request_id_from_trace = request_id_from_trace
        self._header_bytes = header.lower().encode("latin-1")
        self._trace_bytes = trace_header.lower().encode("latin-1")

    async def __call__(self, scope: Mapping[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        incoming: str | None = None
        traceparents: list[str] = []
        for name, value in scope.get("headers") or ():
            lowered = bytes(name).lower()
            if lowered == self._header_bytes and incoming is None:
                incoming = bytes(value).decode("latin-1")
            elif lowered == self._trace_bytes:
                traceparents.append(bytes(value).decode("latin-1"))
        rid, trace = _identify(
            incoming, traceparents[0] if len(traceparents) == 1 else None, self.request_id_from_trace
        )
        new_scope = dict(scope)
        state = dict(scope.get("state") or {})
        state["request_id"] = rid
        state["trace"] = trace
        new_scope["state"] = state
        echo = (self._header_bytes, rid.encode("latin-1"))

        async def _send(message: Mapping[str, Any]) -> None:
            if message.get("type") in ("http.response.start", "websocket.accept"):
                headers = [
                    (k, v) for k, v in message.get("headers") or () if bytes(k).lower() != self._header_bytes
                ]
                headers.append(echo)
                message = {**message, "headers": headers}
            await send(message)

        token = _request_id.set(rid)
        trace_token = _trace.set(trace)
        try:
            await self.app(new_scope, receive, _send)
        finally:
            _trace.reset(trace_token)
            _request_id.reset(token)
