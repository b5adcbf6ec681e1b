"""The capture core in use: the compiled one (``cdc.capture._core``) when it was built and
``CDC_PURE_PYTHON`` is not set to 1, else the pure-Python one (``cdc.capture.core``).
Both have the same interface and give the same bytes (tests/unit/test_capture_core.py).
The compiled one's ``drain`` calls libpq's PQgetCopyData from C when it can vouch for the
connection (``cdc.capture.libpq``; ``Core.drain_path`` says which way it reads).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal

from cdc.capture.model import (
    ColumnDesc,
    Event,
    FinishedTransaction,
    Kind,
    LogicalMessage,
    Policy,
    RelationDesc,
    RelationInfo,
)

__all__ = [
    "IMPLEMENTATION",
    "ColumnDesc",
    "Core",
    "Event",
    "FinishedTransaction",
    "Kind",
    "LogicalMessage",
    "Policy",
    "RelationDesc",
    "RelationInfo",
]

IMPLEMENTATION: Literal["compiled", "python"]

if TYPE_CHECKING:
    from cdc.capture.core import Core
else:
    Core = None
    if os.environ.get("CDC_PURE_PYTHON", "").strip() != "1":
        try:
            from cdc.capture._core import Core
        except ImportError:
            Core = None
    if Core is None:
        from cdc.capture.core import Core

        IMPLEMENTATION = "python"
    else:
        IMPLEMENTATION = "compiled"
