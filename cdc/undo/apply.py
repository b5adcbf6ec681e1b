"""Applying an undo plan in one transaction on the source, with the rows checked again."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.pq import TransactionStatus

from cdc import client
from cdc.errors import UsageError
from cdc.undo.model import (
    Conflict,
    RevertApplyError,
    RevertConflictError,
    RevertPlan,
)
from cdc.undo.plan import (
    _current_state,
    _merge,
)
from cdc.undo.source import (
    _set_output_settings,
    _Source,
)

# ============================================================================ apply


def apply_plan(
    source_conn: psycopg.Connection[Any],
    plan: RevertPlan,
    *,
    request_id: str | None = None,
    actor: str | None = None,
    force: bool = False,
) -> str:
    """Run the plan in one transaction on the source, as a new request; return its id.

    The transaction is tagged with ``cdc.client.request(conn, request_id, actor=actor,
    reverts=...)`` (``restores=...`` for a restore), so the undo has its own history. Unless
    ``force``: a plan with conflicts raises :class:`RevertConflictError` (nothing is run), and
    the rows are locked and checked again first. Every statement must change exactly the
    rows it should, else :class:`RevertApplyError`; on any error the transaction rolls back.
    ``source_conn`` must not be inside a transaction.
    """
    if plan.conflicts and not force:
        raise RevertConflictError(plan.conflicts, what=plan.kind)
    if not plan.statements:
        raise UsageError(f"nothing to apply: the {plan.kind} plan has no statements")
    if source_conn.info.transaction_status != TransactionStatus.IDLE:
        raise UsageError(f"apply_plan runs its own transaction: the connection is inside one ({plan.kind})")
    rid = request_id or client.new_request_id()
    was_autocommit = source_conn.autocommit
    source_conn.autocommit = True  # request() then owns the transaction: committed or rolled back as a whole
    try:
        with client.request(source_conn, rid, actor=actor, **{plan.context_key: plan.context_value}):
            _set_output_settings(source_conn)
            if not force:
                source = _Source(source_conn)
                found: list[Conflict] = []
                for expectation in plan.expectations:
                    found.extend(
                        _current_state(
                            source,
                            source.table(expectation.table, expectation.relation_oid),
                            expectation,
                            lock=True,
                        )
                    )
                if found:
                    raise RevertConflictError(_merge(found), what=plan.kind)
            expected = plan.expected_rows or [(1,)] * len(plan.statements)
            for index, (statement, rows) in enumerate(zip(plan.statements, expected, strict=True), 1):
                cur = source_conn.execute(statement)
                changed = (cur.rowcount,) if len(rows) == 1 else tuple(int(n) for n in cur.fetchone() or ())
                if changed != rows:
                    shown = ", ".join(map(str, changed))
                    raise RevertApplyError(
                        f"statement {index} of {len(plan.statements)} changed {shown} row(s), "
                        f"expected {', '.join(map(str, rows))}: nothing was applied "
                        f"({statement.as_string(source_conn)[:200]})",
                        hint="the rows changed since the plan was made; plan again",
                    )
    finally:
        if not source_conn.closed and source_conn.info.transaction_status == TransactionStatus.IDLE:
            source_conn.autocommit = was_autocommit
    return rid
