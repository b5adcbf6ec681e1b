"""Measurement 6: pruning one day out of a large store, and capture throughput while pruning.

Prune: ``bench.retention_prune.bench_prune`` builds a synthetic store of 10 daily partitions
(10,000,000 changes; 1,000,000 with --quick) in the benchmark server and prunes the oldest
day, as the daemon's pruner does. Capture while pruning: the daemon drains the same
small-transaction backlog (as in the throughput measurement) into its own store schema, in
the same database, alternately with and without a pruner pruning day after day out of a
the synthetic store beside it (its next days); each prune there reads one day's partition,
writes keyframes and drops the partition.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.harness import (
    Capture,
    connect,
    log,
    median,
    new_capture,
    script_dir,
    server,
    write_marker,
)
from bench.model import Context, Figure, Measurement, Target
from bench.retention_prune import bench_prune
from bench.throughput import time_daemon
from bench.workloads import create_source_tables, run_small, small_script
from cdc.config import RetentionConfig
from cdc.store.prune import Pruner
from cdc.store.retention import bucket_start

PRUNE_TARGET = Target("<", 1.0)
#: Throughput while pruning / without: within 10 %.
WHILE_PRUNING_TARGET = Target(">=", 0.9)
DAYS = 10
PRUNED_SCHEMA = "bench_pruned"


def _params(ctx: Context) -> dict[str, Any]:
    if ctx.quick:
        return {"changes": 1_000_000, "hot": 10_000, "cold": 10_000, "runs": 2, "small_txns": 4_000}
    return {"changes": 10_000_000, "hot": 100_000, "cold": 100_000, "runs": 3, "small_txns": 20_000}


class PruneLoop:
    """Prunes one more day of a kept ``bench_prune`` schema each time, until stopped or
    out of days; records each prune's report."""

    def __init__(self, dsn: str, schema: str, first_extra_day: int) -> None:
        self.dsn = dsn
        self.schema = schema
        self.extra_day = first_extra_day
        self.day0 = bucket_start(datetime.now(UTC), timedelta(days=1)) - timedelta(days=DAYS + 1)
        self.reports: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.stop.clear()
        self.thread = threading.Thread(target=self._run, name="bench-pruner", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        retention = RetentionConfig(default=timedelta(days=DAYS - 1), partition_interval=timedelta(days=1))
        try:
            with Pruner(self.dsn, self.schema, retention) as pruner:
                while not self.stop.is_set() and self.extra_day < DAYS - 1:
                    report = pruner.prune(self.day0 + timedelta(days=DAYS + self.extra_day, hours=1))
                    self.extra_day += 1
                    self.reports.append(report.to_json())
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def finish(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=600)
        if self.error is not None:
            raise self.error


def measure(ctx: Context) -> Measurement:
    p = _params(ctx)
    m = Measurement(
        "retention",
        "Retention: pruning a day, and capture while pruning",
        method=(
            f"Prune: a synthetic store of {p['changes']:,} changes over {DAYS} daily partitions "
            f"(transactions of 10; day one inserts {p['hot'] + p['cold']:,} rows, every later change "
            f"updates one of {p['hot']:,} hot rows) is built in the benchmark server by "
            "`python -m bench.retention_prune DSN --changes N` (`bench_prune`), then the oldest day is "
            "pruned as the daemon's pruner does: keyframes for the rows whose last image is in that "
            "day, the floor moved, the day's partitions dropped. Capture while pruning: `cdc run` "
            "drains a backlog of small transactions (as in the throughput measurement) into its store "
            "schema; in the same database the synthetic store's next days are pruned one after the "
            "other by a pruner thread during the drain, or not; with and without alternate, the rate is the "
            "median per mode."
        ),
        params=dict(p),
    )
    with server(ctx.flavor) as pg:
        store = pg.create_database("bench_store")
        log(f"retention: building a {p['changes']:,}-change store and pruning one day")
        # Kept: the pruner of the capture runs below goes on with the next days of this store.
        result = bench_prune(
            store, changes=p["changes"], days=DAYS, hot=p["hot"], cold=p["cold"], schema=PRUNED_SCHEMA,
            keep_schema=True,
        )  # fmt: skip
        m.runs.append({"kind": "prune", **{k: v for k, v in result.items() if k != "partitions"}})
        log(
            f"retention: prune of {result['per_day']:,} changes: {result['prune_seconds']:.2f} s "
            f"({result['keyframes']:,} keyframes; build {result['build_seconds']:.0f} s)"
        )
        m.figures += prune_figures(result)

        # Capture while pruning.
        src = pg.create_database("bench_src")
        create_source_tables(src)
        capture = new_capture(pg, src, store, "ret", {"CDC_SOURCE__STREAM_IN_PROGRESS": "off"})
        capture.setup(ctx.log_path("setup.log"))
        loop = PruneLoop(store, PRUNED_SCHEMA, first_extra_day=1)
        script = small_script(script_dir())
        rates: dict[str, list[float]] = {"without": [], "with": []}
        prunes_during: list[int] = []
        for rep in range(p["runs"]):
            order = ["without", "with"] if rep % 2 == 0 else ["with", "without"]
            for mode in order:
                run_small(pg, script, "bench_src", p["small_txns"])
                marker, _ = write_marker(src)
                changes = 3 * p["small_txns"]
                before = len(loop.reports)
                if mode == "with":
                    loop.start()
                    time.sleep(0.5)  # the pruner is at work when the drain starts
                try:
                    timing = time_daemon(capture, marker, "daemon-retention.log", ctx)
                finally:
                    if mode == "with":
                        loop.finish()
                rate = changes / timing["drain_s"]
                rates[mode].append(rate)
                if mode == "with":
                    prunes_during.append(len(loop.reports) - before)
                m.runs.append({"kind": "capture", "mode": mode, "rep": rep, "rate": rate, **timing})
                log(f"retention: drain {mode} pruning: {rate:,.0f} changes/s")
        _check_store(capture)
        ratio = [w / wo for w, wo in zip(rates["with"], rates["without"], strict=True)]
        m.figures += [
            Figure("retention.capture.without", "cdc run, small transactions, no prune running", "changes/s",
                   rates["without"]),
            Figure("retention.capture.with", "cdc run, small transactions, pruning meanwhile", "changes/s",
                   rates["with"], note=f"prunes completed during each drain: {prunes_during}"),
            Figure("retention.capture.ratio", "ratio with pruning / without", "", ratio,
                   target=WHILE_PRUNING_TARGET),
        ]  # fmt: skip
        durations = [r["prune_seconds"] if "prune_seconds" in r else r.get("seconds") for r in loop.reports]
        if durations:
            m.notes.append(
                f"Prunes during the drains: {len(durations)}, median {median([float(d) for d in durations if d]):.2f} s "
                "each (keyframes replace the previous day's for the hot rows)."
            )
    return m


def prune_figures(result: dict[str, Any]) -> list[Figure]:
    """The prune's figures from ``bench_prune``'s result. The target is on the prune itself: the
    locked transaction that publishes the staged keyframes, moves the floor and drops the day.
    The keyframes are computed before it without any table lock (capture and readers go on),
    and reported apart, with the whole prune."""
    figures = [
        Figure(
            "retention.publish_seconds",
            f"prune one day ({result['per_day']:,} changes) out of a {result['changes']:,}-change "
            "store: the locked prune (publish the staged keyframes, move the floor, DROP the day)",
            "s",
            [result.get("publish_seconds", result["prune_seconds"])],
            target=PRUNE_TARGET,
            note=_prune_note(result),
        )
    ]
    for key, label in (
        ("stage_seconds", "keyframes staged before it, without table locks (capture goes on)"),
        ("drop_seconds", "of which the DROP of the day's partitions"),
        ("prune_seconds", "the whole prune: prepare, stage, publish, request records"),
    ):
        if key in result:
            figures.append(Figure(f"retention.{key}", label, "s", [result[key]]))
    return figures


def _prune_note(result: dict[str, Any]) -> str:
    parts = [
        f"{result['keyframes']:,} keyframes written",
        f"{result.get('dropped_bytes', 0) / 2**20:,.0f} MiB dropped",
        f"store {result.get('store_bytes', 0) / 2**30:.1f} GiB",
        f"build {result['build_seconds']:.0f} s (not counted)",
    ]
    if "keyframe_seconds" in result:
        parts.append(f"keyframes {result['keyframe_seconds']:.2f} s")
    return "; ".join(parts)


def _check_store(capture: Capture) -> None:
    """The drains lost nothing: every marker the workload wrote is in the store."""
    with connect(capture.source_dsn) as source, capture.store() as store:
        markers = source.execute("SELECT count(*) FROM bench_marker").fetchone()
        stored = store.execute(
            "SELECT count(*) FROM changes WHERE table_id IN "
            "(SELECT table_id FROM table_names WHERE schema_name = 'public' AND table_name = 'bench_marker')"
        ).fetchone()
        if markers is None or stored is None or int(stored[0]) < int(markers[0]):
            raise AssertionError(f"the store holds {stored} marker rows, the source {markers}")
