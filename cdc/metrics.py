"""Every Prometheus metric cdc exports, on an injectable registry.

Names start with ``cdc_`` and end with their unit. Labels are bounded: table names and
operations, never keys or values.

No metric reports a number nobody measured: a figure read from a server or measured by the
daemon is a :class:`Reading`, which has no sample until it is known and loses it again when
the server says NULL (``safe_wal_size`` is NULL under ``max_slot_wal_keep_size = -1``, the
default: no limit, so no series, never a 0 that reads as "no WAL left"). Plain gauges are the
ones whose starting value is true (not streaming, nothing buffered). Counters and histograms
export no ``_created`` series.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric

# The `_created` series (a start time per counter and histogram) double the series count and
# mean nothing on a dashboard.
disable_created_metrics()  # type: ignore[no-untyped-call]


class Reading:
    """A gauge without a sample until a value is known; ``set(None)`` removes the sample."""

    def __init__(self, name: str, documentation: str, *, registry: CollectorRegistry) -> None:
        self._name = name
        self._documentation = documentation
        self._value: float | None = None
        self._lock = threading.Lock()
        registry.register(self)

    def set(self, value: float | None) -> None:
        with self._lock:
            self._value = None if value is None else float(value)

    def get(self) -> float | None:
        with self._lock:
            return self._value

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self._name, self._documentation)

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self._name, self._documentation)
        value = self.get()
        if value is not None:
            family.add_metric([], value)
        yield family


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.mutations = Counter(
            "cdc_mutations_total",
            "Row mutations written to the history store",
            ["table", "op", "status"],
            registry=r,
        )
        self.transactions = Counter(
            "cdc_transactions_total", "Transactions written, by outcome", ["status"], registry=r
        )
        self.batch_rows = Histogram(
            "cdc_batch_rows",
            "Mutations per store write",
            buckets=(1, 10, 100, 500, 1000, 5000, 20000),
            registry=r,
        )
        self.store_write_seconds = Histogram(
            "cdc_store_write_seconds", "Duration of one store write (batch + ack)", registry=r
        )
        self.received_lsn = Reading(
            "cdc_received_lsn", "Highest WAL position received from the source", registry=r
        )
        self.written_lsn = Reading("cdc_written_lsn", "Highest position written to the store", registry=r)
        self.confirmed_lsn = Reading("cdc_confirmed_lsn", "Position acknowledged to the slot", registry=r)
        self.server_wal_lsn = Reading(
            "cdc_server_wal_lsn", "Server WAL end reported by keepalives", registry=r
        )
        self.lag_bytes = Reading("cdc_lag_bytes", "Server WAL end minus acknowledged position", registry=r)
        self.lag_seconds = Reading(
            "cdc_lag_seconds",
            "Seconds from the commit of the last stored transaction to its storing; 0 once idle and caught up",
            registry=r,
        )
        self.reconnects = Counter("cdc_reconnects_total", "Reconnections to the source or store", registry=r)
        self.errors = Counter("cdc_errors_total", "Errors by kind", ["kind"], registry=r)
        self.open_transactions = Gauge(
            "cdc_open_transactions", "Transactions buffered while their outcome is unknown", registry=r
        )
        self.buffered_bytes = Gauge(
            "cdc_buffered_bytes", "Bytes of buffered transactions in memory", registry=r
        )
        self.spilled_transactions = Counter(
            "cdc_spilled_transactions_total", "Transactions spilled to disk", registry=r
        )
        self.heartbeat_seconds = Reading(
            "cdc_loop_heartbeat_seconds", "Unix time of the main loop's last iteration", registry=r
        )
        self.streaming = Gauge("cdc_streaming", "1 while the replication stream is open", registry=r)
        self.standby = Gauge(
            "cdc_standby", "1 while waiting for another instance to release the slot", registry=r
        )
        self.slot_retained_wal_bytes = Reading(
            "cdc_slot_retained_wal_bytes",
            "WAL the server keeps for the slot (current LSN - restart_lsn)",
            registry=r,
        )
        self.slot_safe_wal_size_bytes = Reading(
            "cdc_slot_safe_wal_size_bytes",
            "WAL that can still be written before the slot is invalidated (absent: no limit)",
            registry=r,
        )
        self.slot_wal_status = Gauge(
            "cdc_slot_wal_status", "1 for the slot's current wal_status", ["status"], registry=r
        )
        self.context_rejected = Counter(
            "cdc_context_messages_rejected_total",
            "cdc.context and cdc.error messages refused (MAC missing or wrong, another transaction)",
            ["prefix"],
            registry=r,
        )
        self.session_level_request_ids = Counter(
            "cdc_session_level_request_ids_total",
            "Context messages whose request id was carried over from an earlier transaction of its "
            "session: a session-level SET cdc.request_id, not SET LOCAL",
            registry=r,
        )
        self.heartbeats = Counter(
            "cdc_heartbeats_total", "Heartbeat messages written to the source", registry=r
        )
        # Retention (set by cdc.store.prune.Pruner).
        self.retention_rows = Reading(
            "cdc_retention_rows",
            "Changes retained in the store (counted, or estimated when large)",
            registry=r,
        )
        self.retention_bytes = Reading(
            "cdc_retention_bytes", "Total size of the changes partitions and kept rows", registry=r
        )
        self.retention_partitions = Reading(
            "cdc_retention_partitions", "Partitions of the changes table", registry=r
        )
        self.retention_oldest_seconds = Reading(
            "cdc_retention_oldest_seconds", "Unix time of the oldest retained commit", registry=r
        )
        self.pruned_partitions = Counter(
            "cdc_pruned_partitions_total", "Partitions dropped by pruning", registry=r
        )
        self.prune_seconds = Reading("cdc_prune_seconds", "Duration of the last prune", registry=r)
        self.keyframes_written = Counter(
            "cdc_keyframes_written_total", "Keyframes written by pruning", registry=r
        )
        # Source failover (cdc/capture/failover.py).
        self.source_switches = Counter(
            "cdc_source_switches_total",
            "Sessions that found the source on another server or timeline, by outcome (resumed, gap, fork)",
            ["outcome"],
            registry=r,
        )
        self.source_info = Gauge(
            "cdc_source_info",
            "1 for the source server and timeline capture reads from",
            ["host", "timeline"],
            registry=r,
        )
        # Baselines and backfills (cdc/progress.py in the process that reads them; the daemon
        # for the chunks it writes and, from the store, the tables still to do).
        self.baseline_rows = Gauge(
            "cdc_baseline_rows",
            "Rows recorded so far by a table's baseline (kind=baseline) or backfill (kind=backfill)",
            ["kind", "table"],
            registry=r,
        )
        self.baseline_remaining_tables = Gauge(
            "cdc_baseline_remaining_tables",
            "Tables whose baseline or backfill is not complete (their history is incomplete)",
            ["kind"],
            registry=r,
        )
        self.partially_captured_tables = Gauge(
            "cdc_partially_captured_tables",
            "Published or present tables whose changes are not all captured, by reason",
            ["reason"],
            registry=r,
        )
