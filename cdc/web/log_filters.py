"""The mutation log's filters (`/api/v1/mutations` and the page's log), parsed from a query
string once for both."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from starlette.requests import Request

from cdc.errors import UsageError
from cdc.query import OPS, Key, Store
from cdc.web.args import Window, parse_key, parse_limit, query_text
from cdc.web.limits import DEFAULT_LIMIT, MAX_KEY_CHARS, MAX_TABLE_CHARS

__all__ = ["LogFilters"]


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
        window = Window.from_request(request, OPS)
        filters = cls(
            table=query_text(request, "table", MAX_TABLE_CHARS),
            key=parse_key(key_text) if key_text is not None else None,
            request_id=query_text(request, "request"),
            actor=query_text(request, "actor"),
            since=window.since,
            until=window.until,
            status=window.status,
            op=window.op,
            cursor=window.cursor,
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
