"""The benchmark suite's pure parts: argument parsing, statistics, figures and targets, the
markdown report and the profile summary. Nothing here starts a server or times anything."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import profile, run
from bench.harness import lsn_int, lsn_text, median, percentile
from bench.model import Figure, Measurement, Target, fmt
from bench.report import render_markdown


def test_parse_args_defaults_run_every_measurement_in_order() -> None:
    args = run.parse_args([])
    assert args.only == list(run.NAMES)
    assert not args.quick
    assert args.flavor == "embedded"
    assert args.scale
    assert args.write_docs


def test_parse_args_only_accepts_aliases_and_keeps_the_suite_order() -> None:
    args = run.parse_args(["--quick", "--only", "reads, cost,throughput", "--flavor", "system", "--no-scale"])
    assert args.quick
    assert args.only == ["throughput", "source_cost", "reads"]
    assert args.flavor == "system"
    assert not args.scale


@pytest.mark.parametrize("argv", [["--only", "speed"], ["--only", ","], ["--flavor", "oracle"]])
def test_parse_args_rejects_unknown_names(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run.parse_args(argv)
    assert "error" in capsys.readouterr().err


def test_every_measurement_has_a_function_and_a_title() -> None:
    assert set(run.measurement_functions()) == set(run.NAMES) == set(run.TITLES)


def test_statistics() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([]) is None
    assert percentile([], 50) is None
    assert percentile([7.0], 99) == 7.0
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 100) == 100.0


def test_lsn_round_trip() -> None:
    assert lsn_int("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert lsn_text(lsn_int("0/1A2B3C")) == "0/1A2B3C"


def test_figure_median_and_targets() -> None:
    ratio = Figure("t.ratio", "ratio", "", [0.7, 0.9, 0.85], target=Target(">=", 0.8))
    assert ratio.value == 0.85
    assert ratio.met is True
    lag = Figure("lag.p99", "p99", "ms", [300.0], target=Target("<", 250.0))
    assert lag.met is False
    plain = Figure("x", "x", "ms", [])
    assert plain.value is None and plain.met is None
    explicit = Figure("loss", "loss", "%", [1.0, 9.0], value=2.0, target=Target("<", 3.0))
    assert explicit.value == 2.0 and explicit.met is True
    assert Target("<=", 5).text("ms") == "≤ 5 ms"
    assert fmt(81234.5, "changes/s") == "81,234 changes/s"
    assert fmt(0.0712) == "0.07"
    assert fmt(12.5, "%") == "12.5 %"
    assert fmt(None) == "n/a"


def _fake_results() -> dict[str, Any]:
    good = Measurement(
        "reads",
        "Reads on a large store",
        method="Filled directly.",
        figures=[
            Figure("reads.row_at.p99", "row at a version, p99", "ms", [1.2], target=Target("<", 5.0)),
            Figure("reads.table_at.p50", "table page, p50", "ms", [12.0], note="200 samples"),
        ],
        params={"mutations": 1_000_000, "load_average_before": 0.5, "load_average_after": 3.5},
        notes=["A note."],
        seconds=42.0,
    )
    bad = Measurement(
        "throughput",
        "Capture throughput",
        figures=[
            Figure(
                "throughput.small.immediate.ratio",
                "ratio cdc run / pg_recvlogical",
                "",
                [0.1, 0.2, 0.15],
                target=Target(">=", 0.8),
            )
        ],
    )
    failed = Measurement("lag", "Lag", error="Traceback ...\nRuntimeError: pgbench failed")
    return {
        "meta": {
            "date": "2026-01-02 03:04 UTC",
            "command": "python -m bench.run --quick",
            "quick": True,
            "flavor": "embedded",
            "duration_s": 250.0,
            "machine": {
                "nproc": 2,
                "memory_gib": 23.5,
                "cpu_model": "Test CPU @ 1 GHz",
                "kernel": "6.1",
                "python": "3.11.7",
                "psycopg": "3.3.9",
                "postgres": {"embedded": "18.1", "system": "15.14"},
            },
            "server_settings": {"fsync": "off", "synchronous_commit": "on"},
        },
        "measurements": [bad.to_json(), failed.to_json(), good.to_json()],
    }


def test_render_markdown_from_fake_figures() -> None:
    results = json.loads(json.dumps(_fake_results()))  # exactly what results.json holds
    text = render_markdown(results)
    assert text.startswith("# Benchmarks")
    for expected in (
        "2026-01-02 03:04 UTC",
        "`python -m bench.run --quick`",
        "2 CPUs",
        "23.5 GiB",
        "Test CPU @ 1 GHz",
        "18.1 (embedded), 15.14 (system)",
        "fsync=off",
        "4.2 min",
        "## Summary",
        "| ratio cdc run / pg_recvlogical | 0.15 | ≥ 0.80 | **not met** |",
        "row at a version, p99 | 1.20 ms | < 5 ms | met |",
        "RuntimeError: pgbench failed",
        "0.10, 0.20, 0.15",
        "table page, p50 (200 samples)",
        "- A note.",
        "load_average_before=0.5",
        "the 1-minute load average reached 3.5 on 2 CPUs",
    ):
        assert expected in text, expected
    assert text.index("## 1. Capture throughput") < text.index("## 2. Lag") < text.index("## 3. Reads")


def test_measurement_json_round_trip(tmp_path: Path) -> None:
    results = _fake_results()
    path = tmp_path / "out" / "results.json"
    run.write_results(path, results)
    loaded = json.loads(path.read_text())
    again = [Measurement.from_json(m).to_json() for m in loaded["measurements"]]
    assert again == loaded["measurements"]


def test_profile_summary(tmp_path: Path) -> None:
    raw = tmp_path / "profile.txt"
    raw.write_text(
        "thread (7): MainThread;<module> (cdc/__main__.py:3);loop (cdc/daemon.py:300);"
        "wait (psycopg/connection.py:495) 30\n"
        "thread (7): MainThread;<module> (cdc/__main__.py:3);loop (cdc/daemon.py:300);"
        "decode (cdc/protocol/pgoutput.py:10) 10\n"
    )
    total, own, inclusive = profile.summarize(raw)
    assert total == 40
    assert own[0] == ("wait (connection.py:495)", 75.0)
    assert ("loop (cdc/daemon.py:300)", 100.0) in inclusive
    assert "40 samples" in profile.summary_line(raw)


def test_merge_keeps_the_measurements_not_run_again(tmp_path: Path) -> None:
    earlier = _fake_results()
    path = tmp_path / "results-full-embedded.json"
    run.write_results(path, earlier)
    meta, kept = run._previous(path, ["reads"])
    assert meta["date"] == "2026-01-02 03:04 UTC"
    assert [m["name"] for m in kept] == ["throughput", "lag"]
    assert all(m["date"] == "2026-01-02 03:04 UTC" and m["command"] for m in kept)
    fresh = Measurement(
        "reads", "Reads", date="2026-02-03 04:05 UTC", command="python -m bench.run --only reads"
    )
    ordered = run._ordered([fresh.to_json(), *kept])
    assert [m["name"] for m in ordered] == ["throughput", "lag", "reads"]
    results = {
        "meta": {**earlier["meta"], "date": fresh.date, "command": fresh.command, "merged": ["x at y"]},
        "measurements": ordered,
    }
    text = render_markdown(results)
    assert "Measured 2026-01-02 03:04 UTC by `python -m bench.run --quick`." in text
    assert "Merged from an earlier run" in text
    assert run._previous(tmp_path / "missing.json", []) == ({}, [])


def test_parse_args_merge_flag() -> None:
    assert run.parse_args(["--merge", "--only", "reads"]).merge
    assert not run.parse_args([]).merge
