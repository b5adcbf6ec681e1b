"""The baseline `cdc setup` records (docs/baseline.md): all or nothing per table, interrupted at
random moments and completed, exact with each row once; read in block ranges in parallel;
progress printed; incomplete history said so by readers and `cdc status`."""

from __future__ import annotations

import os
import pty
import random
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from cdc import baseline
from cdc.errors import IncompleteHistoryError, SetupError
from cdc.history import History
from cdc.setup import setup
from cdc.status import collect_status
from tests.capture_env import CaptureEnv, new_env, rebuild, source_rows, table_id

ROWS = 300_000


def cli_env(env: CaptureEnv, **extra: str) -> dict[str, str]:
    environ = dict(os.environ)
    environ.update(
        {
            "CDC_SOURCE_DSN": env.source_dsn,
            "CDC_STORE_DSN": env.store_dsn,
            "CDC_STORE__SCHEMA": env.schema,
            "CDC_SOURCE__SLOT": env.slot,
            "CDC_SOURCE__PUBLICATION": env.slot,
            "CDC_LOGGING__FORMAT": "json",
        }
    )
    environ.update(extra)
    return environ


def fill(env: CaptureEnv, rows: int = ROWS) -> None:
    with env.source() as conn:
        conn.execute("CREATE TABLE big (id int PRIMARY KEY, name text, amount numeric, at timestamptz)")
        conn.execute(
            "INSERT INTO big SELECT g, repeat(md5(g::text), 3), g * 1.5, '2026-01-01'::timestamptz + g * interval '1 s' "
            "FROM generate_series(1, %s) g",
            (rows,),
        )
        conn.execute("CREATE TABLE small (k text PRIMARY KEY, v int)")
        conn.execute("INSERT INTO small SELECT 'k' || g, g FROM generate_series(1, 1000) g")
        conn.execute("ANALYZE big")


def snapshot_rows(env: CaptureEnv) -> list[tuple[Any, ...]]:
    """(position, count) of the stored SNAPSHOT rows, by position."""
    with env.store() as conn:
        return conn.execute(
            "SELECT position, count(*) FROM changes WHERE op = 'S' GROUP BY position ORDER BY 1"
        ).fetchall()


