"""`cdc status` against a running, then stopped, daemon: every line true, the exit code follows
the health rules (a daemon streaming, the baseline complete, lag under its thresholds)."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from click.testing import CliRunner, Result

from cdc.cli import main as cli
from cdc.exit_codes import ExitCode
from tests.capture_env import CaptureEnv


def status(capture: CaptureEnv, *args: str, **env: str) -> Result:
    argv = ["status", "--source", capture.source_dsn, "--store", capture.store_dsn, *args]
    return CliRunner().invoke(
        cli, argv, env={"CDC_SOURCE__SLOT": capture.slot, "CDC_SOURCE__PUBLICATION": capture.slot, **env}
    )


def as_json(capture: CaptureEnv, **env: str) -> tuple[int, dict[str, Any]]:
    result = status(capture, "--format", "json", **env)
    return result.exit_code, json.loads(result.stdout)


def lines(result: Result) -> dict[str, str]:
    found = {}
    for line in result.stdout.splitlines():
        label, _, value = line.strip().partition("  ")
        found[label] = value.strip()
    return found


def test_status_follows_the_daemon(capture: CaptureEnv) -> None:
    with capture.source() as conn:
        conn.execute("CREATE TABLE s (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO s SELECT g, 'base' FROM generate_series(1, 5) g")
    capture.setup()
    capture.start()
    with capture.source() as conn:
        for start in range(10, 100, 10):  # 9 transactions of 10 rows
            conn.execute(
                "INSERT INTO s SELECT g, 'x' FROM generate_series(%s::int, %s::int) g", (start, start + 9)
            )
    capture.wait_caught_up()

    code, data = as_json(capture)
    assert code == ExitCode.OK, data["problems"]
    assert data["healthy"] and data["problems"] == []
    assert data["daemon_streaming"] and data["daemon"].endswith(f"pid {os.getpid()}")
    assert data["mutations"] == 95 and data["counts_exact"] is True  # 90 captured + 5 baseline rows
    assert data["transactions"] == 10  # 9 captured + the baseline's
    assert data["lag_seconds"] is not None and data["lag_seconds"] < 5, data["lag_measure"]
    assert isinstance(data["current_version"], int) and "/" in data["acked_lsn"]

    time.sleep(3)  # idle and caught up: the lag does not grow with the time since the last commit
    code, data = as_json(capture)
    assert code == ExitCode.OK and data["lag_seconds"] is not None and data["lag_seconds"] < 2, data

    table = status(capture)
    assert table.exit_code == ExitCode.OK, table.output
    shown = lines(table)
    assert shown["health"] == "ok"
    assert shown["mutations"] == "95" and shown["transactions"] == "10"
    assert shown["daemon"].endswith(", streaming")
    assert shown["safe_wal_size"] == "no limit (max_slot_wal_keep_size = -1)"

    assert capture.stop() == 0
    code, data = as_json(capture)
    assert code == ExitCode.UNHEALTHY
    assert data["daemon"] is None and data["daemon_active"] is False and not data["daemon_streaming"]
    assert any("no daemon is streaming" in p for p in data["problems"])
    with capture.store() as store:
        assert store.execute("SELECT daemon_pid, daemon_host FROM capture_state").fetchone() == (None, None)
    table = status(capture)
    assert table.exit_code == ExitCode.UNHEALTHY and lines(table)["daemon"] == "not running"
    assert "pid" not in lines(table)["daemon"]
    assert data["lag_seconds"] == 0, data["lag_measure"]  # nothing waits in the slot

    # Changes wait in the slot while no daemon reads it: the lag is the age of the oldest.
    with capture.source() as conn:
        conn.execute("INSERT INTO s VALUES (1000, 'late')")
    time.sleep(1.5)
    code, data = as_json(capture)
    assert data["lag_measure"] == "the first transaction waiting in the slot"
    assert 1.0 <= data["lag_seconds"] < 60
    code, data = as_json(capture, CDC_CAPTURE__MAX_LAG_SECONDS="1")
    assert code == ExitCode.UNHEALTHY and any("max_lag_seconds" in p for p in data["problems"])

    # A baseline that did not complete is unhealthy too.
    capture.start()
    capture.wait_caught_up()
    code, data = as_json(capture)
    assert code == ExitCode.OK, data["problems"]
    with capture.store() as store:
        store.execute("UPDATE capture_state SET baseline_done = false")
    code, data = as_json(capture)
    assert code == ExitCode.UNHEALTHY and any("baseline" in p for p in data["problems"])
    with capture.store() as store:
        store.execute("UPDATE capture_state SET baseline_done = true")
