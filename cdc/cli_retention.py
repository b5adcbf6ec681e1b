"""The retention commands of the CLI: ``cdc prune`` and ``cdc erase TABLE --id ID``.

Thin shells over :mod:`cdc.store.prune` and :mod:`cdc.store.erase`. Both take ``--store DSN`` (else ``CDC_STORE_DSN``,
else ``store.dsn`` of the config file given by ``--config`` / ``CDC_CONFIG``) and ``--schema``
(else ``store.schema``); ``cdc prune`` reads ``retention.*`` from the config, ``cdc erase``
checks the source (``--source``, else ``CDC_SOURCE_DSN``, else ``source.dsn``).

Exit codes (cdc/exit_codes.py): 0 done; 6 bad input; 7 an unknown table or row; 8 refused (the
row still exists on the source, or the source could not be checked: pass ``--force``); 9 the
store could not be reached or the prune could not take its locks; 130 the confirmation was
declined. Errors are one ``error: ...`` line on stderr.
"""

from __future__ import annotations

import functools
import json
from datetime import UTC, datetime
from typing import Any

import click
import psycopg

from cdc.cli_errors import CdcCommand, boundary, connection_options, load
from cdc.cli_readers import parse_time
from cdc.cli_table import echo_table
from cdc.config import Config, format_duration, redact_dsn
from cdc.errors import CdcError, NotFoundError, SourceUnavailableError, StoreUnavailableError, UsageError
from cdc.lsn import format_lsn
from cdc.query import key_from_text
from cdc.store.erase import RowStillLiveError, default_actor, erase_row, has_history, row_chain, row_on_source
from cdc.store.prune import Pruner
from cdc.store.table_refs import TableRef, resolve_table
from cdc.stream.replication import OUTPUT_SETTINGS, options_string

__all__ = ["erase", "prune"]


def _refused(text: str) -> CdcError:
    return StoreUnavailableError(f"the history store refused the SQL: {text}")


def _size(value: int) -> str:
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _store_options(func: Any, *, source: bool = False) -> Any:
    options = [
        connection_options(source=source, store=True, schema=True),
        click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
                     show_default=True, help="Output format."),
    ]  # fmt: skip
    for option in reversed(options):
        func = option(func)
    return func


# ============================================================================ cdc prune


