"""Sensitive columns: excluded, hashed or masked before anything reaches the store.

Applied to every image of a mutation (before, after) and to its changed-column list,
at capture and in the baseline, so the clear value is never written anywhere in the
store. Key columns cannot carry a policy: they name the row. Pure functions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import orjson

from cdc.assembler import Mutation, TableSchema
from cdc.errors import ConfigError

MASK = "****"


def hash_value(value: Any) -> str:
    """A stable digest of a stored value (same value, same digest; equality still visible)."""
    return "sha256:" + hashlib.sha256(orjson.dumps(value)).hexdigest()


def hash_text(raw: bytes) -> str:
    """``hash_value`` of a column's text as the capture core has it (its ``hash_value``)."""
    return hash_value(raw.decode())


class ColumnPolicies:
    """Per-table column policies from the ``columns`` config section."""

    def __init__(self, tables: Mapping[str, Mapping[str, str]]) -> None:
        # Config keys are "schema.name" with quotes only where needed; images use raw names.
        self._tables = {
            _plain(table): {_plain_column(c): p for c, p in cols.items()} for table, cols in tables.items()
        }
        self._checked: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self._tables)

    def for_table(self, table: str) -> dict[str, str]:
        return self._tables.get(table, {})

    def check(self, schema: TableSchema) -> None:
        """Refuse a policy on a key column (the key is stored in clear to name the row)."""
        if schema.fingerprint in self._checked:
            return
        policies = self.for_table(schema.table)
        bad = [
            c
            for c in policies
            if c in schema.key_columns or (not schema.key_columns and c in schema.column_names)
        ]
        if bad:
            raise ConfigError(
                [
                    f"columns.{schema.table}.{c}: a key column cannot be {policies[c]}ed (it names the row)"
                    for c in bad
                ]
            )
        self._checked.add(schema.fingerprint)

    def apply(self, mutation: Mutation) -> None:
        policies = self._tables.get(mutation.table)
        if not policies:
            return
        if mutation.schema is not None:
            self.check(mutation.schema)
        mutation.before = _apply_image(mutation.before, policies)
        mutation.after = _apply_image(mutation.after, policies)
        if mutation.changed is not None:
            mutation.changed = [c for c in mutation.changed if policies.get(c) != "exclude"]
        # Columns still to be filled from the store come back already protected there.
        if isinstance(mutation.fill_before, tuple):
            mutation.fill_before = tuple(c for c in mutation.fill_before if policies.get(c) != "exclude")
        mutation.fill_after = tuple(c for c in mutation.fill_after if policies.get(c) != "exclude")


def _apply_image(image: dict[str, Any] | None, policies: Mapping[str, str]) -> dict[str, Any] | None:
    if image is None:
        return None
    # A new dict: the assembler keeps the raw image to fill later changes of the row.
    protected = dict(image)
    for column, policy in policies.items():
        if column not in protected:
            continue
        if policy == "exclude":
            del protected[column]
        elif protected[column] is not None:
            protected[column] = hash_value(protected[column]) if policy == "hash" else MASK
    return protected


def _plain(table: str) -> str:
    from cdc.config import normalize_table

    schema, name = normalize_table(table)
    return f"{schema}.{name}"


def _plain_column(column: str) -> str:
    if len(column) >= 2 and column.startswith('"') and column.endswith('"'):
        return column[1:-1].replace('""', '"')
    return column
