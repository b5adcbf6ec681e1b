"""Measurement 1: capture throughput, `cdc run` against pg_recvlogical on the same backlog.

Both consumers drain the same WAL: every slot (the daemons' and pg_recvlogical's) is created
just before the workload is written, with every daemon stopped. pg_recvlogical gets the options
`cdc run` uses (proto_version, publication_names, messages, streaming) and, for the
"immediate" mode, the same session setting debug_logical_replication_streaming=immediate
(PGOPTIONS); it drains to /dev/null up to the end position (-E). The daemon is timed from
the moment its slot turns active (START_REPLICATION: process start-up left out, reported
apart) until the store holds the workload's end marker and has acknowledged it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any

import psycopg

from bench import profile
from bench.harness import (
    Capture,
    Daemon,
    ProtocolOptions,
    children_of,
    connect,
    create_logical_slot,
    drop_slot,
    log,
    marker_position,
    median,
    new_capture,
    process_cpu_seconds,
    recvlogical_drain,
    script_dir,
    server,
    server_cpu_seconds,
    wait_for_marker,
    write_marker,
)
from bench.model import Context, Figure, Measurement, Target
from bench.workloads import (
    SMALL_CHANGES_PER_TXN,
    count_changes,
    create_source_tables,
    run_large,
    run_small,
    small_script,
)

RATIO_TARGET = Target(">=", 0.8)


def _params(ctx: Context) -> dict[str, Any]:
    if ctx.quick:
        return {
            "runs": 2,
            "small_txns": 4_000,
            "large_rows": 200_000,
            "large_budget_s": 10.0,
            "large_min": 50_000,
        }
    return {
        "runs": 3,
        "small_txns": 20_000,
        "large_rows": 1_000_000,
        "large_budget_s": 30.0,
        "large_min": 100_000,
    }


def time_daemon(
    capture: Capture, marker: int, log_name: str, ctx: Context, profile_name: str | None = None
) -> dict[str, float]:
    """Start `cdc run`, wait for ``marker``; start-up, drain and wall seconds, and peak RSS."""
    wrapper = profile.wrapper(ctx.log_path(profile_name)) if profile_name else []
    daemon = Daemon(capture, ctx.log_path(log_name), wrapper).start()
    try:
        with connect(capture.source_dsn) as source:
            while not capture.slot_active(source):
                daemon.check_alive()
                if time.monotonic() - daemon.started_at > 120:
                    raise TimeoutError("the daemon did not start streaming within 120 s")
                time.sleep(0.005)
        active = time.monotonic()
        pid = daemon.daemon_pid() or daemon.pid
        writers = children_of(pid)  # the store writer process
        backends = _backends(capture)  # the writer's store backend and the walsender
        cpu_before = process_cpu_seconds(pid, False)
        writer_before = sum(process_cpu_seconds(w, False) for w in writers)
        backends_before = {k: process_cpu_seconds(v, False) for k, v in backends.items()}
        server_before = server_cpu_seconds(capture.pg)
        done = wait_for_marker(capture, marker, daemon, interval=0.02)
        main_cpu_s = process_cpu_seconds(pid, False) - cpu_before
        writer_cpu_s = sum(process_cpu_seconds(w, False) for w in writers) - writer_before
        backend_cpu = {k: process_cpu_seconds(v, False) - backends_before[k] for k, v in backends.items()}
        server_cpu_s = server_cpu_seconds(capture.pg) - server_before
        rss = daemon.peak_rss_mb() or 0.0
        metrics = daemon.metrics()
    finally:
        daemon.stop()
        daemon.kill()
    return {
        "startup_s": active - daemon.started_at,
        "drain_s": done - active,
        "wall_s": done - daemon.started_at,
        "peak_rss_mb": rss,
        # Where the CPU went while draining: the daemon's two processes (capture, store writer),
        # and the server's (the walsender decoding, the store's backend writing, both on this
        # machine's 2 cores), with the writer's store backend and the walsender apart.
        "cpu_s": main_cpu_s + writer_cpu_s,
        "main_cpu_s": main_cpu_s,
        "writer_cpu_s": writer_cpu_s,
        "store_backend_cpu_s": backend_cpu.get("store", 0.0),
        "walsender_cpu_s": backend_cpu.get("walsender", 0.0),
        "server_cpu_s": server_cpu_s,
        # What the store writes cost, from the daemon's own metrics (0 when not exposed).
        "store_writes": metrics.get("cdc_batch_rows_count", 0.0),
        "store_write_s": metrics.get("cdc_store_write_seconds_sum", 0.0),
    }


def _backends(capture: Capture) -> dict[str, int]:
    """Server pids of the daemon's store writer connection and of its walsender."""
    found: dict[str, int] = {}
    with capture.store() as conn:
        for _ in range(100):  # the writer process connects as the session starts
            pid = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'cdc-writer' "
                "AND datname = current_database() ORDER BY backend_start DESC LIMIT 1"
            ).fetchone()
            if pid is not None:
                found["store"] = int(pid[0])
                break
            time.sleep(0.05)
    with connect(capture.source_dsn) as source:
        walsender = source.execute(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (capture.slot,)
        ).fetchone()
        if walsender is not None and walsender[0] is not None:
            found["walsender"] = int(walsender[0])
    return found


