"""The undo commands of the CLI: ``cdc revert REQ`` and ``cdc restore TABLE --id ID --version V``.

Thin shells over :mod:`cdc.undo`. Both read the history store (``--store DSN``, else
``CDC_STORE_DSN``, else ``store.dsn`` of the config file) and the source (``--source DSN``,
else ``CDC_SOURCE_DSN``, else ``source.dsn``). Without ``--apply`` they only print the plan:
a SQL script for psql. With ``--apply`` they run it in one transaction on the source, tagged
with a new request id (context ``reverts`` / ``restores``), and print that id.

Exit codes (cdc/exit_codes.py): 0 done; 8 (refused) conflicts (later changes to the same
columns) stop a revert unless ``--force``, or a statement did not change the rows it should
have, or a value to write is held only as a redaction placeholder (``--keep-redacted`` leaves
such columns as they are); 6 bad input; 7 an unknown request, table, row or version; 9 a server
could not be reached or refused the SQL. Errors are one ``error: ...`` message on stderr, never a traceback.
"""

from __future__ import annotations

import getpass
from collections.abc import Sequence
from typing import Any

import click
import psycopg

from cdc.cli_errors import CdcCommand, boundary, connection_options, load
from cdc.cli_readers import open_store, parse_time
from cdc.config import redact_dsn
from cdc.errors import CdcError, SourceUnavailableError, UnavailableError, UsageError
from cdc.query import key_from_text
from cdc.render import align, format_value, json_text
from cdc.undo import (
    RevertConflictError,
    RevertPlan,
    apply_plan,
    plan_restore,
    plan_revert,
    script_text,
)

__all__ = ["restore", "revert"]

FORMATS = ("sql", "json")


def _refused(text: str) -> CdcError:
    return UnavailableError(f"the source refused the SQL: {text}")


def open_source(source_dsn: str | None, config_path: str | None) -> psycopg.Connection[Any]:
    """An autocommit connection to the source from the option, else the environment, else the
    config file (:func:`~cdc.cli_errors.load`)."""
    dsn = load(config_path, source=source_dsn).require_source()
    try:
        return psycopg.connect(dsn, autocommit=True, connect_timeout=10, application_name="cdc-undo")
    except psycopg.Error as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceUnavailableError(
            f"cannot connect to the source ({redact_dsn(dsn)}): {redact_dsn(text)}",
            hint="check --source / CDC_SOURCE_DSN / source.dsn and that the server is up",
        ) from None


def undo_options(func: Any) -> Any:
    options = [
        connection_options(source=True, store=True, schema=True),
        click.option("--apply", "apply", is_flag=True,
                     help="Run the SQL on the source in one transaction, as a new request; print its id."),
        click.option("--actor", metavar="NAME",
                     help="Actor of the applying request (default: cdc:<os user>)."),
        click.option("--request-id", "new_request_id", metavar="ID",
                     help="Request id of the applying request (default: a fresh one)."),
        click.option("--format", "fmt", type=click.Choice(FORMATS), default="sql", show_default=True,
                     help="sql: a psql script; json: the plan, conflicts and diff."),
        click.option("--keep-redacted", "keep_redacted", is_flag=True,
                     help="Leave columns under a redaction policy (hash, mask, exclude) as they are now "
                          "instead of refusing to write their stored placeholders."),
    ]  # fmt: skip
    for option in reversed(options):
        func = option(func)
    return func


def _configured_policies(config_path: str | None) -> dict[str, dict[str, str]]:
    """The ``columns`` policies of the configuration (the stored schema records them too)."""
    config = load(config_path)
    return {table: dict(columns) for table, columns in config.columns.items()}


def _default_actor() -> str:
    try:
        return f"cdc:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name for this uid (containers)
        return "cdc"


def _emit_plan(plan: RevertPlan, fmt: str, header: Sequence[str], applied: str | None) -> None:
    if fmt == "json":
        data = plan.to_json()
        data["applied_request_id"] = applied
        click.echo(json_text(data).rstrip("\n"))
        return
    for note in plan.notes:
        click.echo(f"-- note: {note}")
    if plan.statements:
        click.echo(script_text(plan, header=header).rstrip("\n"))
    if applied is not None:
        click.echo(f"-- applied as request {applied}")


def _warn_conflicts(plan: RevertPlan) -> None:
    click.echo(f"warning: {len(plan.conflicts)} conflict(s), forced:", err=True)
    for conflict in plan.conflicts:
        click.echo(f"  - {conflict.describe()}", err=True)


# ============================================================================ cdc revert


