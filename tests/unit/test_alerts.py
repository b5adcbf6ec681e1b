"""The Prometheus alert rules (deploy/prometheus/alerts.yaml) under `promtool test rules`.

Each case feeds series to the rules and says which alerts fire when, with which labels. The
series are what cdc.metrics exports: a figure the server does not give has no series (a
default server's slot has no safe_wal_size: max_slot_wal_keep_size = -1), so the cases model
it as absent, never as 0 or -1. :func:`series_from_registry` turns a live daemon's registry
into input series (tests/integration/test_operations.py runs the rules over a daemon on a
default server).
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from tests.unit.test_deploy import (
    ALERTS,
    PROMETHEUS_YML,
    _all_panels,
    _load_dashboard,
    _tool,
    promql_for_prometheus,
)

PROMTOOL = _tool("promtool")


def _promtool(*args: str) -> None:
    assert PROMTOOL is not None
    result = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")
def test_promtool_parses_dashboard_queries(tmp_path: Path) -> None:
    rules = []
    for panel in _all_panels(_load_dashboard()["panels"]):
        for target in panel.get("targets", []):
            expr = promql_for_prometheus(target["expr"]).replace("$job", "cdc").replace("$instance", ".*")
            rules.append({"record": f"dashboard:panel_{panel['id']}:{target['refId'].lower()}", "expr": expr})
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _promtool("check", "rules", str(path))


def _series(values: dict[str, str]) -> list[dict[str, str]]:
    return [{"series": name, "values": vals} for name, vals in values.items()]


def _alert(name: str, **labels: str) -> dict[str, Any]:
    return {"alertname": name, "exp_alerts": [{"exp_labels": labels}] if labels else []}


HEALTHY_PAIR = {  # instance a streams, b is the standby; a default server (no safe_wal_size)
    'up{job="cdc", instance="a"}': "1x40",
    'up{job="cdc", instance="b"}': "1x40",
    'cdc_loop_heartbeat_seconds{job="cdc", instance="a"}': "0+60x40",  # = time(): fresh
    'cdc_loop_heartbeat_seconds{job="cdc", instance="b"}': "0+60x40",  # a standby's loop beats too
    'cdc_streaming{job="cdc", instance="a"}': "1x40",
    'cdc_streaming{job="cdc", instance="b"}': "0x40",
    'cdc_standby{job="cdc", instance="a"}': "0x40",
    'cdc_standby{job="cdc", instance="b"}': "1x40",
    'cdc_lag_bytes{job="cdc", instance="a"}': "1000x40",
    'cdc_lag_bytes{job="cdc", instance="b"}': "2147483648x40",  # stale: from before it became standby
    'cdc_slot_retained_wal_bytes{job="cdc", instance="b"}': "1e11x40",
    'cdc_slot_wal_status{job="cdc", instance="a", status="reserved"}': "1x40",
    'cdc_slot_wal_status{job="cdc", instance="a", status="lost"}': "0x40",
}

ALERT_TESTS: list[dict[str, Any]] = [
    {  # a healthy active/standby pair raises nothing
        "interval": "1m",
        "input_series": _series(HEALTHY_PAIR),
        "alert_rule_test": [
            {"eval_time": "30m", **_alert(name)}
            for name in (
                "CdcDaemonDown",
                "CdcDaemonAbsent",
                "CdcLoopStalled",
                "CdcNotStreaming",
                "CdcLagBytesHigh",
                "CdcSlotRetainedWalHigh",
                "CdcSlotLost",
                "CdcSlotSafeWalSizeLow",
            )
        ],
    },
    {  # the active instance's loop stops iterating at minute 5
        "interval": "1m",
        "input_series": _series(
            {**HEALTHY_PAIR, 'cdc_loop_heartbeat_seconds{job="cdc", instance="a"}': "0+60x5 300x35"}
        ),
        "alert_rule_test": [
            {"eval_time": "3m", **_alert("CdcLoopStalled")},
            {"eval_time": "20m", **_alert("CdcLoopStalled", job="cdc", instance="a", severity="critical")},
        ],
    },
    {  # nobody streams: both instances reconnecting
        "interval": "1m",
        "input_series": _series(
            {
                **HEALTHY_PAIR,
                'cdc_streaming{job="cdc", instance="a"}': "1x5 0x35",
                'up{job="cdc", instance="b"}': "0x40",
            }
        ),
        "alert_rule_test": [
            {"eval_time": "10m", **_alert("CdcNotStreaming")},
            {"eval_time": "20m", **_alert("CdcNotStreaming", job="cdc", severity="critical")},
            {"eval_time": "20m", **_alert("CdcDaemonDown", job="cdc", instance="b", severity="critical")},
        ],
    },
    {  # the slot runs out of WAL, then is invalidated; lag grows meanwhile
        "interval": "1m",
        "input_series": _series(
            {
                **HEALTHY_PAIR,
                'cdc_slot_safe_wal_size_bytes{job="cdc", instance="a"}': "1073741824x40",
                'cdc_slot_wal_status{job="cdc", instance="a", status="lost"}': "0x20 1x20",
                'cdc_lag_bytes{job="cdc", instance="a"}': "2147483648x40",
                'cdc_lag_seconds{job="cdc", instance="a"}': "600x40",
                'cdc_slot_retained_wal_bytes{job="cdc", instance="a"}': "2e10x40",
                'cdc_slot_wal_status{job="cdc", instance="a", status="unreserved"}': "0x5 1x35",
            }
        ),
        "alert_rule_test": [
            {"eval_time": "10m", **_alert("CdcSlotSafeWalSizeLow", job="cdc", severity="critical")},
            {"eval_time": "10m", **_alert("CdcSlotLost")},
            {"eval_time": "25m", **_alert("CdcSlotLost", job="cdc", severity="critical")},
            {"eval_time": "25m", **_alert("CdcLagBytesHigh", job="cdc", instance="a", severity="warning")},
            {"eval_time": "25m", **_alert("CdcLagSecondsHigh", job="cdc", instance="a", severity="warning")},
            {"eval_time": "25m", **_alert("CdcSlotRetainedWalHigh", job="cdc", severity="warning")},
            {"eval_time": "10m", **_alert("CdcSlotWalUnreserved", job="cdc", severity="critical")},
        ],
    },
    {  # a promotion of the source: capture resumed on the new primary (information, not a fault)
        "interval": "1m",
        "input_series": _series(
            {
                **HEALTHY_PAIR,
                'cdc_source_switches_total{job="cdc", instance="a", outcome="resumed"}': "0x10 1x30",
            }
        ),
        "alert_rule_test": [
            {"eval_time": "5m", **_alert("CdcSourceSwitched")},
            {"eval_time": "15m", **_alert("CdcSourceSwitched", job="cdc", severity="info")},
            {"eval_time": "15m", **_alert("CdcSlotLost")},
        ],
    },
    {  # no cdc series at all
        "interval": "1m",
        "input_series": _series({'up{job="other", instance="x"}': "1x20"}),
        "alert_rule_test": [
            {"eval_time": "15m", **_alert("CdcDaemonAbsent", job="cdc", severity="critical")},
        ],
    },
]


def alert_names() -> list[str]:
    data = yaml.safe_load(ALERTS.read_text())
    return [rule["alert"] for group in data["groups"] for rule in group["rules"]]


def promtool_test_rules(tmp_path: Path, tests: list[dict[str, Any]]) -> None:
    """``promtool test rules`` of ``tests`` over deploy/prometheus/alerts.yaml."""
    assert PROMTOOL is not None
    # Annotations are prose; the unit tests check when each alert fires and with which labels.
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yaml").write_text(yaml.safe_dump(rules))
    spec = {"rule_files": ["alerts.yaml"], "evaluation_interval": "1m", "tests": copy.deepcopy(tests)}
    (tmp_path / "alerts.test.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    result = subprocess.run(
        [PROMTOOL, "test", "rules", str(tmp_path / "alerts.test.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"promtool test rules:\n{result.stdout}{result.stderr}"


def series_from_registry(registry: CollectorRegistry, instance: str, minutes: int = 40) -> dict[str, str]:
    """The samples of ``registry`` as promtool input series held for ``minutes`` (the loop
    heartbeat kept fresh: it is the time of the loop's last iteration), with ``up``."""
    series = {f'up{{job="cdc", instance="{instance}"}}': f"1x{minutes}"}
    for family in registry.collect():
        for sample in family.samples:
            labels = {"job": "cdc", "instance": instance, **sample.labels}
            text = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
            name = f"{sample.name}{{{text}}}"
            if sample.name == "cdc_loop_heartbeat_seconds":
                series[name] = f"0+60x{minutes}"
            else:
                series[name] = f"{sample.value:g}x{minutes}"
    return series


def silent_at(eval_time: str, names: list[str]) -> list[dict[str, Any]]:
    return [{"eval_time": eval_time, **_alert(name)} for name in names]


#: A single daemon streaming from a default server (max_slot_wal_keep_size = -1), as
#: cdc.metrics exports it: no cdc_slot_safe_wal_size_bytes series at all.
DEFAULT_SERVER = {
    'up{job="cdc", instance="a"}': "1x40",
    'cdc_loop_heartbeat_seconds{job="cdc", instance="a"}': "0+60x40",
    'cdc_streaming{job="cdc", instance="a"}': "1x40",
    'cdc_standby{job="cdc", instance="a"}': "0x40",
    'cdc_lag_bytes{job="cdc", instance="a"}': "0x40",
    'cdc_lag_seconds{job="cdc", instance="a"}': "0x40",
    'cdc_slot_retained_wal_bytes{job="cdc", instance="a"}': "16384x40",
    'cdc_slot_wal_status{job="cdc", instance="a", status="reserved"}': "1x40",
    'cdc_slot_wal_status{job="cdc", instance="a", status="extended"}': "0x40",
    'cdc_slot_wal_status{job="cdc", instance="a", status="unreserved"}': "0x40",
    'cdc_slot_wal_status{job="cdc", instance="a", status="lost"}': "0x40",
}


def test_the_default_server_case_has_no_safe_wal_size_series() -> None:
    assert not any(name.startswith("cdc_slot_safe_wal_size_bytes") for name in DEFAULT_SERVER)
    assert not any(name.startswith("cdc_slot_safe_wal_size_bytes") for name in HEALTHY_PAIR)


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")
def test_promtool_check_rules_and_config() -> None:
    _promtool("check", "rules", str(ALERTS))
    _promtool("check", "config", "--syntax-only", str(PROMETHEUS_YML))


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")
def test_promtool_alert_unit_tests(tmp_path: Path) -> None:
    promtool_test_rules(tmp_path, ALERT_TESTS)


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")
def test_no_alert_on_a_default_server(tmp_path: Path) -> None:
    """The critical CdcSlotSafeWalSizeLow (and every other alert) stays silent for a healthy
    daemon on a server with the default max_slot_wal_keep_size = -1: safe_wal_size is NULL
    there, and so absent; a limited slot with room left is silent too, one near its limit fires."""
    limited = {**DEFAULT_SERVER, 'cdc_slot_safe_wal_size_bytes{job="cdc", instance="a"}': "5e10x40"}
    near = {**DEFAULT_SERVER, 'cdc_slot_safe_wal_size_bytes{job="cdc", instance="a"}': "5e8x40"}
    promtool_test_rules(
        tmp_path,
        [
            {
                "interval": "1m",
                "input_series": _series(DEFAULT_SERVER),
                "alert_rule_test": silent_at("30m", alert_names()),
            },
            {
                "interval": "1m",
                "input_series": _series(limited),
                "alert_rule_test": silent_at("30m", alert_names()),
            },
            {
                "interval": "1m",
                "input_series": _series(near),
                "alert_rule_test": [
                    {"eval_time": "30m", **_alert("CdcSlotSafeWalSizeLow", job="cdc", severity="critical")}
                ],
            },
        ],
    )
