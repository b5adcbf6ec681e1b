"""The HTTP API of ``cdc serve`` (JSON under ``/api/v1/``), its access control and the app factory.

A thin shell over :class:`cdc.query.Store`, like the CLI and the Python API:

==========================================================  =========================================
``GET /api/v1/tables``                                      captured tables (name, key, columns)
``GET /api/v1/versions[?at=T]``                             current / earliest (floor) version
``GET /api/v1/tables/{table}/rows[?version|at&after&limit]`` the table at a version, in key order
``GET /api/v1/tables/{table}/rows/{key}[?version|at]``      one row at a version (default: now)
``GET /api/v1/tables/{table}/rows/{key}/history``           the row's mutations (``since``/``until``)
``GET /api/v1/tables/{table}/rows/{key}/blame``             per column: its last committed write
``GET /api/v1/mutations?table&key&request&actor&...``       the mutation log, newest first, paginated
``GET /api/v1/requests/{request_id}``                       a request (id or unique prefix)
``GET /openapi.json``                                       the OpenAPI 3.1 document of all of this
``GET /healthz`` ``/readyz`` ``/metrics``                   liveness, readiness, Prometheus
==========================================================  =========================================

Keys in a path are a scalar (``42``, ``abc``) or URL-encoded JSON for a composite key
(``{"a":1,"b":"x"}``). Versions are integers or ``X/Y``; times are ISO 8601 (naive: UTC), ``now``
or a duration ago (``24h``); an empty query parameter is an absent one (HTML forms), an unknown
one is refused (a misspelt filter must not silently widen a query). Every time in a response is
UTC. Errors are ``{"error": {"code": ..., "message": ...}}`` with 400 (bad argument), 401
(token), 404 (unknown table, row or request), 409 (a version the store has not caught up with:
retry), 503 (history store unreachable); never a traceback: anything unexpected is a JSON 500
with an id, logged with its type and stack frames but never its message (it may hold values).

Access: with a token, every ``/api/`` request needs ``Authorization: Bearer <token>`` and every
page that header or the ``cdc_token`` cookie set by ``/login``. ``/healthz``, ``/readyz``,
``/metrics``, ``/openapi.json``, ``/login`` and ``/static/`` stay open (they show no history).
Without a token the app is only built with ``open_access=True``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import math
import re
import threading
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote_to_bytes

import psycopg
import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from psycopg.conninfo import conninfo_to_dict
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cdc.config import redact_dsn
from cdc.errors import CdcError, ConfigError, NotFoundError, StoreUnavailableError, UsageError
from cdc.lsn import format_lsn, parse_lsn
from cdc.query import (
    DEFAULT_SCHEMA,
    OPS,
    STATUSES,
    BlameEntry,
    Key,
    Mutation,
    RequestRecord,
    Store,
    VersionRange,
    format_key,
)
from cdc.render import MUTATION_CSV_FIELDS, mutation_record

__all__ = [
    "MAX_KEY_CHARS",
    "MAX_LIMIT",
    "WebContext",
    "create_app",
    "error_status",
    "format_cursor",
    "openapi_document",
    "parse_bool",
    "parse_cursor",
    "parse_key",
    "parse_limit",
    "parse_version",
    "parse_when",
    "path_segments",
    "resolve_version",
]

log = structlog.get_logger("cdc.web")

T = TypeVar("T")

#: A liveness/readiness probe: returns a bool, ``(ok, detail)`` or a mapping with ``ok``.
Probe = Callable[[], Any]

MAX_KEY_CHARS = 4096  # a row key in a path or a filter (scalar text or JSON)
MAX_AFTER_CHARS = 16384  # a table page cursor (a whole row for tables without a key)
MAX_TEXT_CHARS = 1024  # table names, request ids, actors, times, versions
MAX_CURSOR_CHARS = 64
MAX_TABLE_CHARS = 300  # two quoted identifiers of 63 bytes with every quote doubled
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
MAX_LOGIN_BODY = 8192
COOKIE_NAME = "cdc_token"
POOL_SIZE = 8
POOL_WAIT_SECONDS = 30.0

WEB_DIR = Path(__file__).resolve().parent
_LSN_MAX = 2**64 - 1
_CURSOR_RE = re.compile(r"([0-9]{1,18})-([0-9]{1,9})", re.ASCII)
_VERSION_RE = re.compile(r"[0-9]{1,19}|[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}", re.ASCII)
_OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json", "/login", "/logout"})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})

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


class VersionAheadError(UsageError):
    """A version the history store has not caught up with yet (HTTP 409: retry later)."""


def error_status(exc: BaseException) -> tuple[int, str]:
    """HTTP status and error code for an exception raised while answering."""
    if isinstance(exc, VersionAheadError):
        return 409, "version_ahead"
    if isinstance(exc, NotFoundError):
        return 404, "not_found"
    if isinstance(exc, UsageError):
        return 400, "bad_request"
    if isinstance(exc, StoreUnavailableError):
        return 503, "store_unavailable"
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
    if status == 503:
        log.warning("history_store_unavailable", route=route, error=exc.message)
    return JsonResponse(error_body(code, exc.message, exc.hint), status_code=status)


# ============================================================================ arguments


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
    from cdc.cli_readers import parse_time

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


def parse_limit(text: str | None, default: int = DEFAULT_LIMIT, maximum: int = MAX_LIMIT) -> int:
    if text is None or text == "":
        return default
    check_text(text, "limit", 32)
    try:
        value = int(text.strip())
    except ValueError:
        raise UsageError(f"invalid limit {text!r}: expected an integer from 1 to {maximum}") from None
    if not 1 <= value <= maximum:
        raise UsageError(f"invalid limit {value}: expected an integer from 1 to {maximum}")
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
    (re.compile(r"/api/v1/tables/[^/]+/rows/.+"), "api_row"),
    (re.compile(r"/api/v1/tables/[^/]+/rows"), "api_table_rows"),
    (re.compile(r"/api/v1/tables"), "api_tables"),
    (re.compile(r"/api/v1/versions"), "api_versions"),
    (re.compile(r"/api/v1/mutations"), "api_mutations"),
    (re.compile(r"/api/v1/requests/.+"), "api_request"),
    (re.compile(r"/api/.*"), "api_other"),
    (re.compile(r"/"), "page_log"),
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


# ============================================================================ API endpoints

ApiHandler = Callable[[Request, WebContext], Awaitable[Any]]


def api(route: str, handler: ApiHandler) -> Callable[[Request], Awaitable[Response]]:
    """The error boundary of one API endpoint: CdcError → its status, anything else → a logged 500."""

    async def endpoint(request: Request) -> Response:
        try:
            result = await handler(request, context_of(request))
        except Exception as exc:  # noqa: BLE001 - the API boundary: never a traceback to the client
            return api_error_response(exc, route)
        if isinstance(result, Response):
            return result
        return JsonResponse(result)

    endpoint.__name__ = route
    return endpoint


def _version_json(version: int | None) -> dict[str, Any]:
    return {"version": version, "version_lsn": format_lsn(version) if version is not None else None}


async def list_tables(request: Request, ctx: WebContext) -> dict[str, Any]:
    allow_params(request)

    def work(store: Store) -> dict[str, Any]:
        tables = []
        for name in store.known_tables():
            info = store.table(name)
            tables.append(
                {
                    "name": info.name,
                    "key_columns": list(info.key_columns),
                    "columns": list(info.columns),
                    "keyless": info.keyless,
                }
            )
        return {"tables": tables}

    return await ctx.run(work)


async def versions(request: Request, ctx: WebContext) -> dict[str, Any]:
    allow_params(request, "at")
    at_text = query_text(request, "at", 64)
    when = parse_when(at_text, "at") if at_text is not None else None

    def work(store: Store) -> dict[str, Any]:
        found = store.versions()
        data = versions_json(found)
        data["floor"] = found.earliest
        data["floor_lsn"] = data["earliest_lsn"]
        if when is not None:
            version = store.version_at_timestamp(when)
            data["at"] = when.astimezone(UTC).isoformat()
            data["version_at"] = version
            data["version_at_lsn"] = format_lsn(version) if version is not None else None
        return data

    return await ctx.run(work)


def _version_args(request: Request) -> tuple[int | None, datetime | None]:
    version_text = query_text(request, "version", 64)
    at_text = query_text(request, "at", 64)
    if version_text is not None and at_text is not None:
        raise UsageError("give at most one of version or at")
    version = parse_version(version_text) if version_text is not None else None
    when = parse_when(at_text, "at") if at_text is not None else None
    return version, when


async def tables_dispatch(request: Request, ctx: WebContext) -> Any:
    """``/api/v1/tables/{table}/rows[/{key}[/history|/blame]]``, split on the raw path."""
    parts = path_segments(request)[4:]
    if len(parts) >= 2 and parts[1] == "rows" and parts[0]:
        table = check_text(parts[0], "table", MAX_TABLE_CHARS)
        rest = parts[2:]
        if not rest:
            return await table_rows(request, ctx, table)
        key = check_text(rest[0], "key", MAX_KEY_CHARS)  # parsed once the table is known
        if len(rest) == 1:
            return await row_at(request, ctx, table, key)
        if len(rest) == 2 and rest[1] == "history":
            return await row_history(request, ctx, table, key)
        if len(rest) == 2 and rest[1] == "blame":
            return await row_blame(request, ctx, table, key)
    raise NotFoundError("no such endpoint: expected /api/v1/tables/{table}/rows[/{key}[/history|/blame]]")


async def table_rows(request: Request, ctx: WebContext, table: str) -> dict[str, Any]:
    allow_params(request, "version", "at", "after", "limit")
    version, when = _version_args(request)
    after_text = query_text(request, "after", MAX_AFTER_CHARS)
    after = parse_key(after_text, "after", MAX_AFTER_CHARS) if after_text is not None else None
    limit = parse_limit(request.query_params.get("limit"))

    def work(store: Store) -> dict[str, Any]:
        info = store.table(table)
        resolved, exact = resolve_version(store, version, when)
        rows: list[dict[str, Any]] = []
        next_after: str | None = None
        if exact and resolved is not None:
            page = store.table_at(info.name, resolved, after_key=after, limit=limit)
            rows = page.rows
            if page.next_after is not None:
                next_after = json.dumps(page.next_after, ensure_ascii=False, separators=(",", ":"))
        return {
            "table": info.name,
            **_version_json(resolved),
            "exact": exact,
            "rows": rows,
            "next": next_after,
        }

    return await ctx.run(work)


async def row_at(request: Request, ctx: WebContext, table: str, key_text: str) -> dict[str, Any]:
    allow_params(request, "version", "at")
    version, when = _version_args(request)

    def work(store: Store) -> dict[str, Any]:
        info = store.table(table)
        stored = store.stored_key(info, parse_key(key_text))
        resolved, exact = resolve_version(store, version, when)
        row = store.row_at(info.name, stored, resolved) if exact and resolved is not None else None
        if row is None and not store.has_history(info.name, stored):
            raise NotFoundError(f"no history for {info.name} {format_key(stored)}")
        return {"table": info.name, "key": stored, **_version_json(resolved), "exact": exact, "row": row}

    return await ctx.run(work)


async def row_history(request: Request, ctx: WebContext, table: str, key_text: str) -> dict[str, Any]:
    allow_params(request, "since", "until", "committed_only")
    since_text, until_text = query_text(request, "since", 64), query_text(request, "until", 64)
    since = parse_when(since_text, "since") if since_text is not None else None
    until = parse_when(until_text, "until", end=True) if until_text is not None else None
    committed_only = parse_bool(request.query_params.get("committed_only"), "committed_only")

    def work(store: Store) -> dict[str, Any]:
        info = store.table(table)
        stored = store.stored_key(info, parse_key(key_text))
        found = store.row_history(
            info.name, stored, since=since, until=until, include_rolled_back=not committed_only
        )
        return {
            "table": info.name,
            "key": stored,
            "mutations": [mutation_record(m, utc=True) for m in found],
        }

    return await ctx.run(work)


async def row_blame(request: Request, ctx: WebContext, table: str, key_text: str) -> dict[str, Any]:
    allow_params(request)

    def work(store: Store) -> dict[str, Any]:
        info = store.table(table)
        stored = store.stored_key(info, parse_key(key_text))
        return {
            "table": info.name,
            "key": stored,
            "columns": [blame_json(e) for e in store.blame(info.name, stored)],
        }

    return await ctx.run(work)


LOG_PARAMS = ("table", "key", "request", "actor", "since", "until", "status", "op", "cursor", "limit")


@dataclass(frozen=True)
class LogFilters:
    """The mutation log's filters, as parsed from a query string (shared with the page)."""

    table: str | None = None
    key: Key | None = None
    request_id: str | None = None
    actor: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    status: str | None = None
    op: str | None = None
    cursor: tuple[int, int] | None = None
    limit: int = DEFAULT_LIMIT

    @classmethod
    def from_request(cls, request: Request, default_limit: int = DEFAULT_LIMIT) -> LogFilters:
        key_text = query_text(request, "key", MAX_KEY_CHARS)
        since_text, until_text = query_text(request, "since", 64), query_text(request, "until", 64)
        status = query_text(request, "status", 32)
        if status is not None and status not in STATUSES:
            raise UsageError(f"invalid status {status!r}: expected one of {', '.join(STATUSES)}")
        op = query_text(request, "op", 32)
        if op is not None and op not in OPS:
            raise UsageError(f"invalid op {op!r}: expected one of {', '.join(OPS)}")
        cursor_text = query_text(request, "cursor", MAX_CURSOR_CHARS)
        filters = cls(
            table=query_text(request, "table", MAX_TABLE_CHARS),
            key=parse_key(key_text) if key_text is not None else None,
            request_id=query_text(request, "request"),
            actor=query_text(request, "actor"),
            since=parse_when(since_text, "since") if since_text is not None else None,
            until=parse_when(until_text, "until", end=True) if until_text is not None else None,
            status=status,
            op=op,
            cursor=parse_cursor(cursor_text) if cursor_text is not None else None,
            limit=parse_limit(request.query_params.get("limit"), default_limit),
        )
        if filters.key is not None and filters.table is None:
            raise UsageError("a key filter needs a table")
        return filters

    def page(self, store: Store) -> tuple[list[Any], tuple[int, int] | None]:
        request_id = store.resolve_request(self.request_id) if self.request_id is not None else None
        found = store.mutation_log(
            table=self.table,
            key=self.key,
            request_id=request_id,
            actor=self.actor,
            since=self.since,
            until=self.until,
            status=self.status,
            op=self.op,
            before=self.cursor,
            limit=self.limit,
        )
        return found.mutations, found.next_cursor


