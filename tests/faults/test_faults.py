"""Fault injection: nothing lost, nothing twice, every change with its request, whatever fails.

Each scenario runs the random workload (tests/faults/conftest.py) while faults are injected,
then the same end check (``FaultEnv.finish``). Run with ``make test-faults``
(``pytest -m faults``); the figures go to /tmp/cdc-faults/report.jsonl and
docs/reliability.md.
"""

from __future__ import annotations

import random
import time

import pytest

from tests.faults.conftest import FaultEnv, run_load

pytestmark = pytest.mark.faults


# ============================================================================ the daemon dies


def test_daemon_sigkill_at_20_random_moments(fault_env: FaultEnv) -> None:
    env = fault_env
    rng = random.Random(20)
    env.start_daemon()
    workload = run_load(env, seed=1)
    for i in range(20):
        # Anywhere: mid-batch, mid-chunk of a bulk transaction, before or after an ack; every
        # fifth restart is killed again while it replays (recovery measured after the next).
        replaying = i % 5 == 4
        time.sleep(rng.uniform(0.5, 2.0) if replaying else rng.uniform(0.0, 1.5))
        assert env.daemon is not None
        env.daemon.kill()
        entry = env.fault("daemon SIGKILL" + (" while replaying" if replaying else ""))
        time.sleep(rng.uniform(0.0, 0.5))
        env.start_daemon(wait=False)
        if i % 5 != 3:
            env.recovered(entry)
    workload.wait_requests(20)
    figures = env.finish()
    assert figures["transactions_committed"] > 500


# ============================================================================ a server dies


@pytest.mark.parametrize("server", ["source", "store"])
def test_server_stopped_and_killed(fault_env: FaultEnv, server: str) -> None:
    env = fault_env
    target = env.servers.source if server == "source" else env.servers.store
    env.start_daemon()
    workload = run_load(env, seed=2 if server == "source" else 3)
    for how in ("stop -m fast", "SIGKILL", "stop -m immediate", "SIGKILL"):
        time.sleep(2)
        entry = env.fault(f"{server} server {how}")
        if how == "SIGKILL":
            target.kill()
        else:
            target.stop(how.rsplit(" ", 1)[1])
        time.sleep(3)
        target.start()
        env.recovered(entry)
        workload.wait_requests(20)
    figures = env.finish()
    # The workload ran through every outage (how many it commits depends on the machine: 189 to
    # 300+ on 2 loaded cores).
    assert figures["transactions_committed"] > 100


def test_server_error_ending_replication_is_reported(fault_env: FaultEnv) -> None:
    env = fault_env
    # The walsender looks the publication up when it decodes the first change: make one.
    # PostgreSQL < 18 then ends replication with an ErrorResponse; 18+ skips the publication
    # with a WARNING (notice), which the daemon must surface (and not acknowledge past) too.
    with env.source() as conn:
        conn.execute("UPDATE accounts SET note = 'touch' WHERE id = 1")
    env.start_daemon({"CDC_SOURCE__PUBLICATION": "no_such_publication"}, wait=False)
    deadline = time.monotonic() + 15
    while not ("no_such_publication" in env.log_text() and "does not exist" in env.log_text()):
        assert time.monotonic() < deadline, env.log_tail(5)
        time.sleep(0.2)


# ============================================================================ the network fails


def test_network_to_source_cut_and_restored(fault_env: FaultEnv) -> None:
    env = fault_env
    proxy = env.proxy_to(env.servers.source)
    env.start_daemon({"CDC_SOURCE_DSN": proxy.dsn(env.capture.source_dsn)})
    workload = run_load(env, seed=4)
    for seconds in (1, 3, 5):
        time.sleep(2)
        entry = env.fault(f"source network cut {seconds}s")
        proxy.cut()
        time.sleep(seconds)
        proxy.restore()
        env.recovered(entry)
        workload.wait_requests(20)
    env.finish()