class _WalsenderCpu:
    """The CPU of a slot's walsender while pg_recvlogical reads it, sampled every few ms from
    /proc (it exits with pg_recvlogical, before the server reaps it into its totals)."""

    def __init__(self, dsn: str, slot: str) -> None:
        self.dsn, self.slot = dsn, slot
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="walsender-cpu", daemon=True)

    def __enter__(self) -> _WalsenderCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _sample(self) -> None:
        pid = None
        with connect(self.dsn) as conn:
            while pid is None and not self._stop.wait(0.002):
                row = conn.execute(
                    "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (self.slot,)
                ).fetchone()
                pid = row[0] if row else None
        while pid is not None and not self._stop.wait(0.003):
            seconds = process_cpu_seconds(pid, False)
            if seconds:
                self.seconds = seconds


def measure(ctx: Context) -> Measurement:
    p = _params(ctx)
    m = Measurement(
        "throughput",
        "Capture throughput (end to end) vs pg_recvlogical",
        method=(
            "One server, a source and a store database. Slots of two daemons (`cdc run` with "
            "`source.stream_in_progress` at its default, which on PostgreSQL 16+ streams every "
            "transaction as it happens, and with it `off`) and of pg_recvlogical are created anew "
            "before each workload; the workload is written with every consumer stopped, so each drains "
            "the same backlog and nothing else. Small transactions: pgbench, 2 clients, each transaction sets a request id, "
            "updates 2 rows and inserts 1 (3 changes). Large: one INSERT ... SELECT transaction. "
            "pg_recvlogical gets the daemon's protocol options (proto_version, publication_names, "
            "messages, streaming) and, in the immediate mode, the same session setting; it writes to "
            "/dev/null and stops at the end LSN (-E). The daemon is timed from START_REPLICATION "
            "(its slot turning active; Python start-up is reported apart) until the store has written "
            "and acknowledged the workload's end marker. Changes are counted in the store."
        ),
        params=dict(p),
    )
    runs: int = p["runs"]
    with server(ctx.flavor) as pg:
        src = pg.create_database("bench_src")
        store = pg.create_database("bench_store")
        create_source_tables(src)
        immediate_ok = pg.version >= 16
        modes = ["immediate", "off"] if immediate_ok else ["default"]
        captures: dict[str, Capture] = {}
        for mode in modes:
            extra = {"CDC_SOURCE__STREAM_IN_PROGRESS": "off"} if mode == "off" else {}
            captures[mode] = new_capture(pg, src, store, f"tp_{mode}", extra)
            captures[mode].setup(ctx.log_path("setup.log"))
        with psycopg.connect(src) as conn:
            options = ProtocolOptions.for_server(conn.info.server_version)
        m.params.update(
            server_version=pg.version,
            modes=modes,
            proto_version=options.proto_version,
            streaming=options.streaming,
        )
        # Where each store stands: changes are counted between consecutive markers.
        last_position: dict[str, int] = {}
        for mode, capture in captures.items():
            with capture.store() as conn:
                last_position[mode] = capture.acked_lsn(conn)
        scripts = script_dir()
        script = small_script(scripts)
        large_rows: int = p["large_rows"]
        next_id = 1
        results: list[dict[str, Any]] = []
        for rep in range(runs):
            for kind in ("small", "large"):
                if kind == "large" and rep == 0:
                    large_rows = _scaled_rows(ctx, p, results, m)
                slots = {mode: f"rl_{mode}_{rep}_{kind}" for mode in modes}
                for capture in captures.values():
                    capture.renew_slot()
                for slot in slots.values():
                    create_logical_slot(src, slot)
                try:
                    started = time.monotonic()
                    if kind == "small":
                        run_small(pg, script, "bench_src", p["small_txns"])
                    else:
                        run_large(src, large_rows, next_id)
                        next_id += large_rows
                    write_s = time.monotonic() - started
                    marker, end_lsn = write_marker(src)
                    log(f"throughput: run {rep + 1}/{runs}, {kind}: workload written in {write_s:.1f} s")
                    run: dict[str, Any] = {"rep": rep, "kind": kind, "write_s": write_s}
                    order = [(c, mode) for mode in modes for c in ("recvlogical", "daemon")]
                    if rep % 2:
                        order.reverse()
                    for consumer, mode in order:
                        if consumer == "recvlogical":
                            server_before = server_cpu_seconds(pg)
                            with _WalsenderCpu(src, slots[mode]) as walsender:
                                seconds = recvlogical_drain(
                                    pg,
                                    src,
                                    slots[mode],
                                    captures[mode].slot,
                                    end_lsn,
                                    options,
                                    immediate=(mode == "immediate"),
                                )
                            run[f"recvlogical_{mode}_s"] = seconds
                            run[f"recvlogical_{mode}_server_cpu_s"] = server_cpu_seconds(pg) - server_before
                            run[f"recvlogical_{mode}_walsender_cpu_s"] = walsender.seconds
                        else:
                            profile_name = f"profile-{kind}-{mode}.txt" if ctx.profile else None
                            timing = time_daemon(
                                captures[mode], marker, f"daemon-throughput-{mode}.log", ctx, profile_name
                            )
                            run.update({f"daemon_{mode}_{k}": v for k, v in timing.items()})
                            seconds = timing["drain_s"]
                        log(f"throughput:   {consumer} ({mode}) drained in {seconds:.2f} s")
                    for mode, capture in captures.items():
                        with capture.store() as conn:
                            position = marker_position(conn, marker)
                            assert position is not None
                            run[f"changes_{mode}"] = count_changes(conn, last_position[mode], position)
                            last_position[mode] = position
                    changes = run[f"changes_{modes[0]}"]
                    run["changes"] = changes
                    for mode in modes:
                        if run[f"changes_{mode}"] != changes:
                            m.notes.append(
                                f"run {rep} {kind}: the {mode} store holds {run[f'changes_{mode}']} changes, "
                                f"the {modes[0]} store {changes}"
                            )
                        run[f"recvlogical_{mode}_rate"] = changes / run[f"recvlogical_{mode}_s"]
                        run[f"daemon_{mode}_rate"] = changes / run[f"daemon_{mode}_drain_s"]
                        run[f"ratio_{mode}"] = run[f"daemon_{mode}_rate"] / run[f"recvlogical_{mode}_rate"]
                        log(
                            f"throughput:   {mode}: daemon {run[f'daemon_{mode}_rate']:,.0f} changes/s, "
                            f"pg_recvlogical {run[f'recvlogical_{mode}_rate']:,.0f}/s, "
                            f"ratio {run[f'ratio_{mode}']:.2f}"
                        )
                    results.append(run)
                finally:
                    for slot in slots.values():
                        drop_slot(src, slot)
        m.runs = results
        m.params["large_rows_used"] = large_rows
        _figures(m, modes, results)
        _store_ceiling(m, pg, captures[modes[-1]])
        _bound_note(m, modes[-1], [r for r in results if r["kind"] == "small"])
        small_rates = [r[f"daemon_{modes[0]}_rate"] for r in results if r["kind"] == "small"]
        ctx.capture_rate = median(small_rates)
        ctx.changes_per_txn = SMALL_CHANGES_PER_TXN
        ctx.large_rate = median([r[f"daemon_{modes[0]}_rate"] for r in results if r["kind"] == "large"])
        if ctx.profile:
            for kind in ("small", "large"):
                for mode in modes:
                    path = ctx.log_path(f"profile-{kind}-{mode}.txt")
                    with contextlib.suppress(OSError):
                        m.notes.append(
                            f"py-spy profile of the daemon, {kind} transactions, {mode}: "
                            + profile.summary_line(path)
                        )
    return m


