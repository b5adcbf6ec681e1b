"""Search by a column's value in ``cdc serve``: ``GET /api/v1/tables/{table}/search`` and the
``/search`` page, both over :meth:`cdc.query.Store.search_values` (a bounded scan: the answer
says how far it went, and how to go on)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response

from cdc.errors import UsageError
from cdc.query import Mutation, Store
from cdc.query.search import MAX_VALUE_CHARS as MAX_SEARCH_VALUE_CHARS
from cdc.query.search import SCAN_LIMIT, SEARCHED_OPS, ValueSearch
from cdc.render import mutation_record
from cdc.web.args import (
    Window,
    allow_params,
    check_text,
    format_cursor,
    parse_limit,
    query_text,
)
from cdc.web.base import WebContext, context_of
from cdc.web.limits import MAX_TABLE_CHARS
from cdc.web.openapi import SEARCH_PARAMS, query_names
from cdc.web.page_base import (
    LinkFacts,
    MutationView,
    Urls,
    ambiguous_matches,
    iso,
    link_facts,
    mutation_view,
    page_error,
    render,
    url_table,
)

__all__ = ["SearchArgs", "search_api", "search_page"]

SEARCH_PAGE_SIZE = 50
#: The form's fields: the API's parameters (the table a query parameter here), less the paging ones
_FORM = ("table", *(n for n in query_names(SEARCH_PARAMS) if n not in ("cursor", "scan")))


@dataclass(frozen=True)
class SearchArgs:
    """A search's arguments as parsed from a query string (the API's and the page's)."""

    column: str
    value: str
    since: datetime | None = None
    until: datetime | None = None
    status: str | None = None
    op: str | None = None
    cursor: tuple[int, int] | None = None
    limit: int = 100
    scan: int = SCAN_LIMIT

    @classmethod
    def from_request(cls, request: Request, default_limit: int = 100) -> SearchArgs:
        column = query_text(request, "column")
        value = request.query_params.get("value")
        if column is None:
            raise UsageError("give the column to search (column=...)")
        if value is None:
            raise UsageError("give the value to search for (value=...)")
        value = check_text(value, "value", MAX_SEARCH_VALUE_CHARS)
        window = Window.from_request(request, SEARCHED_OPS, ops_are="a search matches")
        return cls(
            column=column,
            value=value,
            since=window.since,
            until=window.until,
            status=window.status,
            op=window.op,
            cursor=window.cursor,
            limit=parse_limit(request.query_params.get("limit"), default_limit),
            scan=parse_limit(request.query_params.get("scan"), SCAN_LIMIT, SCAN_LIMIT, what="scan"),
        )

    def run(self, store: Store, ctx: WebContext, table: str) -> ValueSearch:
        return store.search_values(
            table,
            self.column,
            self.value,
            since=self.since,
            until=self.until,
            status=self.status,
            op=self.op,
            before=self.cursor,
            limit=self.limit,
            scan_limit=self.scan,
            policies=ctx.policies,
            hash_key=ctx.hash_key,
        )


def search_json(found: ValueSearch) -> dict[str, Any]:
    data = found.to_json()
    if found.searched_to is not None:
        data["searched_to"] = found.searched_to.astimezone(UTC).isoformat()
    data["mutations"] = [mutation_record(m, utc=True) for m in found.mutations]
    data["next"] = format_cursor(found.next_cursor)
    return data


async def search_api(request: Request, ctx: WebContext, table: str) -> dict[str, Any]:
    """``GET /api/v1/tables/{table}/search``."""
    allow_params(request, *query_names(SEARCH_PARAMS))
    args = SearchArgs.from_request(request)
    return await ctx.run(lambda store: search_json(args.run(store, ctx, table)))


# ============================================================================ the page


async def search_page(request: Request) -> Response:
    """``/search``: the form, and the matching mutations with how far the scan went."""
    ctx = context_of(request)
    base = str(request.scope.get("root_path") or "").rstrip("/")
    values = {name: (request.query_params.get(name) or "")[:200] for name in _FORM}
    asked = any(values[k] for k in ("table", "column", "value"))
    tables: list[str] = []
    found: ValueSearch | None = None
    views: list[MutationView] = []
    status, error = 200, None
    matches: list[dict[str, str]] = []
    urls = Urls(base)
    try:
        table = query_text(request, "table", MAX_TABLE_CHARS)
        args = SearchArgs.from_request(request, SEARCH_PAGE_SIZE) if asked else None
        if args is not None and table is None:
            raise UsageError("give the table to search")

        def work(store: Store) -> tuple[list[str], ValueSearch | None, dict[int, LinkFacts], dict[str, str]]:
            names = store.known_tables()
            if args is None or table is None:
                return names, None, {}, {}
            result = args.run(store, ctx, table)
            page: list[Mutation] = result.mutations
            return names, result, link_facts(store, page), store.request_prefixes(m.request_id for m in page)

        tables, found, facts, prefixes = await ctx.run(work)
        urls = Urls(base, tables=facts, prefixes=prefixes)
        views = [mutation_view(m, urls) for m in found.mutations] if found is not None else []
    except Exception as exc:  # noqa: BLE001 - the page's error boundary: the form and the error
        status, error = page_error(request, exc, "page_search")
        matches = ambiguous_matches(exc, base)
    further = None
    if found is not None and found.next_cursor is not None:
        query = {k: v for k, v in values.items() if v}
        further = f"{base}/search?" + urlencode({**query, "cursor": format_cursor(found.next_cursor) or ""})
    return render(
        request,
        "search.html",
        status,
        title="Search by value",
        urls=urls,
        values=values,
        tables=[url_table(t) for t in tables],
        searched_ops=SEARCHED_OPS,
        scan_limit=SCAN_LIMIT,
        found=found,
        scope=_scope(found, values) if found is not None else None,
        mutations=views,
        further=further,
        paged="cursor" in request.query_params,
        first=f"{base}/search?" + urlencode({k: v for k, v in values.items() if v}),
        error=error,
        matches=matches,
        asked=asked,
    )


def _scope(found: ValueSearch, values: dict[str, str]) -> dict[str, Any]:
    """What the scan covered, for the sentence under the form."""
    return {
        "table": url_table(found.table),
        "column": found.column,
        "hashed": found.policy == "hash",
        "scanned": found.scanned,
        "scan_limit": found.scan_limit,
        "complete": found.complete,
        "to": iso(found.searched_to) if found.searched_to is not None else None,
        "window": bool(values.get("since") or values.get("until")),
    }
