"""Core.drain against a real server: the libpq path (PQgetCopyData called from C on psycopg's
PGconn) reads the same frames as the psycopg path (a get_copy_data call per frame), ends and
fails the same way; with psycopg[binary] and with the pure-Python psycopg (system libpq)."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest

from bench.drain import PsycopgOnly, describe, open_stream, read_until
from cdc.capture import core as python_core
from cdc.capture import model
from cdc.devdb import LocalPostgres
from tests.capture_drain import END, NOW_US, PUBLICATION, SETTINGS, prepare, read_slot
from tests.unit.capture_support import compiled

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model, "now_us", lambda: NOW_US)


def new_source(pg: LocalPostgres, slots: int) -> tuple[str, list[str]]:
    suffix = uuid.uuid4().hex[:8]
    dsn = pg.create_database(f"drain_{suffix}")
    names = [f"drain_{suffix}_{i}" for i in range(slots)]
    prepare(dsn, names)
    return dsn, names


def drop_slots(dsn: str, slots: list[str]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for slot in slots:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))


def check_events(outcome: list[object]) -> None:
    finished = [item[0] for item in outcome if isinstance(item, tuple)]
    assert [t.status for t in finished].count("r") == 1 and len(finished) == 39  # 38 committed
    assert any(t.flags & model.STREAMED for t in finished)
    assert any(b"\tT\t" in item[1] for item in outcome if isinstance(item, tuple))


def test_pure_core_drains_the_whole_stream(pg: LocalPostgres) -> None:
    """Also where the compiled core is not built (CDC_NO_EXTENSION=1)."""
    dsn, slots = new_source(pg, 1)
    try:
        outcome, core = read_slot(dsn, slots[0], python_core, "libpq")
    finally:
        drop_slots(dsn, slots)
    assert core.drain_path == "psycopg"
    check_events(outcome)


def test_both_drain_paths_read_the_same_events(pg: LocalPostgres) -> None:
    compiled_core = compiled()
    dsn, slots = new_source(pg, 3)
    try:
        via_libpq, core = read_slot(dsn, slots[0], compiled_core, "libpq")
        assert core.drain_path == "libpq"
        via_psycopg, other = read_slot(dsn, slots[1], compiled_core, "psycopg")
        assert other.drain_path == "psycopg"
        pure, pure_core = read_slot(dsn, slots[2], python_core, "libpq")
        assert pure_core.drain_path == "psycopg"
    finally:
        drop_slots(dsn, slots)
    assert via_libpq == via_psycopg == pure
    assert core.last_received_lsn == other.last_received_lsn
    check_events(via_libpq)


@pytest.mark.parametrize("path", ["libpq", "psycopg"])
def test_drain_returns_minus_one_when_copy_ends_and_leaves_the_result(pg: LocalPostgres, path: str) -> None:
    compiled_core = compiled()
    dsn, slots = new_source(pg, 1)
    conn = open_stream(dsn, slots[0], PUBLICATION, SETTINGS)
    try:
        pgconn = conn.pgconn
        source = pgconn if path == "libpq" else PsycopgOnly(pgconn)
        core = compiled_core.Core(describe)
        read_until(core, source, pgconn, END)
        pgconn.put_copy_end()
        pgconn.flush()
        while (count := core.drain(source)) >= 0:
            select.select([pgconn.socket], [], [], 1.0)
            pgconn.consume_input()
        assert count == -1 and core.drain_path == path
        result = pgconn.get_result()
        assert result is not None and result.status == psycopg.pq.ExecStatus.COMMAND_OK
    finally:
        conn.close()
        drop_slots(dsn, slots)


def test_drain_errors_as_psycopg_does(pg: LocalPostgres) -> None:
    """PQgetCopyData's -2 (here: no COPY in progress) raises psycopg's own error on both paths."""
    compiled_core = compiled()
    dsn = pg.create_database(f"drain_{uuid.uuid4().hex[:8]}")
    errors = []
    for path in ("libpq", "psycopg"):
        with psycopg.connect(dsn, autocommit=True) as conn:
            core = compiled_core.Core(describe)
            with pytest.raises(psycopg.OperationalError) as raised:
                core.drain(conn.pgconn if path == "libpq" else PsycopgOnly(conn.pgconn))
            assert core.drain_path == path
            errors.append((type(raised.value), str(raised.value)))
    assert errors[0] == errors[1]
    assert errors[0][1] == "receiving copy data failed: no COPY in progress"


def test_drain_paths_with_the_pure_python_psycopg(pg: LocalPostgres) -> None:
    """PSYCOPG_IMPL=python: psycopg calls the system libpq through ctypes; drain finds that one."""
    compiled()
    check = subprocess.run(
        [sys.executable, "-c", "import psycopg"],
        env={**os.environ, "PSYCOPG_IMPL": "python"},
        capture_output=True,
        text=True,
        check=False,
    )
    if check.returncode != 0:
        pytest.skip(f"the pure-Python psycopg cannot run here (no system libpq?): {check.stderr[-300:]}")
    dsn, slots = new_source(pg, 2)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tests.capture_drain", dsn, *slots],
            env={**os.environ, "PSYCOPG_IMPL": "python"},
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
    finally:
        drop_slots(dsn, slots)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"impl": "python", "paths": ["libpq", "psycopg"], "events": 41, "equal": True}
