"""What the pages of ``cdc serve`` share (cdc/web/pages.py and the pages beside it: search,
previews, the schema and API reference pages): the template environment and rendering, URLs,
value and mutation views, the error page. No route is declared here."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
import structlog
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from cdc.errors import AmbiguousRequestError, CdcError, NotFoundError
from cdc.lsn import format_lsn
from cdc.query import OPS, STATUSES, Mutation, Store
from cdc.render import (
    ROLLED_BACK_NOTE,
    describe_mutation,
    format_value,
    short_table,
    shorten,
)
from cdc.web.base import (
    WEB_DIR,
    context_of,
    error_status,
    log_unexpected,
)

__all__ = [
    "LinkFacts",
    "MutationView",
    "Urls",
    "Value",
    "ambiguous_matches",
    "context_items",
    "error_page",
    "iso",
    "key_label",
    "link_facts",
    "mutation_view",
    "page_error",
    "render",
    "url_key",
    "url_table",
    "value_of",
]

log = structlog.get_logger("cdc.web")

VALUE_CHARS = 300

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