def _scaled_rows(ctx: Context, p: dict[str, Any], results: list[dict[str, Any]], m: Measurement) -> int:
    """The large transaction's size: nominal, or what the daemon drains within the budget."""
    nominal: int = p["large_rows"]
    if not ctx.scale:
        return nominal
    rates = [v for r in results for k, v in r.items() if k.startswith("daemon_") and k.endswith("_rate")]
    if not rates:
        return nominal
    fit = int(min(rates) * p["large_budget_s"] / 10_000) * 10_000
    rows = max(p["large_min"], min(nominal, fit))
    if rows < nominal:
        m.notes.append(
            f"The large transaction has {rows:,} rows instead of {nominal:,}: scaled to drain in about "
            f"{p['large_budget_s']:.0f} s at the daemon's measured rate of {min(rates):,.0f} changes/s "
            "(`--no-scale` for the nominal size)."
        )
    return rows


def _daemon_note(rows: list[dict[str, Any]], mode: str) -> str:
    startup = median([r[f"daemon_{mode}_startup_s"] for r in rows]) or 0.0
    note = (
        f"changes per run: {rows[0]['changes']:,}; start-up before streaming (not counted): {startup:.1f} s"
    )
    writes = median([r.get(f"daemon_{mode}_store_writes", 0.0) for r in rows]) or 0.0
    if writes:
        share = median(
            [
                r[f"daemon_{mode}_store_write_s"] / r[f"daemon_{mode}_drain_s"]
                for r in rows
                if r[f"daemon_{mode}_drain_s"]
            ]
        )
        note += f"; {writes:,.0f} store writes per run, {100 * (share or 0):.0f} % of the drain time in them"
    changes = [r["changes"] for r in rows if r["changes"]]
    if changes and all(f"daemon_{mode}_cpu_s" in r for r in rows):
        per_change = {
            what: median([1e6 * r.get(key, 0.0) / r["changes"] for r in rows if r["changes"]]) or 0.0
            for what, key in (
                ("daemon", f"daemon_{mode}_cpu_s"),
                ("main", f"daemon_{mode}_main_cpu_s"),
                ("writer", f"daemon_{mode}_writer_cpu_s"),
                ("backend", f"daemon_{mode}_store_backend_cpu_s"),
                ("walsender", f"daemon_{mode}_walsender_cpu_s"),
                ("server", f"daemon_{mode}_server_cpu_s"),
                ("recvlogical", f"recvlogical_{mode}_server_cpu_s"),
                ("recvlogical_walsender", f"recvlogical_{mode}_walsender_cpu_s"),
            )
        }
        note += (
            f"; CPU per change while draining: daemon {per_change['daemon']:.1f} µs (capture process "
            f"{per_change['main']:.1f}, store writer process {per_change['writer']:.1f}), server "
            f"{per_change['server']:.1f} µs (store backend {per_change['backend']:.1f}, walsender "
            f"{per_change['walsender']:.1f}; with pg_recvlogical its walsender spends "
            f"{per_change['recvlogical_walsender']:.1f} µs)"
        )
    return note