@click.command(cls=CdcCommand)
@_store_options
@click.option(
    "--dry-run", is_flag=True, help="Print what would be dropped and the new floor; change nothing."
)
@click.option(
    "--as-of",
    "as_of",
    metavar="TIME",
    help="Prune as if it were TIME: ISO 8601 (naive = UTC), or a duration ago such as 2d. Default: now.",
)
def prune(
    store_dsn: str | None,
    config_path: str | None,
    store_schema: str | None,
    fmt: str,
    dry_run: bool,
    as_of: str | None,
) -> None:
    """Drop the history partitions past retention.default, keyframes first.

    Every row that still existed at the new history floor and whose last change is in a dropped
    partition gets a keyframe (its image at the floor), so time travel stays exact from the floor
    on; versions below it read as None. Tables with a longer retention (retention.tables) keep
    their rows. The daemon does the same every retention.prune_interval.
    """
    with boundary(_refused):
        config = load(config_path, store=store_dsn, schema=store_schema)
        dsn = config.require_store()
        schema = config.store.schema_name
        now = parse_time(as_of, utc=True) if as_of else datetime.now(UTC)
        try:  # the horizons this prune computes: --as-of minus each retention
            for period in (config.retention.default, *config.retention.tables.values()):
                now - period
        except OverflowError:
            raise UsageError(f"--as-of {as_of!r}: earlier than any retention horizon can be") from None
        with Pruner(dsn, schema, config.retention) as pruner:
            report = pruner.prune(now, dry_run=dry_run)
    if fmt == "json":
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    verb = "would drop" if dry_run else "dropped"
    retention = config.retention
    lines: list[tuple[str, str]] = [
        ("retention", format_duration(retention.default) + (" (per table: " + ", ".join(
            f"{t} {format_duration(d)}" for t, d in sorted(retention.tables.items())) + ")"
            if retention.tables else "")),
        ("as of", now.isoformat(timespec="seconds")),
        ("horizon", report.horizon.isoformat(timespec="seconds") if report.horizon else "- (nothing has expired)"),
    ]  # fmt: skip
    for name in report.dropped:
        lines.append((verb, name))
    if report.partitions:
        lines.append(("", f"≈ {report.dropped_rows:,} changes, {_size(report.dropped_bytes)}"))
    old = format_lsn(report.old_floor) if report.old_floor is not None else "-"
    new = format_lsn(report.floor) if report.floor is not None else "-"
    lines.append(("history floor", f"{old} → {new}" if old != new else f"{new} (unchanged)"))
    lines.append(
        (
            "keyframes",
            f"{report.keyframes:,} {'to write' if dry_run else 'written'} "
            "(rows changed in what goes, as they are at the new floor)",
        )
    )
    if report.kept_rows:
        lines.append(("kept", f"{report.kept_rows:,} rows of longer-retention tables"))
    if report.expired_rows:
        lines.append(("expired", f"{report.expired_rows:,} kept rows past their table's retention"))
    if report.straggler_rows or report.transactions_removed or report.requests_removed:
        lines.append(
            (
                "removed",
                f"{report.straggler_rows:,} changes and {report.transactions_removed:,} transaction records at "
                f"or below the floor outside the partitions, {report.requests_removed:,} request errors",
            )
        )
    if not dry_run:
        lines.append(
            (
                "took",
                f"{report.seconds:.3f} s (keyframes staged ahead {report.stage_seconds:.3f} s; locked "
                f"{report.publish_seconds:.3f} s: keyframes {report.keyframe_seconds:.3f} s"
                f"{'' if report.staged else ' computed inline'}, drop {report.drop_seconds:.3f} s)",
            )
        )
    echo_table(lines)


# ============================================================================ cdc erase


