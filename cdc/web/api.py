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
``GET /api/v1/requests/{request_id}/revert``                the SQL ``cdc revert`` would run (preview)
``GET /api/v1/tables/{table}/rows/{key}/restore?version|at`` the SQL ``cdc restore`` would run (preview)
``GET /api/v1/tables/{table}/search?column&value&...``      mutations by a column's value (bounded scan)
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

import json
from collections.abc import Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

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
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from cdc.errors import CdcError, ConfigError, NotFoundError, UsageError
from cdc.lsn import format_lsn
from cdc.query import (
    DEFAULT_SCHEMA,
    Store,
    format_key,
)
from cdc.render import mutation_record
from cdc.web.args import (
    VersionAheadError,
    allow_params,
    check_text,
    format_cursor,
    parse_bool,
    parse_cursor,
    parse_key,
    parse_limit,
    parse_version,
    parse_when,
    path_segments,
    query_text,
    resolve_version,
)
from cdc.web.base import (
    POOL_SIZE,
    WEB_DIR,
    AccessMiddleware,
    JsonResponse,
    Probe,
    StorePool,
    WebContext,
    api_error_response,
    blame_json,
    check_dsn,
    context_of,
    error_body,
    error_status,
    log_unexpected,
    request_json,
    versions_json,
)
from cdc.web.limits import (
    MAX_AFTER_CHARS,
    MAX_CURSOR_CHARS,
    MAX_KEY_CHARS,
    MAX_LIMIT,
    MAX_TABLE_CHARS,
)
from cdc.web.log_filters import LogFilters
from cdc.web.openapi import openapi_document
from cdc.web.pages import routes as page_routes

__all__ = [
    "MAX_KEY_CHARS",
    "MAX_LIMIT",
    "VersionAheadError",
    "WebContext",
    "allow_params",
    "check_text",
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
    "query_text",
    "resolve_version",
]

log = structlog.get_logger("cdc.web")


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
        tables = [
            {
                "name": info.name,
                "key_columns": list(info.key_columns),
                "columns": list(info.columns),
                "keyless": info.keyless,
                "dropped": info.dropped,
                "former_names": [name for _, name in info.names[:-1]],
            }
            for info in store.tables()
        ]
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
    if len(parts) == 2 and parts[1] == "search" and parts[0]:
        from cdc.web.search import search_api  # search by value (cdc/web/search.py)

        return await search_api(request, ctx, check_text(parts[0], "table", MAX_TABLE_CHARS))
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
        if len(rest) == 2 and rest[1] == "restore":
            from cdc.web.previews import restore_api  # the restore preview (cdc/web/previews.py)

            return await restore_api(request, ctx, table, key)
    raise NotFoundError(
        "no such endpoint: expected /api/v1/tables/{table}/rows[/{key}[/history|/blame|/restore]] or "
        "/api/v1/tables/{table}/search"
    )


async def table_rows(request: Request, ctx: WebContext, table: str) -> dict[str, Any]:
    allow_params(request, "version", "at", "after", "limit")
    version, when = _version_args(request)
    after_text = query_text(request, "after", MAX_AFTER_CHARS)
    after = parse_key(after_text, "after", MAX_AFTER_CHARS) if after_text is not None else None
    limit = parse_limit(request.query_params.get("limit"))

    def work(store: Store) -> dict[str, Any]:
        store.table(table)  # an unknown table first
        resolved, exact = resolve_version(store, version, when)
        info = store.table(table, resolved)  # the table that had this name then
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
        store.table(table)  # an unknown table first
        resolved, exact = resolve_version(store, version, when)
        info = store.table(table, resolved)  # the table that had this name then
        stored = store.stored_key(info, parse_key(key_text))
        row = store.row_at(info, stored, resolved) if exact and resolved is not None else None
        if row is None and not store.has_history(info, stored):
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
    if len(parts) == 2 and parts[0] and parts[1] == "revert":
        from cdc.web.previews import revert_api  # the revert preview (cdc/web/previews.py)

        return await revert_api(request, ctx, check_text(parts[0], "request id"))
    if len(parts) != 1 or not parts[0]:
        raise NotFoundError("no such endpoint: expected /api/v1/requests/{request_id}[/revert]")
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
    source_dsn: str | None = None,
    policies: Mapping[str, Mapping[str, str]] | None = None,
    hash_key: bytes | None = None,
) -> Starlette:
    """The ASGI app: JSON API, pages, ``/openapi.json``, ``/metrics``, ``/healthz``, ``/readyz``.

    ``token``: required on every API and page request (Bearer header; pages also the ``cdc_token``
    cookie set by ``/login``). Without one, ``open_access`` must be true, else :class:`ConfigError`.
    ``registry``: the Prometheus registry ``/metrics`` exposes (the daemon's, or a new one with
    process metrics). ``health``: whether the main loop's heartbeat is recent (``/healthz``);
    ``ready``: whether the daemon is ready (``/readyz``). Each returns ``(ok, detail)`` like
    ``Daemon.health``/``Daemon.ready``, a mapping with ``ok``, or a bool; the detail is added to the
    JSON answer. Without them both answer whether the history store answers.
    ``source_dsn``: the source, read (never written) for the revert and restore previews; without it
    they say that it is missing. ``policies``: the ``columns`` config section and ``hash_key``
    ``policies.hash_key`` (a hashed column is searched by a value's digest only with the key).
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
        source_dsn=source_dsn or None,
        policies={table: dict(columns) for table, columns in (policies or {}).items()},
        hash_key=hash_key,
    )

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
        *page_routes(ctx),
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
