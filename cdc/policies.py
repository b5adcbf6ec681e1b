"""Sensitive columns: excluded, hashed or masked before anything reaches the store.

Applied to every image of a mutation (before, after) and to its changed-column list,
at capture and in the baseline, so the clear value is never written anywhere in the
store. Key columns cannot carry a policy: they name the row. Pure functions: no I/O.

``hash`` is keyed: ``hmac-sha256:<key id>:<hex HMAC-SHA256 of the value's JSON>`` under
``policies.hash_key``, so equal values still compare equal under one key while a dictionary
of likely values (e-mail addresses) cannot reverse them without the key. The key id (first 8
hex digits of HMAC(key, "cdc key id")) says which key a stored digest was made with; it
reveals nothing about the key.

The policy of each column is also recorded in the schema the mutation is stored with
(``table_schemas.columns[*].policy``), so undo (cdc/revert.py) knows which stored values are
placeholders: :func:`is_placeholder`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Final

import orjson

from cdc.assembler import Mutation, TableSchema
from cdc.errors import ConfigError

if TYPE_CHECKING:
    from cdc.config import Config

MASK: Final = "****"
HASH_PREFIX: Final = "hmac-sha256:"
POLICIES: Final = frozenset({"exclude", "hash", "mask"})

# A stored digest: keyed (now) or the bare SHA-256 written before keys existed.
_PLACEHOLDER_HASH = re.compile(r"hmac-sha256:[0-9a-f]{8}:[0-9a-f]{64}|sha256:[0-9a-f]{64}")


def hash_key_id(key: bytes) -> str:
    """The public name of a hash key: 8 hex digits of HMAC(key, "cdc key id")."""
    return hmac.new(key, b"cdc key id", hashlib.sha256).hexdigest()[:8]


def hash_value(value: Any, key: bytes) -> str:
    """The stored form of a hashed value: same value and key, same digest."""
    digest = hmac.new(key, orjson.dumps(value), hashlib.sha256).hexdigest()
    return f"{HASH_PREFIX}{hash_key_id(key)}:{digest}"


def is_placeholder(policy: str | None, value: Any) -> bool:
    """Whether a stored ``value`` of a column under ``policy`` stands for a value it hides.

    NULL is stored as NULL under every policy (it is the value). A value that does not have
    the policy's form was stored before the policy applied: it is the clear value.
    """
    if value is None or policy is None:
        return False
    if policy == "mask":
        return bool(value == MASK)
    if policy == "hash":
        return isinstance(value, str) and _PLACEHOLDER_HASH.fullmatch(value) is not None
    return False  # exclude: the column is absent from the image, never a value


def normalized_policies(tables: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, str]]:
    """The ``columns`` config section keyed as images are: "schema.name" -> raw column -> policy.

    (Config keys are "schema.name" with quotes only where needed.)"""
    return {_plain(table): {_plain_column(c): p for c, p in cols.items()} for table, cols in tables.items()}


class ColumnPolicies:
    """Per-table column policies from the ``columns`` config section."""

    def __init__(self, tables: Mapping[str, Mapping[str, str]], *, hash_key: bytes | None = None) -> None:
        self._tables = normalized_policies(tables)
        hashed = sorted(
            f"{t}.{c}" for t, cols in self._tables.items() for c, p in cols.items() if p == "hash"
        )
        if hashed and not hash_key:
            raise ConfigError([f"policies.hash_key: required by the hash policy of {', '.join(hashed)}"])
        self._key = hash_key or b""
        self._prefix = f"{HASH_PREFIX}{hash_key_id(self._key)}:" if hash_key else ""
        self._checked: set[str] = set()
        # schema fingerprint -> the same schema carrying its columns' policies
        self._annotated: dict[str, TableSchema] = {}

    @classmethod
    def from_config(cls, config: Config) -> ColumnPolicies:
        return cls(config.columns, hash_key=config.policies.hash_key_bytes())

    def __bool__(self) -> bool:
        return bool(self._tables)

    def for_table(self, table: str) -> dict[str, str]:
        return self._tables.get(table, {})

    def hash(self, value: Any) -> str:
        return self._prefix + hmac.new(self._key, orjson.dumps(value), hashlib.sha256).hexdigest()

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

    def annotate(self, schema: TableSchema) -> TableSchema:
        """``schema`` with its columns' policies recorded (a distinct stored schema version)."""
        found = self._annotated.get(schema.fingerprint)
        if found is not None:
            return found
        policies = self.for_table(schema.table)
        recorded = tuple((c, policies[c]) for c in schema.column_names if c in policies)
        if not recorded or schema.policies == recorded:
            found = schema
        else:
            digest = hashlib.sha256(
                orjson.dumps([schema.fingerprint, [list(p) for p in recorded]])
            ).hexdigest()[:32]
            found = replace(schema, policies=recorded, fingerprint=digest)
        if len(self._annotated) > 10_000:
            self._annotated.clear()
        self._annotated[schema.fingerprint] = found
        return found

    def apply(self, mutation: Mutation) -> None:
        policies = self._tables.get(mutation.table)
        if not policies:
            return
        if mutation.schema is not None:
            self.check(mutation.schema)
            mutation.schema = self.annotate(mutation.schema)
        mutation.before = self._apply_image(mutation.before, policies)
        mutation.after = self._apply_image(mutation.after, policies)
        if mutation.changed is not None:
            mutation.changed = [c for c in mutation.changed if policies.get(c) != "exclude"]
        # Columns still to be filled from the store come back already protected there.
        if isinstance(mutation.fill_before, tuple):
            mutation.fill_before = tuple(c for c in mutation.fill_before if policies.get(c) != "exclude")
        mutation.fill_after = tuple(c for c in mutation.fill_after if policies.get(c) != "exclude")

    def _apply_image(
        self, image: dict[str, Any] | None, policies: Mapping[str, str]
    ) -> dict[str, Any] | None:
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
                protected[column] = self.hash(protected[column]) if policy == "hash" else MASK
        return protected


def _plain(table: str) -> str:
    from cdc.config import normalize_table

    schema, name = normalize_table(table)
    return f"{schema}.{name}"


def _plain_column(column: str) -> str:
    if len(column) >= 2 and column.startswith('"') and column.endswith('"'):
        return column[1:-1].replace('""', '"')
    return column
