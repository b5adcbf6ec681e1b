"""The server-rendered pages of ``cdc serve`` (Jinja2, autoescaped, no JavaScript).

* ``/``: the mutation log, newest first, with filters (table, row key, request, actor, time
  range, status, op) as a GET form and an "older" link carrying the cursor.
* ``/tables/{table}/rows/{key}``: a row's timeline, each mutation with its before/after diff
  (changed columns highlighted, rolled-back attempts marked), its blame, and the row at a version.
* ``/requests/{id}``: a request's context, outcome, reported error and location, and its changes,
  and the revert preview: the SQL ``cdc revert`` would run and its conflicts (cdc/web/preview_pages.py).
* ``/tables/{table}/rows/{key}/restore?version=V``: the restore preview of a row (linked from each
  version of its timeline): the SQL ``cdc restore`` would run and the diff now vs then.
* ``/search``: mutations by a column's value (a bounded scan, cdc/web/search.py).
* ``/docs/api``: the API reference, rendered from the OpenAPI document (cdc/web/reference.py).
* ``/login`` (GET form, ``?token=``, or POST form) sets the ``cdc_token`` session cookie;
  ``/logout`` clears it.

Times are UTC ISO 8601. Keys in URLs are as in the API: a scalar or URL-encoded JSON.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote

import structlog
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from cdc.errors import NotFoundError, UsageError
from cdc.lsn import format_lsn
from cdc.query import BlameEntry, Mutation, RequestRecord, Store
from cdc.render import (
    POSSIBLY_INCOMPLETE,
    unattributed_text,
)
from cdc.web.args import (
    check_text,
    format_cursor,
    parse_key,
    parse_version,
    parse_when,
    path_segments,
    query_text,
    resolve_version,
)
from cdc.web.base import (
    COOKIE_NAME,
    MAX_LOGIN_BODY,
    WebContext,
    context_of,
)
from cdc.web.log_filters import LogFilters
from cdc.web.page_base import (
    LinkFacts,
    MutationView,
    Urls,
    Value,
    ambiguous_matches,
    context_items,
    error_page,
    iso,
    key_label,
    link_facts,
    mutation_view,
    page_error,
    render,
    url_key,
    url_table,
    value_of,
)
from cdc.web.preview_pages import restore_page, revert_section
from cdc.web.reference import reference_page
from cdc.web.schema_page import schema_page
from cdc.web.search import search_page

__all__ = ["routes"]

log = structlog.get_logger("cdc.web")

LOG_PAGE_SIZE = 50
ROW_HISTORY_SHOWN = 1000
REQUEST_CHANGES_SHOWN = 500
_FILTERS = ("table", "key", "request", "actor", "since", "until", "status", "op", "limit")


def login_page(request: Request, error: str | None, status: int) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    next_url = safe_next(request.query_params.get("next") or target)
    return render(request, "login.html", status, title="Log in", error=error, next_url=next_url)


def safe_next(target: str | None) -> str:
    """Only a local path (no scheme, no host, no ``//``) to go back to after logging in."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")) or len(target) > 4096:
        return "/"
    if any(c in target for c in "\r\n\x00"):
        return "/"
    if target.startswith(("/login", "/logout")):
        return "/"
    return target


# ============================================================================ the log page


async def log_page(request: Request) -> Response:
    ctx = context_of(request)
    values = {name: (request.query_params.get(name) or "")[:200] for name in _FILTERS}
    tables: list[str] = []
    found: list[MutationView] = []
    older: str | None = None
    status, error = 200, None
    matches: list[dict[str, str]] = []
    try:
        filters = LogFilters.from_request(request, default_limit=LOG_PAGE_SIZE)

        def work(
            store: Store,
        ) -> tuple[list[str], list[Mutation], tuple[int, int] | None, dict[int, LinkFacts], dict[str, str]]:
            names = store.known_tables()
            page, cursor = filters.page(store)
            prefixes = store.request_prefixes(m.request_id for m in page)
            return names, page, cursor, link_facts(store, page), prefixes

        tables, page, cursor, facts, prefixes = await ctx.run(work)
        urls = Urls(str(request.scope.get("root_path") or "").rstrip("/"), tables=facts, prefixes=prefixes)
        found = [mutation_view(m, urls) for m in page]
        if cursor is not None:
            older = urls.log(**{k: v for k, v in values.items() if v}, cursor=format_cursor(cursor))
    except Exception as exc:  # noqa: BLE001 - the page's error boundary: the form and the error
        status, error = page_error(request, exc, "page_log")
        urls = Urls(str(request.scope.get("root_path") or "").rstrip("/"))
        matches = ambiguous_matches(exc, urls.base)
    return render(
        request,
        "log.html",
        status,
        title="Mutations",
        urls=urls,
        values=values,
        tables=[url_table(t) for t in tables],
        mutations=found,
        older=older,
        newest=urls.log(**{k: v for k, v in values.items() if v}),
        paged="cursor" in request.query_params,
        error=error,
        matches=matches,
        filtered=any(values[k] for k in _FILTERS if k != "limit"),
    )


# ============================================================================ the row page


@dataclass
class BlameView:
    column: str
    value: Value
    request_id: str | None
    request_short: str
    request_href: str | None
    time: str
    op: str
    rolled_back: bool
    rolled_back_short: str
    rolled_back_href: str | None
    rolled_back_time: str


def blame_view(e: BlameEntry, urls: Urls) -> BlameView:
    return BlameView(
        column=e.column,
        value=value_of({e.column: e.value}, e.column),
        request_id=e.request_id,
        request_short=urls.request_label(e.request_id, "req:-"),
        request_href=urls.request(e.request_id),
        time=iso(e.committed_at) if e.committed_at else "(before history)",
        op=e.op or "",
        rolled_back=e.rolled_back,
        rolled_back_short=urls.request_label(e.rolled_back_request_id, "req:-"),
        rolled_back_href=urls.request(e.rolled_back_request_id),
        rolled_back_time=iso(e.rolled_back_at) if e.rolled_back_at else "",
    )


@dataclass
class RowPage:
    table: str
    key: dict[str, Any]
    keyless: bool
    mutations: list[Mutation]
    total: int
    blame: list[BlameEntry] | None
    blame_note: str | None
    at_version: int | None = None
    at_exact: bool = False
    at_row: dict[str, Any] | None = None
    at_asked: bool = False
    prefixes: dict[str, str] = field(default_factory=dict)
    current_name: str = ""  # the table's name now (undo writes to it)


async def row_page(request: Request) -> Response:
    ctx = context_of(request)
    base = str(request.scope.get("root_path") or "").rstrip("/")
    try:
        parts = path_segments(request)[2:]
        if len(parts) == 2 and parts[1] == "schema" and parts[0]:
            return await schema_page(request, check_text(parts[0], "table"))
        if len(parts) == 4 and parts[1] == "rows" and parts[3] == "restore" and parts[0] and parts[2]:
            return await restore_page(request, check_text(parts[0], "table"), check_text(parts[2], "key"))
        if len(parts) != 3 or parts[1] != "rows" or not parts[0]:
            raise NotFoundError("no such page: expected /tables/{table}/rows/{key} or /tables/{table}/schema")
        table_text = check_text(parts[0], "table")
        key = parse_key(parts[2])
        version_text = query_text(request, "version", 64)
        at_text = query_text(request, "at", 64)
        if version_text is not None and at_text is not None:
            raise UsageError("give at most one of version or at")
        version = parse_version(version_text) if version_text is not None else None
        when = parse_when(at_text, "at") if at_text is not None else None

        def work(store: Store) -> RowPage:
            store.table(table_text)  # an unknown table first
            at_version: int | None = None
            at_exact = False
            if version is not None or when is not None:
                at_version, at_exact = resolve_version(store, version, when)
            info = store.table(table_text, at_version)  # the table of that name then (else now)
            stored = store.stored_key(info, key)
            history = store.row_history(info, stored)
            blame: list[BlameEntry] | None = None
            note: str | None = None
            try:
                blame = store.blame(info, stored)
            except NotFoundError as exc:
                note = f"No blame: {exc.message}."
            page = RowPage(
                table=info.name,
                key=stored,
                keyless=info.keyless,
                mutations=history[-ROW_HISTORY_SHOWN:],
                total=len(history),
                blame=blame,
                blame_note=note,
                current_name=info.current_name,
            )
            page.prefixes = store.request_prefixes(
                [m.request_id for m in page.mutations]
                + [i for e in blame or () for i in (e.request_id, e.rolled_back_request_id)]
            )
            if version is not None or when is not None:
                page.at_asked = True
                page.at_version, page.at_exact = at_version, at_exact
                if page.at_exact and page.at_version is not None:
                    page.at_row = store.row_at(info, stored, page.at_version)
            return page

        result = await ctx.run(work)
    except Exception as exc:  # noqa: BLE001 - the page's error boundary
        status, message = page_error(request, exc, "page_row")
        return error_page(request, status, message)
    urls = Urls(base, {result.table: result.keyless}, prefixes=result.prefixes)
    views = [mutation_view(m, urls, with_diff=True) for m in result.mutations]
    restore_to = urls.row(result.current_name, result.key, keyless=result.keyless)
    for view in views:  # each committed version of the row: its restore preview
        if restore_to is not None and view.m.version is not None and view.m.op != "TRUNCATE":
            view.restore_href = f"{restore_to}/restore?version={format_lsn(view.m.version)}"
    blame = [blame_view(e, urls) for e in result.blame] if result.blame is not None else None
    at_values = (
        [(c, value_of(result.at_row, c)) for c in result.at_row] if result.at_row is not None else None
    )
    return render(
        request,
        "row.html",
        title=f"{url_table(result.table)} {key_label(result.key)}",
        urls=urls,
        table=url_table(result.table),
        table_full=result.table,
        key=key_label(result.key),
        json_href=f"{base}/api/v1/tables/{quote(url_table(result.table), safe='')}/rows/"
        f"{quote(url_key(result.key, result.keyless), safe='')}/history",
        mutations=views,
        total=result.total,
        hidden=result.total - len(views),
        blame=blame,
        blame_note=result.blame_note,
        at_asked=result.at_asked,
        at_version=format_lsn(result.at_version) if result.at_version is not None else None,
        at_exact=result.at_exact,
        at_values=at_values,
        version_value=(request.query_params.get("version") or "")[:64],
        at_value=(request.query_params.get("at") or "")[:64],
        log_href=urls.log(table=url_table(result.table), key=url_key(result.key, result.keyless)),
    )


# ============================================================================ the request page


_OUTCOMES = {
    "committed": "committed",
    "rolled_back": "rolled back",
    "partly_rolled_back": "committed, with attempts rolled back",
    "unknown": "unknown (no transaction of it was stored)",
}


async def request_page(request: Request) -> Response:
    ctx = context_of(request)
    base = str(request.scope.get("root_path") or "").rstrip("/")
    try:
        parts = path_segments(request)[2:]
        if len(parts) != 1 or not parts[0]:
            raise NotFoundError("no such page: expected /requests/{id}")
        request_id = check_text(parts[0], "request id")

        def work(store: Store) -> tuple[RequestRecord, dict[int, LinkFacts], Any]:
            record = store.request(request_id, mutation_limit=REQUEST_CHANGES_SHOWN)

            return record, link_facts(store, record.mutations), revert_section(store, ctx, record, base)

        record, facts, revert = await ctx.run(work)
    except Exception as exc:  # noqa: BLE001 - the page's error boundary
        status, message = page_error(request, exc, "page_request")
        return error_page(request, status, message, ambiguous_matches(exc, base))
    urls = Urls(base, tables=facts)
    cause = ": ".join(p for p in (record.error_type, record.error_message) if p) or None
    return render(
        request,
        "request.html",
        title=f"Request {record.request_id}",
        urls=urls,
        record=record,
        outcome=_OUTCOMES.get(record.outcome, record.outcome),
        cause=cause,
        reporter=record.error_reporter() if cause else None,
        error_at=iso(record.error_at) if record.error_at else None,
        other_errors=[
            {
                "text": ": ".join(p for p in (e.error_type, e.message) if p),
                "location": e.location,
                "time": iso(e.at),
                "reporter": unattributed_text(e),
            }
            for e in record.unattributed_errors
        ],
        incomplete_note=POSSIBLY_INCOMPLETE if record.possibly_incomplete else None,
        first_seen=iso(record.first_seen_at),
        last_seen=iso(record.last_seen_at),
        context=context_items(record.context),
        transactions=[
            {
                "xid": t.xid,
                "position": format_lsn(t.position),
                "status": t.status,
                "time": iso(t.committed_at),
                "count": t.mutation_count,
                "possibly_incomplete": t.possibly_incomplete,
            }
            for t in record.transactions
        ],
        mutations=[mutation_view(m, urls) for m in record.mutations],
        hidden=record.mutation_count - len(record.mutations),
        log_href=urls.log(request=record.request_id),
        revert=revert,
    )


# ============================================================================ login


def _login_response(request: Request, token: str | None, next_url: str) -> Response:
    ctx = context_of(request)
    if ctx.token is None:
        return RedirectResponse(next_url, status_code=303)
    if token is None:
        return render(request, "login.html", title="Log in", error=None, next_url=next_url)
    if not ctx.token_ok(token):
        log.warning("login_refused")
        return render(request, "login.html", 401, title="Log in", error="invalid token", next_url=next_url)
    response = RedirectResponse(next_url, status_code=303)
    cookie = ctx.cookie_value
    assert cookie is not None
    response.set_cookie(
        COOKIE_NAME,
        cookie,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


async def login(request: Request) -> Response:
    if request.method == "POST":
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_LOGIN_BODY:
                return error_page(request, 400, "login form too large")
        form = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)
        tokens, targets = form.get("token") or [""], form.get("next") or ["/"]
        token: str | None = tokens[-1]
        next_url = safe_next(targets[-1])
    else:
        token = request.query_params.get("token")
        next_url = safe_next(request.query_params.get("next"))
    return _login_response(request, token if token else None, next_url)


async def logout(request: Request) -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE_NAME, path="/")
    return response


# ============================================================================ routes


def routes(ctx: WebContext) -> Sequence[BaseRoute]:
    """The page routes; also installs the login page (401) and error page on ``ctx``."""

    ctx.unauthorized_page = login_page
    page: Callable[[Request, int, str], Response] = error_page
    ctx.extra["error_page"] = page
    return [
        Route("/", log_page, methods=["GET"]),
        Route("/search", search_page, methods=["GET"]),
        Route("/docs/api", reference_page, methods=["GET"]),
        Route("/tables/{rest:path}", row_page, methods=["GET"]),
        Route("/requests/{rest:path}", request_page, methods=["GET"]),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["GET"]),
    ]