def _figures(m: Measurement, modes: list[str], results: list[dict[str, Any]]) -> None:
    for kind, what in (("small", "small transactions"), ("large", "one large transaction")):
        rows = [r for r in results if r["kind"] == kind]
        if not rows:
            continue
        for mode in modes:
            label_mode = {
                "immediate": "streaming every transaction (default on PG16+)",
                "off": "stream_in_progress off",
                "default": "default options",
            }[mode]
            m.figures.append(
                Figure(
                    f"throughput.{kind}.{mode}.recvlogical",
                    f"pg_recvlogical, {what}, {label_mode}",
                    "changes/s",
                    [r[f"recvlogical_{mode}_rate"] for r in rows],
                )
            )
            m.figures.append(
                Figure(
                    f"throughput.{kind}.{mode}.daemon",
                    f"cdc run, {what}, {label_mode}",
                    "changes/s",
                    [r[f"daemon_{mode}_rate"] for r in rows],
                    note=_daemon_note(rows, mode),
                )
            )
            m.figures.append(
                Figure(
                    f"throughput.{kind}.{mode}.ratio",
                    f"ratio cdc run / pg_recvlogical, {what}, {label_mode}",
                    "",
                    [r[f"ratio_{mode}"] for r in rows],
                    target=RATIO_TARGET,
                )
            )
        if "immediate" in modes and "off" in modes:
            m.figures.append(
                Figure(
                    f"throughput.{kind}.streaming_cost",
                    f"cdc run rate, {what}: streaming every transaction / stream_in_progress off",
                    "",
                    [r["daemon_immediate_rate"] / r["daemon_off_rate"] for r in rows],
                )
            )


