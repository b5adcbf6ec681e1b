"""Where the walsender's CPU goes when `cdc run` reads, against pg_recvlogical (not in the suite).

    python -m bench.walsender [--transactions N] [--runs R] [--off] [--keep-slots] [--status S]

Per run, the small request-tagged transactions of the throughput bench are written with every
consumer stopped, then drained by pg_recvlogical and by two daemons: one with its store on the
source's server (as in the throughput bench) and one with its store on a second server. Each
figure is per change: the walsender's CPU (sampled from /proc), the drain rate, and the slot's
spill counter (pg_stat_replication_slots: since the slot was created, or through every run with
``--keep-slots``). A slot created after the workload then reads only
the WAL the daemon's store wrote on the source's server: its size and what decoding it costs.

By default every daemon's slot is created anew before the workload, like pg_recvlogical's;
``--keep-slots`` keeps them across runs (what the throughput bench did before): a new session
first decodes again from the slot's restart point, which lags its confirmed position.
``--status S`` sets capture.status_interval_seconds (the cost of status updates).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from bench.harness import (
    OUT_DIR,
    ProtocolOptions,
    connect,
    create_logical_slot,
    drop_slot,
    lsn_int,
    median,
    new_capture,
    recvlogical_drain,
    scalar,
    script_dir,
    server,
    write_marker,
)
from bench.model import Context
from bench.throughput import _WalsenderCpu, time_daemon
from bench.workloads import SMALL_CHANGES_PER_TXN, create_source_tables, run_small, small_script


def _spilled(dsn: str, slot: str) -> tuple[int, int]:
    """(spill_txns, spill_bytes) of a slot so far."""
    with connect(dsn) as conn:
        row = conn.execute(
            "SELECT spill_txns, spill_bytes FROM pg_stat_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def _current_lsn(dsn: str) -> int:
    return lsn_int(str(scalar(dsn, "SELECT pg_current_wal_lsn()::text")))


def measure(args: argparse.Namespace) -> dict[str, Any]:
    ctx = Context(flavor=args.flavor, quick=False, out_dir=args.out)
    extra = {"CDC_CAPTURE__STATUS_INTERVAL_SECONDS": str(args.status)} if args.status else {}
    if args.off:
        extra["CDC_SOURCE__STREAM_IN_PROGRESS"] = "off"
    changes = args.transactions // 2 * 2 * SMALL_CHANGES_PER_TXN
    runs: list[dict[str, Any]] = []
    with server(args.flavor) as pg, server(args.flavor) as second:
        src = pg.create_database("bench_src")
        stores = {"same": pg.create_database("bench_store"), "other": second.create_database("bench_store")}
        create_source_tables(src)
        captures = {where: new_capture(pg, src, dsn, f"ws_{where}", extra) for where, dsn in stores.items()}
        for capture in captures.values():
            capture.setup(ctx.log_path("walsender-setup.log"))
        with connect(src) as conn:
            options = ProtocolOptions.for_server(conn.info.server_version)
        immediate = pg.version >= 16 and not args.off
        script = small_script(script_dir())
        for rep in range(args.runs):
            if not args.keep_slots:
                for capture in captures.values():
                    capture.renew_slot()
            slot = f"ws_rl_{rep}"
            create_logical_slot(src, slot)
            run_small(pg, script, "bench_src", args.transactions)
            marker, end = write_marker(src)
            store_slot = f"ws_store_{rep}"
            create_logical_slot(src, store_slot)  # reads only what is written from here on
            store_start = _current_lsn(src)
            run: dict[str, Any] = {"rep": rep, "load": os.getloadavg()[0]}
            order = ["recvlogical", "same", "other"]
            for consumer in order if rep % 2 == 0 else order[::-1]:
                if consumer == "recvlogical":
                    with _WalsenderCpu(src, slot) as walsender:
                        seconds = recvlogical_drain(
                            pg, src, slot, captures["same"].slot, end, options, immediate=immediate
                        )
                    run[consumer] = {"drain_s": seconds, "walsender_cpu_s": walsender.seconds}
                    spill_slot = slot
                else:
                    run[consumer] = time_daemon(captures[consumer], marker, f"walsender-{consumer}.log", ctx)
                    spill_slot = captures[consumer].slot
                run[consumer]["spill_txns"], run[consumer]["spill_bytes"] = _spilled(src, spill_slot)
            # The store's WAL on the source's server (the "same" daemon's writes), decoded alone.
            with connect(src) as conn:
                conn.execute("SELECT pg_logical_emit_message(false, 'bench.end', '')")
            store_end = _current_lsn(src)
            with _WalsenderCpu(src, store_slot) as walsender:
                recvlogical_drain(pg, src, store_slot, captures["same"].slot, store_end, options, immediate)
            run["store_wal"] = {"bytes": store_end - store_start, "walsender_cpu_s": walsender.seconds}
            for name in (slot, store_slot):
                drop_slot(src, name)
            runs.append(run)
            print(_run_line(run, changes), flush=True)
    return {"changes": changes, "runs": runs}


def _run_line(run: dict[str, Any], changes: int) -> str:
    parts = [f"run {run['rep'] + 1} (load {run['load']:.1f}):"]
    for consumer in ("recvlogical", "same", "other"):
        r = run[consumer]
        parts.append(
            f"{consumer} {changes / r['drain_s']:,.0f}/s walsender {1e6 * r['walsender_cpu_s'] / changes:.1f} µs "
            f"(slot's spilled transactions {r['spill_txns']:,})"
        )
    return " ".join(parts)


def report(result: dict[str, Any]) -> str:
    changes, runs = result["changes"], result["runs"]
    lines = [f"{changes:,} changes a run, medians of {len(runs)} runs:"]
    for consumer, what in (
        ("recvlogical", "pg_recvlogical"),
        ("same", "cdc run, store on the source's server"),
        ("other", "cdc run, store on a second server"),
    ):
        rows = [r[consumer] for r in runs]
        walsender = median([1e6 * r["walsender_cpu_s"] / changes for r in rows]) or 0.0
        rate = median([changes / r["drain_s"] for r in rows]) or 0.0
        line = f"- {what}: {rate:,.0f} changes/s, walsender {walsender:.1f} µs a change"
        if consumer != "recvlogical":
            cpu = {
                k: median([1e6 * r[f"{k}_cpu_s"] / changes for r in rows]) or 0.0
                for k in ("main", "writer", "store_backend")
            }
            line += (
                f"; capture process {cpu['main']:.1f}, store writer process {cpu['writer']:.1f}, "
                f"store backend {cpu['store_backend']:.1f} µs"
            )
        spilled = max(r["spill_txns"] for r in rows)
        lines.append(
            line + f"; its slot's spilled transactions (pg_stat_replication_slots): {spilled:,} at most"
        )
    wal = median([r["store_wal"]["bytes"] / changes for r in runs]) or 0.0
    decode = median([1e6 * r["store_wal"]["walsender_cpu_s"] / changes for r in runs]) or 0.0
    lines.append(
        f"- the store's own WAL on the source's server: {wal:,.0f} bytes a change; a walsender reads it "
        f"(another database: not decoded further) for {decode:.1f} µs a change"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--transactions", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--off", action="store_true", help="stream_in_progress off (default: immediate)")
    parser.add_argument("--keep-slots", action="store_true", help="the daemons keep their slots across runs")
    parser.add_argument("--status", type=float, default=0.0, help="capture.status_interval_seconds")
    parser.add_argument("--flavor", choices=("embedded", "system"), default="embedded")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    print(report(measure(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
