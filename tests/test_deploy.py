"""The deployment files agree with each other and with the code."""

from __future__ import annotations

import json
import re

import yaml

from dlqd.metrics import Metrics
from tests.conftest import ROOT

RULES = ROOT / "deploy/prometheus/dlqd-rules.yml"
PROMETHEUS_RULE = ROOT / "deploy/base/prometheusrule.yaml"
DASHBOARD = ROOT / "deploy/grafana/dlqd-dashboard.json"
OPERATIONS = ROOT / "docs/operations.md"


def _dlqd_families() -> set[str]:
    return {
        family.name
        for family in Metrics().registry.collect()
        if family.name.startswith("dlqd_") and family.name != "dlqd_replayer_passes"
    }


def test_the_prometheusrule_carries_exactly_the_rules_file() -> None:
    rules = yaml.safe_load(RULES.read_text())
    resource = yaml.safe_load(PROMETHEUS_RULE.read_text())
    assert resource["kind"] == "PrometheusRule"
    assert resource["spec"] == rules, "run scripts/render_prometheusrule.py"


def test_every_alert_has_a_runbook_entry_and_a_unit_test() -> None:
    alerts = [
        rule["alert"]
        for group in yaml.safe_load(RULES.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]
    runbook = OPERATIONS.read_text()
    tests = (ROOT / "deploy/prometheus/dlqd-rules.test.yml").read_text()
    for alert in alerts:
        assert f"\n## {alert}\n" in runbook, alert
        assert f"alertname: {alert}\n" in tests, alert
    for rule in (r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]):
        if "alert" in rule:
            assert rule["annotations"]["runbook"] == f"docs/operations.md#{rule['alert'].lower()}"


def test_the_dashboard_shows_every_dlqd_metric_and_the_process() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = " ".join(
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    )
    used = set(re.findall(r"\b(dlqd_[a-z_]+|process_[a-z_]+)", exprs))
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in used}
    missing = _dlqd_families() - shown - {"dlqd_build_info"}
    assert not missing, missing
    assert {"process_resident_memory_bytes", "process_cpu_seconds"} <= shown
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
