"""Source failover: the primary is killed mid-workload, its standby promoted, capture follows.

A real primary and a real streaming standby (tests/faults/cluster.py: pg_basebackup from the
same binaries), the history store on a third server, the daemon as a real ``cdc run`` process
with the multi-host DSN ``host=primary,standby ... target_session_attrs=primary``.

- ``test_failover_slot_survives_promotion`` (PostgreSQL 17+): a failover slot
  (``source.failover: true``), synchronized to the standby (``sync_replication_slots``,
  ``hot_standby_feedback``, ``primary_slot_name`` there, ``synchronized_standby_slots`` on the
  primary). The primary's postmaster is SIGKILLed mid-workload and the standby promoted. The
  end check is the fault suite's (``FaultEnv.finish``), against the NEW primary: replication
  is asynchronous, so requests the old primary committed that had not reached the standby are
  lost by the promotion itself (counted as ``commits_lost_by_promotion``, not as a fault of
  capture); everything the new primary has is stored exactly once, nothing it lacks is
  stored, no gap is recorded.
- ``test_unsynchronized_slot_is_a_recorded_gap`` (every version): the slot is not
  synchronized (``source.failover`` off; before 17 there is no way). After the promotion the
  daemon records a gap with its bounds and stops with exit code 5; ``cdc status`` is
  unhealthy; ``cdc setup`` refuses without ``--recreate-slot``; ``--recreate-slot`` takes a
  new baseline and records the gap in ``gaps`` with the daemon's reason; capture resumes and
  the rebuilt state equals the new primary.

Figures go to the fault suite's report (``[faults]`` lines) and docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from cdc.devdb import LocalPostgres
from cdc.errors import SetupError, SlotLostError
from cdc.status import collect_status
from tests.capture_env import CaptureEnv, rebuild, source_rows
from tests.conftest import _pg_params
from tests.faults.cluster import STANDBY_SLOT, Cluster, start_cluster
from tests.faults.conftest import (
    SCHEMA,
    SERVER_SETTINGS,
    TABLES,
    TAGGED_CHANGES,
    AckMonitor,
    FaultEnv,
    Servers,
    report,
    run_load,
)

pytestmark = pytest.mark.faults

#: Seconds between the primary's death and the promotion: a failover manager's detection time.
PROMOTE_AFTER = 2.0


def without_daemon(problems: list[str]) -> list[str]:
    """`cdc status`'s problems but the daemon's absence (the tests stop it before they look)."""
    return [p for p in problems if not p.startswith("no daemon is streaming")]


def _flavor(param: Any) -> str:
    if isinstance(param, SetupError):
        pytest.fail(str(param), pytrace=False)
    return str(param)


@contextlib.contextmanager
def failover_env(
    flavor: str, tmp_path: Path, scenario: str, *, synchronized: bool
) -> Iterator[tuple[FaultEnv, Cluster]]:
    """A primary, its standby and a store; tables, `cdc setup` through the multi-host DSN."""
    version = LocalPostgres(flavor=flavor).version
    if synchronized and version < 17:
        pytest.skip(f"failover slots need PostgreSQL 17+ (this is {version})")
    primary_settings = dict(SERVER_SETTINGS)
    standby_settings = {**SERVER_SETTINGS, "hot_standby_feedback": "on"}
    if synchronized:
        primary_settings["synchronized_standby_slots"] = STANDBY_SLOT
        standby_settings["sync_replication_slots"] = "on"
    cluster = start_cluster(flavor, primary_settings, standby_settings)
    store = LocalPostgres(flavor=flavor, settings=SERVER_SETTINGS)
    env: FaultEnv | None = None
    try:
        store.start()
        suffix = uuid.uuid4().hex[:8]
        cluster.primary.create_database(f"src_{suffix}")
        store_dsn = store.create_database(f"store_{suffix}")
        capture = CaptureEnv(
            cluster.primary,
            cluster.source_dsn(f"src_{suffix}"),
            store_dsn,
            slot=f"cdc_{suffix}",
            extra_env={"CDC_SOURCE__FAILOVER": "true" if synchronized else "false"},
        )
        with capture.source() as conn:
            conn.execute(SCHEMA)
        capture.setup()
        env = FaultEnv(Servers(cluster.primary, store), capture, tmp_path, scenario=scenario, promoted=True)
        env.notes["postgres_flavor"] = flavor
        yield env, cluster
    finally:
        if env is not None:
            if env.workload is not None:
                env.workload.stop()
            if env.monitor is not None:
                env.monitor.stop()
            if env.daemon is not None and env.daemon_alive():
                assert env.daemon.proc is not None
                env.daemon.proc.kill()
                env.daemon.proc.wait()
            print(f"[faults] daemon log: {tmp_path / 'daemon.log'}")
        store.cleanup()
        cluster.cleanup()


def daemon_env(env: FaultEnv) -> dict[str, str]:
    return {"CDC_SOURCE__FAILOVER": env.capture.extra_env["CDC_SOURCE__FAILOVER"]}


def wait_event(env: FaultEnv, name: str, before: int, timeout: float) -> float:
    """Seconds until the daemon logged one more ``name`` event."""
    started = time.monotonic()
    while env.log_events(name) <= before:
        assert time.monotonic() - started < timeout, f"no {name} within {timeout}s:\n{env.log_tail()}"
        time.sleep(0.05)
    return round(time.monotonic() - started, 2)


def wait_failover_ready(env: FaultEnv, timeout: float = 90) -> float:
    """Seconds until `cdc status` says the slot is ready to fail over (synced on the standby)."""
    started = time.monotonic()
    while True:
        status = collect_status(env.capture.config)
        failover = status.failover or {}
        if failover.get("ready"):
            return round(time.monotonic() - started, 2)
        assert time.monotonic() - started < timeout, f"failover never ready: {json.dumps(failover)}"
        time.sleep(0.5)


def metric(env: FaultEnv, name: str) -> dict[str, float]:
    """The daemon's samples of a metric, by their label text."""
    assert env.daemon is not None
    url = f"http://127.0.0.1:{env.daemon.http_port()}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    found = {}
    for line in text.splitlines():
        match = re.match(rf"^{name}(\{{[^}}]*\}})? (\S+)$", line)
        if match:
            found[match.group(1) or ""] = float(match.group(2))
    return found