async def mutations(request: Request, ctx: WebContext) -> dict[str, Any]:
    allow_params(request, *LOG_PARAMS)
    filters = LogFilters.from_request(request)

    def work(store: Store) -> dict[str, Any]:
        found, next_cursor = filters.page(store)
        return {
            "mutations": [mutation_record(m, utc=True) for m in found],
            "next": format_cursor(next_cursor),
        }

    return await ctx.run(work)


async def request_record(request: Request, ctx: WebContext) -> dict[str, Any]:
    parts = path_segments(request)[4:]
    if len(parts) != 1 or not parts[0]:
        raise NotFoundError("no such endpoint: expected /api/v1/requests/{request_id}")
    allow_params(request, "limit", "cursor")
    request_id = check_text(parts[0], "request id")
    limit = parse_limit(request.query_params.get("limit"), MAX_LIMIT)
    cursor_text = query_text(request, "cursor", MAX_CURSOR_CHARS)
    cursor = parse_cursor(cursor_text) if cursor_text is not None else None

    def work(store: Store) -> dict[str, Any]:
        record = store.request(request_id, mutation_limit=0 if cursor is not None else limit)
        found = record.mutations
        if cursor is not None:
            found = store.request_mutations(record.request_id, limit=limit, after=cursor)
        data = request_json(record, found)
        data["next"] = format_cursor(found[-1].cursor) if len(found) == limit else None
        return data

    return await ctx.run(work)


