"""Helpers of the capture core tests: both implementations, recorded streams, a registry stand-in."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from cdc.capture import core as python_core
from cdc.capture.model import (
    FinishedTransaction,
    Kind,
    LogicalMessage,
    Policy,
    RelationDesc,
    RelationInfo,
)
from cdc.errors import ProtocolError
from cdc.protocol import encode as wire

try:
    from cdc.capture import _core as compiled_core
except ImportError:  # not built: the compiled tests fail in CI, skip elsewhere
    compiled_core = None  # type: ignore[assignment]

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "pgoutput"
RECORDED = sorted(p for p in DATA_DIR.glob("pg*_*.jsonl") if not p.name.endswith("_frames.jsonl"))
FRAMES = sorted(DATA_DIR.glob("pg*_frames.jsonl"))
NOW_US = 849_991_169_000_000  # the clock of aborts without a time (model.now_us, patched)


def compiled() -> ModuleType:
    if compiled_core is None:
        if os.environ.get("CI"):
            pytest.fail("the compiled capture core (cdc.capture._core) is not built")
        pytest.skip("the compiled capture core is not built")
    return compiled_core


IMPLEMENTATIONS = ["python", "compiled"]


def module(name: str) -> ModuleType:
    return python_core if name == "python" else compiled()


def lsn(text: str) -> int:
    hi, lo = text.split("/")
    return int(hi, 16) << 32 | int(lo, 16)


def recorded_frames(path: Path) -> list[bytes]:
    """Each recorded payload in a 'w' frame with wal_start = its lsn."""
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    records = [json.loads(line) for line in lines]
    return [wire.xlog(lsn(r["lsn"]), bytes.fromhex(r["hex"])) for r in records]


def copy_frames(path: Path) -> list[bytes]:
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [bytes.fromhex(json.loads(line)["hex"]) for line in lines]


class Registry:
    """A describe() stand-in: keys from the flagged columns (or primary keys by table name),
    kinds from type oids, policies by column name; counts its calls."""

    def __init__(
        self,
        primary_keys: dict[str, tuple[str, ...]] | None = None,
        policies: dict[str, Policy] | None = None,
        ignored: frozenset[str] = frozenset(),
    ) -> None:
        self.primary_keys = primary_keys or {}
        self.policies = policies or {}
        self.ignored = ignored  # table names whose changes the core drops
        self.calls: list[RelationDesc] = []
        self.ids: dict[int, int] = {}

    def __call__(self, desc: RelationDesc) -> RelationInfo:
        self.calls.append(desc)
        names = tuple(c.name for c in desc.columns)
        flagged = tuple(i for i, c in enumerate(desc.columns) if c.flagged_key)
        if desc.name in self.primary_keys:
            key = tuple(names.index(n) for n in self.primary_keys[desc.name])
        elif desc.replica_identity in ("d", "i") and flagged:
            key = flagged
        else:
            key = ()
        keyless = not key
        if keyless:
            key = tuple(range(len(names)))
        table_id = self.ids.setdefault(desc.oid, len(self.ids) + 1)
        return RelationInfo(
            table_id=table_id,
            schema_id=100 + len(self.calls),
            names=names,
            kinds=tuple(Kind.for_type(c.type_oid) for c in desc.columns),
            policies=tuple(
                Policy.NONE if i in key else self.policies.get(n, Policy.NONE) for i, n in enumerate(names)
            ),
            key=key,
            keyless=keyless,
            ignored=desc.name in self.ignored,
        )


def fake_hash(raw: bytes) -> str:
    return f"h:{len(raw)}:{raw[:4].hex()}"


Outcome = list[Any]


def run(
    impl: str,
    frames: Iterable[bytes],
    *,
    registry: Callable[[RelationDesc], RelationInfo] | None = None,
    max_bytes: int = 1 << 16,
    **options: Any,
) -> Outcome:
    """Feed frames; return every event (a finished transaction as (its fields, its COPY bytes))
    and, last, the error that stopped it, if any; then the core's state."""
    core = module(impl).Core(registry or Registry(), **options)
    out: Outcome = []
    try:
        for frame in frames:
            core.feed(frame)
            out.extend(flatten(core.pop_events(), max_bytes))
    except ProtocolError as exc:
        out.extend(flatten(core.pop_events(), max_bytes))
        out.append(("error", str(exc)))
    out.append(
        (
            "state",
            core.server_wal_end,
            core.last_received_lsn,
            core.reply_requested,
            core.open_transactions,
            core.memory_bytes,
            core.spilled_transactions,
        )
    )
    return out


def flatten(events: list[Any], max_bytes: int) -> Outcome:
    out: Outcome = []
    for event in events:
        if isinstance(event, LogicalMessage):
            out.append(event)
        else:
            assert isinstance(event, FinishedTransaction)
            chunks = list(event.chunks(max_bytes))
            for chunk in chunks[:-1]:
                assert len(chunk) <= max_bytes or chunk.count(b"\n") == 1
            out.append((event, b"".join(chunks)))
    return out


def lines(outcome: Outcome) -> list[list[str]]:
    """Every COPY line of the outcome, split into its fields."""
    found = []
    for item in outcome:
        if isinstance(item, tuple) and isinstance(item[0], FinishedTransaction):
            found.extend(line.split("\t") for line in item[1].decode().splitlines())
    return found


def transactions(outcome: Outcome) -> list[FinishedTransaction]:
    return [
        item[0] for item in outcome if isinstance(item, tuple) and isinstance(item[0], FinishedTransaction)
    ]