@click.command(cls=CdcCommand)
@click.argument("table")
@click.option(
    "--id",
    "key_text",
    required=True,
    metavar="ID",
    help="""The row's key: 42, or '{"a": 1, "b": "x"}' (a keyless table: every column).""",
)
@click.option(
    "--between",
    nargs=2,
    metavar="T1 T2",
    help="Only images committed in [T1, T2) (ISO 8601 or a duration ago such as 30d).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Erase even if the row still exists on the source, or the source cannot be checked.",
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--actor", metavar="NAME", help="Who asks for the erasure (recorded; default: the OS user).")
@click.option("--utc", is_flag=True, help="Read naive --between times as UTC, not local time.")
@functools.partial(_store_options, source=True)
def erase(
    table: str,
    key_text: str,
    between: tuple[str, str] | None,
    force: bool,
    yes: bool,
    actor: str | None,
    source_dsn: str | None,
    utc: bool,
    config_path: str | None,
    store_dsn: str | None,
    store_schema: str | None,
    fmt: str,
) -> None:  # fmt: skip
    """Remove every image of one row from the history (right to erasure).

    Deletes each stored change holding an image of the row (after and before images, SNAPSHOT
    rows, keyframes), under its key and under every other key it had (followed through its
    key-changing UPDATEs, backwards and forwards), in one transaction, and records the erasure
    in the store's `erasures` table: who, when, the table, a SHA-256 of the key and counts, never
    the data.

    Refuses (exit 8) while the row still exists on the source under any of its keys (it would be
    captured again) and when the source cannot be reached (--force overrides both); exits 7 when
    the history has no such row. The store's WAL, backups and replicas keep the bytes until
    they age out.
    """
    with boundary(_refused):
        config = load(config_path, source=source_dsn, store=store_dsn, schema=store_schema)
        dsn = config.require_store()
        schema = config.store.schema_name
        since = until = None
        if between:
            since, until = parse_time(between[0], utc=utc), parse_time(between[1], utc=utc, end=True)
            if until <= since:
                raise UsageError(f"--between: {between[1]!r} is not after {between[0]!r}")
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10, application_name="cdc-erase") as conn:
            info = resolve_table(conn, schema, table)
            key = info.key_text(key_from_text(key_text))
            name = f"that row of {info.name}"
            if not has_history(conn, schema, info.table_id, key):
                raise NotFoundError(f"no history for {name}: nothing to erase")
            keys = list(dict.fromkeys(s.key_text for s in row_chain(conn, schema, info, key)))
        check, reason = _check_source(config, info, keys)
        if check != "absent" and not force:
            if check == "live":
                raise RowStillLiveError(
                    f"{name} still exists on the source: its images would be captured again",
                    hint="delete it on the source first, or pass --force to erase its history anyway",
                )
            raise RowStillLiveError(
                f"cannot check that {name} is gone from the source ({reason})",
                hint="pass --source DSN (or set CDC_SOURCE_DSN / source.dsn), or --force to erase unchecked",
            )
        who = actor or default_actor()
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10, application_name="cdc-erase") as conn:
            if not yes:
                plan = erase_row(
                    conn, schema, info, key, actor=who, source_check=check, forced=force,
                    since=since, until=until, dry_run=True,
                )  # fmt: skip
                window = (
                    f" committed in [{since.isoformat()}, {until.isoformat()})" if since and until else ""
                )
                click.echo(
                    f"{plan.mutations_removed} image(s) of {name}{window} will be removed "
                    f"({plan.keyframes_removed} keyframe(s); {plan.earlier_keys} other key(s) it had); "
                    f"source: {check}" + (f" ({reason})" if reason else "")
                )
                click.confirm("erase them?", abort=True)
            report = erase_row(
                conn, schema, info, key, actor=who, source_check=check, forced=force,
                since=since, until=until,
            )  # fmt: skip
    if fmt == "json":
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    click.echo(
        f"erased {report.mutations_removed} image(s) of {name} ({report.keyframes_removed} keyframe(s), "
        f"{report.earlier_keys} other key(s) it had) from {len(report.partitions)} relation(s); "
        f"erasure #{report.erasure_id} recorded by {who} (key sha256 {report.key_sha256[:16]}...)"
    )
    if check == "live":
        click.echo("note: the row still exists on the source: its next changes will be captured again")
    click.echo(
        "note: the bytes stay in the store's WAL, backups and replicas until they age out, and in its "
        "table files until VACUUM reuses the space (VACUUM FULL or pg_repack rewrites them now)"
    )


def _check_source(config: Config, table: TableRef, keys: list[str]) -> tuple[str, str]:
    """("absent" | "live" | "unreachable" | "not_checked", reason): "live" when the row exists on
    the source under any of the keys it had."""
    if config.source.dsn is None:
        return "not_checked", "no source DSN given"
    dsn = config.source.dsn.get_secret_value()
    try:
        with psycopg.connect(
            dsn, autocommit=True, connect_timeout=10, application_name="cdc-erase",
            options=options_string(OUTPUT_SETTINGS),
        ) as source:  # fmt: skip
            source.execute("SET default_transaction_read_only = on")
            live = any(row_on_source(source, table, table.key_mapping(k)) for k in keys)
            return ("live" if live else "absent"), ""
    except psycopg.OperationalError as exc:
        error = SourceUnavailableError(f"cannot connect to the source ({redact_dsn(dsn)}): {_line(exc)}")
        return "unreachable", error.message
    except (psycopg.Error, UsageError) as exc:
        return "unreachable", f"the source refused the check: {_line(exc)}"


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return redact_dsn(text.splitlines()[0] if text else type(exc).__name__)
