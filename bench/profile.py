"""Optional py-spy profiles of the daemon (`--profile`): the wrapper command and a summary
of a raw (collapsed stacks) profile."""

from __future__ import annotations

import shutil
import sys
from collections import Counter
from pathlib import Path


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


def wrapper(output: Path) -> list[str]:
    """``py-spy record`` around a command, or nothing when py-spy is not installed."""
    exe = py_spy()
    if exe is None:
        return []
    return [exe, "record", "--nonblocking", "--idle", "-f", "raw", "-o", str(output), "--"]


def _short(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py:123)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path, _, line = where.rpartition(":")
    parts = path.split("/")
    tail = "/".join(parts[-2:]) if parts and parts[-2:-1] == ["cdc"] else parts[-1]
    return f"{name} ({tail}:{line})" if where else name


def summarize(path: Path, top: int = 12) -> tuple[int, list[tuple[str, float]], list[tuple[str, float]]]:
    """(samples, top self frames, top inclusive frames below the daemon loop) as (frame, %)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[_short(frames[-1])] += n
        for frame in {_short(f) for f in frames}:
            inclusive[frame] += n
    if total == 0:
        return 0, [], []
    skip = ("runpy", "click/", "core.py", "__main__", "cli.py", "<module>", "_bootstrap")
    own_top = [(f, 100 * n / total) for f, n in own.most_common(top)]
    incl_top = [
        (f, 100 * n / total) for f, n in inclusive.most_common(top * 3) if not any(s in f for s in skip)
    ][:top]
    return total, own_top, incl_top


def summary_line(path: Path, top: int = 6) -> str:
    total, own, incl = summarize(path, top)
    if total == 0:
        return "(empty profile)"
    own_text = ", ".join(f"{f} {p:.0f}%" for f, p in own)
    incl_text = ", ".join(f"{f} {p:.0f}%" for f, p in incl)
    return f"{total} samples; self: {own_text}; inclusive: {incl_text}"
