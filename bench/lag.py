"""Measurement 2: commit-to-store lag under a sustained write load at half the capacity.

pgbench writes the small-transaction workload at a fixed rate (-R) with the daemon running.
A separate thread polls the store every 10 ms for transactions it has not seen yet; a
transaction's lag is the time it was first seen (the store server's clock_timestamp())
minus its commit time on the source (`transactions.committed_at`, from the commit record).
Both clocks are the same machine's. Polling adds 0-10 ms (5 ms on average) to each figure.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime
from typing import Any

from bench.harness import (
    Background,
    Capture,
    catch_up,
    log,
    new_capture,
    percentile,
    pgbench_tps,
    running_daemon,
    script_dir,
    server,
    wait_for_marker,
    write_marker,
)
from bench.model import Context, Figure, Measurement, Target
from bench.throughput import time_daemon
from bench.workloads import SMALL_CHANGES_PER_TXN, create_source_tables, run_small, small_script

P99_TARGET = Target("<", 250.0)
POLL_SECONDS = 0.01


class StorePoller:
    """Polls a store for new transactions; records (committed_at, first seen) of each."""

    def __init__(self, capture: Capture) -> None:
        self.capture = capture
        self.stop = threading.Event()
        self.seen: list[tuple[datetime, datetime]] = []
        self.polls = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="store-poller", daemon=True)

    def start(self, after_position: int) -> None:
        self.after = after_position
        self.thread.start()

    def _run(self) -> None:
        try:
            with self.capture.store() as conn:
                while not self.stop.is_set():
                    rows = conn.execute(
                        "SELECT position, committed_at, clock_timestamp() FROM transactions "
                        "WHERE position > %s ORDER BY position",
                        (self.after,),
                    ).fetchall()
                    self.polls += 1
                    for position, committed_at, now in rows:
                        self.seen.append((committed_at, now))
                        self.after = max(self.after, int(position))
                    time.sleep(POLL_SECONDS)
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        if self.error is not None:
            raise self.error


def _capacity(ctx: Context, pg: Any, capture: Capture, script: Any, m: Measurement) -> float:
    """Transactions/s the daemon drains: from the throughput measurement, or a short probe."""
    per_txn = ctx.changes_per_txn or SMALL_CHANGES_PER_TXN
    if ctx.capture_rate:
        m.params["capacity_from"] = "throughput measurement"
        return ctx.capture_rate / per_txn
    txns = 2_000 if ctx.quick else 6_000
    run_small(pg, script, "bench_src", txns)
    marker, _ = write_marker(capture.source_dsn)
    timing = time_daemon(capture, marker, "daemon-lag-probe.log", ctx)
    m.params["capacity_from"] = f"a probe: {txns} transactions drained from a backlog"
    return txns / timing["drain_s"]


#: (name, daemon environment, share of the capacity): the first one carries the target.
VARIANTS: list[tuple[str, dict[str, str], float]] = [
    ("default", {}, 0.5),
    ("batch_max_seconds=0.05", {"CDC_CAPTURE__BATCH_MAX_SECONDS": "0.05"}, 0.5),
    ("a quarter of the capacity", {}, 0.25),
]


def _one_load(
    ctx: Context, pg: Any, capture: Capture, script: Any, rate: int, duration: int, variant: str
) -> dict[str, Any]:
    """One paced pgbench load with the daemon running; the lag of every transaction."""
    with running_daemon(capture, ctx.log_path("daemon-lag.log")) as daemon:
        catch_up(capture, daemon)
        with capture.store() as conn:
            start_position = capture.acked_lsn(conn)
        poller = StorePoller(capture)
        poller.start(start_position)
        try:
            argv = [str(pg.bin("pgbench")), "-n", "-f", str(script), "-c", "2", "-j", "2"]
            argv += ["-R", str(rate), "-T", str(duration), "bench_src"]
            load = Background(lambda: pg.run_as_owner(argv, timeout=duration + 600), "pgbench-load")
            load.start()
            while load.is_alive():
                daemon.check_alive()
                time.sleep(0.2)
            out = load.value()
            text = (out.stdout or "") + (out.stderr or "")
            if out.returncode != 0:
                raise RuntimeError(f"pgbench failed: {text[-1500:]}")
            achieved = pgbench_tps(text)
            marker, _ = write_marker(capture.source_dsn)
            wait_for_marker(capture, marker, daemon, timeout=600)
            time.sleep(0.05)
        finally:
            poller.finish()
        rss = daemon.peak_rss_mb()
    lags = [(seen - committed).total_seconds() * 1000 for committed, seen in poller.seen]
    lags = lags[:-1] if lags else lags  # the marker transaction is not part of the load
    fifth = max(1, len(lags) // 5)
    run = {
        "variant": variant,
        "transactions_seen": len(lags),
        "achieved_tps": achieved,
        "polls": poller.polls,
        "p50_ms": percentile(lags, 50),
        "p90_ms": percentile(lags, 90),
        "p99_ms": percentile(lags, 99),
        "max_ms": max(lags) if lags else None,
        "early_p50_ms": percentile(lags[:fifth], 50) or 0.0,
        "late_p50_ms": percentile(lags[-fifth:], 50) or 0.0,
        "daemon_peak_rss_mb": rss,
    }
    log(
        f"lag ({variant}): {len(lags)} transactions at {achieved:,.0f}/s: p50 {run['p50_ms']:.0f} ms, "
        f"p99 {run['p99_ms']:.0f} ms, max {run['max_ms']:.0f} ms"
    )
    return run


def measure(ctx: Context) -> Measurement:
    duration = 10 if ctx.quick else 30
    m = Measurement(
        "lag",
        "Lag: commit on the source to visible in the store",
        method=(
            "The daemon runs (default options) while pgbench writes the small-transaction workload "
            "(2 clients, request id + 2 updates + 1 insert per transaction) at a fixed rate of half "
            "the daemon's measured capacity (`pgbench -R`; the capacity is the rate at which it drained a "
            "backlog of the same workload in the throughput measurement). A thread polls the store every 10 ms for "
            "new transactions; a transaction's lag is the store's clock when first seen minus its "
            "commit time on the source (`committed_at`, from the commit record; same machine, same "
            "clock). Polling adds 0-10 ms. synchronous_commit is on: with it off the walsender would "
            "see commits only after the WAL writer's next flush (up to 200 ms later)."
        ),
        params={"duration_s": duration, "poll_ms": POLL_SECONDS * 1000},
    )
    with server(ctx.flavor) as pg:
        src = pg.create_database("bench_src")
        store = pg.create_database("bench_store")
        create_source_tables(src)
        capture = new_capture(pg, src, store, "lag")
        capture.setup(ctx.log_path("setup.log"))
        script = small_script(script_dir())
        capacity_tps = _capacity(ctx, pg, capture, script, m)
        rate = max(20, int(capacity_tps / 2))
        m.params.update(capacity_tps=round(capacity_tps, 1), target_rate_tps=rate, server_version=pg.version)
        log(f"lag: capacity about {capacity_tps:,.0f} transactions/s; loads of {duration} s")
        for number, (variant, extra, share) in enumerate(VARIANTS):
            capture.extra_env = dict(extra)
            rate = max(20, int(capacity_tps * share))
            run = _one_load(ctx, pg, capture, script, rate, duration, variant)
            m.runs.append(run)
            suffix = "" if variant == "default" else f", {variant}"
            name = ["lag", "lag.fast_batches", "lag.quarter"][number]
            note = (
                f"{run['transactions_seen']:,} transactions at {run['achieved_tps']:,.0f}/s (asked {rate}/s)"
            )
            if run["late_p50_ms"] > max(2 * run["early_p50_ms"], 250):
                m.notes.append(
                    f"{variant}: the lag grew during the run (median {run['early_p50_ms']:,.0f} ms over the "
                    f"first fifth of the transactions, {run['late_p50_ms']:,.0f} ms over the last): the daemon "
                    f"did not keep up with {rate}/s while pgbench ran on the same CPUs."
                )
            m.figures += [
                Figure(f"{name}.p50", f"commit → store lag{suffix}, p50", "ms", [run["p50_ms"]], note=note),
                Figure(f"{name}.p90", f"commit → store lag{suffix}, p90", "ms", [run["p90_ms"]]),
                Figure(
                    f"{name}.p99",
                    f"commit → store lag{suffix}, p99",
                    "ms",
                    [run["p99_ms"]],
                    target=P99_TARGET if variant == "default" else None,
                ),
                Figure(f"{name}.max", f"commit → store lag{suffix}, max", "ms", [run["max_ms"]]),
            ]
            if run["achieved_tps"] < rate * 0.9:
                m.notes.append(
                    f"{variant}: pgbench reached {run['achieved_tps']:,.0f} transactions/s of the {rate}/s asked "
                    "(the source, not the capture, was the limit)."
                )
        m.notes.append(
            "The second load runs the daemon with `capture.batch_max_seconds` at 0.05 s instead of its default "
            "0.2 s (how long a batch may wait for more transactions before it is written), the third at a "
            "quarter of the capacity: no target, they show how much of the lag is that wait and how much "
            "the daemon falling behind."
        )
    return m
