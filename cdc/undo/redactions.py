"""Undo and redacted columns: which stored values are placeholders of a column policy, and what
a plan does with them (refuse, or leave the column as it is with ``keep_redacted``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from cdc.names import parse_table
from cdc.policies import is_placeholder, normalized_policies
from cdc.query import Store, TableInfo
from cdc.undo.model import (
    RedactedValuesError,
)
from cdc.undo.source import (
    _Table,
)

# ============================================================================ redacted columns


class _Redactions:
    """Which values of a plan are placeholders of a redaction policy, and what becomes of them.

    A column's policy is the one capture recorded in the stored schema (``table_schemas``, any
    version of the table; the latest wins), else the configured one (``configured``: the
    ``columns`` config section, for history written before policies were recorded). Placeholders
    are recognised by their form too (:func:`cdc.policies.is_placeholder`): a hash or mask value
    stored before the policy applied is the clear value and may be written; an excluded column is
    stored as null (or, in history migrated from format 1, left out of the image).
    """

    def __init__(
        self,
        store: Store,
        configured: Mapping[str, Mapping[str, str]] | None,
        keep: bool,
        tables: Iterable[TableInfo],
    ) -> None:
        self.store = store
        self.configured = normalized_policies(configured or {})
        self.keep = keep
        self._ids: dict[str, int] = {}
        for info in tables:
            self._ids[info.name] = self._ids[info.current_name] = info.table_id
        self._policies: dict[str, dict[str, str]] = {}
        self.refused: dict[str, dict[str, str]] = {}
        self.required: dict[str, dict[str, str]] = {}
        self.kept: dict[str, set[str]] = {}

    def policies(self, table: str) -> dict[str, str]:
        found = self._policies.get(table)
        if found is None:
            schema, name = parse_table(table)
            recorded = self.store.recorded_policies(self._ids[table]) if table in self._ids else {}
            found = {**self.configured.get(f"{schema}.{name}", {}), **recorded}
            self._policies[table] = found
        return found

    def _hidden(self, table: _Table, values: Mapping[str, Any], *, whole_row: bool) -> dict[str, str]:
        policies = self.policies(table.name)
        hidden: dict[str, str] = {}
        for column, value in values.items():
            policy = policies.get(column)
            if is_placeholder(policy, value):
                hidden[column] = "exclude: never captured" if policy == "exclude" else str(policy)
        if whole_row:  # an INSERT: an excluded column left out would get its default, not its value
            for column, policy in policies.items():
                found = table.columns.get(column)
                if policy == "exclude" and column not in values and found is not None and not found.generated:
                    hidden[column] = "exclude: never captured"
        return hidden

    def values(self, table: _Table, values: Mapping[str, Any]) -> dict[str, Any]:
        """The SET list of an UPDATE, without placeholders (when keeping) or as it is (refused)."""
        hidden = self._hidden(table, values, whole_row=False)
        if not hidden:
            return dict(values)
        if not self.keep:
            self.refused.setdefault(table.name, {}).update(hidden)
            return dict(values)
        self.kept.setdefault(table.name, set()).update(hidden)
        return {c: v for c, v in values.items() if c not in hidden}

    def image(self, table: _Table, image: Mapping[str, Any]) -> dict[str, Any]:
        """The row an INSERT writes, without placeholders (when keeping) or as it is (refused)."""
        hidden = self._hidden(table, image, whole_row=True)
        if not hidden:
            return dict(image)
        if not self.keep:
            self.refused.setdefault(table.name, {}).update(hidden)
            return dict(image)
        required = {c: why for c, why in hidden.items() if c in table.columns and table.columns[c].required}
        if required:
            self.required.setdefault(table.name, {}).update(required)
        self.kept.setdefault(table.name, set()).update(hidden)
        return {c: v for c, v in image.items() if c not in hidden}

    def comparable(self, table: str, image: Mapping[str, Any]) -> dict[str, Any]:
        """``image`` without the columns whose stored value stands for another (never compared)."""
        policies = self.policies(table)
        return {c: v for c, v in image.items() if not is_placeholder(policies.get(c), v)}

    def unseen(self, table: str) -> list[str]:
        """Columns whose changes the history cannot show (excluded; masked, **** before and after)."""
        return sorted(c for c, p in self.policies(table).items() if p in ("exclude", "mask"))

    def check(self, what: str) -> None:
        if self.refused:
            raise RedactedValuesError(what, self.refused)
        if self.required:
            raise RedactedValuesError(what, self.required, required=True)

    def notes(self) -> list[str]:
        return [
            f"{table}: redacted column(s) {', '.join(sorted(cols))} left as they are on the source (--keep-redacted)"
            for table, cols in sorted(self.kept.items())
        ]