@click.command(cls=CdcCommand)
@click.argument("request_id", metavar="REQ")
@click.option("--force", is_flag=True, help="Plan (and apply) even when later changes conflict.")
@undo_options
def revert(
    *,
    request_id: str,
    force: bool,
    source_dsn: str | None,
    store_dsn: str | None,
    config_path: str | None,
    store_schema: str | None,
    apply: bool,
    actor: str | None,
    new_request_id: str | None,
    fmt: str,
    keep_redacted: bool,
) -> None:
    """Print (or --apply) the SQL that undoes the committed changes of request REQ.

    \b
    Inverse statements, newest change first, rows named by their key. Stops with exit code 8
    and the list of conflicts when a later request changed the same columns of the same rows
    (or the rows differ on the source now), unless --force.

    \b
    Refuses (exit code 8) to write the stored placeholder of a redacted column (hash, mask,
    exclude) into the source, unless --keep-redacted leaves those columns as they are.
    \b
      cdc revert 550e8400                 # the plan, as a psql script
      cdc revert 550e8400 --apply         # run it; prints the new request id
      cdc revert 550e8400 --apply --force
    """
    with boundary(_refused):
        store = open_store(store_dsn, config_path, store_schema)
        with store, open_source(source_dsn, config_path) as source:
            plan = plan_revert(
                store,
                source,
                request_id,
                keep_redacted=keep_redacted,
                policies=_configured_policies(config_path),
            )
            if plan.conflicts and not force:
                if fmt == "json":  # the conflicts for scripts on stdout; the error on stderr
                    _emit_plan(plan, fmt, (), None)
                raise RevertConflictError(plan.conflicts)
            if plan.conflicts:
                _warn_conflicts(plan)
            header = [
                f"revert of request {plan.context_value}: {len(plan.statements)} statement(s), "
                "newest change first"
            ]
            applied = None
            if apply and plan.statements:
                applied = apply_plan(
                    source, plan, request_id=new_request_id, actor=actor or _default_actor(), force=force
                )
            _emit_plan(plan, fmt, header, applied)


# ============================================================================ cdc restore


@click.command(cls=CdcCommand)
@click.argument("table")
@click.option(
    "--id", "key_text", metavar="ID", required=True, help="""The row's key: 42, abc, or '{"a":1}'."""
)
@click.option("--version", "version_text", metavar="V", help="The version to go back to: X/Y or an integer.")
@click.option("--at", "at_text", metavar="TIME", help="Or a time: ISO 8601, or a duration ago such as 1h.")
@click.option("--utc", is_flag=True, help="Read a naive --at time as UTC, not local time.")
@click.option("--force", is_flag=True, help="Apply even if the row changed since the plan was made.")
@undo_options
def restore(
    *,
    table: str,
    key_text: str,
    version_text: str | None,
    at_text: str | None,
    utc: bool,
    force: bool,
    source_dsn: str | None,
    store_dsn: str | None,
    config_path: str | None,
    store_schema: str | None,
    apply: bool,
    actor: str | None,
    new_request_id: str | None,
    fmt: str,
    keep_redacted: bool,
) -> None:
    """Print (or --apply) the SQL that puts one row back to its state at a version.

    \b
    An INSERT, an UPDATE of the differing columns, or a DELETE; the diff is shown first.
      cdc restore users --id 42 --version 0/16B3748
      cdc restore users --id 42 --at 2026-03-10T14:00 --apply
    """
    with boundary(_refused):
        if (version_text is None) == (at_text is None):
            raise UsageError("give exactly one of --version V or --at TIME")
        when = parse_time(at_text, utc=utc) if at_text is not None else None
        store = open_store(store_dsn, config_path, store_schema)
        with store, open_source(source_dsn, config_path) as source:
            plan = plan_restore(
                store,
                source,
                table,
                key_from_text(key_text),
                version=version_text,
                at=when,
                keep_redacted=keep_redacted,
                policies=_configured_policies(config_path),
            )
            if fmt != "json":
                for line in _diff_lines(plan):
                    click.echo(line)
            applied = None
            if apply and plan.statements:
                applied = apply_plan(
                    source, plan, request_id=new_request_id, actor=actor or _default_actor(), force=force
                )
            _emit_plan(plan, fmt, [f"restore of {plan.context_value}"], applied)


def _diff_lines(plan: RevertPlan) -> list[str]:
    if not plan.diff:
        return []
    target = plan.context_value.rsplit(" @ ", 1)[-1]
    rows = [["column", "now", f"at {target}"]]
    for d in plan.diff:
        rows.append(
            [
                d.column,
                format_value(d.current) if d.current_present else "(absent)",
                format_value(d.target) if d.target_present else "(absent)",
            ]
        )
    return [f"-- diff of {plan.context_value}", *(f"--{line}" for line in align(rows, gaps=(2, 2)))]
