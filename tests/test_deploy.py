"""The deployment files agree with each other and with the code."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from typing import Any

import yaml

from dlqd.config import Settings, load_settings
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


def _unit() -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    for line in (ROOT / "systemd/dlqd.service").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            directives.setdefault(key.strip(), []).append(value.strip())
    return directives


def _seconds(text: str) -> float:
    from dlqd.config import parse_duration

    return parse_duration(text).total_seconds()


def test_the_systemd_unit_speaks_the_daemons_protocol() -> None:
    unit = _unit()
    assert unit["Type"] == ["notify"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["Restart"] == ["on-failure"]
    assert "78" in unit["RestartPreventExitStatus"][0]  # a bad config does not loop
    # ... which systemd applies to the main process's exit status alone: a
    # command before it (ExecStartPre) exiting 78 would restart every RestartSec
    assert "ExecStartPre" not in unit, unit["ExecStartPre"]
    assert unit["ExecStart"][0].split()[1:3] == ["run", "--config"]
    assert unit["EnvironmentFile"] == ["/etc/dlqd/dlqd.env"]
    assert "--config /etc/dlqd/dlqd.toml" in unit["ExecStart"][0]
    assert _seconds(unit["WatchdogSec"][0]) >= 10
    default_shutdown = load_settings(database_url="postgresql://x@localhost/x").shutdown_timeout
    assert _seconds(unit["TimeoutStopSec"][0]) > default_shutdown.total_seconds()
    assert unit["DynamicUser"] == ["yes"]
    assert unit["CapabilityBoundingSet"] == [""]


def _built(kustomization: str) -> list[dict[str, Any]]:
    """The objects of a kustomization, rendered by kubectl kustomize."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render deploy/ (kubectl kustomize)"
    out = subprocess.run(
        [kubectl, "kustomize", str(ROOT / kustomization)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def test_the_kubernetes_objects_fit_the_daemon() -> None:
    objects = {(o["kind"], o["metadata"]["name"]): o for o in _built("deploy/overlays/example")}
    deployment = objects[("Deployment", "dlqd")]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config_map = next(o for (kind, _), o in objects.items() if kind == "ConfigMap")
    settings = load_settings_text(config_map["data"]["dlqd.toml"])
    assert pod["terminationGracePeriodSeconds"] > settings.shutdown_timeout.total_seconds()
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["volumes"][0]["configMap"]["name"] == config_map["metadata"]["name"]
    assert deployment["spec"]["replicas"] == 3  # the overlay's
    job = objects[("Job", "dlqd-migrate")]
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["migrate"]
    # the ServiceMonitor scrapes the Service's named port, and its job label
    # (the Service's name) is the one the alert rules select
    service = objects[("Service", "dlqd")]
    monitor = objects[("ServiceMonitor", "dlqd")]
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert 'job="dlqd"' in RULES.read_text()
    assert service["metadata"]["name"] == "dlqd"
    assert objects[("PrometheusRule", "dlqd")]["spec"] == yaml.safe_load(RULES.read_text())


def test_the_shipped_configs_load() -> None:
    for path in ("deploy/base/dlqd.toml", "deploy/overlays/example/dlqd.toml"):
        settings = load_settings_text((ROOT / path).read_text())
        assert settings.policies, path


def load_settings_text(text: str) -> Settings:
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as handle:
        handle.write(text)
        handle.flush()
        return load_settings(handle.name, database_url="postgresql://x@localhost/x")