def _store_ceiling(m: Measurement, pg: Any, capture: Capture, batch_rows: int = 2_000) -> None:
    """What the history store alone accepts: the small transactions' changes the daemon
    stored, COPYed again into a table like ``changes`` (its indexes and generated key hashes,
    no partitions) by a bare client, in transactions of ``batch_rows`` like the daemon's
    batches. No decoding, no Python per row: the bound the store's write path puts on any
    capture into it."""
    columns = (
        "position, ordinal, committed_at, table_id, schema_id, op, flags, lsn, xid, key_text, image, "
        "before, old_key_text, pending"
    )
    with capture.store() as conn:
        conn.execute(
            "CREATE TEMP TABLE ceiling (LIKE changes INCLUDING DEFAULTS INCLUDING CONSTRAINTS "
            "INCLUDING INDEXES INCLUDING GENERATED)"
        )
        lines: list[bytes] = []
        with conn.cursor().copy(
            f"COPY (SELECT {columns} FROM changes WHERE table_id IN (SELECT table_id FROM table_names "
            "WHERE table_name IN ('bench_accounts', 'bench_history')) ORDER BY position, ordinal "
            "LIMIT 200000) TO STDOUT"
        ) as copy:
            pending = b""
            for chunk in copy:
                pending += bytes(chunk)
                *complete, pending = pending.split(b"\n")
                lines += complete
        if not lines:
            return
        batches = [b"\n".join(lines[i : i + batch_rows]) + b"\n" for i in range(0, len(lines), batch_rows)]
        backend = conn.info.backend_pid
        cpu_before = process_cpu_seconds(backend)
        started = time.monotonic()
        for data in batches:
            with conn.transaction(), conn.cursor().copy(f"COPY ceiling ({columns}) FROM STDIN") as copy:
                copy.write(data)
        seconds = time.monotonic() - started
        cpu = process_cpu_seconds(backend) - cpu_before
    m.figures.append(
        Figure(
            "throughput.store_ceiling",
            "the history store alone: COPY of captured changes into a table like `changes` (its "
            f"indexes), {batch_rows:,} rows a transaction, by a bare client",
            "rows/s",
            [len(lines) / seconds],
            note=f"{len(lines):,} rows; store backend CPU {1e6 * cpu / len(lines):.1f} µs a row",
        )
    )


def _bound_note(m: Measurement, mode: str, rows: list[dict[str, Any]]) -> None:
    """What bounds the daemon's rate here, from this run's own CPU figures."""
    rows = [r for r in rows if r.get("changes") and f"daemon_{mode}_cpu_s" in r]
    if not rows:
        return
    daemon_us = median([1e6 * r[f"daemon_{mode}_cpu_s"] / r["changes"] for r in rows]) or 0.0
    server_us = median([1e6 * r[f"daemon_{mode}_server_cpu_s"] / r["changes"] for r in rows]) or 0.0
    recv_us = (
        median(
            [
                1e6
                * max(
                    r[f"recvlogical_{mode}_server_cpu_s"], r.get(f"recvlogical_{mode}_walsender_cpu_s", 0.0)
                )
                / r["changes"]
                for r in rows
            ]
        )
        or 0.0
    )
    recv_rate = median([r[f"recvlogical_{mode}_rate"] for r in rows]) or 0.0
    cores = os.cpu_count() or 1
    if daemon_us + server_us <= 0:
        return
    ceiling = cores * 1e6 / (daemon_us + server_us)
    verdict = (
        f"below 0.8 of pg_recvlogical's {recv_rate:,.0f} changes/s: the ratio cannot be reached with the "
        "store on the same machine"
        if ceiling < 0.8 * recv_rate
        else f"{ceiling / recv_rate:.2f} times pg_recvlogical's {recv_rate:,.0f} changes/s"
        if recv_rate
        else "the ceiling"
    )
    m.notes.append(
        f"What bounds the rate (small transactions, {mode}): each change costs {daemon_us:.0f} µs of the "
        f"daemon's CPU (its capture and store writer processes) and {server_us:.0f} µs of the server's "
        f"(the walsender decoding, the store's backend writing the row, its indexes and the transaction "
        f"rows), all on this machine's {cores} cores; pg_recvlogical costs the server {recv_us:.0f} µs a "
        f"change (its walsender) and almost nothing itself. With every core busy and perfect overlap the "
        f"daemon would reach {ceiling:,.0f} changes/s, {verdict}."
    )
