"""deploy/monitoring: the alert rules pass promtool's check and their unit tests, the
Grafana dashboard is a well-formed dashboard, and every PromQL expression in either
(and every Prometheus-valid one: the dashboard's are checked by promtool too) names
only metrics tlserve exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from tests.test_metrics_units import ROOT, catalogue, system_tool

MONITORING = ROOT / "deploy" / "monitoring"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# The process collector's metrics the assets may use (prometheus_client's names).
PROCESS_METRICS = {"process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"}
# Grafana's variables, replaced by values Prometheus accepts when the expressions are checked.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$job": ".*",
                     "$instance": ".*", "$model": ".*"}


def dashboard() -> dict:
    return json.loads((MONITORING / "grafana-dashboard.json").read_text())


def dashboard_panels() -> list[dict]:
    panels = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows hold theirs
    return panels


def dashboard_expressions() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
            for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(?:tlserve|process)_[a-z0-9_]+", expr))


def exported(name: str, found: dict) -> bool:
    if name in found or name in PROCESS_METRICS:
        return True
    base = next((name.removesuffix(s) for s in HISTOGRAM_SUFFIXES if name.endswith(s)), None)
    return base is not None and found.get(base, ("",))[0] == "histogram"


def test_alert_rules_pass_promtool_check():
    result = subprocess.run([system_tool("promtool"), "check", "rules", "alerts.yml"], cwd=MONITORING,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_alert_unit_tests_fire_on_synthetic_series():
    result = subprocess.run([system_tool("promtool"), "test", "rules", "alerts_test.yml"], cwd=MONITORING,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = yaml.safe_load((MONITORING / "alerts_test.yml").read_text())["tests"]
    fired = {t["alertname"] for test in tested for t in test["alert_rule_test"] if t["exp_alerts"]}
    assert len(fired) >= 2, fired


def test_every_alert_has_a_severity_a_summary_and_only_exported_metrics():
    found = catalogue()
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names)) >= 8
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        unknown = {n for n in metric_names(rule["expr"]) if not exported(n, found)}
        assert not unknown, f"{rule['alert']}: {unknown}"


def test_readme_lists_every_alert():
    readme = (ROOT / "README.md").read_text()
    for rule in alert_rules():
        assert f"`{rule['alert']}`" in readme, rule["alert"]


def test_dashboard_is_a_grafana_dashboard_with_a_datasource_variable():
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        covered = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not covered & cells, f"{panel['title']} overlaps another panel"
        cells |= covered
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]


def test_dashboard_covers_the_issue_panels():
    text = " ".join(dashboard_expressions())
    for name in ("tlserve_grpc_requests_total", "tlserve_grpc_request_duration_seconds_bucket",
                 "tlserve_predict_duration_seconds_bucket", "tlserve_inference_batch_size_images_bucket",
                 "tlserve_inference_queue_requests", "tlserve_predict_errors_total",
                 "tlserve_inference_model_memory_bytes", "tlserve_profile_latency_seconds",
                 "tlserve_profile_accuracy_ratio", "tlserve_training_jobs", "tlserve_training_loss",
                 "tlserve_training_accuracy_ratio", "process_resident_memory_bytes", "tlserve_gpu_memory_used_bytes"):
        assert name in text, name
    assert any(p["type"] == "table" and "profile" in json.dumps(p["targets"]) for p in dashboard_panels())


def test_dashboard_expressions_name_only_exported_metrics():
    found = catalogue()
    queries = dashboard_expressions() + [
        v["query"] for v in dashboard()["templating"]["list"] if v["type"] == "query"
    ]
    unknown = {n for expr in queries for n in metric_names(expr) if not exported(n, found)}
    assert not unknown, unknown
    used = {n for expr in queries for n in metric_names(expr)}
    assert len(used) >= 25


def test_dashboard_expressions_are_valid_promql(tmp_path):
    """promtool parses every expression, as recording rules with Grafana's variables filled in."""
    rules = []
    for i, expr in enumerate(dashboard_expressions()):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:expression_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([system_tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) not installed")
def test_monitoring_kustomization_renders_the_rules_and_the_labelled_dashboard():
    rendered = subprocess.run(["kubectl", "kustomize", str(MONITORING)], capture_output=True, text=True,
                              check=True, timeout=120).stdout
    maps = {d["metadata"]["name"]: d for d in yaml.safe_load_all(rendered)}
    assert set(maps) == {"tlserve-alerts", "tlserve-grafana-dashboard"}
    assert yaml.safe_load(maps["tlserve-alerts"]["data"]["alerts.yml"])["groups"]
    board = maps["tlserve-grafana-dashboard"]
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(board["data"]["tlserve.json"]) == dashboard()
