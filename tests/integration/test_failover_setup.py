"""`cdc setup` and `cdc status` with a standby (PostgreSQL 17+): a failover slot, the settings
both servers need named with the statement that sets them, readiness once the standby's copy of
the slot is synchronized (cdc/failover_readiness.py)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from cdc.devdb import LocalPostgres
from cdc.errors import SetupError
from cdc.setup import setup
from cdc.status import collect_status, render_status
from tests.capture_env import CaptureEnv
from tests.conftest import _pg_params
from tests.faults.cluster import STANDBY_SLOT, Cluster, start_cluster


@pytest.fixture(params=[p for p in _pg_params() if "system" not in str(p.values[0])])
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    if isinstance(request.param, SetupError):
        pytest.fail(str(request.param), pytrace=False)
    if LocalPostgres(flavor=request.param).version < 17:
        pytest.skip("failover slots need PostgreSQL 17+")
    # Nothing configured for slot synchronization yet.
    cluster = start_cluster(request.param, {}, {})
    try:
        yield cluster
    finally:
        cluster.cleanup()


def slot_failover(env: CaptureEnv) -> Any:
    with env.source() as conn:
        row = conn.execute(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = %s", (env.slot,)
        ).fetchone()
    return row[0] if row else None


def test_setup_names_every_missing_setting_then_status_is_ready(cluster: Cluster) -> None:
    suffix = uuid.uuid4().hex[:8]
    cluster.primary.create_database(f"src_{suffix}")
    store = cluster.primary.create_database(f"store_{suffix}")
    env = CaptureEnv(cluster.primary, cluster.source_dsn(f"src_{suffix}"), store, slot=f"cdc_{suffix}")
    with env.source() as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, n int)")
    try:
        # source.failover off: a plain slot, and a warning that a promotion loses it
        report = setup(env.config)
        assert slot_failover(env) is False
        assert any("source.failover is off" in w for w in report.warnings), report.warnings

        env.extra_env["CDC_SOURCE__FAILOVER"] = "true"
        report = setup(env.config)
        assert slot_failover(env) is True, "setup turns the existing slot into a failover slot"
        assert f"source: slot {env.slot} failover on" in report.steps
        text = "\n".join(report.warnings)
        assert f"ALTER SYSTEM SET synchronized_standby_slots = '{STANDBY_SLOT}'" in text, text
        assert "ALTER SYSTEM SET sync_replication_slots = on" in text
        assert "ALTER SYSTEM SET hot_standby_feedback = on" in text
        assert "primary_slot_name" not in text and "dbname" not in text  # pg_basebackup -R -C -S did those

        status = collect_status(env.config)
        assert status.failover is not None and status.failover["ready"] is False
        # not ready to fail over is not a capture failure (no daemon runs here: that one is)
        assert status.problems == ["no daemon is streaming from the slot"], status.problems

        # Do what setup said.
        with psycopg.connect(cluster.primary.dsn(), autocommit=True) as conn:
            conn.execute(f"ALTER SYSTEM SET synchronized_standby_slots = '{STANDBY_SLOT}'")
            conn.execute("SELECT pg_reload_conf()")
        with psycopg.connect(cluster.standby.dsn(), autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET sync_replication_slots = on")
            conn.execute("ALTER SYSTEM SET hot_standby_feedback = on")
            conn.execute("SELECT pg_reload_conf()")
        env.start()
        deadline = time.monotonic() + 90
        with env.source() as conn:
            while True:
                conn.execute("INSERT INTO t VALUES (%s, 1) ON CONFLICT (id) DO UPDATE SET n = t.n + 1", (1,))
                status = collect_status(env.config)
                if status.failover and status.failover["ready"]:
                    break
                assert time.monotonic() < deadline, status.failover
                time.sleep(0.5)
        assert status.failover["problems"] == []
        (standby,) = status.failover["standbys"]
        assert standby["host"] == f"127.0.0.1:{cluster.standby.port}" and standby["slot"] == "synced"
        lines = dict(render_status(status))
        assert lines["failover"] == "READY (slot failover: yes)"
        assert lines["source server"] == f"127.0.0.1:{cluster.primary.port}"
        env.stop()  # setup takes the store's lock
        assert not setup(env.config).warnings
    finally:
        env.teardown()