# ============================================================================ health, metrics, schema


def probe_result(value: Any) -> tuple[bool, dict[str, Any]]:
    """A probe's answer as ``(ok, detail)``: it may return a bool, ``(ok, detail)`` (the daemon's
    ``Daemon.health``/``Daemon.ready``) or a mapping whose ``ok`` says it."""
    if isinstance(value, tuple) and len(value) == 2:
        return bool(value[0]), dict(value[1] or {})
    if isinstance(value, Mapping):
        return bool(value.get("ok")), dict(value)
    return bool(value), {}


async def _probe(probe: Probe, route: str) -> Response:
    try:
        ok, detail = probe_result(await run_in_threadpool(probe))
    except Exception as exc:  # noqa: BLE001 - a broken probe means not OK, never a 500
        log_unexpected(exc, route)
        ok, detail = False, {}
    body = {**detail, "status": "ok" if ok else "unavailable", "ok": ok}
    return JsonResponse(body, status_code=200 if ok else 503)


async def healthz(request: Request) -> Response:
    """200 while the main loop's heartbeat is recent (``health()``), else 503."""
    ctx = context_of(request)
    if ctx.health is not None:
        return await _probe(ctx.health, "healthz")
    return await _store_probe(ctx, "healthz")


async def readyz(request: Request) -> Response:
    """200 when ready (``ready()``, else the history store answers), else 503."""
    ctx = context_of(request)
    if ctx.ready is not None:
        return await _probe(ctx.ready, "readyz")
    return await _store_probe(ctx, "readyz")


