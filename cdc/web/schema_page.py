"""The page of a table's schema versions: ``/tables/{table}/schema`` (docs/ddl.md)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from cdc.lsn import format_lsn
from cdc.query import Store
from cdc.query.evolution import SchemaVersion
from cdc.web.base import context_of
from cdc.web.page_base import Urls, context_items, error_page, iso, page_error, render

__all__ = ["schema_page"]


async def schema_page(request: Request, table: str) -> Response:
    ctx = context_of(request)
    base = str(request.scope.get("root_path") or "").rstrip("/")
    try:

        def work(store: Store) -> tuple[str, list[SchemaVersion]]:
            return store.table(table).name, store.schema_versions(table)

        name, versions = await ctx.run(work)
    except Exception as exc:  # noqa: BLE001 - the page's error boundary
        status, message = page_error(request, exc, "page_schema")
        return error_page(request, status, message)
    urls = Urls(base)
    return render(
        request,
        "schema.html",
        title=f"Schema of {name}",
        urls=urls,
        table=name,
        versions=[
            {
                "version": format_lsn(v.version),
                "time": iso(v.committed_at) if v.committed_at is not None else "",
                "command": v.command,
                "summary": v.summary,
                "request_id": v.request_id,
                "request_href": urls.request(v.request_id),
                "context": context_items(v.context),
                "name": v.name,
                "columns": v.columns,
            }
            for v in versions
        ],
    )
