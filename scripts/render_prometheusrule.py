"""Writes deploy/base/prometheusrule.yaml from deploy/prometheus/dlqd-rules.yml.

The plain rules file is the one source of the alerts (promtool tests it); the
PrometheusRule for the Prometheus operator carries the same groups.
tests/test_deploy.py fails when the two differ.
Run: .venv/bin/python scripts/render_prometheusrule.py
"""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy/prometheus/dlqd-rules.yml"
TARGET = ROOT / "deploy/base/prometheusrule.yaml"
HEADER = (
    "# Generated from deploy/prometheus/dlqd-rules.yml by scripts/render_prometheusrule.py:\n"
    "# edit the rules there and run the script (tests/test_deploy.py checks they agree).\n"
)


def render() -> str:
    rules = yaml.safe_load(RULES.read_text())
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "dlqd",
            "labels": {"app.kubernetes.io/name": "dlqd", "app.kubernetes.io/component": "alerts"},
        },
        "spec": rules,
    }
    return HEADER + yaml.safe_dump(doc, sort_keys=False, width=120)


if __name__ == "__main__":
    TARGET.write_text(render())
    print(f"wrote {TARGET.relative_to(ROOT)}")