async def _store_probe(ctx: WebContext, route: str) -> Response:
    try:
        await ctx.run(lambda store: store.current_version())
    except Exception as exc:  # noqa: BLE001 - unreachable, not set up, anything: not OK
        if isinstance(exc, CdcError):
            log.warning("history_store_unavailable", route=route, error=exc.message)
        else:
            log_unexpected(exc, route)
        return JsonResponse({"status": "unavailable", "ok": False, "store": "unreachable"}, status_code=503)
    return JsonResponse({"status": "ok", "ok": True, "store": "reachable"})


async def metrics(request: Request) -> Response:
    registry = context_of(request).registry
    body = await run_in_threadpool(generate_latest, registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


async def openapi(request: Request) -> Response:
    ctx = context_of(request)
    document = ctx.extra.get("openapi")
    if document is None:
        document = ctx.extra["openapi"] = openapi_document(secured=ctx.token is not None)
    return JsonResponse(document)


async def http_exception(request: Request, exc: Exception) -> Response:
    """Unknown paths and methods: JSON under /api/, a page elsewhere."""
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    if request.url.path.startswith("/api/") or "text/html" not in request.headers.get("accept", ""):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JsonResponse(error_body(code, str(exc.detail)), status_code=exc.status_code, headers=headers)
    ctx = context_of(request)
    page = ctx.extra.get("error_page")
    if page is None:
        return Response(str(exc.detail), status_code=exc.status_code, headers=headers)
    response: Response = page(request, exc.status_code, str(exc.detail))
    response.headers.update(headers)
    return response


# ============================================================================ OpenAPI


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    kind = schema.get("type")
    if isinstance(kind, str):
        return {**schema, "type": [kind, "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


_STRING = {"type": "string"}
_INT = {"type": "integer"}
_TIME = {"type": "string", "format": "date-time"}
_OBJECT = {"type": "object"}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {
                        "type": "string",
                        "enum": [
                            "bad_request",
                            "not_found",
                            "unauthorized",
                            "store_unavailable",
                            "internal",
                            "method_not_allowed",
                            "version_ahead",
                            "http_error",
                        ],
                    },
                    "message": _STRING,
                    "hint": _STRING,
                    "id": _STRING,
                },
            }
        },
    },
    "Row": {
        "type": "object",
        "description": "A row image: column → value (the server's text output; "
        "integers and booleans as JSON). Absent columns did not exist at that version.",
    },
    "Mutation": {
        "type": "object",
        "required": list(MUTATION_CSV_FIELDS),  # the fields of mutation_record, as in the CSV export
        "properties": {
            "version": {**_nullable(_INT), "description": "End LSN of the transaction; null: rolled back"},
            "version_lsn": _nullable(_STRING),
            "lsn": _INT,
            "lsn_text": _STRING,
            "xid": _INT,
            "committed_at": _TIME,
            "table": _STRING,
            "key": _nullable(_OBJECT),
            "op": {"type": "string", "enum": list(OPS)},
            "before": _nullable(_OBJECT),
            "after": _nullable(_OBJECT),
            "changed": {"type": "array", "items": _STRING},
            "request_id": _nullable(_STRING),
            "context": _nullable(_OBJECT),
            "status": {"type": "string", "enum": list(STATUSES)},
        },
    },
    "Table": {
        "type": "object",
        "required": ["name", "key_columns", "columns", "keyless"],
        "properties": {
            "name": _STRING,
            "key_columns": {"type": "array", "items": _STRING},
            "columns": {"type": "array", "items": _STRING},
            "keyless": {"type": "boolean"},
        },
    },
    "TableList": {
        "type": "object",
        "required": ["tables"],
        "properties": {"tables": {"type": "array", "items": _ref("Table")}},
    },
    "Versions": {
        "type": "object",
        "required": [
            "earliest",
            "earliest_lsn",
            "earliest_at",
            "current",
            "current_lsn",
            "current_at",
            "floor",
            "floor_lsn",
        ],
        "properties": {
            "earliest": _nullable(_INT),
            "earliest_lsn": _nullable(_STRING),
            "earliest_at": _nullable(_TIME),
            "current": _nullable(_INT),
            "current_lsn": _nullable(_STRING),
            "current_at": _nullable(_TIME),
            "floor": _nullable(_INT),
            "floor_lsn": _nullable(_STRING),
            "at": _TIME,
            "version_at": _nullable(_INT),
            "version_at_lsn": _nullable(_STRING),
        },
    },
    "RowAt": {
        "type": "object",
        "required": ["table", "key", "version", "version_lsn", "exact", "row"],
        "properties": {
            "table": _STRING,
            "key": _OBJECT,
            "version": _nullable(_INT),
            "version_lsn": _nullable(_STRING),
            "exact": {"type": "boolean", "description": "false below the history floor: nothing is read"},
            "row": _nullable(_OBJECT),
        },
    },
    "TablePage": {
        "type": "object",
        "required": ["table", "version", "version_lsn", "exact", "rows", "next"],
        "properties": {
            "table": _STRING,
            "version": _nullable(_INT),
            "version_lsn": _nullable(_STRING),
            "exact": {"type": "boolean"},
            "rows": {"type": "array", "items": _ref("Row")},
            "next": {**_nullable(_STRING), "description": "pass as `after` for the next page"},
        },
    },
    "RowHistory": {
        "type": "object",
        "required": ["table", "key", "mutations"],
        "properties": {
            "table": _STRING,
            "key": _OBJECT,
            "mutations": {"type": "array", "items": _ref("Mutation")},
        },
    },
    "BlameEntry": {
        "type": "object",
        "required": [
            "column",
            "value",
            "request_id",
            "committed_at",
            "version",
            "op",
            "rolled_back",
            "rolled_back_request_id",
            "rolled_back_at",
        ],
        "properties": {
            "column": _STRING,
            "value": {},
            "request_id": _nullable(_STRING),
            "committed_at": _nullable(_TIME),
            "version": _nullable(_INT),
            "op": _nullable(_STRING),
            "rolled_back": {"type": "boolean"},
            "rolled_back_request_id": _nullable(_STRING),
            "rolled_back_at": _nullable(_TIME),
        },
    },
    "Blame": {
        "type": "object",
        "required": ["table", "key", "columns"],
        "properties": {
            "table": _STRING,
            "key": _OBJECT,
            "columns": {"type": "array", "items": _ref("BlameEntry")},
        },
    },
    "MutationPage": {
        "type": "object",
        "required": ["mutations", "next"],
        "properties": {
            "mutations": {"type": "array", "items": _ref("Mutation")},
            "next": {**_nullable(_STRING), "description": "pass as `cursor` for the next (older) page"},
        },
    },
    "Transaction": {
        "type": "object",
        "required": [
            "position",
            "position_lsn",
            "xid",
            "version",
            "commit_lsn",
            "status",
            "committed_at",
            "origin",
            "mutation_count",
        ],
        "properties": {
            "position": _INT,
            "position_lsn": _STRING,
            "xid": _INT,
            "version": _nullable(_INT),
            "commit_lsn": _nullable(_INT),
            "status": {"type": "string", "enum": list(STATUSES)},
            "committed_at": _TIME,
            "origin": _nullable(_STRING),
            "mutation_count": _INT,
        },
    },
    "Request": {
        "type": "object",
        "required": [
            "request_id",
            "actor",
            "outcome",
            "context",
            "first_seen_at",
            "last_seen_at",
            "committed_count",
            "rolled_back_count",
            "error",
            "transactions",
            "mutation_count",
            "mutations",
            "next",
        ],
        "properties": {
            "request_id": _STRING,
            "actor": _nullable(_STRING),
            "outcome": {
                "type": "string",
                "enum": ["committed", "rolled_back", "partly_rolled_back", "unknown"],
            },
            "context": _nullable(_OBJECT),
            "first_seen_at": _nullable(_TIME),
            "last_seen_at": _nullable(_TIME),
            "committed_count": _INT,
            "rolled_back_count": _INT,
            "error": _nullable(
                {
                    "type": "object",
                    "required": [
                        "type",
                        "message",
                        "location",
                        "at",
                        "attributed",
                        "attribution",
                        "reported_by",
                    ],
                    "properties": {
                        "type": _nullable(_STRING),
                        "message": _nullable(_STRING),
                        "location": _nullable(_STRING),
                        "at": _nullable(_TIME),
                        "attributed": {
                            "type": "boolean",
                            "description": "false: reported by a session that never wrote this request's "
                            "context (or before messages were signed); not the request's root cause",
                        },
                        "attribution": {
                            "type": "string",
                            "enum": ["own_session", "no_captured_session", "other_session", "unverified"],
                        },
                        "reported_by": {
                            "type": "object",
                            "description": "the reporting session, as the source stamped it",
                            "required": ["db_user", "backend_pid", "client_addr", "xid", "proven"],
                            "properties": {
                                "db_user": _nullable(_STRING),
                                "backend_pid": _nullable(_INT),
                                "client_addr": _nullable(_STRING),
                                "xid": _nullable(_INT),
                                "proven": {"type": "boolean"},
                            },
                        },
                    },
                }
            ),
            "transactions": {"type": "array", "items": _ref("Transaction")},
            "mutation_count": _INT,
            "mutations": {"type": "array", "items": _ref("Mutation")},
            "next": {
                **_nullable(_STRING),
                "description": "pass as `cursor` for the request's next mutations",
            },
        },
    },
    "Health": {
        "type": "object",
        "required": ["status", "ok"],
        "properties": {"status": _STRING, "ok": {"type": "boolean"}},
    },
}


