"""Nothing lost, nothing recorded twice: SIGKILL of the daemon, a server restart, and
the memory bound of a very large transaction. The daemon runs as a real `cdc run`
process here, so SIGKILL is the real thing."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.capture_env import CaptureEnv, rebuild, source_rows, table_id

MEMORY_BOUND_MB = 200  # stated in the README


class DaemonProcess:
    def __init__(self, env: CaptureEnv, log_path: Path, extra: dict[str, str] | None = None) -> None:
        self.env = env
        self.log_path = log_path
        self.extra = extra or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        environ = dict(os.environ)
        environ.update(
            {
                "CDC_SOURCE_DSN": self.env.source_dsn,
                "CDC_STORE_DSN": self.env.store_dsn,
                "CDC_SOURCE__SLOT": self.env.slot,
                "CDC_SOURCE__PUBLICATION": self.env.slot,
                "CDC_CAPTURE__STATUS_INTERVAL_SECONDS": "1",
                "CDC_RECONNECT__INITIAL_BACKOFF_SECONDS": "0.2",
                "CDC_RECONNECT__MAX_BACKOFF_SECONDS": "1",
                "CDC_LOGGING__FORMAT": "json",
                "CDC_SERVER__LISTEN": "127.0.0.1:0",
            }
        )
        environ.update(self.extra)
        self.starts += 1
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cdc", "run"], env=environ, stdout=log, stderr=log
        )

    def wait_streaming(self, timeout: float = 20) -> None:
        """Wait for this run's `streaming_started` line (the daemon counts them from the log)."""
        deadline = time.monotonic() + timeout
        while self.log_path.read_text().count("streaming_started") < self.starts:
            assert self.proc is not None and self.proc.poll() is None, "daemon exited"
            assert time.monotonic() < deadline, "daemon did not start streaming"
            time.sleep(0.05)

    def http_port(self) -> int:
        for line in self.log_path.read_text().splitlines():
            if '"http_listening"' in line:
                return int(json.loads(line)["port"])
        raise AssertionError("the daemon did not log its HTTP port")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def peak_rss_mb(self) -> float:
        """Peak RSS of the daemon's process and of its store writer process, together."""
        assert self.proc is not None
        pid = self.proc.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        total = 0.0
        for process in (pid, *map(int, children)):
            for line in Path(f"/proc/{process}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
                    print("VmHWM", process, int(line.split()[1]) // 1024)
        return total


@pytest.fixture
def daemon_proc(capture: CaptureEnv, tmp_path: Path) -> Iterator[DaemonProcess]:
    proc = DaemonProcess(capture, tmp_path / "daemon.log")
    yield proc
    if proc.proc is not None and proc.proc.poll() is None:
        proc.proc.kill()
        proc.proc.wait()


def writer_load(env: CaptureEnv, stop: threading.Event, counter: list[int]) -> None:
    rng = random.Random(99)
    with env.source() as conn:
        while not stop.is_set():
            with conn.transaction():
                key = rng.randint(1, 500)
                conn.execute(
                    "INSERT INTO ledger VALUES (%s, 1) ON CONFLICT (id) DO UPDATE SET n = ledger.n + 1",
                    (key,),
                )
                if rng.random() < 0.2:
                    conn.execute("DELETE FROM ledger WHERE id = %s", (rng.randint(1, 500),))
                conn.execute("INSERT INTO events (note) VALUES ('e')")
            counter[0] += 1


def test_sigkill_at_random_moments_loses_and_duplicates_nothing(
    capture: CaptureEnv, daemon_proc: DaemonProcess
) -> None:
    with capture.source() as conn:
        conn.execute("CREATE TABLE ledger (id int PRIMARY KEY, n int)")
        conn.execute("CREATE TABLE events (id bigserial PRIMARY KEY, note text)")
    capture.setup()
    stop = threading.Event()
    counter = [0]
    load = threading.Thread(target=writer_load, args=(capture, stop, counter))
    load.start()
    rng = random.Random(5)
    try:
        for _ in range(5):
            daemon_proc.start()
            time.sleep(rng.uniform(0.3, 1.5))
            daemon_proc.kill()
    finally:
        stop.set()
        load.join()
    daemon_proc.start()
    capture.wait_caught_up(timeout=120)
    assert daemon_proc.stop() == 0
    assert counter[0] > 50
    for table in ("public.ledger", "public.events"):
        assert rebuild(capture, table) == source_rows(capture, table)
    with capture.store() as store:
        # events is insert-only: exactly one INSERT per row, none lost, none twice.
        row = store.execute(
            "SELECT count(*), count(DISTINCT key_text) FROM changes WHERE table_id = %s",
            (table_id(capture, "events"),),
        ).fetchone()
        committed = store.execute("SELECT count(*) FROM transactions WHERE status = 'c'").fetchone()
    assert row is not None and row[0] == row[1]
    with capture.source() as conn:
        total = conn.execute("SELECT count(*) FROM events").fetchone()
    assert total is not None and row[0] == total[0]
    assert committed is not None and committed[0] >= counter[0]


def test_sigkill_in_the_middle_of_a_large_transaction_stores_each_change_once(
    capture: CaptureEnv, daemon_proc: DaemonProcess
) -> None:
    """The daemon dies after some batches of one large transaction were written (without its
    ack); restarted, it writes the transaction again: every change exactly once."""
    rows = 200_000
    daemon_proc.extra = {"CDC_CAPTURE__BATCH_MAX_ROWS": "2000"}
    with capture.source() as conn:
        conn.execute("CREATE TABLE bulk (id int PRIMARY KEY, payload text)")
    capture.setup()
    daemon_proc.start()
    daemon_proc.wait_streaming()
    with capture.source() as conn:
        conn.execute("INSERT INTO bulk SELECT g, md5(g::text) FROM generate_series(1, %s) g", (rows,))
    partial = 0
    deadline = time.monotonic() + 120
    with capture.store() as store:
        while partial == 0:
            assert time.monotonic() < deadline, "no batch of the large transaction was written"
            found = store.execute(
                "SELECT count(*) FROM changes c, capture_state s WHERE s.slot_name = %s "
                "AND c.position > s.acked_lsn",
                (capture.slot,),
            ).fetchone()
            partial = int(found[0]) if found else 0
            time.sleep(0.01)
    daemon_proc.kill()
    assert 0 < partial < rows, partial
    daemon_proc.start()
    capture.wait_caught_up(timeout=300)
    assert daemon_proc.stop() == 0
    with capture.store() as store:
        found = store.execute(
            "SELECT count(*), count(DISTINCT ordinal), count(DISTINCT key_text), count(DISTINCT position) "
            "FROM changes WHERE table_id = %s",
            (table_id(capture, "bulk"),),
        ).fetchone()
        txns = store.execute("SELECT count(*), sum(change_count) FROM transactions WHERE xid <> 0").fetchone()
    assert found == (rows, rows, rows, 1)
    assert txns == (1, rows)
    assert rebuild(capture, "public.bulk") == source_rows(capture, "public.bulk")


def test_daemon_reconnects_after_postgres_restart(capture: CaptureEnv, daemon_proc: DaemonProcess) -> None:
    with capture.source() as conn:
        conn.execute("CREATE TABLE ledger (id int PRIMARY KEY, n int)")
    capture.setup()
    daemon_proc.start()
    with capture.source() as conn:
        conn.execute("INSERT INTO ledger SELECT g, 0 FROM generate_series(1, 100) g")
    capture.wait_caught_up()
    capture.pg.restart()
    with capture.source() as conn:
        conn.execute("UPDATE ledger SET n = n + 1 WHERE id <= 50")
    capture.wait_caught_up(timeout=60)
    assert daemon_proc.proc is not None and daemon_proc.proc.poll() is None
    assert rebuild(capture, "public.ledger") == source_rows(capture, "public.ledger")
    assert daemon_proc.stop() == 0


@pytest.mark.slow
def test_million_row_transaction_stays_under_the_memory_bound(
    capture: CaptureEnv, daemon_proc: DaemonProcess
) -> None:
    with capture.source() as conn:
        conn.execute("CREATE TABLE wide (id int PRIMARY KEY, a text, b numeric, c timestamptz)")
    capture.setup()
    daemon_proc.start()
    with capture.source() as conn:
        conn.execute(
            "INSERT INTO wide SELECT g, md5(g::text), g * 1.5, now() FROM generate_series(1, 1000000) g"
        )
    capture.wait_caught_up(timeout=600)
    peak = daemon_proc.peak_rss_mb()
    print(f"peak RSS, both processes: {peak:.0f} MB")
    assert daemon_proc.stop() == 0
    with capture.store() as store:
        row = store.execute(
            "SELECT count(*) FROM changes WHERE table_id = %s", (table_id(capture, "wide"),)
        ).fetchone()
    assert row == (1_000_000,)
    assert peak < MEMORY_BOUND_MB, f"peak RSS {peak:.0f} MB"
