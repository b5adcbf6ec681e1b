"""The plumbing of ``cdc serve``: JSON errors, the pool of stores, the app's context and access
control (bearer token or session cookie), shared by the API and the pages."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
)
from psycopg.conninfo import conninfo_to_dict
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cdc.config import redact_dsn
from cdc.errors import (
    AmbiguousRequestError,
    CdcError,
    ConfigError,
    IncompleteHistoryError,
    NotFoundError,
    SourceUnavailableError,
    StoreUnavailableError,
    UsageError,
)
from cdc.query import BlameEntry, Mutation, RequestRecord, Store, VersionRange
from cdc.render import mutation_record
from cdc.web.args import VersionAheadError

__all__ = [
    "COOKIE_NAME",
    "MAX_LOGIN_BODY",
    "POOL_SIZE",
    "WEB_DIR",
    "AccessMiddleware",
    "JsonResponse",
    "Probe",
    "SourceNotConfiguredError",
    "StorePool",
    "WebContext",
    "api_error_response",
    "blame_json",
    "check_dsn",
    "context_of",
    "error_body",
    "error_status",
    "log_unexpected",
    "request_json",
    "versions_json",
]

log = structlog.get_logger("cdc.web")

T = TypeVar("T")

#: A liveness/readiness probe: returns a bool, ``(ok, detail)`` or a mapping with ``ok``.
Probe = Callable[[], Any]

MAX_LOGIN_BODY = 8192
COOKIE_NAME = "cdc_token"
POOL_SIZE = 8
POOL_WAIT_SECONDS = 30.0

WEB_DIR = Path(__file__).resolve().parent
_OPEN_PATHS = frozenset(
    {"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs/api", "/login", "/logout"}
)

# Security headers on every response; pages get a CSP that allows only our own stylesheet.
_COMMON_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
_PAGE_CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)


# ============================================================================ JSON


class SourceNotConfiguredError(SourceUnavailableError):
    """``cdc serve`` was started without a source DSN: undo previews need one (HTTP 503)."""

    def __init__(self) -> None:
        super().__init__(
            "this server has no source database configured: undo previews read the source's current rows",
            hint="start cdc serve with --source DSN (or CDC_SOURCE_DSN / source.dsn), a role that may "
            "SELECT the captured tables; or run the cdc command shown",
        )


class JsonResponse(JSONResponse):
    """Compact UTF-8 JSON; anything unexpected (a datetime...) as its string."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, separators=(",", ":"), default=str).encode("utf-8")


def error_body(
    code: str, message: str, hint: str | None = None, error_id: str | None = None
) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if hint:
        error["hint"] = hint
    if error_id:
        error["id"] = error_id
    return {"error": error}


def error_status(exc: BaseException) -> tuple[int, str]:
    """HTTP status and error code for an exception raised while answering."""
    if isinstance(exc, VersionAheadError):
        return 409, "version_ahead"
    if isinstance(exc, NotFoundError):
        return 404, "not_found"
    if isinstance(exc, IncompleteHistoryError):
        return 409, "history_incomplete"
    if isinstance(exc, UsageError):
        return 400, "bad_request"
    if isinstance(exc, StoreUnavailableError):
        return 503, "store_unavailable"
    if isinstance(exc, SourceNotConfiguredError):
        return 503, "no_source"
    if isinstance(exc, SourceUnavailableError):
        return 503, "source_unavailable"
    return 500, "internal"


def log_unexpected(exc: BaseException, route: str) -> str:
    """Log an unexpected error without its message (it may hold values); return its id."""
    error_id = uuid.uuid4().hex[:12]
    frames = [f"{f.filename}:{f.lineno} in {f.name}" for f in traceback.extract_tb(exc.__traceback__)[-10:]]
    log.error(
        "http_unexpected_error", route=route, error_type=type(exc).__name__, error_id=error_id, frames=frames
    )
    return error_id


def api_error_response(exc: BaseException, route: str) -> JsonResponse:
    status, code = error_status(exc)
    if status == 500 or not isinstance(exc, CdcError):
        error_id = log_unexpected(exc, route)
        return JsonResponse(
            error_body("internal", f"internal error (logged with id {error_id})", error_id=error_id),
            status_code=500,
        )
    if isinstance(exc, StoreUnavailableError):
        log.warning("history_store_unavailable", route=route, error=exc.message)
    elif isinstance(exc, SourceUnavailableError) and not isinstance(exc, SourceNotConfiguredError):
        log.warning("source_unavailable", route=route, error=exc.message)
    body = error_body(code, exc.message, exc.hint)
    if isinstance(exc, AmbiguousRequestError):
        # An ambiguous request id prefix: the ids it matches, to pick one from.
        body["error"]["matches"] = exc.matches
        body["error"]["more_matches"] = exc.more
    return JsonResponse(body, status_code=status)


