"""Sensitive columns: excluded, hashed or masked before anything reaches the store.

The capture core applies each column's policy (cdc/capture/registry.py reads them from the
``columns`` config section) to every image, at capture and in the baseline, so the clear value
is never written anywhere in the store: ``exclude`` → null, ``mask`` → ``MASK``, ``hash`` →
the keyed digest of the value's text (:func:`text_hasher`, the core's ``hash_value``). Key
columns cannot carry a policy: they name the row. Pure functions: no I/O.

``hash`` is keyed: ``hmac-sha256:<key id>:<hex HMAC-SHA256 of the value's JSON>`` under
``policies.hash_key``, so equal values still compare equal under one key while a dictionary
of likely values (e-mail addresses) cannot reverse them without the key. The key id (first 8
hex digits of HMAC(key, "cdc key id")) says which key a stored digest was made with; it
reveals nothing about the key.

The policy of each column is also recorded in the schema the change is stored with
(``table_schemas.columns[*].policy``), so undo (cdc/undo/) knows which stored values are
placeholders: :func:`is_placeholder`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from typing import Any, Final

import orjson

from cdc.config import normalize_table

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


def text_hasher(key: bytes) -> Callable[[bytes], str]:
    """The capture core's ``hash_value``: :func:`hash_value` of a column's text (UTF-8 bytes,
    as the core has it) under ``key``. The HMAC's keyed state is computed once."""
    keyed = hmac.new(key, digestmod=hashlib.sha256)
    prefix = f"{HASH_PREFIX}{hash_key_id(key)}:"

    def hash_text(raw: bytes) -> str:
        mac = keyed.copy()
        mac.update(orjson.dumps(raw.decode()))
        return prefix + mac.hexdigest()

    return hash_text


def column_hasher(key: bytes | None) -> Callable[[bytes], str] | None:
    """:func:`text_hasher` of ``policies.hash_key``; None without a key (the configuration
    refuses a ``hash`` policy without one: cdc.config)."""
    return None if key is None else text_hasher(key)


def is_placeholder(policy: str | None, value: Any) -> bool:
    """Whether a stored ``value`` of a column under ``policy`` stands for a value it hides.

    NULL is stored as NULL under ``hash`` and ``mask`` (it is the value). An excluded column is
    stored as null: under ``exclude``, null is the placeholder (a real NULL cannot be told from
    it). A value that does not have the policy's form was stored while the policy did not apply:
    it is the clear value.
    """
    if policy == "exclude":
        return value is None
    if value is None or policy is None:
        return False
    if policy == "mask":
        return bool(value == MASK)
    if policy == "hash":
        return isinstance(value, str) and _PLACEHOLDER_HASH.fullmatch(value) is not None
    return False


def normalized_policies(tables: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, str]]:
    """The ``columns`` config section keyed as "schema.name" (raw names) -> raw column -> policy.

    (Config keys are "schema.name" with quotes only where needed.)"""
    return {_plain(table): {_plain_column(c): p for c, p in cols.items()} for table, cols in tables.items()}


def _plain(table: str) -> str:
    schema, name = normalize_table(table)
    return f"{schema}.{name}"


def _plain_column(column: str) -> str:
    if len(column) >= 2 and column.startswith('"') and column.endswith('"'):
        return column[1:-1].replace('""', '"')
    return column
