"""The reader commands of the CLI: ``cdc state history|blame|at`` and ``cdc why``.

Thin shells over :mod:`cdc.query` (reads) and :mod:`cdc.render` (layout). Every command
takes ``--store DSN`` (else ``CDC_STORE_DSN``, else ``store.dsn`` of the config file given
by ``--config`` / ``CDC_CONFIG``), ``--schema`` (else the config's ``store.schema``, else
``cdc_history``), ``--format table|json|csv`` and ``--utc``. Times are shown, and naive
times on the command line are read, in the local zone (``TZ``) unless ``--utc``.

Errors are one line on stderr (``error: ...``) and an exit code of cdc/exit_codes.py: 6 for
bad input (a bad time or key), 7 for an unknown table, row, request or version, 9 when the store
cannot be read; never a traceback.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import click

from cdc.cli_errors import CdcCommand, CdcGroup, boundary, connection_options, load
from cdc.config import parse_duration
from cdc.errors import NotFoundError, UsageError
from cdc.lsn import format_lsn, parse_lsn
from cdc.query import Mutation, Store, format_key, key_from_text
from cdc.render import (
    MUTATION_CSV_FIELDS,
    align,
    blame_lines,
    csv_text,
    describe_mutation,
    format_time,
    history_lines,
    incomplete_lines,
    json_text,
    key_text,
    mutation_record,
    mutations_csv,
    mutations_json,
    request_lines,
    row_lines,
    short_request,
    to_zone,
    why_lines,
)

__all__ = ["parse_time", "state", "why"]

F = TypeVar("F", bound=Callable[..., Any])
FORMATS = ("table", "json", "csv")
#: Most rows a reader command lists (--limit, --max-changes).
MAX_ROWS = 1_000_000


# ============================================================================ shared plumbing


def reader_options(func: F) -> F:
    """``--store``, ``--config``, ``--schema``, ``--format``, ``--utc``."""
    options = [
        connection_options(store=True, schema=True),
        click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
                     help="Output format."),
        click.option("--utc", is_flag=True, help="Show (and read naive) times in UTC, not the local zone."),
    ]  # fmt: skip
    for option in reversed(options):
        func = option(func)
    return func


def open_store(store_dsn: str | None, config_path: str | None, store_schema: str | None) -> Store:
    """The store from the options, else the environment, else the config file (:func:`load`)."""
    config = load(config_path, store=store_dsn, schema=store_schema)
    return Store(config.require_store(), schema=config.store.schema_name)


def parse_time(text: str, *, utc: bool = False, end: bool = False, now: datetime | None = None) -> datetime:
    """A time from the command line.

    ISO 8601 (``2026-03-10``, ``2026-03-10T14:00``, ``2026-03-10 14:00:05+01:00``, ``...Z``),
    naive ones in the local zone (UTC with ``utc``); ``now``; or a duration meaning that long
    ago (``24h``, ``90m``, ``7d``). With ``end``, a date alone means the end of that day.
    """
    value = text.strip()
    current = now or datetime.now(UTC)
    if value.lower() == "now":
        return current
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        parsed = None
    out_of_range = UsageError(
        f"invalid time {value!r}: out of range (years 1 to 9999, in UTC and in the local time zone)"
    )
    if parsed is not None:
        date_only = len(value) <= 10 and ":" not in value and "T" not in value.upper()
        try:
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC) if utc else parsed.astimezone()
            if end and date_only:
                parsed += timedelta(days=1)
            parsed.astimezone(UTC)  # representable in UTC too (what the store compares)
        except (ValueError, OverflowError):
            raise out_of_range from None
        return parsed
    try:
        return current - parse_duration(value)
    except OverflowError:
        raise out_of_range from None
    except UsageError:
        raise UsageError(
            f"invalid time {value!r}: expected ISO 8601 (2026-03-10, 2026-03-10T14:00, with an optional "
            "offset such as +01:00 or Z), now, or a duration ago (30m, 24h, 7d)"
        ) from None


def _time_window(
    since: str | None, between: tuple[str, str] | None, utc: bool
) -> tuple[datetime | None, datetime | None]:
    if since is not None and between:
        raise UsageError("give either --since or --between, not both")
    if between:
        start, stop = parse_time(between[0], utc=utc), parse_time(between[1], utc=utc, end=True)
        if stop <= start:
            raise UsageError(f"empty time range: {between[1]!r} is not after {between[0]!r}")
        return start, stop
    if since is not None:
        return parse_time(since, utc=utc), None
    return None, None


def _emit(text: str) -> None:
    click.echo(text.rstrip("\n"))


def _emit_lines(lines: Sequence[str]) -> None:
    if lines:
        click.echo("\n".join(lines))


def _emit_mutations(
    mutations: Sequence[Mutation], fmt: str, utc: bool, table: Callable[[], list[str]]
) -> None:
    if fmt == "json":
        _emit(mutations_json(mutations, utc=utc))
    elif fmt == "csv":
        _emit(mutations_csv(mutations, utc=utc))
    else:
        _emit_lines(table())


def _iso(value: datetime | None, utc: bool) -> str | None:
    return to_zone(value, utc).isoformat() if value is not None else None


def _in_window(m: Mutation, since: datetime | None, until: datetime | None) -> bool:
    return (since is None or m.committed_at >= since) and (until is None or m.committed_at < until)


# ============================================================================ cdc state


@click.group(cls=CdcGroup, context_settings={"help_option_names": ["-h", "--help"]})
def state() -> None:
    """Read the captured history: a row's mutations, per-column blame, a row at a past version."""


