"""Measurement 7: the baseline `cdc setup` records, against a bare COPY of the same table.

One server, a source and a store database. The source table has N rows (10,000,000; 1,000,000
with --quick) of `(id bigint primary key, name text, amount numeric(12,2), created timestamptz,
flag boolean, note text)`, about 130 bytes a row. Each run, the same table is copied twice:

* bare: one client reads `COPY (SELECT ...) TO STDOUT` from the source and writes it into
  `COPY ... FROM STDIN` of an unindexed table of the same columns in the store database;
* cdc: `cdc setup` (a subprocess, default settings: one reader per CPU, the table in block
  ranges, each read in the slot's exported snapshot and written as SNAPSHOT changes into the
  partitioned, indexed `changes` table). Its baseline is timed from its first
  `baseline_table_started` log line to `baseline_done`; the whole `cdc setup` is reported too.

Between runs the capture is torn down (`cdc teardown --drop-history`) and the copy dropped.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from datetime import datetime

from bench.harness import ROOT, connect, log, new_capture, server, server_cpu_seconds
from bench.model import Context, Figure, Measurement, Target

RATIO_TARGET = Target(">=", 0.5)
COLUMNS = "id, name, amount, created, flag, note"
_STAMP = re.compile(r"^(\S+Z) \[\w+\s*\] (baseline_table_started|baseline_done)\b")


def fill(dsn: str, rows: int) -> None:
    with connect(dsn) as conn:
        conn.execute(
            "CREATE TABLE bench_baseline (id bigint PRIMARY KEY, name text, amount numeric(12,2), "
            "created timestamptz, flag boolean, note text)"
        )
        step = 1_000_000
        for first in range(1, rows + 1, step):
            last = min(rows, first + step - 1)
            conn.execute(
                "INSERT INTO bench_baseline SELECT g, 'name ' || g, (g %% 100000) / 100.0, "
                "'2026-01-01'::timestamptz + g * interval '1 s', g %% 2 = 0, md5(g::text) "
                "FROM generate_series(%s::bigint, %s::bigint) g",
                (first, last),
            )
        conn.execute("VACUUM ANALYZE bench_baseline")


def bare_copy(source: str, store: str) -> float:
    """Seconds of one client piping COPY TO STDOUT into COPY FROM STDIN (an unindexed table)."""
    with connect(store) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_copy")
        conn.execute(
            "CREATE TABLE bench_copy (id bigint, name text, amount numeric(12,2), created timestamptz, "
            "flag boolean, note text)"
        )
    started = time.monotonic()
    with (
        connect(source) as a,
        connect(store) as b,
        a.cursor().copy(f"COPY (SELECT {COLUMNS} FROM bench_baseline) TO STDOUT") as out,
        b.cursor().copy(f"COPY bench_copy ({COLUMNS}) FROM STDIN") as into,
    ):
        for data in out:
            into.write(data)
    seconds = time.monotonic() - started
    with connect(store) as conn:
        conn.execute("DROP TABLE bench_copy")
    return seconds


def baseline_seconds(output: str) -> float:
    """From the first `baseline_table_started` to `baseline_done` in `cdc setup`'s log lines."""
    stamps: dict[str, list[datetime]] = {}
    for line in output.splitlines():
        found = _STAMP.match(line)
        if found:
            stamps.setdefault(found.group(2), []).append(
                datetime.fromisoformat(found.group(1).replace("Z", "+00:00"))
            )
    if "baseline_table_started" not in stamps or "baseline_done" not in stamps:
        raise RuntimeError(f"no baseline log lines in cdc setup's output: {output[-2000:]}")
    return (max(stamps["baseline_done"]) - min(stamps["baseline_table_started"])).total_seconds()


def measure(ctx: Context) -> Measurement:
    rows = 1_000_000 if ctx.quick else 10_000_000
    runs_wanted = 2
    m = Measurement(
        "baseline",
        "Baseline: `cdc setup` of a large table vs a bare COPY",
        method=__doc__.split("\n\n", 1)[1].strip() if __doc__ else "",
    )
    m.params.update({"rows": rows, "runs": runs_wanted})
    with server(ctx.flavor) as pg:
        m.params["server_version"] = pg.version
        src = pg.create_database("bench_src")
        store = pg.create_database("bench_store")
        log(f"baseline: filling {rows:,} rows")
        started = time.monotonic()
        fill(src, rows)
        with connect(src) as conn:
            size = conn.execute("SELECT pg_total_relation_size('bench_baseline')").fetchone()
        m.params["fill_seconds"] = round(time.monotonic() - started, 1)
        m.params["table_bytes"] = int(size[0]) if size else None
        capture = new_capture(pg, src, store, "baseline")
        bare_rates, cdc_rates, setup_rates, ratios = [], [], [], []
        for run in range(runs_wanted):
            seconds = bare_copy(src, store)
            bare_rates.append(rows / seconds)
            log(f"baseline run {run + 1}: bare COPY {seconds:.1f} s ({rows / seconds:,.0f} rows/s)")
            cpu_before = server_cpu_seconds(pg)
            started = time.monotonic()
            out = subprocess.run(
                [sys.executable, "-m", "cdc", "setup"],
                env=capture.env(),
                capture_output=True,
                text=True,
                timeout=7200,
                check=False,
                cwd=ROOT,
            )
            wall = time.monotonic() - started
            cpu = server_cpu_seconds(pg) - cpu_before
            ctx.log_path("baseline-setup.log").write_text(out.stdout + out.stderr)
            if out.returncode != 0:
                raise RuntimeError(
                    f"cdc setup failed ({out.returncode}): {(out.stdout + out.stderr)[-2000:]}"
                )
            phase = baseline_seconds(out.stderr)
            cdc_rates.append(rows / phase)
            setup_rates.append(rows / wall)
            ratios.append(bare_rates[-1] and (rows / phase) / bare_rates[-1])
            m.runs.append(
                {
                    "bare_seconds": round(seconds, 2),
                    "baseline_seconds": round(phase, 2),
                    "setup_seconds": round(wall, 2),
                    "server_cpu_seconds": round(cpu, 1),
                }
            )
            log(
                f"baseline run {run + 1}: cdc baseline {phase:.1f} s ({rows / phase:,.0f} rows/s), setup {wall:.1f} s"
            )
            subprocess.run(
                [sys.executable, "-m", "cdc", "teardown", "--drop-history"],
                env=capture.env(),
                capture_output=True,
                timeout=600,
                check=True,
                cwd=ROOT,
            )
        m.figures = [
            Figure(
                "baseline.bare",
                f"bare COPY TO STDOUT into COPY FROM STDIN, {rows:,} rows",
                "rows/s",
                bare_rates,
            ),
            Figure(
                "baseline.cdc",
                "cdc setup's baseline (read, convert, write SNAPSHOT changes)",
                "rows/s",
                cdc_rates,
            ),
            Figure(
                "baseline.setup",
                "the whole `cdc setup` (process start, publications, triggers, slot, baseline)",
                "rows/s",
                setup_rates,
            ),
            Figure("baseline.ratio", "ratio cdc baseline / bare COPY", "", ratios, target=RATIO_TARGET),
        ]
    return m
