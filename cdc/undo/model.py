"""Undo plans and their errors (cdc/undo/__init__.py has the overview)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from psycopg import sql

from cdc.errors import RefusedError
from cdc.lsn import format_lsn
from cdc.query import Row, format_key

#: The session settings under which the stored text forms were produced (and parse back
#: exactly): the capture daemon's output settings (cdc/stream/replication.py).
OUTPUT_SETTINGS: Final[Mapping[str, str]] = {
    "DateStyle": "ISO, MDY",
    "IntervalStyle": "postgres",
    "extra_float_digits": "1",
    "bytea_output": "hex",
    "TimeZone": "UTC",
}

_MAX_CONFLICTS_IN_MESSAGE: Final = 20
_LOG_PAGE: Final = 200


# ============================================================================ results


@dataclass(frozen=True)
class Conflict:
    """Why a revert would clobber something: a column of a row changed after the request."""

    table: str
    key: Row
    column: str | None  # None: the whole row (it appeared, disappeared or was truncated)
    request_id: str | None  # the request that changed it later (None: unknown / not captured yet)
    version: int | None  # the version of that change (None: seen on the source, not in the history)
    reason: str

    def describe(self) -> str:
        what = f"{self.table} {format_key(self.key)}" + (f" column {self.column}" if self.column else "")
        by = []
        if self.request_id:
            by.append(f"request {self.request_id}")
        if self.version is not None:
            by.append(f"version {format_lsn(self.version)}")
        return f"{what}: {self.reason}" + (f" (by {', '.join(by)})" if by else "")

    def to_json(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "key": self.key,
            "column": self.column,
            "request_id": self.request_id,
            "version": self.version,
            "version_lsn": format_lsn(self.version) if self.version is not None else None,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class ColumnDiff:
    """One column of a restore: its value now on the source and at the target version."""

    column: str
    current: Any
    target: Any
    current_present: bool = True  # False: the row (or the column) does not exist now
    target_present: bool = True  # False: the row (or the column) did not exist at the version

    def to_json(self) -> dict[str, Any]:
        return {
            "column": self.column,
            "current": self.current if self.current_present else None,
            "target": self.target if self.target_present else None,
            "current_present": self.current_present,
            "target_present": self.target_present,
        }


@dataclass(frozen=True)
class RowExpectation:
    """The state a row must be in when the plan is applied (checked unless forced).

    ``image`` holds the columns to compare (None: the row must be absent); ``keyless`` rows
    are matched by the whole image and only their presence is checked.
    """

    table: str
    key: Row
    image: Row | None
    keyless: bool = False
    relation_oid: int = 0  # the source relation the history knows the table as


@dataclass(frozen=True)
class RevertPlan:
    """The statements of a revert or restore, their SQL text, and what stands in their way."""

    statements: list[sql.Composed]
    sql_text: str
    conflicts: list[Conflict]
    kind: Literal["revert", "restore"] = "revert"
    context_key: str = "reverts"  # the extra context key of the applying request
    context_value: str = ""  # the request reverted, or "table key @ version" restored
    #: rows each statement must change (several numbers: a statement grouping inverses, see below)
    expected_rows: list[tuple[int, ...]] = field(default_factory=list)
    expectations: list[RowExpectation] = field(default_factory=list)
    diff: list[ColumnDiff] = field(default_factory=list)  # restore: current vs target
    notes: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.statements

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "target": self.context_value,
            "sql": self.sql_text,
            "statements": len(self.statements),
            "conflicts": [c.to_json() for c in self.conflicts],
            "diff": [d.to_json() for d in self.diff],
            "notes": list(self.notes),
        }


class RevertConflictError(RefusedError):
    """Later changes stand in the way of a revert; ``conflicts`` lists them."""

    def __init__(self, conflicts: Sequence[Conflict], *, what: str = "revert") -> None:
        self.conflicts = list(conflicts)
        shown = [c.describe() for c in self.conflicts[:_MAX_CONFLICTS_IN_MESSAGE]]
        more = len(self.conflicts) - len(shown)
        text = f"{len(self.conflicts)} conflict(s) stop the {what}:\n" + "\n".join(f"  - {s}" for s in shown)
        if more > 0:
            text += f"\n  ... and {more} more"
        super().__init__(text, hint="review them; --force (force=True) applies anyway")


class RedactedValuesError(RefusedError):
    """A plan would write redaction placeholders (or nothing, for an excluded column) where the
    source has real values. ``columns``: table -> column -> why."""

    def __init__(
        self, what: str, columns: Mapping[str, Mapping[str, str]], *, required: bool = False
    ) -> None:
        self.columns = {t: dict(c) for t, c in columns.items()}
        listed = "; ".join(
            f"{table}: " + ", ".join(f"{c} ({why})" for c, why in sorted(cols.items()))
            for table, cols in sorted(self.columns.items())
        )
        if required:
            super().__init__(
                f"the {what} cannot leave these columns out: they are NOT NULL without a default, and the "
                f"history holds no value for them (redacted at capture): {listed}",
                hint="restore these values by hand, or give the columns a default",
            )
        else:
            super().__init__(
                f"the {what} would write redaction placeholders into the source instead of the values they "
                f"stand for: {listed}",
                hint="--keep-redacted (keep_redacted=True) leaves these columns as they are now "
                "(a re-inserted row gets their default)",
            )


class RevertApplyError(RefusedError):
    """A statement of the plan did not change the rows it should have: nothing was applied."""
