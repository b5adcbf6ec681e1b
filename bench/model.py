"""What a measurement hands back: figures (a median over runs, with an optional target),
the raw runs, parameters and notes. Plain data, stored as JSON and rendered as markdown."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.harness import OUT_DIR, median

TARGET_OPS = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


@dataclass
class Target:
    op: str  # one of TARGET_OPS
    value: float

    def met(self, value: float | None) -> bool | None:
        return None if value is None else bool(TARGET_OPS[self.op](value, self.value))

    def text(self, unit: str = "") -> str:
        symbol = {"<=": "≤", ">=": "≥"}.get(self.op, self.op)
        return f"{symbol} {_number(self.value)}{(' ' + unit) if unit else ''}"


@dataclass
class Figure:
    """One reported number: the median of ``runs`` (or a single value), with its unit."""

    name: str  # stable key, e.g. "throughput.small.ratio"
    label: str  # what it is, for humans
    unit: str
    runs: list[float]
    target: Target | None = None
    value: float | None = None  # default: the median of runs
    note: str = ""

    def __post_init__(self) -> None:
        if self.value is None:
            self.value = median(self.runs)

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.target.met(self.value)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["met"] = self.met
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Figure:
        target = data.get("target")
        return cls(
            name=data["name"],
            label=data["label"],
            unit=data.get("unit", ""),
            runs=list(data.get("runs", [])),
            target=Target(**target) if target else None,
            value=data.get("value"),
            note=data.get("note", ""),
        )


@dataclass
class Measurement:
    """The outcome of one measurement function."""

    name: str  # throughput, lag, source_cost, memory, reads
    title: str
    method: str = ""  # how it was measured (markdown, a paragraph)
    figures: list[Figure] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    date: str = ""  # when it ran (UTC), and by which command: set by bench.run
    command: str = ""

    def figure(self, name: str) -> Figure | None:
        return next((f for f in self.figures if f.name == name), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "method": self.method,
            "figures": [f.to_json() for f in self.figures],
            "params": self.params,
            "runs": self.runs,
            "notes": self.notes,
            "error": self.error,
            "seconds": round(self.seconds, 1),
            "date": self.date,
            "command": self.command,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Measurement:
        return cls(
            name=data["name"],
            title=data.get("title", data["name"]),
            method=data.get("method", ""),
            figures=[Figure.from_json(f) for f in data.get("figures", [])],
            params=dict(data.get("params", {})),
            runs=list(data.get("runs", [])),
            notes=list(data.get("notes", [])),
            error=data.get("error"),
            seconds=float(data.get("seconds", 0.0)),
            date=str(data.get("date", "")),
            command=str(data.get("command", "")),
        )


@dataclass
class Context:
    """What every measurement gets: the server flavor, quick or full, and shared findings."""

    flavor: str
    quick: bool
    scale: bool = True  # shrink workloads to fit the time budget at the measured capture rate
    profile: bool = False  # record a py-spy profile of the daemon in the throughput runs
    out_dir: Path = OUT_DIR
    #: the daemon's measured rate of small-transaction changes per second (from throughput)
    capture_rate: float | None = None
    #: changes per transaction of the small workload, to turn the rate into transactions/s
    changes_per_txn: float | None = None
    #: the daemon's measured rate of changes per second in one large transaction
    large_rate: float | None = None

    def log_path(self, name: str) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return self.out_dir / name


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def fmt(value: float | None, unit: str = "") -> str:
    """A number for a table: thousands separators, 2-3 significant digits for small ones."""
    if value is None:
        return "n/a"
    if unit == "%":
        return f"{value:.1f} %"
    text = _number(value)
    return f"{text} {unit}".strip()
