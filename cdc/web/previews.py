"""Undo previews of ``cdc serve``: what ``cdc revert REQ`` and ``cdc restore TABLE --id ID --version V``
would run, built by :mod:`cdc.undo` (the same plans), never applied from the server.

A preview reads the history store and the source's current rows over a connection of its own
(``source_dsn``: read-only transactions, always rolled back, a 15 s statement timeout). Without
a source DSN, or when the source cannot be reached, it says so instead.

Redaction holds on every preview: a plan never writes a redaction placeholder (it refuses:
:class:`~cdc.undo.RedactedValuesError`; the preview then also shows the ``--keep-redacted`` plan,
which leaves those columns as they are), and the restore diff never shows a value of a column
under a policy (hash, mask, exclude): neither the stored placeholder as if it were a value nor
the source's current value in clear.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from starlette.requests import Request

from cdc.config import redact_dsn
from cdc.errors import CdcError, NotFoundError, RefusedError, SourceUnavailableError, UsageError
from cdc.lsn import format_lsn
from cdc.query import Key, Store, TableInfo, format_key
from cdc.render import short_table
from cdc.undo import RedactedValuesError, RevertPlan, plan_restore, plan_revert, script_text
from cdc.web.args import allow_params, parse_key, parse_version, parse_when, query_text, resolve_version
from cdc.web.base import SourceNotConfiguredError, WebContext
from cdc.web.openapi import RESTORE_PARAMS, REVERT_PARAMS, query_names

__all__ = [
    "UndoPreview",
    "restore_api",
    "restore_args",
    "restore_command",
    "restore_preview",
    "restore_target",
    "revert_api",
    "revert_command",
    "revert_preview",
    "source_connection",
]

SOURCE_STATEMENT_TIMEOUT = "15s"
POLICY_TEXT = {"hash": "hashed", "mask": "masked", "exclude": "excluded"}


@dataclass
class UndoPreview:
    """A plan as shown: its script, conflicts, notes, a refusal, and the command that applies it."""

    kind: str  # revert | restore
    target: str  # the request id, or "table key @ version"
    command: str  # the cdc command that prints (with --apply: runs) this plan
    sql: str | None = None  # the psql script; None: nothing to run (refused or empty)
    statements: int = 0
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    diff: list[dict[str, Any]] = field(default_factory=list)
    refusal: dict[str, Any] | None = None  # why the plan as asked refuses (message, hint, columns)
    keep_redacted: bool = False  # the script shown is the --keep-redacted plan

    @property
    def apply_command(self) -> str | None:
        """The command that applies it (None when nothing can be applied)."""
        if self.sql is None:
            return None
        flags = [" --apply"]
        if self.keep_redacted:
            flags.append(" --keep-redacted")
        if self.conflicts:
            flags.append(" --force")
        return self.command + "".join(flags)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "target": self.target,
            "sql": self.sql,
            "statements": self.statements,
            "conflicts": self.conflicts,
            "notes": self.notes,
            "diff": self.diff,
            "refusal": self.refusal,
            "keep_redacted": self.keep_redacted,
            "command": self.command,
            "apply_command": self.apply_command,
        }


@contextmanager
def source_connection(ctx: WebContext) -> Iterator[psycopg.Connection[Any]]:
    """A read-only connection to the source (:class:`SourceNotConfiguredError` without a DSN)."""
    if ctx.source_dsn is None:
        raise SourceNotConfiguredError()
    try:
        conn = psycopg.connect(
            ctx.source_dsn, autocommit=True, connect_timeout=10, application_name="cdc-serve-preview"
        )
    except psycopg.Error as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceUnavailableError(f"cannot connect to the source: {redact_dsn(text)}") from None
    try:
        conn.execute("SET default_transaction_read_only = on")
        conn.execute(
            "SELECT pg_catalog.set_config('statement_timeout', %s, false)", [SOURCE_STATEMENT_TIMEOUT]
        )
        yield conn
    except psycopg.Error as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceUnavailableError(f"the source refused the preview's reads: {redact_dsn(text)}") from None
    finally:
        conn.close()


def _refusal(exc: CdcError) -> dict[str, Any]:
    refusal: dict[str, Any] = {"message": exc.message, "hint": exc.hint, "columns": None}
    if isinstance(exc, RedactedValuesError):
        refusal["columns"] = exc.columns
    return refusal


def _shown(preview: UndoPreview, plan: RevertPlan, header: list[str]) -> None:
    preview.statements = len(plan.statements)
    preview.sql = script_text(plan, header=header) if plan.statements else None
    preview.conflicts = [c.to_json() for c in plan.conflicts]
    preview.notes = list(plan.notes)


def revert_command(request_id: str) -> str:
    return f"cdc revert {shlex.quote(request_id)}"


def restore_command(info: TableInfo, key_text: str, version: int) -> str:
    return (
        f"cdc restore {shlex.quote(short_table(info.current_name))} --id {shlex.quote(key_text)} "
        f"--version {format_lsn(version)}"
    )


def revert_preview(store: Store, ctx: WebContext, request_id: str) -> UndoPreview:
    """The revert plan of ``request_id`` (a full id or a unique prefix), as ``cdc revert`` prints it."""
    full = store.resolve_request(request_id)
    preview = UndoPreview("revert", full, revert_command(full))
    with source_connection(ctx) as source:
        try:
            plan = _plan(
                lambda keep: plan_revert(store, source, full, keep_redacted=keep, policies=ctx.policies),
                preview,
            )
        except (RefusedError, UsageError) as exc:  # what the plan itself refuses (the target exists)
            preview.refusal = _refusal(exc)
            return preview
    if plan is not None:
        header = [f"revert of request {full}: {len(plan.statements)} statement(s), newest change first"]
        _shown(preview, plan, header)
    return preview


def _plan(make: Any, preview: UndoPreview) -> RevertPlan | None:
    """The plan as asked; refused for redacted columns: the refusal and the --keep-redacted plan."""
    try:
        plan: RevertPlan = make(False)
    except RedactedValuesError as exc:
        preview.refusal = _refusal(exc)
        try:
            plan = make(True)
        except RedactedValuesError as required:  # NOT NULL without a default: no plan at all
            preview.refusal = _refusal(required)
            return None
        preview.keep_redacted = True
    return plan


def restore_preview(
    store: Store, ctx: WebContext, info: TableInfo, key: Mapping[str, Any], key_text: str, version: int
) -> UndoPreview:
    """The restore plan of one row to ``version``, as ``cdc restore`` prints it; its diff redacted."""
    target = f"{info.current_name} {format_key(dict(key))} @ {format_lsn(version)}"
    preview = UndoPreview("restore", target, restore_command(info, key_text, version))
    with source_connection(ctx) as source:
        try:
            plan = _plan(
                lambda keep: plan_restore(
                    store, source, info.current_name, dict(key), version=version, keep_redacted=keep,
                    policies=ctx.policies,
                ),
                preview,
            )  # fmt: skip
        except (RefusedError, UsageError) as exc:  # what the plan itself refuses (the target exists)
            preview.refusal = _refusal(exc)
            return preview
    if plan is not None:
        preview.target = plan.context_value
        _shown(preview, plan, [f"restore of {plan.context_value}"])
        policies = store.column_policies(info, ctx.policies)
        preview.diff = [_redacted_diff(d.to_json(), policies.get(d.column)) for d in plan.diff]
    return preview


def _redacted_diff(entry: dict[str, Any], policy: str | None) -> dict[str, Any]:
    """A diff entry; under a column policy neither side's value is shown (``redacted`` says why)."""
    entry["redacted"] = policy
    if policy is not None:
        entry["current"] = None
        entry["target"] = None
    return entry