def _param(
    name: str, where: str, schema: dict[str, Any], description: str, example: Any = None
) -> dict[str, Any]:
    param: dict[str, Any] = {
        "name": name,
        "in": where,
        "required": where == "path",
        "schema": schema,
        "description": description,
    }
    if example is not None:
        param["example"] = example
    return param


def _text(
    max_length: int = MAX_TEXT_CHARS, min_length: int = 0, pattern: str | None = None
) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "minLength": min_length, "maxLength": max_length}
    if pattern is not None:
        schema["pattern"] = pattern
    return schema


VERSION_PATTERN = "^(?:[0-9]{1,19}|[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8})?$"
CURSOR_PATTERN = "^(?:[0-9]{1,18}-[0-9]{1,9})?$"
_TIME_TEXT = (
    "ISO 8601 (`2026-03-10`, `2026-03-10T14:00:00Z`; without an offset: UTC), `now`, "
    "or a duration ago (`30m`, `24h`, `7d`)"
)

_P_TABLE = _param(
    "table",
    "path",
    _text(MAX_TABLE_CHARS, 1),
    '`name` (schema public) or `schema.name`; double-quote other identifiers (`"My Table"`, URL-encoded)',
    "users",
)
_P_KEY = _param(
    "key",
    "path",
    _text(MAX_KEY_CHARS, 1),
    'The row\'s key: a scalar (`42`, `abc`) or a JSON object for a composite key (`{"a":1,"b":"x"}`), '
    "URL-encoded",
    "42",
)
_P_VERSION = _param(
    "version",
    "query",
    _text(64, 0, VERSION_PATTERN),
    "A version: an integer LSN or `X/Y` (default: the current version)",
    "1/300",
)
_P_AT = _param("at", "query", _text(64), f"Read at this time instead: {_TIME_TEXT}")
_P_SINCE = _param("since", "query", _text(64), f"Committed at or after: {_TIME_TEXT}")
_P_UNTIL = _param("until", "query", _text(64), f"Committed before (a date alone: its end): {_TIME_TEXT}")
_P_LIMIT = _param(
    "limit", "query", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}, "Page size (default 100)"
)
_P_CURSOR = _param(
    "cursor", "query", _text(MAX_CURSOR_CHARS, 0, CURSOR_PATTERN), "The `next` value of the previous page"
)