@state.command()
@click.argument("table", required=False)
@click.option("--id", "key_text", metavar="ID", help="""The row's key: 42, abc, or '{"a":1,"b":"x"}'.""")
@click.option(
    "--request", "request_id", metavar="REQ", help="Every change of a request (id or unique prefix)."
)
@click.option("--since", metavar="TIME", help="Only changes since TIME: 24h (ago) or ISO 8601.")
@click.option("--between", nargs=2, metavar="T1 T2", help="Only changes from T1 to T2 (ISO 8601).")
@click.option("--committed-only", is_flag=True, help="Leave out rolled-back attempts.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, MAX_ROWS),
              help="Without --id: the number of newest changes of the table to show.")  # fmt: skip
@reader_options
def history(
    *,
    table: str | None,
    key_text: str | None,
    request_id: str | None,
    since: str | None,
    between: tuple[str, str] | None,
    committed_only: bool,
    limit: int,
    store_dsn: str | None,
    config_path: str | None,
    store_schema: str | None,
    fmt: str,
    utc: bool,
) -> None:
    """The mutations of a row (TABLE --id ID), of a request (--request REQ) or of a table (TABLE).

    \b
      cdc state history users --id 42
      cdc state history users --id 42 --since 24h
      cdc state history orders --id 81b2 --between 2026-03-10T14:00 2026-03-10T15:00
      cdc state history --request 550e8400
      cdc state history users --id 42 --format json > mutations.json
    """
    with boundary():
        start, stop = _time_window(since, between or None, utc)
        if request_id is not None:
            if table is not None or key_text is not None:
                raise UsageError("give either TABLE --id ID or --request REQ, not both")
            with open_store(store_dsn, config_path, store_schema) as store:
                mutations = [
                    m
                    for m in store.request_mutations(request_id)
                    if _in_window(m, start, stop) and not (committed_only and m.rolled_back)
                ]
                _emit_mutations(
                    mutations, fmt, utc, lambda: request_lines(mutations) or ["  (no data changes)"]
                )
            return
        if table is None:
            raise UsageError("give TABLE --id ID (a row), TABLE (its newest changes) or --request REQ")
        with open_store(store_dsn, config_path, store_schema) as store:
            info = store.table(table)
            if key_text is None:
                page = store.mutation_log(
                    table=info.name,
                    since=start,
                    until=stop,
                    status="committed" if committed_only else None,
                    limit=limit,
                )
                mutations = list(reversed(page.mutations))
                _emit_mutations(
                    mutations,
                    fmt,
                    utc,
                    lambda: _table_log_lines(
                        info.name, mutations, utc, store.request_prefixes(m.request_id for m in mutations)
                    ),
                )
                return
            key = store.stored_key(info, key_from_text(key_text))
            mutations = store.row_history(
                info.name, key, since=start, until=stop, include_rolled_back=not committed_only
            )
            _emit_mutations(
                mutations,
                fmt,
                utc,
                lambda: history_lines(
                    info.name,
                    key,
                    mutations,
                    utc=utc,
                    prefixes=store.request_prefixes(m.request_id for m in mutations),
                ),
            )


def _table_log_lines(
    table: str, mutations: Sequence[Mutation], utc: bool, prefixes: Mapping[str, str]
) -> list[str]:
    count = len(mutations)
    header = f"  {table}  (newest {count} mutation{'' if count == 1 else 's'})"
    rows = [
        [format_time(m.committed_at, utc), m.op, key_text(m.key), describe_mutation(m),
         short_request(m.request_id, prefixes) if m.request_id else ""]
        for m in mutations
    ]  # fmt: skip
    if not rows:
        return [header]
    return [header, "", *align(rows, gaps=(2, 2, 2, 2)), *incomplete_lines(mutations, prefixes)]