def wait_for_error_logged(env: FaultEnv, before: int, seconds: float) -> float | None:
    """Seconds until the daemon logs a new capture error, or None within ``seconds``."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if env.log_events("capture_interrupted") + env.log_events("capture_failed") > before:
            return round(time.monotonic() - started, 2)
        time.sleep(0.2)
    return None


KEEPALIVES = " keepalives=1 keepalives_idle=2 keepalives_interval=1 keepalives_count=3 tcp_user_timeout=5000"
BLACKHOLE_SECONDS = 30
# The daemon's source/store timeout_seconds (10 s in this suite, see DAEMON_ENV), plus up to a
# status interval before the next catalog query, or the check on the store (5 s here).
DETECT_WITHIN = 25


@pytest.mark.parametrize(
    "dsn_params",
    [
        pytest.param("", id="plain-dsn"),
        pytest.param(KEEPALIVES, id="keepalive-dsn"),
    ],
)
def test_network_to_source_blackholed(fault_env: FaultEnv, dsn_params: str) -> None:
    """Silent drop for longer than every timeout: the daemon must notice, retry, and recover."""
    env = fault_env
    proxy = env.proxy_to(env.servers.source)
    env.start_daemon({"CDC_SOURCE_DSN": proxy.dsn(env.capture.source_dsn) + dsn_params})
    workload = run_load(env, seed=5)
    time.sleep(2)
    before = env.log_events("capture_interrupted") + env.log_events("capture_failed")
    entry = env.fault(f"source network blackhole {BLACKHOLE_SECONDS}s")
    proxy.blackhole()
    started = time.monotonic()
    detected = wait_for_error_logged(env, before, BLACKHOLE_SECONDS)
    time.sleep(max(0.0, BLACKHOLE_SECONDS - (time.monotonic() - started)))
    # Evidence: a main loop stuck in a query stops beating.
    env.notes["healthz_at_end_of_blackhole"] = env.probe("/healthz")
    proxy.restore()
    env.notes["blackhole_detected_after_seconds"] = detected
    env.notes["dsn_params"] = dsn_params.strip() or None
    env.recovered(entry)
    workload.wait_requests(20)
    env.finish()  # nothing lost or doubled either way
    assert detected is not None and detected <= DETECT_WITHIN, (
        f"the daemon did not notice a {BLACKHOLE_SECONDS}s silent network failure"
    )


# ============================================================================ the store fails


@pytest.mark.parametrize(
    "how",
    [
        "cut",
        "blackhole",
    ],
)
def test_store_unreachable_pauses_capture_without_acknowledging(fault_env: FaultEnv, how: str) -> None:
    env = fault_env
    proxy = env.proxy_to(env.servers.store)
    env.start_daemon({"CDC_STORE_DSN": proxy.dsn(env.capture.store_dsn)})
    workload = run_load(env, seed=6)
    outage = 12 if how == "cut" else BLACKHOLE_SECONDS
    detected_all: list[float | None] = []
    for _ in range(2 if how == "cut" else 1):
        time.sleep(2)
        before = env.log_events("capture_interrupted") + env.log_events("capture_failed")
        entry = env.fault(f"store network {how} {outage}s")
        getattr(proxy, how)()
        time.sleep(1.5)  # a write in flight at the cut may still commit: start watching after it
        acked_at_start = env.acked_lsn()
        confirmed_at_start = env.confirmed_flush_lsn()
        assert acked_at_start is not None and confirmed_at_start is not None
        started = time.monotonic()
        detected = None
        while time.monotonic() - started < outage:
            # Capture pauses: the store's acknowledged LSN stands still, and so does the slot.
            confirmed, acked = env.confirmed_flush_lsn(), env.acked_lsn()
            assert acked == acked_at_start, "the store moved while unreachable?"
            assert confirmed is not None and confirmed <= acked_at_start, (
                f"slot acknowledged {confirmed} past the store's {acked_at_start} during the outage"
            )
            if detected is None and (
                env.log_events("capture_interrupted") + env.log_events("capture_failed") > before
            ):
                detected = round(time.monotonic() - started + 1.5, 2)
            time.sleep(0.5)
        detected_all.append(detected)
        env.notes.setdefault("readyz_at_end_of_outage", []).append(env.probe("/readyz"))
        proxy.restore()
        env.recovered(entry)
        workload.wait_requests(20)
    env.notes["outage_detected_after_seconds"] = detected_all
    env.finish()
    assert all(d is not None and d <= DETECT_WITHIN for d in detected_all), detected_all


FAULT_TRIGGER = """
CREATE SCHEMA IF NOT EXISTS faults;
CREATE TABLE faults.control (armed boolean NOT NULL, sqlstate text NOT NULL, after_rows int NOT NULL,
                             message text NOT NULL);