_ERROR_TEXTS = {
    400: "Bad argument",
    401: "Missing or invalid token",
    404: "Unknown table, row, request or path",
    409: "Version ahead of the history store (capture has not caught up yet: retry)",
    503: "History store unreachable or not set up",
}


def _responses(schema: str, description: str, *statuses: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "200": {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}
    }
    for status in statuses:
        out[str(status)] = {
            "description": _ERROR_TEXTS[status],
            "content": {"application/json": {"schema": _ref("Error")}},
        }
    return out


def _get(
    summary: str, params: list[Any], responses: dict[str, Any], *, open_: bool = False
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "operationId": re.sub(r"[^a-z0-9]+", "_", summary.lower()).strip("_"),
        "parameters": params,
        "responses": responses,
    }
    if open_:
        operation["security"] = []
    return {"get": operation}


def _health(ok: str, not_ok: str) -> dict[str, Any]:
    content = {"application/json": {"schema": _ref("Health")}}
    return {
        "200": {"description": ok, "content": content},
        "503": {"description": not_ok, "content": content},
    }


def openapi_document(*, secured: bool) -> dict[str, Any]:
    """The OpenAPI 3.1 description of the API (every endpoint, parameter and response)."""
    auth = (401,) if secured else ()  # optional query parameters: empty means absent (HTML forms)
    plain = (400, *auth, 503)
    errors = (400, *auth, 404, 503)
    versioned = (400, *auth, 404, 409, 503)
    paths: dict[str, Any] = {
        "/api/v1/tables": _get(
            "List captured tables", [], _responses("TableList", "Captured tables", *plain)
        ),
        "/api/v1/versions": _get(
            "Versions",
            [_param("at", "query", _text(64), f"Also resolve the version at: {_TIME_TEXT}")],
            _responses("Versions", "The readable range of versions", *plain),
        ),
        "/api/v1/tables/{table}/rows": _get(
            "Table at a version",
            [
                _P_TABLE,
                _P_VERSION,
                _P_AT,
                _param("after", "query", _text(MAX_AFTER_CHARS), "The `next` value of the previous page"),
                _P_LIMIT,
            ],
            _responses("TablePage", "One page of the table's rows in key order", *versioned),
        ),
        "/api/v1/tables/{table}/rows/{key}": _get(
            "Row at a version",
            [_P_TABLE, _P_KEY, _P_VERSION, _P_AT],
            _responses("RowAt", "The row (null when absent at that version)", *versioned),
        ),
        "/api/v1/tables/{table}/rows/{key}/history": _get(
            "Row history",
            [
                _P_TABLE,
                _P_KEY,
                _P_SINCE,
                _P_UNTIL,
                _param("committed_only", "query", {"type": "boolean"}, "Leave out rolled-back attempts"),
            ],
            _responses("RowHistory", "The row's mutations, oldest first", *errors),
        ),
        "/api/v1/tables/{table}/rows/{key}/blame": _get(
            "Row blame",
            [_P_TABLE, _P_KEY],
            _responses("Blame", "For each column: the last committed write to it", *errors),
        ),
        "/api/v1/mutations": _get(
            "Mutation log",
            [
                _param(
                    "table",
                    "query",
                    _text(MAX_TABLE_CHARS),
                    "Only this table",
                    "users",
                ),
                _param("key", "query", _text(MAX_KEY_CHARS), "Only this row (needs `table`)", "42"),
                _param("request", "query", _text(), "Only this request (id or unique prefix)"),
                _param("actor", "query", _text(), "Only mutations whose context's actor is this"),
                _P_SINCE,
                _P_UNTIL,
                _param("status", "query", {"type": "string", "enum": ["", *STATUSES]}, "Only this outcome"),
                _param("op", "query", {"type": "string", "enum": ["", *OPS]}, "Only this operation"),
                _P_CURSOR,
                _P_LIMIT,
            ],
            _responses("MutationPage", "Mutations, newest first", *errors),
        ),
        "/api/v1/requests/{request_id}": _get(
            "Request",
            [
                _param(
                    "request_id",
                    "path",
                    _text(MAX_TEXT_CHARS, 1),
                    "A request id or a unique prefix of one (an ambiguous prefix is a 400)",
                    "550e8400",
                ),
                _param(
                    "limit",
                    "query",
                    {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT},
                    "Mutations to include (default 1000)",
                ),
                _P_CURSOR,
            ],
            _responses("Request", "The request's context, outcome, error and data changes", *errors),
        ),
        "/healthz": _get("Liveness", [], _health("Healthy", "Unhealthy"), open_=True),
        "/readyz": _get("Readiness", [], _health("Ready", "Not ready"), open_=True),
        "/metrics": _get(
            "Prometheus metrics",
            [],
            {
                "200": {
                    "description": "Metrics in the Prometheus text format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
            open_=True,
        ),
    }
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "cdc history API",
            "version": "1",
            "description": (
                "Row history of a PostgreSQL database captured by cdc: what changed a row, when, and "
                "which request did it. Times are UTC; values are the server's text output (integers "
                "and booleans as JSON). /healthz, /readyz and /metrics need no token."
            ),
        },
        "paths": paths,
        "components": {"schemas": _SCHEMAS},
    }
    if secured:
        document["components"]["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearerAuth": []}]
    return document


