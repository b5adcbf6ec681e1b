"""Sensitive columns: excluded, hashed or masked before anything reaches the store.

The capture core applies each column's policy (cdc/capture/registry.py reads them from the
``columns`` config section) to every image, at capture and in the baseline, so the clear value
is never written anywhere in the store: ``exclude`` → null, ``mask`` → ``MASK``, ``hash`` →
``hash_text`` of the value's text. Key columns cannot carry a policy: they name the row. Pure
functions.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

MASK = "****"


def hash_value(value: Any) -> str:
    """A stable digest of a stored value (same value, same digest; equality still visible)."""
    return "sha256:" + hashlib.sha256(orjson.dumps(value)).hexdigest()


def hash_text(raw: bytes) -> str:
    """``hash_value`` of a column's text as the capture core has it (its ``hash_value``)."""
    return hash_value(raw.decode())
