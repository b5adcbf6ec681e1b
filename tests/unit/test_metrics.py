"""What cdc.metrics exports before anything was measured, and when the server says NULL."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from cdc.metrics import Metrics, Reading

#: Gauges whose starting value is a true statement (not streaming, nothing buffered).
KNOWN_AT_START = {"cdc_streaming", "cdc_standby", "cdc_open_transactions", "cdc_buffered_bytes"}


def test_a_fresh_registry_reports_no_number_nobody_measured() -> None:
    metrics = Metrics(CollectorRegistry())
    text = generate_latest(metrics.registry).decode()
    assert "_created" not in text
    gauges = {
        family.name: [s.value for s in family.samples]
        for family in metrics.registry.collect()
        if family.type == "gauge"
    }
    readings = {value._name for value in vars(metrics).values() if isinstance(value, Reading)}
    assert {"cdc_slot_safe_wal_size_bytes", "cdc_lag_seconds", "cdc_retention_oldest_seconds"} <= readings
    for name, samples in gauges.items():
        if name in KNOWN_AT_START:
            assert samples == [0.0], name
        else:
            assert samples == [], f"{name} exports {samples} before anything was measured"


def test_a_null_from_the_server_removes_the_series() -> None:
    metrics = Metrics(CollectorRegistry())
    registry = metrics.registry
    metrics.slot_safe_wal_size_bytes.set(5 * 1024**3)  # max_slot_wal_keep_size limits the slot
    assert registry.get_sample_value("cdc_slot_safe_wal_size_bytes") == 5 * 1024**3
    metrics.slot_safe_wal_size_bytes.set(None)  # then -1 again: safe_wal_size is NULL
    assert registry.get_sample_value("cdc_slot_safe_wal_size_bytes") is None
    assert "\ncdc_slot_safe_wal_size_bytes " not in generate_latest(registry).decode()
    metrics.slot_safe_wal_size_bytes.set(0)  # a real 0 is a number the server gave
    assert registry.get_sample_value("cdc_slot_safe_wal_size_bytes") == 0