# ============================================================================ the app


def _http_metrics(registry: CollectorRegistry) -> tuple[Counter | None, Histogram | None]:
    try:
        total = Counter(
            "cdc_http_requests_total",
            "HTTP requests answered by cdc serve",
            ["route", "method", "status"],
            registry=registry,
        )
        seconds = Histogram(
            "cdc_http_request_duration_seconds",
            "Time to answer an HTTP request",
            ["route"],
            registry=registry,
        )
    except ValueError:  # already registered by another app on this registry
        return None, None
    return total, seconds


def create_app(
    store_dsn: str,
    *,
    schema: str = DEFAULT_SCHEMA,
    token: str | None = None,
    open_access: bool = False,
    registry: CollectorRegistry | None = None,
    health: Probe | None = None,
    ready: Probe | None = None,
    pool_size: int = POOL_SIZE,
) -> Starlette:
    """The ASGI app: JSON API, pages, ``/openapi.json``, ``/metrics``, ``/healthz``, ``/readyz``.

    ``token``: required on every API and page request (Bearer header; pages also the ``cdc_token``
    cookie set by ``/login``). Without one, ``open_access`` must be true, else :class:`ConfigError`.
    ``registry``: the Prometheus registry ``/metrics`` exposes (the daemon's, or a new one with
    process metrics). ``health``: whether the main loop's heartbeat is recent (``/healthz``);
    ``ready``: whether the daemon is ready (``/readyz``). Each returns ``(ok, detail)`` like
    ``Daemon.health``/``Daemon.ready``, a mapping with ``ok``, or a bool; the detail is added to the
    JSON answer. Without them both answer whether the history store answers.
    """
    problems: list[str] = []
    if not store_dsn or not store_dsn.strip():
        problems.append("store.dsn: not set; pass --store, set CDC_STORE_DSN or store.dsn in the config file")
    if token is not None and not token:
        token = None
    if token is not None and (token != token.strip() or not all(" " < c < "\x7f" for c in token)):
        problems.append("server.token: must be printable ASCII without spaces (it is sent in an HTTP header)")
    if token is None and not open_access:
        problems.append(
            "server.token: not set; set CDC_SERVER__TOKEN or server.token, or allow unauthenticated "
            "access explicitly with server.open: true (cdc serve --open)"
        )
    if not problems:
        try:
            check_dsn(store_dsn)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)

    if registry is None:
        registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
    requests_total, request_seconds = _http_metrics(registry)
    ctx = WebContext(
        pool=StorePool(store_dsn, schema, size=pool_size),
        token=token,
        registry=registry,
        health=health,
        ready=ready,
        requests_total=requests_total,
        request_seconds=request_seconds,
    )

    from cdc.web import pages

    routes: list[BaseRoute] = [
        Route("/api/v1/tables", api("api_tables", list_tables), methods=["GET"]),
        Route("/api/v1/versions", api("api_versions", versions), methods=["GET"]),
        Route("/api/v1/tables/{rest:path}", api("api_table", tables_dispatch), methods=["GET"]),
        Route("/api/v1/mutations", api("api_mutations", mutations), methods=["GET"]),
        Route("/api/v1/requests/{rest:path}", api("api_request", request_record), methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *pages.routes(ctx),
        Mount("/static", StaticFiles(directory=WEB_DIR / "static"), name="static"),
    ]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> Any:
        yield
        ctx.pool.close()

    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: http_exception},
        lifespan=lifespan,
    )
    app.state.cdc = ctx
    app.add_middleware(AccessMiddleware, ctx=ctx)
    return app