def store_rows(env: FaultEnv, query: str) -> list[tuple[Any, ...]]:
    with env.store() as conn:
        return list(conn.execute(query).fetchall())


# ============================================================================ a synchronized failover slot


@pytest.mark.parametrize("flavor", [p for p in _pg_params() if "system" not in str(p.values[0])])
def test_failover_slot_survives_promotion(flavor: Any, tmp_path: Path) -> None:
    with failover_env(_flavor(flavor), tmp_path, "failover_slot_survives_promotion", synchronized=True) as (
        env,
        cluster,
    ):
        env.start_daemon(daemon_env(env))
        workload = run_load(env, seed=19)
        env.notes["failover_ready_after_seconds"] = wait_failover_ready(env)
        workload.wait_requests(60)
        switched_before = env.log_events("source_switched")
        entry = env.fault("primary SIGKILL, standby promoted")
        killed = time.monotonic()
        cluster.primary.kill()
        time.sleep(PROMOTE_AFTER)
        cluster.promote()
        promoted = time.monotonic()
        env.notes["switch_after_promotion_seconds"] = wait_event(env, "source_switched", switched_before, 60)
        env.notes["capture_outage_seconds"] = round(time.monotonic() - killed, 2)
        env.recovered(entry)
        env.notes["caught_up_after_promotion_seconds"] = round(time.monotonic() - promoted, 2)
        workload.wait_requests(40)
        # The daemon's own account of the switch, the store's and `cdc status`'s, before it stops.
        switches = store_rows(
            env,
            "SELECT outcome, host, timeline, previous_timeline, slot_synced, acked_lsn, slot_confirmed_lsn, fork_lsn "
            "FROM source_switches ORDER BY switch_id",
        )
        gaps = store_rows(env, "SELECT count(*) FROM gaps")[0][0]
        status = collect_status(env.capture.config)
        env.notes.update(
            metrics={
                "cdc_source_switches_total": metric(env, "cdc_source_switches_total"),
                "cdc_source_info": metric(env, "cdc_source_info"),
            },
            switches=[list(map(str, s)) for s in switches],
            gaps=gaps,
            status_problems_after=status.problems,
        )
        figures = env.finish()
        assert [s[0] for s in switches] == ["first", "resumed"], switches
        resumed = switches[1]
        assert resumed[1] == f"127.0.0.1:{cluster.standby.port}" and resumed[2] == 2 and resumed[3] == 1
        assert resumed[4] is True, "the slot on the new primary was synchronized from the old one"
        assert resumed[6] <= resumed[5] <= resumed[7], "slot confirmed <= acked <= the old timeline's end"
        assert gaps == 0
        assert without_daemon(status.problems) == [] and status.pending_gap is None
        assert env.notes["metrics"]["cdc_source_switches_total"].get('{outcome="resumed"}') == 1.0
        assert figures["transactions_committed"] > 100


# ============================================================================ a slot that was not synchronized


