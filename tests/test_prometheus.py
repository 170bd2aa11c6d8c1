"""End to end with a real Prometheus (Debian's `prometheus`): it scrapes two
`dlqd run` replicas and loads the alert rules; every PromQL expression of the
rules and of the Grafana dashboard runs against it without error."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import yaml

from tests.conftest import ROOT
from tests.daemon_helpers import SINK_STATEMENT, DaemonProcess, scalar, wait_until, write_config
from tests.factories import row_json
from tests.test_poison import insert_rows, start

pytestmark = pytest.mark.anyio

RULES = ROOT / "deploy/prometheus/dlqd-rules.yml"
DASHBOARD = ROOT / "deploy/grafana/dlqd-dashboard.json"
# what Grafana substitutes before sending a panel's query
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "$job": "dlqd",
}

CONFIG = f"""
[listen]
poll_interval = "500ms"
probe_interval = "1h"
[metrics]
refresh_interval = "1s"

[[policies]]
name = "sink"
match = {{ type = ["email.*"] }}
target = {{ kind = "sql", statement = "{SINK_STATEMENT}" }}

[[policies]]
name = "hold"
match = {{ type = ["hold.*"] }}
action = "park"
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Prometheus:
    def __init__(self, workdir: Path, targets: list[str]) -> None:
        binary = shutil.which("prometheus")
        assert binary, "prometheus is not installed (scripts/test installs Debian's package)"
        self.port = _free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "dlqd", "static_configs": [{"targets": targets}]}],
        }
        path = workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self.log = self.log_path.open("wb")
        self.command = [
            binary,
            f"--config.file={path}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            "--web.enable-lifecycle",
        ]
        self.process = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [*self.command, f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log,
            stderr=self.log,
        )

    def get(self, path: str, **params: str) -> Any:
        # 400 and 422 answers carry the query's error as JSON too
        response = httpx.get(f"http://127.0.0.1:{self.port}{path}", params=params, timeout=5)
        return response.json()

    def ready(self) -> bool:
        if self.process.poll() is not None:
            self.log.flush()
            if "address already in use" in self.log_path.read_text(errors="replace"):
                # the port picked was taken before Prometheus bound it: another one
                self.log.truncate(0)
                self.port = _free_port()
                self.process = self._start()
                return False
            raise AssertionError(f"prometheus exited {self.process.returncode}")
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/-/ready", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def query(self, expr: str) -> Any:
        return self.get("/api/v1/query", query=expr)

    def scalar(self, expr: str) -> float | None:
        answer = self.query(expr)
        assert answer["status"] == "success", answer
        result = answer["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[list[Prometheus]]:
    started: list[Prometheus] = []
    yield started
    for server in started:
        server.stop()


def expressions() -> list[tuple[str, str]]:
    """(where, PromQL) for every rule and every dashboard panel target."""
    found: list[tuple[str, str]] = []
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            found.append((rule.get("alert") or rule["record"], rule["expr"]))
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            found.append((f"panel {panel['title']!r} {target['refId']}", expr))
    return found


async def test_prometheus_scrapes_two_replicas_and_every_query_runs(
    sink_db: str,
    tmp_path: Path,
    daemons: list[DaemonProcess],
    prometheus_factory: list[Prometheus],
) -> None:
    cfg = write_config(tmp_path / "dlqd.toml", CONFIG)
    for index in range(2):
        workdir = tmp_path / f"replica{index}"
        workdir.mkdir()
        await start(daemons, sink_db, cfg, workdir)
    prometheus = Prometheus(tmp_path, [f"127.0.0.1:{d.port}" for d in daemons])
    prometheus_factory.append(prometheus)

    async def ready() -> bool:
        return await anyio.to_thread.run_sync(prometheus.ready)

    await wait_until(ready, within=60)

    async def both_up() -> bool:
        return prometheus.scalar('sum(up{job="dlqd"})') == 2

    await wait_until(both_up, within=60)
    assert prometheus.scalar('count(up{job="dlqd"} == 1)') == 2

    async def one_leader() -> bool:
        return prometheus.scalar("sum(dlqd_leader)") == 1

    await wait_until(one_leader, within=60)
    assert prometheus.scalar('sum(dlqd_replays_total{outcome="replayed"})') == 0

    await insert_rows(
        sink_db,
        [
            *[row_json(original_job_id=f"e{i}", type="email.send") for i in range(3)],
            *[
                row_json(original_job_id=f"h{i}", type="hold.me", error_reason="bad")
                for i in range(5)
            ],
        ],
    )

    async def replayed_seen() -> bool:
        return prometheus.scalar('sum(dlqd_replays_total{outcome="replayed"})') == 3

    await wait_until(replayed_seen, within=60)
    table_pending = int(
        await scalar(sink_db, "SELECT count(*) FROM job_dlq WHERE replayed_at IS NULL")
    )
    assert table_pending == 5

    async def pending_matches() -> bool:
        seen = prometheus.scalar("sum(max by (app_id, type, error_reason) (dlqd_pending_entries))")
        return seen == table_pending

    await wait_until(pending_matches, within=60)
    # each replica reports the whole table, so each series says 5
    for replica_value in prometheus.query('dlqd_pending_entries{type="hold.me"}')["data"]["result"]:
        assert float(replica_value["value"][1]) == 5

    failures = []
    for where, expr in expressions():
        answer = prometheus.query(expr)
        if answer.get("status") != "success":
            failures.append(f"{where}: {answer.get('error')}")
    assert not failures, "\n".join(failures)

    async def rules_evaluated() -> bool:
        groups = prometheus.get("/api/v1/rules")["data"]["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return bool(rules) and all(rule.get("lastEvaluation", "").startswith("2") for rule in rules)

    await wait_until(rules_evaluated, within=30)
    groups = prometheus.get("/api/v1/rules")["data"]["groups"]
    unhealthy = [
        f"{rule['name']}: {rule.get('lastError')}"
        for group in groups
        for rule in group["rules"]
        if rule["health"] != "ok"
    ]
    assert not unhealthy, unhealthy

    # the recording rule counts the table once, not once per replica
    async def recorded() -> bool:
        return prometheus.scalar("dlqd:pending_entries:sum") == table_pending

    await wait_until(recorded, within=30)
