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

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

import jinja2
import structlog
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from cdc.errors import AmbiguousRequestError, CdcError, NotFoundError, UsageError
from cdc.lsn import format_lsn
from cdc.query import OPS, STATUSES, BlameEntry, Mutation, RequestRecord, Store
from cdc.render import (
    POSSIBLY_INCOMPLETE,
    ROLLED_BACK_NOTE,
    describe_mutation,
    format_value,
    short_table,
    shorten,
    unattributed_text,
)
from cdc.web.api import LogFilters
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
    WEB_DIR,
    WebContext,
    context_of,
    error_status,
    log_unexpected,
)

__all__ = ["routes"]

log = structlog.get_logger("cdc.web")

LOG_PAGE_SIZE = 50
ROW_HISTORY_SHOWN = 1000
REQUEST_CHANGES_SHOWN = 500
VALUE_CHARS = 300
_FILTERS = ("table", "key", "request", "actor", "since", "until", "status", "op", "limit")

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(WEB_DIR / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


# ============================================================================ formatting


def iso(value: datetime | None) -> str:
    """``2026-03-10T14:22:00Z`` (UTC, seconds); ``-`` for None."""
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def iso_full(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def url_table(table: str) -> str:
    """``public.users`` → ``users``, ``public."User"`` → ``"User"``; other schemas ``s.t``."""
    return short_table(table)


def url_key(key: Mapping[str, Any], keyless: bool = False) -> str:
    """The key as a URL path segment's text: the scalar for a one-column key, else JSON."""
    if not keyless and len(key) == 1:
        value = next(iter(key.values()))
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int):
            return str(value)
        if isinstance(value, str) and value.strip() and not value.lstrip().startswith("{"):
            return value
    return json.dumps(dict(key), ensure_ascii=False, separators=(",", ":"))


def key_label(key: Mapping[str, Any] | None) -> str:
    if key is None:
        return "(all rows)"
    return shorten(",".join(f"{c}={format_value(v)}" for c, v in key.items()), 80)


@dataclass(frozen=True)
class Value:
    """A value for display: ``text`` (cut), ``full`` (for the title), ``null``, ``absent``."""

    text: str
    full: str = ""
    null: bool = False
    absent: bool = False

    @property
    def cut(self) -> bool:
        return self.full != self.text


def value_of(image: Mapping[str, Any] | None, column: str) -> Value:
    if image is None or column not in image:
        return Value("—", absent=True)
    raw = image[column]
    if raw is None:
        return Value("null", "null", null=True)
    full = format_value(raw)
    return Value(shorten(full, VALUE_CHARS), shorten(full, 2000))


@dataclass(frozen=True)
class DiffRow:
    column: str
    before: Value
    after: Value
    kind: str  # changed | added | removed | same


@dataclass(frozen=True)
class LinkFacts:
    """What a link to a table's row needs: how its keys are written, and whether its name now
    belongs to another table (then the link names a version at which it did not)."""

    keyless: bool
    pinned: bool


@dataclass
class Urls:
    """Links between the pages (under the app's root path)."""

    base: str
    keyless: Mapping[str, bool] = field(default_factory=dict)
    tables: Mapping[int, LinkFacts] = field(default_factory=dict)  # by table id
    # Each request id shown: its shortest unique prefix of at least 8 characters (Store.request_prefixes)
    prefixes: Mapping[str, str] = field(default_factory=dict)

    def static(self, name: str) -> str:
        return f"{self.base}/static/{quote(name)}"

    def log(self, **params: str | None) -> str:
        query = urlencode({k: v for k, v in params.items() if v not in (None, "")})
        return f"{self.base}/" + (f"?{query}" if query else "")

    def row(
        self,
        table: str,
        key: Mapping[str, Any] | None,
        *,
        keyless: bool | None = None,
        version: int | None = None,
    ) -> str | None:
        if key is None:
            return None
        text = url_key(key, self.keyless.get(table, False) if keyless is None else keyless)
        href = f"{self.base}/tables/{quote(url_table(table), safe='')}/rows/{quote(text, safe='')}"
        return href if version is None else f"{href}?version={version}"

    def mutation_row(self, m: Mutation) -> str | None:
        """The row page of a mutation's row, by the table's name at the change."""
        if m.op == "TRUNCATE":
            return None
        facts = self.tables.get(m.table_id) if m.table_id is not None else None
        if facts is None:
            return self.row(m.table, m.key)
        return self.row(m.table, m.key, keyless=facts.keyless, version=m.position if facts.pinned else None)

    def request(self, request_id: str | None) -> str | None:
        if not request_id:
            return None
        return f"{self.base}/requests/{quote(request_id, safe='')}"

    def request_label(self, request_id: str | None, none: str = "") -> str:
        """``req:<shortest unique prefix>`` (the whole id when it was not looked up)."""
        if not request_id:
            return none
        return f"req:{self.prefixes.get(request_id, request_id)}"


def ambiguous_matches(exc: BaseException, base: str) -> list[dict[str, str]]:
    """The requests an ambiguous prefix matches, each with its page: shown under the error."""
    if not isinstance(exc, AmbiguousRequestError):
        return []
    urls = Urls(base)
    return [{"id": rid, "href": urls.request(rid) or ""} for rid in exc.matches]


@dataclass
class MutationView:
    m: Mutation
    time: str
    time_full: str
    table: str
    key: str
    row_href: str | None
    summary: str
    request_id: str | None
    request_short: str
    request_href: str | None
    actor: str | None
    rolled_back: bool
    version: str
    diff: list[DiffRow]
    unchanged: list[DiffRow]
    restore_href: str | None = None  # the row page: the restore preview to this version


def _diff(m: Mutation) -> tuple[list[DiffRow], list[DiffRow]]:
    before, after = m.before, m.after
    columns = list(after or {}) + [c for c in before or {} if c not in (after or {})]
    if m.op == "TRUNCATE":
        return [], []
    if m.op in ("INSERT", "SNAPSHOT"):
        return [DiffRow(c, Value("—", absent=True), value_of(after, c), "added") for c in columns], []
    if m.op == "DELETE":
        return [DiffRow(c, value_of(before, c), Value("—", absent=True), "removed") for c in columns], []
    changed = set(m.changed)
    if m.old_key is not None and m.key is not None:
        changed.update(c for c in m.key if m.old_key.get(c) != m.key[c])
    if not changed and before is not None and after is not None:
        changed = {c for c in columns if before.get(c) != after.get(c)}
    shown, same = [], []
    for c in columns:
        old = value_of(before if before is not None else m.old_key, c)
        new = value_of(after, c)
        if c in changed:
            shown.append(DiffRow(c, old, new, "changed"))
        else:
            same.append(DiffRow(c, old, new, "same"))
    return shown, same


def mutation_view(m: Mutation, urls: Urls, *, with_diff: bool = False) -> MutationView:
    summary = describe_mutation(m, width=60).removesuffix(f"  {ROLLED_BACK_NOTE}")
    diff, unchanged = _diff(m) if with_diff else ([], [])
    return MutationView(
        m=m,
        time=iso(m.committed_at),
        time_full=iso_full(m.committed_at),
        table=url_table(m.table),
        key=key_label(m.key),
        row_href=urls.mutation_row(m),
        summary=summary,
        request_id=m.request_id,
        request_short=urls.request_label(m.request_id),
        request_href=urls.request(m.request_id),
        actor=str((m.context or {}).get("actor") or "") or None,
        rolled_back=m.rolled_back,
        version=format_lsn(m.version) if m.version is not None else "",
        diff=diff,
        unchanged=unchanged,
    )


def link_facts(store: Store, mutations: Sequence[Mutation]) -> dict[int, LinkFacts]:
    """For each table of ``mutations`` (by id): what links to its rows need."""
    facts: dict[int, LinkFacts] = {}
    for m in mutations:
        if m.table_id is None or m.table_id in facts:
            continue
        then = store.table(m.table, m.position)
        try:
            now = store.table(m.table).table_id
        except NotFoundError:
            now = None
        facts[m.table_id] = LinkFacts(keyless=then.keyless, pinned=now != m.table_id)
    return facts


# ============================================================================ rendering


def render(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    ctx = context_of(request)
    base = str(request.scope.get("root_path") or "").rstrip("/")
    context.setdefault("urls", Urls(base))
    context.setdefault("error", None)
    context.setdefault("matches", [])
    context.setdefault("title", "cdc")
    html = _env.get_template(name).render(
        **context,
        base=base,
        secured=ctx.token is not None,
        ops=OPS,
        statuses=STATUSES,
    )
    return HTMLResponse(html, status_code=status_code)


def page_error(request: Request, exc: BaseException, route: str) -> tuple[int, str]:
    """Status and message to show for an error while building a page (unexpected ones are logged)."""
    status, _ = error_status(exc)
    if status == 500 or not isinstance(exc, CdcError):
        error_id = log_unexpected(exc, route)
        return 500, f"internal error (logged with id {error_id})"
    if status == 503:
        log.warning("history_store_unavailable", route=route, error=exc.message)
    message = exc.message + (f" (hint: {exc.hint})" if exc.hint else "")
    return status, message


def error_page(
    request: Request, status: int, message: str, matches: Sequence[Mapping[str, str]] = ()
) -> Response:
    titles = {
        400: "Bad request",
        401: "Log in",
        404: "Not found",
        405: "Method not allowed",
        503: "Unavailable",
    }
    return render(
        request,
        "error.html",
        status,
        title=titles.get(status, "Error"),
        message=message,
        status=status,
        matches=matches,
    )


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
            from cdc.web.schema_page import schema_page  # the table's schema versions (docs/ddl.md)

            return await schema_page(request, check_text(parts[0], "table"))
        if len(parts) == 4 and parts[1] == "rows" and parts[3] == "restore" and parts[0] and parts[2]:
            from cdc.web.preview_pages import restore_page  # the restore preview (cdc/web/previews.py)

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
_CONTEXT_LABELS = (
    ("application_name", "application"),
    ("db_user", "database user"),
    ("client_addr", "client address"),
    ("backend_pid", "backend pid"),
    ("source", "source"),
    ("trace_id", "trace id"),
    ("span_id", "span id"),
)


def context_items(context: Mapping[str, Any] | None) -> list[tuple[str, Value]]:
    if not context:
        return []
    items: list[tuple[str, Value]] = []
    known = {k for k, _ in _CONTEXT_LABELS} | {"extra", "request_id", "actor"}  # actor: shown above
    for key, label in _CONTEXT_LABELS:
        if context.get(key) not in (None, ""):
            items.append((label, value_of(context, key)))
    extra = context.get("extra")
    if isinstance(extra, Mapping):
        items.extend((str(k), value_of(extra, k)) for k in extra)
    items.extend((str(k), value_of(context, k)) for k in context if k not in known)
    return items


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
            from cdc.web.preview_pages import revert_section  # the revert preview (cdc/web/previews.py)

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
    from cdc.web.reference import reference_page  # the API reference, from the OpenAPI document
    from cdc.web.search import search_page  # search by a column's value

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
