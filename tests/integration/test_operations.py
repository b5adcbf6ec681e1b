"""Operations: metrics under load, health, slot safety, SIGTERM, standby failover, status."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, generate_latest

from cdc.cli import main as cli
from cdc.daemon import Daemon
from cdc.lsn import parse_lsn
from cdc.metrics import Metrics
from tests.capture_env import CaptureEnv, new_env, rebuild, source_rows, table_id
from tests.integration.test_durability import DaemonProcess


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


def test_metrics_move_with_the_workload(capture: CaptureEnv) -> None:
    with capture.source() as conn:
        conn.execute("CREATE TABLE m (id int PRIMARY KEY, v text)")
    capture.setup()
    daemon = capture.start()
    registry = daemon.metrics.registry
    with capture.source() as conn:
        conn.execute("INSERT INTO m SELECT g, 'x' FROM generate_series(1, 300) g")
        conn.execute("UPDATE m SET v = 'y' WHERE id <= 100")
        conn.execute("DELETE FROM m WHERE id <= 10")
    capture.wait_caught_up()
    labels = {"table": "public.m", "status": "committed"}
    assert sample(registry, "cdc_mutations_total", op="INSERT", **labels) == 300
    assert sample(registry, "cdc_mutations_total", op="UPDATE", **labels) == 100
    assert sample(registry, "cdc_mutations_total", op="DELETE", **labels) == 10
    assert sample(registry, "cdc_transactions_total", status="committed") >= 3
    assert sample(registry, "cdc_store_write_seconds_count") >= 1
    assert sample(registry, "cdc_batch_rows_sum") >= 410
    assert sample(registry, "cdc_confirmed_lsn") >= parse_lsn("0/1")
    assert sample(registry, "cdc_streaming") == 1
    assert time.time() - sample(registry, "cdc_loop_heartbeat_seconds") < 5
    assert capture.stop() == 0
    assert sample(registry, "cdc_streaming") == 0


def test_a_default_server_raises_no_alert(capture: CaptureEnv, tmp_path: Path) -> None:
    """A daemon streaming from a server with the default max_slot_wal_keep_size (-1): the
    server's safe_wal_size is NULL, so the metric has no series (never 0), and every alert
    rule of deploy/prometheus/alerts.yaml, the critical CdcSlotSafeWalSizeLow first, stays
    silent over what the daemon exports."""
    from tests.unit.test_alerts import (
        PROMTOOL,
        alert_names,
        promtool_test_rules,
        series_from_registry,
        silent_at,
    )

    with capture.source() as conn:
        setting = conn.execute("SHOW max_slot_wal_keep_size").fetchone()
        assert setting == ("-1",)
        conn.execute("CREATE TABLE quiet (id int PRIMARY KEY)")
    capture.setup()
    daemon = capture.start()
    registry = daemon.metrics.registry
    with capture.source() as conn:
        conn.execute("INSERT INTO quiet VALUES (1)")
    capture.wait_caught_up()
    deadline = time.monotonic() + 30
    while registry.get_sample_value("cdc_slot_retained_wal_bytes") is None:  # the slot was checked
        assert time.monotonic() < deadline, "no slot check"
        time.sleep(0.1)
    assert registry.get_sample_value("cdc_slot_wal_status", {"status": "reserved"}) == 1
    assert registry.get_sample_value("cdc_slot_safe_wal_size_bytes") is None
    exposition = generate_latest(registry).decode()
    assert "\ncdc_slot_safe_wal_size_bytes " not in exposition and "_created" not in exposition
    if PROMTOOL is not None:
        series = series_from_registry(registry, "a")
        promtool_test_rules(
            tmp_path,
            [{"interval": "1m", "input_series": [{"series": k, "values": v} for k, v in series.items()],
              "alert_rule_test": silent_at("30m", alert_names())}],
        )  # fmt: skip
    assert capture.stop() == 0


def test_health_endpoints_follow_the_main_loop(capture: CaptureEnv, tmp_path: Path) -> None:
    import urllib.error
    import urllib.request

    from cdc.health import HealthServer

    with capture.source() as conn:
        conn.execute("CREATE TABLE h (id int PRIMARY KEY)")
    capture.setup()
    daemon = capture.start()
    server = HealthServer("127.0.0.1", 0, daemon.metrics.registry, daemon.health, daemon.ready).start()

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    try:
        with capture.source() as conn:
            conn.execute("INSERT INTO h VALUES (1)")
        capture.wait_caught_up()
        assert get("/healthz")[0] == 200
        assert get("/readyz")[0] == 200
        code, text = get("/metrics")
        assert (
            code == 200 and 'cdc_mutations_total{op="INSERT",status="committed",table="public.h"} 1.0' in text
        )
        # A stuck loop stops beating: liveness fails, readiness too.
        daemon.health_max_age_seconds = 0.5
        daemon.beat = lambda: None  # type: ignore[method-assign]
        time.sleep(1.0)
        assert get("/healthz")[0] == 503
        assert get("/readyz")[0] == 503
    finally:
        server.stop()
    assert capture.stop() == 0


def test_daemon_process_serves_metrics_and_health(capture: CaptureEnv, tmp_path: Path) -> None:
    import urllib.request

    with capture.source() as conn:
        conn.execute("CREATE TABLE hp (id int PRIMARY KEY)")
    capture.setup()
    proc = DaemonProcess(capture, tmp_path / "d.log")
    proc.start()
    proc.wait_streaming()
    port = proc.http_port()
    for path in ("/healthz", "/readyz", "/metrics"):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            assert response.status == 200
    assert proc.stop() == 0


def test_idle_captured_table_does_not_hold_wal_written_elsewhere(capture: CaptureEnv) -> None:
    capture.extra_env["CDC_CAPTURE__HEARTBEAT_INTERVAL_SECONDS"] = "1"
    with capture.source() as conn:
        conn.execute("CREATE TABLE idle (id int PRIMARY KEY)")
    capture.setup()
    other = capture.pg.create_database(f"other_{capture.slot}")
    daemon = capture.start()
    with psycopg.connect(other, autocommit=True) as conn:
        conn.execute("CREATE TABLE noise (id serial, pad text)")
        for _ in range(6):
            conn.execute("INSERT INTO noise (pad) SELECT repeat('x', 500) FROM generate_series(1, 20000)")
            time.sleep(0.5)
    # WAL was written in another database only: the slot must still move close to the end.
    deadline = time.monotonic() + 30
    retained = None
    with capture.source() as conn:
        while time.monotonic() < deadline:
            conn.execute("CHECKPOINT")
            row = conn.execute(
                "SELECT (pg_current_wal_insert_lsn() - confirmed_flush_lsn)::bigint FROM pg_replication_slots "
                "WHERE slot_name = %s",
                (capture.slot,),
            ).fetchone()
            assert row is not None
            retained = row[0]
            if retained < 2 * 1024 * 1024:
                break
            time.sleep(0.5)
    assert retained is not None and retained < 2 * 1024 * 1024, f"slot holds {retained} bytes"
    assert sample(daemon.metrics.registry, "cdc_slot_retained_wal_bytes") > 0
    assert capture.stop() == 0


def test_dropped_slot_stops_the_daemon_with_its_exit_code(capture: CaptureEnv, tmp_path: Path) -> None:
    with capture.source() as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
    capture.setup()
    proc = DaemonProcess(capture, tmp_path / "d.log")
    proc.start()
    with capture.source() as conn:
        conn.execute("INSERT INTO t VALUES (1)")
    capture.wait_caught_up()
    with capture.source() as conn:
        for _ in range(50):
            conn.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                "WHERE slot_name = %s AND active_pid IS NOT NULL",
                (capture.slot,),
            )
            try:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (capture.slot,))
                break
            except psycopg.errors.ObjectInUse:
                time.sleep(0.05)
    assert proc.proc is not None
    code = proc.proc.wait(timeout=30)
    assert code == 5
    log = (tmp_path / "d.log").read_text()
    assert "cdc setup --recreate-slot" in log
    assert "daemon_stopped" in log


def test_sigterm_mid_workload_loses_nothing(capture: CaptureEnv, tmp_path: Path) -> None:
    with capture.source() as conn:
        conn.execute("CREATE TABLE s (id int PRIMARY KEY, n int)")
    capture.setup()
    proc = DaemonProcess(capture, tmp_path / "d.log")
    stop = threading.Event()

    def load() -> None:
        with capture.source() as conn:
            i = 0
            while not stop.is_set():
                i += 1
                conn.execute(
                    "INSERT INTO s VALUES (%s, 0) ON CONFLICT (id) DO UPDATE SET n = s.n + 1", (i % 300,)
                )

    writer = threading.Thread(target=load)
    writer.start()
    try:
        for _ in range(3):
            proc.start()
            proc.wait_streaming()
            time.sleep(0.5)
            assert proc.stop() == 0  # SIGTERM: flush, write, acknowledge, exit 0
    finally:
        stop.set()
        writer.join()
    proc.start()
    capture.wait_caught_up()
    assert proc.stop() == 0
    assert rebuild(capture, "public.s") == source_rows(capture, "public.s")
    assert "signal_received" in (tmp_path / "d.log").read_text()


def test_standby_takes_over_without_loss_or_duplicates(capture: CaptureEnv, tmp_path: Path) -> None:
    with capture.source() as conn:
        conn.execute("CREATE TABLE f (id bigserial PRIMARY KEY, note text)")
    capture.setup()
    active = DaemonProcess(capture, tmp_path / "a.log")
    standby = DaemonProcess(capture, tmp_path / "b.log")
    active.start()
    active.wait_streaming()
    standby.start()
    stop = threading.Event()

    def load() -> None:
        with capture.source() as conn:
            while not stop.is_set():
                conn.execute("INSERT INTO f (note) VALUES ('x')")

    writer = threading.Thread(target=load)
    writer.start()
    try:
        deadline = time.monotonic() + 20
        while '"standby"' not in (tmp_path / "b.log").read_text():
            assert time.monotonic() < deadline, "second instance did not stand by"
            time.sleep(0.1)
        started = time.monotonic()
        active.kill()
        # The standby takes the lock and the slot within seconds.
        while "standby_taking_over" not in (tmp_path / "b.log").read_text():
            assert time.monotonic() - started < 15, "standby did not take over"
            time.sleep(0.1)
        took = time.monotonic() - started
        time.sleep(1.0)
    finally:
        stop.set()
        writer.join()
    capture.wait_caught_up()
    assert standby.stop() == 0
    assert took < 10
    with capture.store() as store:
        row = store.execute(
            "SELECT count(*), count(DISTINCT key_text) FROM changes WHERE table_id = %s",
            (table_id(capture, "f"),),
        ).fetchone()
    with capture.source() as conn:
        total = conn.execute("SELECT count(*) FROM f").fetchone()
    assert row is not None and total is not None
    assert row[0] == row[1] == total[0]


def test_status_reports_slot_store_and_versions(capture: CaptureEnv) -> None:
    with capture.source() as conn:
        conn.execute("CREATE TABLE st (id int PRIMARY KEY)")
    capture.setup()
    capture.start()
    with capture.source() as conn:
        conn.execute("INSERT INTO st VALUES (1)")
    capture.wait_caught_up()
    args = ["status", "--source", capture.source_dsn, "--store", capture.store_dsn]
    env = {"CDC_SOURCE__SLOT": capture.slot}
    table = CliRunner().invoke(cli, args, env=env)
    assert table.exit_code == 0, table.output
    assert "wal_status" in table.output and "reserved" in table.output
    result = CliRunner().invoke(cli, [*args, "--format", "json"], env=env)
    data = json.loads(result.output)
    assert data["slot_exists"] is True and data["baseline_done"] is True
    assert data["current_version"] >= data["earliest_version"] > 0
    assert "password" not in result.output
    capture.stop()
    missing = CliRunner().invoke(cli, args, env={"CDC_SOURCE__SLOT": "no_such_slot"})
    assert missing.exit_code == 10 and "MISSING" in missing.output


def test_setup_explains_missing_wal_level_and_role(pg: object, tmp_path: Path) -> None:
    from cdc.devdb import LocalPostgres

    server = LocalPostgres(flavor=pg.flavor, settings={"wal_level": "replica"})  # type: ignore[attr-defined]
    server.start()
    try:
        dsn = server.dsn()
        result = CliRunner().invoke(cli, ["setup", "--source", dsn, "--store", dsn])
        assert result.exit_code == 4
        assert "wal_level" in result.output and "ALTER SYSTEM SET wal_level = logical" in result.output
        assert "Traceback" not in result.output
    finally:
        server.cleanup()
    unreachable = CliRunner().invoke(
        cli, ["setup", "--source", "host=127.0.0.1 port=1 dbname=x", "--store", "host=127.0.0.1 port=1"]
    )
    assert unreachable.exit_code != 0 and "cannot connect to the source" in unreachable.output


def test_sighup_reloads_the_config(capture: CaptureEnv, tmp_path: Path) -> None:
    config = tmp_path / "cdc.yaml"
    config.write_text("logging:\n  level: info\n")
    with capture.source() as conn:
        conn.execute("CREATE TABLE r (id int PRIMARY KEY)")
    capture.setup()
    proc = DaemonProcess(capture, tmp_path / "d.log", extra={"CDC_CONFIG": str(config)})
    proc.start()
    proc.wait_streaming()
    config.write_text("logging:\n  level: info\ncapture:\n  batch_max_rows: 10\n")
    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "config_reloaded" not in (tmp_path / "d.log").read_text():
        assert time.monotonic() < deadline, "no config_reloaded log line"
        time.sleep(0.1)
    with capture.source() as conn:
        conn.execute("INSERT INTO r SELECT generate_series(1, 50)")
    capture.wait_caught_up()
    assert proc.stop() == 0


@pytest.mark.parametrize("argv", [["run"], ["setup"]])
def test_commands_without_dsn_say_what_to_set(argv: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cdc", *argv],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert result.returncode == 2
    assert "CDC_SOURCE_DSN" in result.stderr and "Traceback" not in result.stderr


__all__ = ["Daemon", "Metrics", "new_env"]
