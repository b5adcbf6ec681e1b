"""The machine description and the markdown report (docs/benchmarks.md) from the results."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

from bench.model import Figure, Measurement, fmt


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    return None


def _postgres_versions() -> dict[str, str]:
    from cdc.devdb import available_flavors, find_bindir

    versions: dict[str, str] = {}
    for flavor in available_flavors():
        with contextlib.suppress(Exception):
            out = subprocess.run(
                [str(find_bindir(flavor) / "postgres"), "--version"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            ).stdout
            match = re.search(r"\(PostgreSQL\)\s+(\S+)", out)
            versions[flavor] = match.group(1) if match else out.strip()
    return versions


def machine_info() -> dict[str, Any]:
    import psycopg

    return {
        "nproc": os.cpu_count(),
        "memory_gib": round(_memory_gib() or 0, 1),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "psycopg": psycopg.__version__,
        "postgres": _postgres_versions(),
    }


# --------------------------------------------------------------------------- markdown


def _verdict(figure: Figure) -> str:
    if figure.target is None:
        return ""
    if figure.met is None:
        return "no figure"
    return "met" if figure.met else "**not met**"


def _target_note(figure: Figure) -> str:
    assert figure.target is not None
    value = fmt(figure.value, figure.unit)
    goal = figure.target.text(figure.unit)
    if figure.met is None:
        return f"{figure.label}: no figure (the measurement failed), target {goal}."
    if figure.met:
        return f"{figure.label}: {value}, target {goal}: met."
    return f"{figure.label}: {value}, target {goal}: **not met**."


def _runs_text(figure: Figure) -> str:
    if len(figure.runs) <= 1:
        return ""
    return ", ".join(fmt(v) for v in figure.runs)


def render_markdown(results: dict[str, Any]) -> str:
    """The whole report, from the results as stored in results.json."""
    meta = results.get("meta", {})
    machine = meta.get("machine", {})
    measurements = [Measurement.from_json(m) for m in results.get("measurements", [])]
    lines: list[str] = ["# Benchmarks", ""]
    lines.append(
        "Written by `bench/run.py` from the figures it measured; do not edit by hand (run `make bench`, "
        "or `python -m bench.run --quick` for the short version)."
    )
    lines.append("")
    lines.append(f"- Date: {meta.get('date', 'unknown')}")
    lines.append(f"- Command: `{meta.get('command', 'python -m bench.run')}`")
    for merged in meta.get("merged", []):
        lines.append(f"- Merged from an earlier run (`--merge`): `{merged.replace(' at ', '` at ', 1)}")
    mode = "quick" if meta.get("quick") else "full"
    duration = meta.get("duration_s")
    lines.append(
        f"- Mode: {mode}; server flavor `{meta.get('flavor', '?')}`"
        + (f"; took {duration / 60:.1f} min" if duration else "")
        + (
            f" (with the merged measurements: {sum(m.seconds for m in measurements) / 60:.1f} min)"
            if meta.get("merged")
            else ""
        )
    )
    pg_versions = machine.get("postgres", {})
    pg_text = ", ".join(f"{v} ({k})" for k, v in pg_versions.items()) or "unknown"
    lines.append(
        f"- Machine: {machine.get('nproc', '?')} CPUs (`nproc`), {machine.get('memory_gib', '?')} GiB memory, "
        f"{machine.get('cpu_model', '?')}; Linux {machine.get('kernel', '?')}; Python {machine.get('python', '?')}, "
        f"psycopg {machine.get('psycopg', '?')}"
    )
    lines.append(f"- PostgreSQL installed: {pg_text}; the figures below ran on `{meta.get('flavor', '?')}`")
    settings = meta.get("server_settings")
    if settings:
        shown = ", ".join(f"{k}={v}" for k, v in settings.items())
        lines.append(
            f"- Server settings: {shown}. Throwaway servers, one per measurement, on this machine; "
            "durability is off (fsync=off), so the figures leave the disk out."
        )
    loads = [
        float(v)
        for m in measurements
        for k, v in m.params.items()
        if k in ("load_average_before", "load_average_after") and isinstance(v, int | float)
    ]
    nproc = machine.get("nproc") or 1
    if loads and max(loads) > nproc / 2:
        lines.append(
            f"- **The machine was busy with other work during this run**: the 1-minute load average reached "
            f"{max(loads):.1f} on {nproc} CPUs (see each measurement's parameters). Every figure here shares "
            "the CPUs with that work: rates are low and latencies high compared with an idle machine, and "
            "run-to-run spread is wide."
        )
    lines.append("")

    targeted = [(m, f) for m in measurements for f in m.figures if f.target is not None]
    lines += ["## Summary", ""]
    if targeted:
        lines += ["| Measurement | Figure | Median | Target | Verdict |", "|---|---|---|---|---|"]
        for m, f in targeted:
            lines.append(
                f"| {m.title} | {f.label} | {fmt(f.value, f.unit)} | {f.target.text(f.unit) if f.target else ''} "
                f"| {_verdict(f)} |"
            )
        lines.append("")
    failed = [m for m in measurements if m.error]
    for m in failed:
        lines.append(f"- {m.title}: the measurement failed: `{m.error.splitlines()[-1] if m.error else ''}`")
    if failed:
        lines.append("")

    for number, m in enumerate(measurements, start=1):
        lines += [f"## {number}. {m.title}", ""]
        if m.date and m.date != meta.get("date"):
            lines += [f"Measured {m.date} by `{m.command}`.", ""]
        if m.method:
            lines += [m.method, ""]
        if m.error:
            lines += ["The measurement failed:", "", "```", m.error.strip()[-3000:], "```", ""]
        if m.figures:
            lines += ["| Figure | Median | Runs | Target |", "|---|---|---|---|"]
            for f in m.figures:
                target = f"{f.target.text(f.unit)} ({_verdict(f)})" if f.target else ""
                label = f.label + (f" ({f.note})" if f.note else "")
                lines.append(f"| {label} | {fmt(f.value, f.unit)} | {_runs_text(f)} | {target} |")
            lines.append("")
        notes = [_target_note(f) for f in m.figures if f.target is not None] + m.notes
        if notes:
            lines += [f"- {note}" for note in notes]
            lines.append("")
        shown_params = {
            k: v for k, v in m.params.items() if not isinstance(v, dict | list) or k in ("sizes", "modes")
        }
        if shown_params:
            lines.append(
                "Parameters: "
                + ", ".join(f"{k}={v}" for k, v in shown_params.items())
                + f"; {m.seconds:.0f} s."
            )
            lines.append("")
    lines.append("Raw figures of every run: `bench/out/results.json` (not committed).")
    lines.append("")
    return "\n".join(lines)