INSERT INTO faults.control VALUES (false, '53100', 0, '');
CREATE SEQUENCE faults.rows_seen;
CREATE FUNCTION faults.fail_insert() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE c faults.control;
BEGIN
    SELECT * INTO c FROM faults.control;
    IF c.armed AND nextval('faults.rows_seen') > c.after_rows THEN
        RAISE EXCEPTION '%', c.message USING ERRCODE = c.sqlstate;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER zz_injected_failure BEFORE INSERT ON {schema}.changes
    FOR EACH ROW EXECUTE FUNCTION faults.fail_insert();
"""

STORE_FAILURES = [
    # (what, SQLSTATE, rows written before the first failure: mid-batch)
    ("disk full", "53100", 50, "could not extend file: No space left on device (injected)"),
    ("quota exceeded", "53000", 0, "tablespace quota exceeded (injected)"),
    ("program limit", "54000", 120, "row too big for the index (injected)"),
]


def test_store_write_fails_mid_batch(fault_env: FaultEnv) -> None:
    """The store refuses rows (disk full, a quota): the batch rolls back whole, nothing is
    acknowledged while it fails, and everything is written exactly once when it clears."""
    env = fault_env
    with env.store() as conn:
        conn.execute(FAULT_TRIGGER.format(schema=env.capture.schema))
    env.start_daemon()
    workload = run_load(env, seed=7)
    for what, sqlstate, after_rows, message in STORE_FAILURES:
        time.sleep(2)
        entry = env.fault(f"store write fails: {what} (SQLSTATE {sqlstate}) after {after_rows} rows")
        with env.store() as conn:
            conn.execute("SELECT setval('faults.rows_seen', 1, false)")
            conn.execute(
                "UPDATE faults.control SET armed = true, sqlstate = %s, after_rows = %s, message = %s",
                (sqlstate, after_rows, message),
            )
            # Wait until a write actually failed, then nothing may move while it keeps failing.
            deadline = time.monotonic() + 30
            while True:
                seen = conn.execute("SELECT last_value, is_called FROM faults.rows_seen").fetchone()
                if seen is not None and seen[1] and seen[0] > after_rows:
                    break
                assert time.monotonic() < deadline, "no write reached the failing trigger"
                time.sleep(0.1)
        time.sleep(0.5)
        count, acked, confirmed = env.mutation_count(), env.acked_lsn(), env.confirmed_flush_lsn()
        assert acked is not None and confirmed is not None and confirmed <= acked
        for _ in range(8):
            time.sleep(0.5)
            assert env.mutation_count() == count, "rows of a failing batch were committed"
            # The acknowledged position may still move up to where the source's walsender stands
            # when a session starts (a keepalive with nothing in flight), never past the failing
            # transaction: that would lose it, which env.finish() checks against the source.
            now_confirmed = env.confirmed_flush_lsn()  # read first: the slot follows the store
            now_acked = env.acked_lsn()
            assert now_acked is not None and now_acked >= acked
            assert now_confirmed is not None and now_confirmed <= now_acked
        with env.store() as conn:
            conn.execute("UPDATE faults.control SET armed = false")
        env.recovered(entry)
        workload.wait_requests(20)
    log = env.log_text()
    env.notes["store_errors_logged"] = {
        state: log.count(text) for _, state, _, text in STORE_FAILURES for text in [text.split(" (")[0]]
    }
    env.finish()
