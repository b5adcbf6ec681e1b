"""The capture session's periodic look at the tables (docs/baseline.md).

Every ``INTERVAL_SECONDS`` while streaming:

* the publications, through :func:`cdc.publications.check_tables`: a table published for
  UPDATE/DELETE without a replica identity (the event trigger missing: not a superuser's setup)
  is repaired when the configuration allows it; every table whose changes are still not all
  captured is logged (``tables_partially_captured``, table= and reason=) and counted
  (``cdc_partially_captured_tables{reason}``); one whose writes fail becomes the daemon's last
  error (``cdc status``);
* the store's ``baselines``: tables whose baseline or backfill is not done
  (``cdc_baseline_remaining_tables{kind}``, ``cdc_baseline_rows{kind,table}``);
* a publication the session does not stream from that the slot can decode with now (one created
  after the slot, ``capture_publications.usable_from``): the session ends to start again with it.

Nothing here may stop capture: a failed check is logged and tried again next time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg
import structlog

from cdc.config import Config
from cdc.errors import error_text
from cdc.metrics import Metrics
from cdc.publications import PartialTable, check_tables, stream_publications

log = structlog.get_logger("cdc.daemon")

#: Seconds between two checks (the first one runs at once).
INTERVAL_SECONDS = 60.0
_REASONS = ("updates_fail", "inserts_only", "not_captured")


class TableChecks:
    """Runs the checks on the session's catalog (source) and registry (store) connections."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        report: Callable[[str], None],
        *,
        streaming: list[str],
        interval: float | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.report = report
        self.streaming = streaming  # the publications this session streams from
        self.interval = INTERVAL_SECONDS if interval is None else interval
        self.last = -1e9
        self.restart_wanted = False
        self._reported: set[tuple[str, str]] = set()

    def due(self, now: float) -> bool:
        return now - self.last >= self.interval

    def run(self, source: psycopg.Connection[Any], store: psycopg.Connection[Any]) -> None:
        self.last = time.monotonic()
        try:
            partial, repaired = check_tables(source, self.config)
        except psycopg.Error as exc:
            log.warning("table_check_failed", error=error_text(exc))
            partial, repaired = [], []
        for name in repaired:
            # Published now: its changes are captured from here on, its rows from before are not.
            log.warning("publication_repaired", table=name, hint="record its existing rows: cdc backfill")
        self._partial(partial)
        try:
            self._baselines(store)
            names, _ = stream_publications(
                store, source, self.config.source.slot, self.config.source.publication
            )
            new = [n for n in names if n not in self.streaming]
            if new:
                log.info("publication_usable", publications=",".join(new))
                self.restart_wanted = True
        except psycopg.Error as exc:
            log.warning("baseline_check_failed", error=error_text(exc))

    def _partial(self, partial: list[PartialTable]) -> None:
        counts = dict.fromkeys(_REASONS, 0)
        for table in partial:
            counts[table.reason] = counts.get(table.reason, 0) + 1
            key = (table.table, table.reason)
            if key in self._reported:
                continue
            self._reported.add(key)
            if table.reason == "updates_fail":
                log.error("table_writes_fail", table=table.table, reason=table.reason, detail=table.detail)
                self.report(
                    f"{table.table}: {table.detail} (set source.keyless_tables and run `cdc setup`, "
                    f"or ALTER TABLE {table.table} REPLICA IDENTITY FULL)"
                )
            else:
                log.warning(
                    "table_partially_captured", table=table.table, reason=table.reason, detail=table.detail
                )
        for reason, count in counts.items():
            self.metrics.partially_captured_tables.labels(reason=reason).set(count)

    def _baselines(self, store: psycopg.Connection[Any]) -> None:
        rows = store.execute(
            "SELECT b.kind, b.state, b.rows, coalesce(format('%I.%I', n.schema_name, n.table_name), b.table_id::text) "
            "FROM baselines b LEFT JOIN LATERAL (SELECT schema_name, table_name FROM table_names t "
            "WHERE t.table_id = b.table_id ORDER BY from_position DESC LIMIT 1) n ON true"
        ).fetchall()
        remaining = {"baseline": 0, "backfill": 0}
        for kind_code, state, done, name in rows:
            kind = "baseline" if kind_code == "b" else "backfill"
            if state != "done":
                remaining[kind] += 1
                self.metrics.baseline_rows.labels(kind=kind, table=str(name)).set(int(done))
        for kind, count in remaining.items():
            self.metrics.baseline_remaining_tables.labels(kind=kind).set(count)
