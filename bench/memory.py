"""Measurement 4: the daemon's peak RSS (VmHWM) while capturing one very large transaction.

A fresh `cdc run` process per size: it catches up, then one transaction inserts N rows
(4 columns: bigint key, md5 text, numeric, timestamptz) and the daemon drains it; VmHWM is
read from /proc/PID/status once the store has acknowledged the transaction.
"""

from __future__ import annotations

import time
from typing import Any

from bench.harness import (
    catch_up,
    connect,
    log,
    new_capture,
    running_daemon,
    server,
    wait_for_marker,
    write_marker,
)
from bench.model import Context, Figure, Measurement, Target
from bench.workloads import create_source_tables, run_large

RSS_TARGET = Target("<", 200.0)
PROBE_ROWS = 50_000


def _sizes(ctx: Context, rate: float | None, m: Measurement) -> list[int]:
    """The nominal sizes, or, when the daemon is too slow to drain the largest within the
    budget, the same sizes scaled down together (the largest never below ``floor`` rows)."""
    nominal = [1_000_000] if ctx.quick else [1_000_000, 5_000_000]
    budget = 30.0 if ctx.quick else 180.0  # seconds of draining for the largest size
    floor = 100_000 if ctx.quick else 500_000
    if not ctx.scale or not rate:
        return nominal
    largest = max(nominal)
    fit = max(floor, int(rate * budget / 50_000) * 50_000)
    if fit >= largest:
        return nominal
    sizes = [max(10_000, int(n * fit / largest / 10_000) * 10_000) for n in nominal]
    m.notes.append(
        f"Sizes scaled from {', '.join(f'{n:,}' for n in nominal)} rows to {', '.join(f'{n:,}' for n in sizes)} "
        f"to drain the largest in about {budget:.0f} s at the measured {rate:,.0f} rows/s of a large "
        "transaction (`--no-scale` for the nominal sizes)."
    )
    return sizes


def measure(ctx: Context) -> Measurement:
    m = Measurement(
        "memory",
        "Memory: peak RSS of `cdc run` during one large transaction",
        method=(
            "A fresh `cdc run` per size (default options: on PostgreSQL 16+ the transaction is "
            "streamed as it is written; `capture.memory_limit_bytes` 64 MiB before spilling). One "
            "transaction inserts N rows `(id bigint, a text, b numeric, c timestamptz)`; VmHWM of "
            "the daemon's two processes (capture, store writer), added, is read when the store has "
            "acknowledged it. One run per size."
        ),
    )
    with server(ctx.flavor) as pg:
        src = pg.create_database("bench_src")
        store = pg.create_database("bench_store")
        create_source_tables(src)
        capture = new_capture(pg, src, store, "mem")
        capture.setup(ctx.log_path("setup.log"))
        m.params["server_version"] = pg.version

        def one(rows: int) -> dict[str, Any]:
            with connect(src) as conn:
                conn.execute("TRUNCATE bench_big")
            with running_daemon(capture, ctx.log_path("daemon-memory.log")) as daemon:
                catch_up(capture, daemon)
                started = time.monotonic()
                run_large(src, rows, 1)
                inserted = time.monotonic() - started
                marker, _ = write_marker(src)
                done = wait_for_marker(capture, marker, daemon, interval=0.1)
                peak = daemon.peak_rss_mb()
                daemon.check_alive()
            run = {
                "rows": rows,
                "peak_rss_mb": peak,
                "insert_s": inserted,
                "capture_s": done - started,
                "rows_per_s": rows / (done - started),
            }
            log(
                f"memory: {rows:,} rows: peak RSS {peak:.0f} MB; captured in {done - started:.1f} s "
                f"({run['rows_per_s']:,.0f} rows/s)"
            )
            return run

        rate = ctx.large_rate
        if rate is None and ctx.scale:
            probe = one(PROBE_ROWS)
            m.runs.append(probe)
            rate = probe["rows_per_s"]
        sizes = _sizes(ctx, rate, m)
        m.params["sizes"] = sizes
        for rows in sizes:
            m.runs.append(one(rows))
    for run in m.runs:
        m.figures.append(
            Figure(
                f"memory.rows_{run['rows']}",
                f"peak RSS, one transaction of {run['rows']:,} rows",
                "MB",
                [run["peak_rss_mb"]],
                target=RSS_TARGET if run["rows"] != PROBE_ROWS else None,
                note=f"captured at {run['rows_per_s']:,.0f} rows/s",
            )
        )
    peaks = [r["peak_rss_mb"] for r in m.runs if r["rows"] != PROBE_ROWS]
    if len(m.runs) >= 2 and peaks:
        smallest, largest = m.runs[0], m.runs[-1]
        m.notes.append(
            f"From {smallest['rows']:,} to {largest['rows']:,} rows "
            f"({largest['rows'] / smallest['rows']:.0f}x) the peak RSS went from "
            f"{smallest['peak_rss_mb']:.0f} MB to {largest['peak_rss_mb']:.0f} MB."
        )
    return m
