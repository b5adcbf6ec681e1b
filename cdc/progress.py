"""Progress of the long operations (a baseline, a backfill): per table the rows done, the
estimated total (``pg_class.reltuples`` when it started), the rate and the time left.

On a terminal a progress bar per table (rich, on stderr); otherwise a structlog line per table at
most every ``interval`` seconds (``baseline_progress`` / ``backfill_progress``) and one when the
table is done. With ``metrics``: ``cdc_baseline_rows`` and ``cdc_baseline_remaining_tables``.
Thread-safe: the workers of a parallel baseline report into one ``Progress``. Never row values.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO, Any

import structlog
from rich.console import Console
from rich.progress import BarColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

from cdc.metrics import Metrics

log = structlog.get_logger("cdc.progress")

#: Seconds between two log lines of one table (not on a terminal).
LOG_INTERVAL_SECONDS = 10.0


@dataclass
class TableProgress:
    """One table's progress."""

    name: str
    estimated: int | None  # None: unknown (a table never analyzed)
    started: float
    rows: int = 0
    finished: float | None = None
    last_logged: float = 0.0
    rate_window: list[tuple[float, int]] = field(default_factory=list)

    def rate(self, now: float) -> float:
        """Rows per second over the last half minute (since the start when shorter)."""
        window = self.rate_window
        if not window:
            elapsed = max(1e-6, (self.finished or now) - self.started)
            return self.rows / elapsed
        t0, rows0 = window[0]
        elapsed = max(1e-6, (self.finished or now) - t0)
        return (self.rows - rows0) / elapsed

    def eta(self, now: float) -> float | None:
        """Seconds left at the current rate (None: unknown)."""
        if self.finished is not None:
            return 0.0
        if not self.estimated:
            return None
        rate = self.rate(now)
        if rate <= 0:
            return None
        return max(0.0, (self.estimated - self.rows) / rate)


def _estimate_text(estimated: int | None) -> str:
    return f"~{estimated:,}" if estimated else "?"


class Progress:
    """Progress of one operation (``kind``: "baseline" or "backfill") over several tables."""

    def __init__(
        self,
        kind: str,
        *,
        metrics: Metrics | None = None,
        terminal: bool | None = None,
        interval: float = LOG_INTERVAL_SECONDS,
        stream: IO[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kind = kind
        self.metrics = metrics
        self.interval = interval
        self.clock = clock
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self._lock = threading.Lock()
        self._tables: dict[str, TableProgress] = {}
        self._tasks: dict[str, TaskID] = {}
        self._bar: RichProgress | None = None
        if self.terminal:
            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[fields][done]}"),
                TextColumn("{task.fields[fields][rate]}"),
                TextColumn("{task.fields[fields][eta]}"),
                TimeElapsedColumn(),
                console=Console(file=self.stream),
                transient=False,
            )

    # -- lifetime -----------------------------------------------------------------
    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()

    def rename(self, kind: str) -> None:
        """Report what follows as ``kind`` (setup's baseline bar goes on with its backfills)."""
        self.kind = kind

    # -- reports ------------------------------------------------------------------
    def table(self, name: str, estimated: int | None, rows: int = 0) -> None:
        """A table starts (``rows``: already done, when resuming)."""
        now = self.clock()
        with self._lock:
            progress = TableProgress(name, estimated if estimated and estimated > 0 else None, now, rows)
            progress.last_logged = now
            self._tables[name] = progress
            if self._bar is not None:
                self._tasks[name] = self._bar.add_task(
                    name, total=progress.estimated, completed=rows, fields=self._fields(progress, now)
                )
            self._remaining()
        if self._bar is None:
            log.info(
                f"{self.kind}_table_started",
                table=name,
                estimated_rows=progress.estimated,
                rows=rows,
            )

    def advance(self, name: str, rows: int) -> None:
        """``rows`` more rows of table ``name`` are recorded."""
        now = self.clock()
        line: dict[str, Any] | None = None
        with self._lock:
            progress = self._tables[name]
            progress.rows += rows
            window = progress.rate_window
            window.append((now, progress.rows))
            while len(window) > 2 and now - window[0][0] > 30:
                window.pop(0)
            if self._bar is not None:
                total = progress.estimated
                if total is not None and progress.rows > total:
                    total = progress.rows  # the estimate was low
                self._bar.update(
                    self._tasks[name],
                    completed=progress.rows,
                    total=total,
                    fields=self._fields(progress, now),
                )
            elif now - progress.last_logged >= self.interval:
                progress.last_logged = now
                line = self._line(progress, now)
        if self.metrics is not None:
            self.metrics.baseline_rows.labels(kind=self.kind, table=name).set(progress.rows)
        if line is not None:
            log.info(f"{self.kind}_progress", **line)

    def done(self, name: str) -> None:
        """Table ``name`` is complete."""
        now = self.clock()
        with self._lock:
            progress = self._tables[name]
            progress.finished = now
            if self._bar is not None:
                self._bar.update(
                    self._tasks[name],
                    completed=progress.rows,
                    total=progress.rows,
                    fields=self._fields(progress, now),
                )
            self._remaining()
        seconds = now - progress.started
        if self._bar is None:
            log.info(
                f"{self.kind}_table_done",
                table=name,
                rows=progress.rows,
                seconds=round(seconds, 2),
                rows_per_second=round(progress.rows / seconds) if seconds > 0 else None,
            )

    def tables(self) -> list[TableProgress]:
        with self._lock:
            return list(self._tables.values())

    # -- helpers --------------------------------------------------------------------
    def _remaining(self) -> None:
        if self.metrics is not None:
            left = sum(1 for p in self._tables.values() if p.finished is None)
            self.metrics.baseline_remaining_tables.labels(kind=self.kind).set(left)

    def _line(self, progress: TableProgress, now: float) -> dict[str, Any]:
        eta = progress.eta(now)
        rate = progress.rate(now)
        return {
            "table": progress.name,
            "rows": progress.rows,
            "estimated_rows": progress.estimated,
            "percent": round(100 * progress.rows / progress.estimated, 1) if progress.estimated else None,
            "rows_per_second": round(rate),
            "eta_seconds": round(eta) if eta is not None else None,
        }

    @staticmethod
    def _fields(progress: TableProgress, now: float) -> dict[str, str]:
        eta = progress.eta(now)
        if progress.finished is not None:
            eta_text = "done"
        elif eta is None:
            eta_text = "ETA ?"
        else:
            eta_text = f"ETA {int(eta) // 60}:{int(eta) % 60:02d}"
        return {
            "done": f"{progress.rows:,} of {_estimate_text(progress.estimated)} rows",
            "rate": f"{progress.rate(now):,.0f} rows/s",
            "eta": eta_text,
        }
