"""Undo (revert, restore): the implementation is the :mod:`cdc.undo` package; this module keeps
``from cdc.revert import plan_revert, ...`` working."""

from __future__ import annotations

from cdc.undo import (
    OUTPUT_SETTINGS,
    ColumnDiff,
    Conflict,
    RedactedValuesError,
    RevertApplyError,
    RevertConflictError,
    RevertPlan,
    RowExpectation,
    apply_plan,
    plan_restore,
    plan_revert,
    script_text,
)

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
