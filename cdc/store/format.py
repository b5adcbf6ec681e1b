"""The codes and flags of store format 2, declared once (docs/store.md, sql/store.sql).

Every writer and reader of the store takes them from here: the op and status letters of
``changes.op`` / ``transactions.status``, the bits of ``changes.flags`` and
``transactions.flags``, and the marker of a value stored by reference.
"""

from __future__ import annotations

from enum import IntFlag
from typing import Any, Final

__all__ = [
    "FORMAT_VERSION",
    "OPS",
    "OP_CODES",
    "OP_NAMES",
    "OVERSIZE_MARKER",
    "ROW_OPS",
    "STATUSES",
    "STATUS_CODES",
    "STATUS_NAMES",
    "ChangeFlag",
    "TxnFlag",
    "is_oversize",
]

FORMAT_VERSION: Final = 2

#: ``changes.op`` letter → the op's name (the name readers show and export).
OP_NAMES: Final = {"I": "INSERT", "U": "UPDATE", "D": "DELETE", "T": "TRUNCATE", "S": "SNAPSHOT"}
OP_CODES: Final = {name: code for code, name in OP_NAMES.items()}
OPS: Final = tuple(OP_NAMES.values())
#: The ops after which a row exists with the change's image.
ROW_OPS: Final = ("INSERT", "UPDATE", "SNAPSHOT")

#: ``transactions.status`` letter → the status's name; a change's status is its ROLLED_BACK bit.
STATUS_NAMES: Final = {"c": "committed", "r": "rolled_back"}
STATUS_CODES: Final = {name: code for code, name in STATUS_NAMES.items()}
STATUSES: Final = tuple(STATUS_NAMES.values())


class ChangeFlag(IntFlag):
    """``changes.flags`` (docs/store.md "Change flags")."""

    ROLLED_BACK = 1  # a rolled-back attempt (aborted transaction or rolled-back savepoint)
    BEFORE_FROM_WAL = 2  # `before` holds the old row as the WAL sent it
    INCOMPLETE = 4  # some columns of the image are unknown: absent from it
    OVERSIZE = 8  # a value is stored by reference (OVERSIZE_MARKER)
    KEY_UNKNOWN = 16  # the key could not be read
    KEYFRAME = 256  # written by pruning: a row's image at the history floor, not a change


class TxnFlag(IntFlag):
    """``transactions.flags`` (docs/store.md "Transaction flags")."""

    STREAMED = 1  # decoded while in progress
    MAYBE_INCOMPLETE = 2  # rolled back, not shown decoded in progress: changes may be missing
    CONTEXT_REJECTED = 4  # a context message failed verification and was ignored


#: What every reader says of a MAYBE_INCOMPLETE attempt (docs/store.md "Transaction flags").
MAYBE_INCOMPLETE_NOTE: Final = "capture was behind; some attempted changes may be missing"


#: ``{"$cdc": "oversize", "bytes": n, "sha256": hex}``: a value over capture.max_value_bytes.
OVERSIZE_MARKER: Final = "oversize"


def is_oversize(value: Any) -> bool:
    """Whether an image value is the reference to an oversize value, not the value."""
    return isinstance(value, dict) and value.get("$cdc") == OVERSIZE_MARKER