# ============================================================================ the API


async def revert_api(request: Request, ctx: WebContext, request_id: str) -> dict[str, Any]:
    """``GET /api/v1/requests/{request_id}/revert``."""
    allow_params(request, *query_names(REVERT_PARAMS))
    return await ctx.run(lambda store: revert_preview(store, ctx, request_id).to_json())


def restore_args(request: Request, key_text: str) -> tuple[Key, int | None, datetime | None]:
    """The row's key and the version (or time) to restore it to, from a restore URL."""
    allow_params(request, *query_names(RESTORE_PARAMS))
    key = parse_key(key_text)
    version_text, at_text = query_text(request, "version", 64), query_text(request, "at", 64)
    if (version_text is None) == (at_text is None):
        raise UsageError("give the version to restore the row to: version=V or at=TIME")
    version = parse_version(version_text) if version_text is not None else None
    return key, version, parse_when(at_text, "at") if at_text is not None else None


def restore_target(
    store: Store, table: str, key: Key, version: int | None, at: datetime | None
) -> tuple[TableInfo, dict[str, Any], int]:
    """The table (by its current name), the stored key and the exact version to restore to."""
    info = store.table(table)
    stored = store.stored_key(info, key)
    resolved, exact = resolve_version(store, version, at)
    if resolved is None or not exact:
        floor = store.earliest_version()
        raise NotFoundError(
            "no version to restore to there: it is below the history floor "
            f"{format_lsn(floor or 0)} (pruned, or before capture), or nothing was stored by then"
        )
    if not store.has_history(info, stored):
        raise NotFoundError(f"no history for {info.name} {format_key(stored)}")
    return info, stored, resolved


async def restore_api(request: Request, ctx: WebContext, table: str, key_text: str) -> dict[str, Any]:
    """``GET /api/v1/tables/{table}/rows/{key}/restore?version=V|at=T``."""
    key, version, at = restore_args(request, key_text)

    def work(store: Store) -> dict[str, Any]:
        info, stored, resolved = restore_target(store, table, key, version, at)
        return restore_preview(store, ctx, info, stored, key_text, resolved).to_json()

    return await ctx.run(work)
