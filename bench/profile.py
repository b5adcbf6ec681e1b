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
    return [exe, "record", "--nonblocking", "--idle", "--threads", "-f", "raw", "-o", str(output), "--"]


def _short(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py:123)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path, _, line = where.rpartition(":")
    parts = path.split("/")
    tail = "/".join(parts[-2:]) if parts and parts[-2:-1] == ["cdc"] else parts[-1]
    return f"{name} ({tail}:{line})" if where else name


#: Leaf frames of threads with nothing to do (the HTTP server, a queue's consumer, a timer).
IDLE_LEAVES = ("_PollLikeSelector.select", "EpollSelector.select", "Condition.wait", "Event.wait")


def summarize(path: Path, top: int = 12) -> tuple[int, list[tuple[str, float]], list[tuple[str, float]]]:
    """(samples, top self frames, top inclusive frames below the daemon loop) as (frame, %).

    Samples of every thread (py-spy --idle), except those parked with nothing to do; waits on
    the source or the store (a socket read, ``Connection.wait``) stay in."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        # With --threads the first frame names the thread ("thread (123): cdc-store-writer").
        frames = [f for f in stack.split(";") if not f.startswith("thread (")] or ["(idle)"]
        if frames[-1].startswith(IDLE_LEAVES) or frames == ["(idle)"]:
            continue  # a thread parked on a queue or an idle server socket: no work
        total += n
        own[_short(frames[-1])] += n
        for frame in {_short(f) for f in frames}:
            inclusive[frame] += n
    if total == 0:
        return 0, [], []
    skip = ("runpy", "click/", "core.py", "__main__", "cli.py", "<module>", "_bootstrap", "Thread.run")
    skip += ("Daemon.run", "Daemon._session", "_Session.loop")
    own_top = [(f, 100 * n / total) for f, n in own.most_common(top)]
    incl_top = [
        (f, 100 * n / total) for f, n in inclusive.most_common(top * 8) if not any(s in f for s in skip)
    ][:top]
    return total, own_top, incl_top


def summary_line(path: Path, top: int = 6) -> str:
    total, own, incl = summarize(path, top)
    if total == 0:
        return "(empty profile)"
    own_text = ", ".join(f"{f} {p:.0f}%" for f, p in own)
    incl_text = ", ".join(f"{f} {p:.0f}%" for f, p in incl)
    return f"{total} samples; self: {own_text}; inclusive: {incl_text}"