def run_cli(env: FaultEnv, *args: str) -> subprocess.CompletedProcess[str]:
    environ = {
        "CDC_SOURCE_DSN": env.capture.source_dsn,
        "CDC_STORE_DSN": env.capture.store_dsn,
        "CDC_STORE__SCHEMA": env.capture.schema,
        "CDC_SOURCE__SLOT": env.capture.slot,
        "CDC_SOURCE__PUBLICATION": env.capture.slot,
        "PATH": "/usr/bin:/bin",
    }
    return subprocess.run(
        [sys.executable, "-m", "cdc", *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize("flavor", _pg_params())
def test_unsynchronized_slot_is_a_recorded_gap(flavor: Any, tmp_path: Path) -> None:
    with failover_env(
        _flavor(flavor), tmp_path, "unsynchronized_slot_is_a_recorded_gap", synchronized=False
    ) as (
        env,
        cluster,
    ):
        env.start_daemon(daemon_env(env))
        workload = run_load(env, seed=23)
        workload.wait_requests(40)
        acked_before = env.acked_lsn()
        entry = env.fault("primary SIGKILL, standby promoted (slot not synchronized)")
        killed = time.monotonic()
        cluster.primary.kill()
        time.sleep(PROMOTE_AFTER)
        cluster.promote()
        promoted = time.monotonic()
        # The daemon finds no slot on the new primary: a gap, recorded, and it stops.
        assert env.daemon is not None and env.daemon.proc is not None
        code = env.daemon.proc.wait(timeout=60)
        env.notes["gap_detected_after_promotion_seconds"] = round(time.monotonic() - promoted, 2)
        assert code == SlotLostError.exit_code, env.log_tail()
        # The ack monitor watches the daemon: `cdc setup --recreate-slot` below creates a slot
        # confirmed past the store until its baseline commits. Watched again once it has.
        assert env.monitor is not None
        env.monitor.stop()
        monitors = [env.monitor]
        assert env.log_events("source_gap") == 1, env.log_tail()
        pending = store_rows(
            env,
            "SELECT outcome, host, timeline, acked_lsn, slot_confirmed_lsn, reason, resolved_position "
            "FROM source_switches WHERE outcome = 'gap'",
        )
        assert len(pending) == 1, pending
        outcome, host, timeline, gap_after, confirmed, reason, resolved = pending[0]
        assert outcome == "gap" and timeline == 2
        assert host == f"127.0.0.1:{cluster.standby.port}" and confirmed is None and resolved is None
        assert gap_after >= (acked_before or 0) and "not synchronized" in reason
        # cdc status: unhealthy (exit code 10), the gap shown
        status = run_cli(env, "status", "--format", "json")
        assert status.returncode == 10, status.stdout + status.stderr
        shown = json.loads(status.stdout)
        assert shown["pending_gap"] and "not synchronized" in shown["pending_gap"]
        # The daemon started again stops again at the same gap (nothing recorded twice).
        env.start_daemon(daemon_env(env), wait=False)
        assert env.daemon.proc.wait(timeout=60) == SlotLostError.exit_code
        env.daemon.starts -= 1  # it never streamed (wait_streaming counts the runs that did)
        assert len(store_rows(env, "SELECT 1 FROM source_switches WHERE outcome = 'gap'")) == 1
        # cdc setup refuses without --recreate-slot, then records the gap with a new baseline.
        refused = run_cli(env, "setup")
        assert refused.returncode == SlotLostError.exit_code, refused.stdout + refused.stderr
        recreated = run_cli(env, "setup", "--recreate-slot")
        assert recreated.returncode == 0, recreated.stdout + recreated.stderr
        gaps = store_rows(env, "SELECT after_position, resumed_position, reason FROM gaps")
        assert len(gaps) == 1 and gaps[0][0] == gap_after and gaps[0][1] > gap_after, gaps
        assert "not synchronized" in gaps[0][2]
        env.monitor = AckMonitor(env).start()
        monitors.append(env.monitor)
        env.start_daemon(daemon_env(env))
        env.recovered(entry)
        env.notes["capture_resumed_after_kill_seconds"] = round(time.monotonic() - killed, 2)
        workload.wait_requests(20)
        workload.stop()
        env.wait_caught_up()
        assert env.daemon.stop() == 0
        env.monitor.stop()
        # The state rebuilt from the history (the baseline after the gap, then the stream)
        # equals the new primary's.
        for table in TABLES:
            assert rebuild(env.capture, table) == source_rows(env.capture, table), table
        final = collect_status(env.capture.config)
        assert without_daemon(final.problems) == [] and final.pending_gap is None and len(final.gaps) == 1
        # Nothing doubled, across the gap either: no request has more stored changes than it made.
        # Requests of the new primary with none stored fell in the gap (before the new baseline).
        with psycopg.connect(env.capture.source_dsn, autocommit=True) as conn:
            truth = {str(r[0]) for r in conn.execute("SELECT request_id FROM events").fetchall()}
        with env.store() as conn:
            stored = dict(
                conn.execute(
                    f"SELECT request_id, count(*) FROM ({TAGGED_CHANGES}) t WHERE committed AND op <> 'S' "
                    "AND request_id IS NOT NULL GROUP BY 1"
                ).fetchall()
            )
        assert workload is not None
        made = {**workload.unknown, **workload.committed}
        doubled = sum(max(0, n - made.get(rid, 0)) for rid, n in stored.items() if rid in truth)
        assert doubled == 0
        assert not [rid for rid in stored if rid not in truth], "stored a request the new primary lacks"
        report(
            env,
            {
                "transactions_on_new_primary": len(truth),
                "transactions_in_the_gap": sum(1 for rid in truth if rid not in stored),
                "mutations_doubled": doubled,
                "gap_after": gap_after,
                "gap_resumed": gaps[0][1],
                "gap_reason": gaps[0][2],
                "status_exit_code_at_gap": status.returncode,
                "ack_monitor_samples": sum(m.samples for m in monitors),
                "ack_ahead_of_store": sum(len(m.violations) for m in monitors),
            },
        )
        assert all(not m.violations for m in monitors), [m.violations for m in monitors]


# ============================================================================ a standby behind capture


def standby_slot_synced(env: FaultEnv) -> bool:
    from cdc.failover_readiness import readiness

    result = readiness(env.capture.source_dsn, env.capture.slot)
    return any(s.slot == "synced" for s in result.standbys)


@pytest.mark.parametrize("flavor", [p for p in _pg_params() if "system" not in str(p.values[0])])
def test_promotion_behind_capture_is_a_recorded_fork(flavor: Any, tmp_path: Path) -> None:
    """Without ``synchronized_standby_slots``, capture may store changes the standby never
    received. A failover slot then survives the promotion, but the new primary's history ends
    the old timeline before the store's acknowledged position: a fork, recorded, never resumed
    past silently (the new primary would reuse those positions for other transactions)."""
    with failover_env(
        _flavor(flavor), tmp_path, "promotion_behind_capture_is_a_recorded_fork", synchronized=True
    ) as (
        env,
        cluster,
    ):
        with psycopg.connect(cluster.primary.dsn(), autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET synchronized_standby_slots = ''")
            conn.execute("SELECT pg_reload_conf()")
        env.start_daemon(daemon_env(env))
        with env.source() as conn:
            deadline = time.monotonic() + 90
            while not standby_slot_synced(env):  # the daemon's confirmations complete the first sync
                conn.execute("UPDATE accounts SET balance = balance + 1 WHERE id = 1")
                assert time.monotonic() < deadline, "the slot was never synchronized"
                time.sleep(0.5)
        # The standby stops receiving WAL; capture goes on from the primary.
        with psycopg.connect(cluster.standby.dsn(), autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET primary_conninfo = ''")
            conn.execute("SELECT pg_reload_conf()")
        time.sleep(1)
        with env.source() as conn:
            for i in range(20):
                conn.execute(
                    "INSERT INTO events (request_id, kind) VALUES (%s, 'old primary only')", (f"x{i}",)
                )
        env.wait_caught_up()
        cluster.primary.kill()
        entry = env.fault("standby behind capture promoted")
        cluster.promote()
        assert env.daemon is not None and env.daemon.proc is not None
        assert env.daemon.proc.wait(timeout=60) == SlotLostError.exit_code, env.log_tail()
        assert env.log_events("source_fork") == 1, env.log_tail()
        fork = store_rows(
            env, "SELECT acked_lsn, fork_lsn, slot_synced, reason FROM source_switches WHERE outcome = 'fork'"
        )
        assert len(fork) == 1 and fork[0][1] < fork[0][0] and fork[0][2] is True, fork
        assert "never reached the promoted one" in fork[0][3]
        phantom = store_rows(
            env, f"SELECT count(*) FROM transactions WHERE status = 'c' AND position > {int(fork[0][1])}"
        )[0][0]
        assert phantom >= 20
        status = run_cli(env, "status", "--format", "json")
        assert status.returncode == 10 and json.loads(status.stdout)["pending_gap"].startswith("fork")
        recreated = run_cli(env, "setup", "--recreate-slot")
        assert recreated.returncode == 0, recreated.stdout + recreated.stderr
        gaps = store_rows(env, "SELECT after_position, resumed_position, reason FROM gaps")
        assert len(gaps) == 1 and gaps[0][2].startswith("fork:"), gaps
        env.start_daemon(daemon_env(env))
        env.recovered(entry)
        with env.source() as conn:
            conn.execute("UPDATE accounts SET balance = 0 WHERE id = 2")
        env.wait_caught_up()
        assert env.daemon.stop() == 0
        for table in TABLES:
            assert rebuild(env.capture, table) == source_rows(env.capture, table), table
        report(
            env,
            {
                "acked_lsn": fork[0][0],
                "fork_lsn": fork[0][1],
                "transactions_only_on_old_primary": phantom,
                "gap_reason": gaps[0][2],
            },
        )