# ============================================================================ the store pool


class StorePool:
    """At most ``size`` :class:`Store` objects (one connection each), reused across requests.

    A ``Store`` is not thread-safe: each is used by one worker thread at a time. A Store whose
    connection broke reconnects by itself on its next use.
    """

    def __init__(self, dsn: str, schema: str, size: int = POOL_SIZE) -> None:
        self._dsn = dsn
        self._schema = schema
        self._idle: list[Store] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(size)

    @contextmanager
    def store(self) -> Iterator[Store]:
        if not self._slots.acquire(timeout=POOL_WAIT_SECONDS):
            raise StoreUnavailableError("every connection to the history store is busy: retry later")
        try:
            with self._lock:
                store = self._idle.pop() if self._idle else None
            if store is None:
                store = Store(self._dsn, schema=self._schema)
            try:
                yield store
            except CdcError:
                self._give_back(store)
                raise
            except BaseException:
                store.close()  # unknown state: do not reuse its connection
                raise
            else:
                self._give_back(store)
        finally:
            self._slots.release()

    def _give_back(self, store: Store) -> None:
        with self._lock:
            self._idle.append(store)

    def call(self, work: Callable[[Store], T]) -> T:
        with self.store() as store:
            return work(store)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for store in idle:
            store.close()


def check_dsn(dsn: str) -> None:
    """:class:`ConfigError` unless ``dsn`` parses (the store is connected to lazily, per request)."""
    try:
        conninfo_to_dict(dsn)
    except psycopg.Error as exc:
        raise ConfigError([f"store.dsn: invalid DSN: {redact_dsn(str(exc).strip())}"]) from None


def utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


def blame_json(entry: BlameEntry) -> dict[str, Any]:
    return replace(
        entry, committed_at=utc(entry.committed_at), rolled_back_at=utc(entry.rolled_back_at)
    ).to_json()


def versions_json(found: VersionRange) -> dict[str, Any]:
    return replace(found, earliest_at=utc(found.earliest_at), current_at=utc(found.current_at)).to_json()


def request_json(record: RequestRecord, mutations: list[Mutation]) -> dict[str, Any]:
    """The request's record with every time in UTC and ``mutations`` (one page of them)."""
    data = replace(
        record,
        first_seen_at=utc(record.first_seen_at),
        last_seen_at=utc(record.last_seen_at),
        error_at=utc(record.error_at),
        transactions=[replace(t, committed_at=t.committed_at.astimezone(UTC)) for t in record.transactions],
        mutations=[],
        errors=[replace(e, at=utc(e.at)) for e in record.errors],
    ).to_json()
    data["mutations"] = [mutation_record(m, utc=True) for m in mutations]
    return data


# ============================================================================ the app's context


@dataclass
class WebContext:
    """What every endpoint needs; kept on ``app.state.cdc``."""

    pool: StorePool
    token: str | None
    registry: CollectorRegistry
    health: Probe | None
    ready: Probe | None
    requests_total: Counter | None = None
    request_seconds: Histogram | None = None
    unauthorized_page: Callable[[Request, str | None, int], Response] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: the source, for undo previews (read only, rolled back); None: previews say it is missing
    source_dsn: str | None = None
    #: the ``columns`` config section (redaction policies not recorded in the stored schema)
    policies: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    #: ``policies.hash_key``: a hashed column is searched by the digest of a value only with it
    hash_key: bytes | None = None

    @property
    def cookie_value(self) -> str | None:
        """The session cookie: an HMAC of the token (the cookie never holds the token itself)."""
        if self.token is None:
            return None
        return hmac.new(self.token.encode("utf-8"), b"cdc-web-session-v1", hashlib.sha256).hexdigest()

    async def run(self, work: Callable[[Store], T]) -> T:
        """``work(store)`` in a worker thread with a pooled store."""
        return await run_in_threadpool(self.pool.call, work)

    def token_ok(self, given: str | None) -> bool:
        if self.token is None:
            return True
        if given is None:
            return False
        return hmac.compare_digest(given.encode("utf-8"), self.token.encode("utf-8"))

    def authorized(self, headers: Headers, *, allow_cookie: bool) -> bool:
        if self.token is None:
            return True
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self.token_ok(credentials.strip()):
            return True
        if allow_cookie:
            cookie = _cookie(headers, COOKIE_NAME)
            expected = self.cookie_value
            if cookie is not None and expected is not None:
                return hmac.compare_digest(cookie.encode("utf-8"), expected.encode("utf-8"))
        return False


