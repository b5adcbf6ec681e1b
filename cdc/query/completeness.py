"""Whether a table's history is complete at a version (docs/baseline.md "Readers").

A table whose rows were recorded by a baseline or a backfill has a ``baselines`` row: its
history is complete from ``complete_from`` on (NULL: the baseline or backfill is not done). Reading
one of its rows, or the whole table, at an earlier version would answer "absent" for rows that
existed: readers raise :class:`~cdc.errors.IncompleteHistoryError` instead. A table without a
``baselines`` row (created while captured, or captured before baselines were recorded) is
complete from its first change. The store's ``baselines`` are read at most every
``CACHE_SECONDS`` per store object.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

from psycopg import sql

from cdc.errors import IncompleteHistoryError
from cdc.lsn import format_lsn
from cdc.query.base import StoreBase
from cdc.query.model import TableInfo

__all__ = ["Bound", "check_complete", "incomplete_tables"]

CACHE_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class Bound:
    table_id: int
    kind: str  # "baseline" | "backfill"
    state: str
    complete_from: int | None
    rows: int
    estimated_rows: int | None


_cache: weakref.WeakKeyDictionary[StoreBase, tuple[float, dict[int, Bound]]] = weakref.WeakKeyDictionary()


def _bounds(store: StoreBase) -> dict[int, Bound]:
    now = time.monotonic()
    cached = _cache.get(store)
    if cached is not None and now - cached[0] < CACHE_SECONDS:
        return cached[1]
    exists = store._rows(
        sql.SQL("SELECT to_regclass(format('%%I.baselines', %(s)s::text)) IS NOT NULL AS found"),
        {"s": store.schema},
    )
    bounds: dict[int, Bound] = {}
    if exists and exists[0]["found"]:
        for r in store._rows(
            sql.SQL("SELECT table_id, kind, state, complete_from, rows, estimated_rows FROM {}").format(
                sql.Identifier(store.schema, "baselines")
            )
        ):
            bounds[int(r["table_id"])] = Bound(
                int(r["table_id"]),
                "baseline" if r["kind"] == "b" else "backfill",
                str(r["state"]),
                None if r["complete_from"] is None else int(r["complete_from"]),
                int(r["rows"]),
                None if r["estimated_rows"] is None else int(r["estimated_rows"]),
            )
    _cache[store] = (now, bounds)
    return bounds


def incomplete_tables(store: StoreBase) -> list[Bound]:
    """The tables whose baseline or backfill is not done."""
    return [b for b in _bounds(store).values() if b.complete_from is None or b.state != "done"]


def check_complete(store: StoreBase, info: TableInfo, version: int) -> None:
    """Raise :class:`IncompleteHistoryError` when ``info``'s history at ``version`` is incomplete."""
    bound = _bounds(store).get(info.table_id)
    if bound is None:
        return
    if bound.complete_from is not None and version >= bound.complete_from:
        return
    if bound.complete_from is not None:
        raise IncompleteHistoryError(
            f"the history of {info.name} before version {format_lsn(bound.complete_from)} is incomplete: "
            f"its rows were recorded by a {bound.kind} at {format_lsn(bound.complete_from)}",
            hint=f"read it at version {format_lsn(bound.complete_from)} or later",
        )
    estimate = f" of ~{bound.estimated_rows:,}" if bound.estimated_rows else ""
    what = {
        "pending": "has not started",
        "running": f"is in progress ({bound.rows:,}{estimate} rows)",
        "failed": "failed",
        "done": "is not complete",
    }.get(bound.state, bound.state)
    command = "cdc setup" if bound.kind == "baseline" else f"cdc backfill {info.current_name or info.name}"
    raise IncompleteHistoryError(
        f"the history of {info.name} is incomplete: its {bound.kind} {what}",
        hint=f"run `{command}` (`cdc status` shows its progress)",
    )
