"""The undo previews on the pages: the request page's revert preview (:func:`revert_section`) and
a row's restore preview (``/tables/{table}/rows/{key}/restore?version=V``). Preview only: the
pages show the command that applies a plan, never apply it (cdc/web/previews.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import structlog
from starlette.requests import Request
from starlette.responses import Response

from cdc.errors import CdcError
from cdc.lsn import format_lsn
from cdc.query import RequestRecord, Store, TableInfo, format_key
from cdc.render import format_value
from cdc.web.base import SourceNotConfiguredError, WebContext, context_of, log_unexpected
from cdc.web.page_base import Urls, Value, error_page, page_error, render, url_key, url_table, value_of
from cdc.web.previews import (
    UndoPreview,
    restore_args,
    restore_command,
    restore_preview,
    restore_target,
    revert_command,
    revert_preview,
)

__all__ = ["RevertSection", "restore_page", "revert_section"]

log = structlog.get_logger("cdc.web")

#: A request with more changes than this is not previewed on its page (the command still is).
REVERT_PREVIEW_MAX_CHANGES = 2000


@dataclass
class RevertSection:
    """The request page's revert preview: a plan, or why there is none."""

    command: str
    json_href: str
    preview: UndoPreview | None = None
    conflicts: list[dict[str, Any]] = field(default_factory=list)  # the preview's, with their links
    unavailable: str | None = None  # no source configured, nothing to revert, too many changes
    error: str | None = None  # the source could not be read, or something failed


def revert_section(store: Store, ctx: WebContext, record: RequestRecord, base: str) -> RevertSection:
    """The revert preview of ``record`` (in the page's worker thread; never raises)."""
    section = RevertSection(
        command=revert_command(record.request_id),
        json_href=f"{base}/api/v1/requests/{quote(record.request_id, safe='')}/revert",
    )
    if not record.committed_count:
        section.unavailable = "Nothing to revert: no change of this request was committed."
        return section
    if record.mutation_count > REVERT_PREVIEW_MAX_CHANGES:
        section.unavailable = (
            f"Not previewed here: the request made {record.mutation_count} changes (more than "
            f"{REVERT_PREVIEW_MAX_CHANGES}). Run the command to see its plan."
        )
        return section
    try:
        section.preview = revert_preview(store, ctx, record.request_id)
        section.conflicts = _conflict_rows(section.preview, Urls(base))
    except SourceNotConfiguredError as exc:
        section.unavailable = f"No preview: {exc.message}. Run the command where the source can be reached."
    except CdcError as exc:
        section.error = exc.message + (f" (hint: {exc.hint})" if exc.hint else "")
    except Exception as exc:  # noqa: BLE001 - the section's boundary: the rest of the page stands
        section.error = f"internal error (logged with id {log_unexpected(exc, 'page_request_revert')})"
    return section


@dataclass(frozen=True)
class DiffView:
    column: str
    current: Value
    target: Value
    redacted: str | None


def _diff_view(entry: dict[str, Any]) -> DiffView:
    policy = entry.get("redacted")
    column = str(entry["column"])
    if policy is not None:  # never a value: not the placeholder, not the source's clear value
        hidden = Value(f"redacted ({policy})", f"column policy {policy}: the value is not shown")
        return DiffView(column, hidden, hidden, str(policy))
    current = value_of({column: entry["current"]} if entry["current_present"] else None, column)
    target = value_of({column: entry["target"]} if entry["target_present"] else None, column)
    return DiffView(column, current, target, None)


async def restore_page(request: Request, table: str, key_text: str) -> Response:
    """``/tables/{table}/rows/{key}/restore?version=V``: the restore preview of one row."""
    ctx = context_of(request)
    base = str(request.scope.get("root_path") or "").rstrip("/")
    unavailable: str | None = None
    try:
        key, version, at = restore_args(request, key_text)

        def work(store: Store) -> tuple[TableInfo, dict[str, Any], int, UndoPreview | None, str | None]:
            info, stored, resolved = restore_target(store, table, key, version, at)
            try:
                return (
                    info,
                    stored,
                    resolved,
                    restore_preview(store, ctx, info, stored, key_text, resolved),
                    None,
                )
            except SourceNotConfiguredError as exc:
                return info, stored, resolved, None, exc.message

        info, stored, resolved, preview, unavailable = await ctx.run(work)
    except Exception as exc:  # noqa: BLE001 - the page's error boundary
        status, message = page_error(request, exc, "page_restore")
        return error_page(request, status, message)
    urls = Urls(base)
    key_url = url_key(stored, info.keyless)
    row_href = urls.row(info.current_name, stored, keyless=info.keyless)
    json_href = (
        f"{base}/api/v1/tables/{quote(url_table(info.current_name), safe='')}/rows/"
        f"{quote(key_url, safe='')}/restore?version={format_lsn(resolved)}"
    )
    return render(
        request,
        "restore.html",
        title=f"Restore {url_table(info.current_name)} {format_key(stored)}",
        urls=urls,
        table=url_table(info.current_name),
        key=format_key(stored),
        version=format_lsn(resolved),
        row_href=row_href,
        json_href=json_href,
        preview=preview,
        unavailable=unavailable,
        command=preview.command if preview is not None else restore_command(info, key_url, resolved),
        diff=[_diff_view(d) for d in preview.diff] if preview is not None else [],
    )


def _conflict_rows(preview: UndoPreview, urls: Urls) -> list[dict[str, Any]]:
    """The conflicts of a revert, each with its row and the later request (links)."""
    rows = []
    for c in preview.conflicts:
        rows.append(
            {
                "table": url_table(str(c["table"])),
                "key": ", ".join(f"{k}={format_value(v)}" for k, v in (c["key"] or {}).items()),
                "row_href": urls.row(str(c["table"]), c["key"]),
                "column": c["column"] or "(whole row)",
                "reason": c["reason"],
                "request_id": c["request_id"],
                "request_href": urls.request(c["request_id"]),
                "version": c["version_lsn"] or "",
            }
        )
    return rows