def _cookie(headers: Headers, name: str) -> str | None:
    for header in headers.getlist("cookie"):
        for part in header.split(";"):
            key, sep, value = part.strip().partition("=")
            if sep and key == name:
                return value.strip()
    return None


def context_of(request: Request) -> WebContext:
    ctx = request.app.state.cdc
    assert isinstance(ctx, WebContext)
    return ctx


# ============================================================================ middleware

_ROUTES = (
    (re.compile(r"/api/v1/tables/[^/]+/rows/.+/history"), "api_row_history"),
    (re.compile(r"/api/v1/tables/[^/]+/rows/.+/blame"), "api_row_blame"),
    (re.compile(r"/api/v1/tables/[^/]+/rows/.+/restore"), "api_row_restore"),
    (re.compile(r"/api/v1/tables/[^/]+/search"), "api_table_search"),
    (re.compile(r"/api/v1/requests/.+/revert"), "api_request_revert"),
    (re.compile(r"/api/v1/tables/[^/]+/rows/.+"), "api_row"),
    (re.compile(r"/api/v1/tables/[^/]+/rows"), "api_table_rows"),
    (re.compile(r"/api/v1/tables"), "api_tables"),
    (re.compile(r"/api/v1/versions"), "api_versions"),
    (re.compile(r"/api/v1/mutations"), "api_mutations"),
    (re.compile(r"/api/v1/requests/.+"), "api_request"),
    (re.compile(r"/api/.*"), "api_other"),
    (re.compile(r"/"), "page_log"),
    (re.compile(r"/search"), "page_search"),
    (re.compile(r"/docs/api"), "page_api_reference"),
    (re.compile(r"/tables/[^/]+/rows/.+/restore"), "page_restore"),
    (re.compile(r"/tables/.+"), "page_row"),
    (re.compile(r"/requests/.+"), "page_request"),
    (re.compile(r"/static/.*"), "static"),
    (re.compile(r"/(healthz|readyz|metrics|login|logout)"), ""),
    (re.compile(r"/openapi\.json"), "openapi"),
)


def route_label(path: str) -> str:
    """A bounded label for metrics and logs (never the path itself: it may hold a row key)."""
    for pattern, label in _ROUTES:
        if pattern.fullmatch(path):
            return label or path.strip("/")
    return "other"


class AccessMiddleware:
    """Token check, security headers, request metrics and an access log without paths or tokens."""

    def __init__(self, app: ASGIApp, ctx: WebContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path = str(scope.get("path", "/"))
        root = str(scope.get("root_path") or "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        route = route_label(path)
        is_api = path.startswith("/api/")
        status_holder = [500]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder[0] = int(message["status"])
                headers = MutableHeaders(scope=message)
                for name, value in _COMMON_HEADERS.items():
                    headers.setdefault(name, value)
                content_type = headers.get("content-type", "")
                if content_type.startswith("text/html"):
                    headers.setdefault("Content-Security-Policy", _PAGE_CSP)
                if is_api or content_type.startswith("text/html"):
                    headers.setdefault("Cache-Control", "no-store")
            await send(message)

        try:
            open_path = path in _OPEN_PATHS or path.startswith("/static/")
            if self.ctx.token is not None and not open_path:
                headers = Headers(scope=scope)
                if not self.ctx.authorized(headers, allow_cookie=not is_api):
                    response = self._unauthorized(scope, is_api, headers)
                    await response(scope, receive, send_with_headers)
                    return
            await self.app(scope, receive, send_with_headers)
        finally:
            elapsed = time.perf_counter() - started
            method = str(scope.get("method", "GET"))
            if self.ctx.requests_total is not None:
                self.ctx.requests_total.labels(route=route, method=method, status=str(status_holder[0])).inc()
            if self.ctx.request_seconds is not None:
                self.ctx.request_seconds.labels(route=route).observe(elapsed)
            quiet = route in ("healthz", "readyz", "metrics", "static")  # probes and scrapes: debug
            (log.debug if quiet else log.info)(
                "http_request",
                method=method,
                route=route,
                status=status_holder[0],
                ms=round(elapsed * 1000, 1),
            )

    def _unauthorized(self, scope: Scope, is_api: bool, headers: Headers) -> Response:
        given = "authorization" in headers or _cookie(headers, COOKIE_NAME) is not None
        if is_api or self.ctx.unauthorized_page is None:
            message = "invalid token" if given else "missing token: send Authorization: Bearer <token>"
            return JsonResponse(
                error_body("unauthorized", message),
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="cdc"'},
            )
        return self.ctx.unauthorized_page(Request(scope), "invalid token" if given else None, 401)