@state.command()
@click.argument("table")
@click.option("--id", "key_text", metavar="ID", required=True, help="The row's key.")
@reader_options
def blame(
    *,
    table: str,
    key_text: str,
    store_dsn: str | None,
    config_path: str | None,
    store_schema: str | None,
    fmt: str,
    utc: bool,
) -> None:
    """For each column of the row: its value now, the request and time of its last committed write.

    "✗ rolled back req:..." marks a later attempt on the column that was rolled back.
    """
    with boundary(), open_store(store_dsn, config_path, store_schema) as store:
        entries = store.blame(table, key_from_text(key_text))
        records = []
        for e in entries:
            record = e.to_json()
            record["committed_at"] = to_zone(e.committed_at, utc).isoformat() if e.committed_at else None
            record["rolled_back_at"] = (
                to_zone(e.rolled_back_at, utc).isoformat() if e.rolled_back_at else None
            )
            records.append(record)
        if fmt == "json":
            _emit(json_text(records))
        elif fmt == "csv":
            fields = list(records[0]) if records else ["column", "value"]
            _emit(csv_text(fields, records))
        else:
            ids = [i for e in entries for i in (e.request_id, e.rolled_back_request_id)]
            _emit_lines(blame_lines(entries, utc=utc, prefixes=store.request_prefixes(ids)))


@state.command()
@click.argument("table")
@click.option("--id", "key_text", metavar="ID", required=True, help="The row's key.")
@click.option("--version", "version_text", metavar="V", help="A version: an LSN as X/Y or an integer.")
@click.option("--at", "at_text", metavar="TIME", help="A time (ISO 8601, or a duration ago such as 1h).")
@reader_options
def at(
    *,
    table: str,
    key_text: str,
    version_text: str | None,
    at_text: str | None,
    store_dsn: str | None,
    config_path: str | None,
    store_schema: str | None,
    fmt: str,
    utc: bool,
) -> None:
    """The row as it was at a version (--version V) or at a time (--at TIME)."""
    with boundary():
        if (version_text is None) == (at_text is None):
            raise UsageError("give exactly one of --version V or --at TIME")
        requested = parse_lsn(version_text) if version_text is not None else None
        when = parse_time(at_text, utc=utc) if at_text is not None else None
        with open_store(store_dsn, config_path, store_schema) as store:
            store.table(table)  # an unknown table first
            version = requested
            if when is not None:
                version = store.version_at_timestamp(when)
                if version is None:
                    floor = store.earliest_version()
                    since = store.version_time(floor) if floor else None
                    raise NotFoundError(
                        f"no stored version at or before {format_time(when, utc, seconds=True)}"
                        + (f": history starts at {format_time(since, utc, seconds=True)}" if since else "")
                    )
            assert version is not None
            if store.current_version() is None:
                raise NotFoundError(
                    f"the history store ({store.describe()}) has no captured version yet",
                    hint="is `cdc run` capturing? `cdc status` shows it",
                )
            if not store.check_version(version):
                floor = store.earliest_version()
                raise NotFoundError(
                    f"version {format_lsn(version)} is below the history floor "
                    f"{format_lsn(floor or 0)}: it was pruned or precedes the capture"
                )
            info = store.table(table, version)  # the table that had this name then
            key = store.stored_key(info, key_from_text(key_text))
            row = store.row_at(info, key, version)
            if row is None and not store.has_history(info, key):
                raise NotFoundError(f"no history for {info.name} {format_key(key)}")
            what = f"{info.name} {format_key(key)}"
            if fmt == "json":
                _emit(
                    json_text(
                        {
                            "table": info.name,
                            "key": key,
                            "version": version,
                            "version_lsn": format_lsn(version),
                            "row": row,
                        }
                    )
                )
            elif fmt == "csv":
                _emit(
                    csv_text(["column", "value"], ({"column": c, "value": v} for c, v in (row or {}).items()))
                )
            elif row is None:
                _emit(f"  {what} absent at version {format_lsn(version)}")
            else:
                _emit_lines([f"  {what} at version {format_lsn(version)}", "", *row_lines(row)])


# ============================================================================ cdc why


@click.command(cls=CdcCommand)
@click.argument("request_id", metavar="REQ")
@click.option("--max-changes", default=50, show_default=True, type=click.IntRange(1, MAX_ROWS),
              help="Data changes to list (table form).")  # fmt: skip
@reader_options
def why(
    *,
    request_id: str,
    max_changes: int,
    store_dsn: str | None,
    config_path: str | None,
    store_schema: str | None,
    fmt: str,
    utc: bool,
) -> None:
    """Why a request's changes happened: its context, outcome, error and data changes.

    REQ is a request id or a unique prefix of one (8 characters are usually enough).
    """
    with boundary(), open_store(store_dsn, config_path, store_schema) as store:
        record = store.request(request_id, mutation_limit=None if fmt != "table" else max_changes)
        if fmt == "json":
            data = record.to_json()
            data["mutations"] = [mutation_record(m, utc=utc) for m in record.mutations]
            data["first_seen_at"] = _iso(record.first_seen_at, utc)
            data["last_seen_at"] = _iso(record.last_seen_at, utc)
            _emit(json_text(data))
        elif fmt == "csv":
            _emit(csv_text(MUTATION_CSV_FIELDS, (mutation_record(m, utc=utc) for m in record.mutations)))
        else:
            _emit_lines(why_lines(record, utc=utc, max_changes=max_changes))