def test_interrupted_baseline_completes_exactly_once(
    capture: CaptureEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(capture)
    rng = random.Random(os.environ.get("CDC_TEST_SEED", "15"))
    interrupted = 0
    for attempt, sig in enumerate((signal.SIGINT, signal.SIGKILL, signal.SIGTERM, signal.SIGKILL)):
        proc = subprocess.Popen(
            [sys.executable, "-m", "cdc", "setup"],
            env=cli_env(capture),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines: list[str] = []
        started_reading = threading.Event()

        def read(
            proc: subprocess.Popen[str] = proc,
            lines: list[str] = lines,
            event: threading.Event = started_reading,
        ) -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                lines.append(line)
                if "baseline_table_started" in line:
                    event.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        if attempt == 0:
            time.sleep(rng.uniform(0.3, 1.0))  # maybe before the baseline began
        else:
            # within the baseline: its start is seen on stderr (log lines when not a terminal)
            started_reading.wait(timeout=60)
            time.sleep(rng.uniform(0.0, 1.2))
        if proc.poll() is not None:
            reader.join(timeout=5)
            pytest.fail(f"setup finished before it could be interrupted: {''.join(lines)[-2000:]}")
        proc.send_signal(sig)
        proc.wait(timeout=60)
        interrupted += 1
        # Nothing of the unfinished baseline answers a reader; status says so.
        with capture.store() as conn:
            ready = conn.execute("SELECT to_regclass('baselines') IS NOT NULL").fetchone()
            if not ready or not ready[0]:
                continue  # interrupted before the store schema was there
            state = conn.execute("SELECT baseline_done FROM capture_state").fetchone()
            started = conn.execute("SELECT count(*) FROM baselines").fetchone()
        assert state is None or state[0] is False
        if started and started[0]:
            history = History(capture.store_dsn, schema=capture.schema)
            earliest = history.earliest_version()
            assert earliest is not None
            with pytest.raises(IncompleteHistoryError, match=r"history of public\.big is incomplete"):
                history.at(version=earliest).table("big").get(1)
            status = collect_status(capture.config)
            assert not status.healthy
            assert {i["table"] for i in status.incomplete} >= {"public.big"}
        # At most one baseline's rows are in the store, at the slot's consistent point.
        assert len(snapshot_rows(capture)) <= 1
    assert interrupted == 4
    monkeypatch.setattr(baseline, "RANGE_MIN_PAGES", 64)  # the large table in block ranges, in parallel
    setup(capture.config)
    with capture.store() as conn:
        lsn = conn.execute("SELECT baseline_lsn FROM capture_state").fetchone()
        states = conn.execute("SELECT state, chunks_total, rows FROM baselines ORDER BY rows").fetchall()
    assert snapshot_rows(capture) == [(lsn[0], ROWS + 1000)]
    assert states[-1][0] == "done" and states[-1][1] > 1 and states[-1][2] == ROWS
    assert all(s[0] == "done" for s in states)
    assert collect_status(capture.config).incomplete == []
    capture.start()
    with capture.source() as conn:
        conn.execute("UPDATE big SET name = 'changed' WHERE id % 1000 = 0")
        conn.execute("DELETE FROM big WHERE id % 999 = 0")
        conn.execute("INSERT INTO big VALUES (0, 'zero', 0, now())")
    capture.wait_caught_up()
    for table in ("public.big", "public.small"):
        assert rebuild(capture, table) == source_rows(capture, table), table
    history = History(capture.store_dsn, schema=capture.schema)
    assert history.at(version=history.earliest_version()).table("big").get(1000)["name"] != "changed"  # type: ignore[index]
    with capture.store() as conn:
        keys = conn.execute(
            "SELECT count(DISTINCT key_text), count(*) FROM changes WHERE op = 'S' AND table_id = %s",
            (table_id(capture, "big"),),
        ).fetchone()
    assert keys == (ROWS, ROWS)
    assert capture.stop() == 0


def test_progress_is_printed_during_a_baseline(capture: CaptureEnv) -> None:
    fill(capture, 100_000)
    structlog.reset_defaults()  # an earlier test may have left a level filter above info
    # Not a terminal: log lines (table started, progress, done) with rows, estimate, rate, ETA.
    with capture_logs() as logs:
        from cdc.progress import Progress

        with Progress("baseline", terminal=False, interval=0.0) as progress:
            setup(capture.config, progress=progress)
    events = [e for e in logs if e["event"].startswith("baseline_")]
    started = [e for e in events if e["event"] == "baseline_table_started" and e["table"] == "public.big"]
    assert started and started[0]["estimated_rows"] == 100_000
    lines = [e for e in events if e["event"] == "baseline_progress" and e["table"] == "public.big"]
    assert lines, events
    assert {"rows", "estimated_rows", "percent", "rows_per_second", "eta_seconds"} <= set(lines[-1])
    done = [e for e in events if e["event"] == "baseline_table_done" and e["table"] == "public.big"]
    assert done and done[0]["rows"] == 100_000 and done[0]["rows_per_second"] > 0


def test_progress_bar_on_a_terminal(pg: Any) -> None:
    env = new_env(pg)
    try:
        fill(env, 50_000)
        leader, follower = pty.openpty()
        proc = subprocess.Popen(
            [sys.executable, "-m", "cdc", "setup"],
            env=cli_env(env, TERM="xterm", COLUMNS="160"),
            stdin=follower,
            stdout=follower,
            stderr=follower,
        )
        os.close(follower)
        output = b""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if ready:
                try:
                    data = os.read(leader, 65536)
                except OSError:
                    break
                if not data:
                    break
                output += data
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=30) == 0, output.decode(errors="replace")[-3000:]
        text = output.decode(errors="replace")
        assert "public.big" in text and "rows/s" in text and "50,000" in text, text[-3000:]
    finally:
        env.teardown()


def test_slot_name_of_another_database_is_refused(pg: Any) -> None:
    first, second = new_env(pg), new_env(pg)
    second.slot = first.slot
    try:
        with first.source() as conn:
            conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        with second.source() as conn:
            conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        first.setup()
        with pytest.raises(SetupError, match=r"choose another source\.slot"):
            setup(second.config)
        with first.source() as conn:  # the first database's slot is untouched
            row = conn.execute(
                "SELECT database FROM pg_replication_slots WHERE slot_name = %s", (first.slot,)
            ).fetchone()
        assert row is not None and row[0] == first.source_dsn.rsplit("dbname=", 1)[-1].split()[0]
    finally:
        first.teardown()
