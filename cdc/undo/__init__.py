"""Undo: the SQL that reverts a request's committed changes, or restores one row to a past version.

::

    from cdc.query import Store
    from cdc.undo import apply_plan, plan_restore, plan_revert

    store = Store(store_dsn)
    with psycopg.connect(source_dsn, autocommit=True) as source:
        plan = plan_revert(store, source, "550e8400")
        print(plan.sql_text)                 # the inverse statements, newest change first
        if not plan.conflicts:
            new_id = apply_plan(source, plan, actor="ops")   # tagged reverts=550e8400

        plan = plan_restore(store, source, "users", 42, version=before)
        apply_plan(source, plan)             # tagged restores="public.users id=42 @ 0/16B3748"

**Revert** reads the request's committed mutations from the history store (rolled-back
attempts are ignored) and builds, newest first, the inverse of each: an INSERT becomes a
DELETE of that row, a DELETE an INSERT of the before image, an UPDATE an UPDATE setting the
changed columns back to their before values, found by the key after the update (so a
key-changing UPDATE moves the row back). Replaying the inverses in reverse order walks the
rows back through the same intermediate states, so unique keys never collide on the way.
Rows are named by their key; a table without a key by the ``ctid`` of one row equal to the
image. Tables are the captured relations by identity: the SQL names each by its current schema
and name (identifiers, never a dotted string), found on the source by the relation's oid, and
the plan refuses a table that was dropped, or whose oid on the source now carries another name
than the history knows (a look-alike is never written to). A table renamed after the request
is reverted under its current name.

Values are literals of the stored text with an explicit cast to the column's current type
on the source (``'12.50'::numeric(10,2)``), rendered by psycopg (quotes and backslashes
escaped). The text forms are the server's output under the capture daemon's output
settings, which :func:`apply_plan` sets for its transaction (the printed script does the
same with ``SET LOCAL``).

**Conflicts** stop a revert (unless forced): a later committed mutation of another request on
the same row that touched the same columns (per the history store), or a current row on the
source that differs, in the columns the request touched, from the state the request left
(this also catches changes the daemon has not captured yet). :func:`apply_plan` checks the
rows again inside its transaction, with the rows locked, and requires every statement to
change exactly the expected number of rows: anything else rolls the whole revert back.

**Restore** makes the current row equal to its state at a version (``Store.row_at``): an
INSERT, an UPDATE of the differing columns, or a DELETE. It reports the diff; it has no
conflicts (it is explicit), but it refuses to apply if the row changed since the plan.

**Redacted columns** (``columns:`` policies hash, mask, exclude) are stored as placeholders
(``hmac-sha256:...``, ``****``, and null for an excluded column; history migrated from format 1
left it out): neither plan ever writes one into the source.
Which columns they are is read from the stored schema (capture records each column's policy)
and the current configuration. A plan that would write a placeholder, or re-insert a row
without an excluded column, raises :class:`RedactedValuesError` naming the table and columns,
unless ``keep_redacted``: those columns are then left out (an UPDATE leaves them as they are
now, an INSERT gives them their default), except a NOT NULL column without a default, which
still refuses. A restore updating an existing row leaves its excluded columns as they are.
Redacted columns are not compared in the conflict checks (the store has no value to compare).

The package: ``model`` (plans, conflicts, errors), ``source`` (the source's tables and the SQL
of the inverse statements), ``redactions`` (columns under a redaction policy), ``plan``
(:func:`plan_revert`, :func:`plan_restore`) and ``apply`` (:func:`apply_plan`).
"""

from __future__ import annotations

from cdc.undo.apply import apply_plan
from cdc.undo.model import (
    OUTPUT_SETTINGS,
    ColumnDiff,
    Conflict,
    RedactedValuesError,
    RevertApplyError,
    RevertConflictError,
    RevertPlan,
    RowExpectation,
)
from cdc.undo.plan import plan_restore, plan_revert
from cdc.undo.source import script_text

__all__ = [
    "OUTPUT_SETTINGS",
    "ColumnDiff",
    "Conflict",
    "RedactedValuesError",
    "RevertApplyError",
    "RevertConflictError",
    "RevertPlan",
    "RowExpectation",
    "apply_plan",
    "plan_restore",
    "plan_revert",
    "script_text",
]
