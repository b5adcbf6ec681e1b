"""Run the benchmarks and write bench/out/results.json and docs/benchmarks.md.

    python -m bench.run [--quick] [--only NAME,...] [--flavor embedded|system]

Measurements, in this order (later ones use the capture rate the first one measured):
throughput, lag, memory, source_cost, reads, retention, baseline. `make bench` runs the full suite
(about 50 minutes on 2 cores); `--quick` shrinks every workload (under 8 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.harness import BENCH_SETTINGS, OUT_DIR, ROOT, log
from bench.model import Context, Measurement

NAMES = ("throughput", "lag", "memory", "source_cost", "reads", "retention", "baseline")
ALIASES = {
    "cost": "source_cost",
    "source": "source_cost",
    "read": "reads",
    "mem": "memory",
    "prune": "retention",
}
TITLES = {
    "throughput": "Capture throughput (end to end) vs pg_recvlogical",
    "lag": "Lag: commit on the source to visible in the store",
    "memory": "Memory: peak RSS of `cdc run` during one large transaction",
    "source_cost": "Cost on the source: pgbench TPC-B-like",
    "reads": "Reads on a large store (query layer)",
    "retention": "Retention: pruning a day, and capture while pruning",
    "baseline": "Baseline: `cdc setup` of a large table vs a bare COPY",
}
DOCS = ROOT / "docs" / "benchmarks.md"


def _names(text: str) -> list[str]:
    names = []
    for raw in text.split(","):
        name = raw.strip().lower().replace("-", "_")
        if not name:
            continue
        name = ALIASES.get(name, name)
        if name not in NAMES:
            raise argparse.ArgumentTypeError(
                f"unknown measurement {raw.strip()!r}: choose from {', '.join(NAMES)}"
            )
        if name not in names:
            names.append(name)
    if not names:
        raise argparse.ArgumentTypeError("no measurement named")
    return names


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small workloads (under 5 minutes)")
    parser.add_argument(
        "--only", type=_names, default=list(NAMES), metavar="NAME,...", help=f"among {', '.join(NAMES)}"
    )
    parser.add_argument("--flavor", choices=("embedded", "system"), default="embedded")
    parser.add_argument(
        "--no-scale",
        dest="scale",
        action="store_false",
        help="use the nominal workload sizes even when the daemon is too slow to drain them in the time budget",
    )
    parser.add_argument("--profile", action="store_true", help="py-spy profiles of the daemon (throughput)")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="raw results and logs (default bench/out)")
    parser.add_argument(
        "--docs", type=Path, default=DOCS, help="the markdown report (default docs/benchmarks.md)"
    )
    parser.add_argument("--no-docs", dest="write_docs", action="store_false", help="do not write the report")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the measurements not run now from the last run of the same mode and flavor "
        "(bench/out/results-<quick|full>-<flavor>.json); the report dates each one",
    )
    args = parser.parse_args(list(argv))
    args.only = [n for n in NAMES if n in args.only]  # always in the suite's order
    return args


def measurement_functions() -> dict[str, Callable[[Context], Measurement]]:
    from bench import baseline, lag, memory, reads, retention, source_cost, throughput

    return {
        "throughput": throughput.measure,
        "lag": lag.measure,
        "memory": memory.measure,
        "source_cost": source_cost.measure,
        "reads": reads.measure,
        "retention": retention.measure,
        "baseline": baseline.measure,
    }


def _previous(path: Path, names: Sequence[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The meta and the measurements (those not in ``names``) of an earlier results file."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}, []
    meta = earlier.get("meta", {})
    kept = []
    for measurement in earlier.get("measurements", []):
        if measurement.get("name") in names:
            continue
        measurement.setdefault("date", meta.get("date", ""))
        measurement.setdefault("command", meta.get("command", ""))
        if not measurement["date"]:
            measurement["date"] = meta.get("date", "")
        if not measurement["command"]:
            measurement["command"] = meta.get("command", "")
        kept.append(measurement)
    return meta, kept


def _ordered(measurements: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(
        measurements, key=lambda m: NAMES.index(m["name"]) if m.get("name") in NAMES else len(NAMES)
    )


def run_one(name: str, fn: Callable[[Context], Measurement], ctx: Context) -> Measurement:
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    log(f"=== {name} (load average {load_before:.1f})")
    try:
        result = fn(ctx)
    except Exception:
        result = Measurement(name, TITLES[name], error=traceback.format_exc())
        log(f"{name} failed:\n{result.error}")
    result.seconds = time.monotonic() - started
    # Other work on the machine skews every figure: keep the 1-minute load average around it.
    result.params["load_average_before"] = round(load_before, 1)
    result.params["load_average_after"] = round(os.getloadavg()[0], 1)
    log(f"=== {name} done in {result.seconds:.0f} s")
    return result


def write_results(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    tmp.replace(path)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    # SIGTERM (make interrupted, a CI timeout) unwinds like Ctrl-C: every finally block stops
    # its daemon and its server.
    signal.signal(signal.SIGTERM, _interrupt)
    from bench.report import machine_info, render_markdown

    ctx = Context(
        flavor=args.flavor, quick=args.quick, scale=args.scale, profile=args.profile, out_dir=args.out
    )
    started = time.monotonic()
    results: dict[str, Any] = {
        "meta": {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": shlex.join(["python", "-m", "bench.run", *argv]),
            "quick": args.quick,
            "flavor": args.flavor,
            "only": args.only,
            "machine": machine_info(),
            "server_settings": {
                "fsync": "off",
                "full_page_writes": "off",
                **{k: v for k, v in BENCH_SETTINGS.items() if not k.startswith("max_")},
            },
        },
        "measurements": [],
    }
    mode_file = args.out / f"results-{'quick' if args.quick else 'full'}-{args.flavor}.json"
    kept: list[dict[str, Any]] = []
    if args.merge:
        _, kept = _previous(mode_file, args.only)
        results["meta"]["merged"] = sorted({m["command"] + " at " + m["date"] for m in kept})
    functions = measurement_functions()
    failed = False
    done: list[dict[str, Any]] = []
    for name in args.only:
        measurement = run_one(name, functions[name], ctx)
        measurement.date = results["meta"]["date"]
        measurement.command = results["meta"]["command"]
        failed = failed or measurement.error is not None
        done.append(measurement.to_json())
        results["measurements"] = _ordered(kept + done)
        results["meta"]["duration_s"] = round(time.monotonic() - started, 1)
        write_results(args.out / "results.json", results)
        # Also kept per mode and flavor, so that a quick run does not hide the last full one.
        write_results(mode_file, results)
    if args.write_docs:
        args.docs.parent.mkdir(parents=True, exist_ok=True)
        text = render_markdown(results)
        if args.merge and not kept and args.docs.exists():
            # No earlier raw results here: the other sections are kept from the report itself.
            from bench.docs_merge import merge_into

            text = merge_into(args.docs.read_text(), text, [TITLES[n] for n in NAMES])
        args.docs.write_text(text)
        log(f"wrote {args.docs}")
    summary = [
        f"{f['label']}: {f['value']!r} {f['unit']} (target {f['target']['op']} {f['target']['value']}: "
        f"{'met' if f['met'] else 'NOT met'})"
        for m in results["measurements"]
        for f in m["figures"]
        if f.get("target")
    ]
    print("\n".join(summary))
    log(f"total {time.monotonic() - started:.0f} s; results in {args.out / 'results.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
