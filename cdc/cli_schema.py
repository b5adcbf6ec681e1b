"""`cdc state schema TABLE`: a table's schema versions, each with its DDL, version and request."""

from __future__ import annotations

import click

from cdc.cli_errors import boundary
from cdc.cli_readers import _emit, _emit_lines, open_store, reader_options, state
from cdc.lsn import format_lsn
from cdc.render import csv_text, json_text, to_zone

__all__ = ["schema"]


@state.command()
@click.argument("table")
@reader_options
def schema(
    *,
    table: str,
    store_dsn: str | None,
    config_path: str | None,
    store_schema: str | None,
    fmt: str,
    utc: bool,
) -> None:
    """The table's schema versions: each DDL (or new shape) with its version, time and request,
    and the columns from then on (docs/ddl.md)."""
    with boundary(), open_store(store_dsn, config_path, store_schema) as store:
        versions = store.schema_versions(table)
        records = []
        for v in versions:
            record = v.to_json()
            record["committed_at"] = to_zone(v.committed_at, utc).isoformat() if v.committed_at else None
            records.append(record)
        if fmt == "json":
            _emit(json_text(records))
        elif fmt == "csv":
            fields = [
                "version",
                "version_lsn",
                "committed_at",
                "command",
                "summary",
                "request_id",
                "name",
                "columns",
            ]
            rows = [{**{k: r[k] for k in fields}, "columns": " ".join(r["columns"])} for r in records]
            _emit(csv_text(fields, rows))
        else:
            lines = []
            for v, r in zip(versions, records, strict=True):
                when = r["committed_at"] or "-"
                request = f" req:{v.request_id}" if v.request_id else ""
                lines.append(f"{format_lsn(v.version)}  {when}  {v.command}{request}  {v.name}")
                lines.append(f"    {v.summary}")
                lines.append(f"    columns: {', '.join(v.columns)}")
            for start, end, command in store.inexact_windows(table):
                until = f"and {format_lsn(end)}" if end is not None else "and now"
                pending = "" if end is not None else "; backfill pending: cdc backfill " + table
                lines.append(
                    f"history of {table} between versions {format_lsn(start)} {until} is inexact "
                    f"(rewritten by {command}{pending})"
                )
            _emit_lines(lines or [f"no schema versions recorded for {table}"])
