"""Settings: precedence defaults < TOML < environment, durations, one-line errors."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from dlqd.config import (
    HttpTarget,
    RateLimit,
    SqlTarget,
    load_settings,
    parse_duration,
)
from dlqd.errors import ConfigError

SECRET = "hunter2-secret"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("DLQD_"):
            monkeypatch.delenv(key)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dlqd.toml"
    path.write_text(text)
    return path


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLQD_DATABASE_URL", "postgresql://u@db/dlq")
    s = load_settings()
    assert s.dsn == "postgresql://u@db/dlq"
    assert s.listen_dsn == s.dsn
    assert (s.metrics_host, s.metrics_port) == ("0.0.0.0", 9464)  # noqa: S104
    assert s.log_level == "info"
    assert s.shutdown_timeout == timedelta(seconds=30)
    assert s.dry_run is False
    assert (s.listen.enabled, s.listen.poll_interval, s.listen.probe_interval) == (
        True,
        timedelta(seconds=30),
        timedelta(seconds=10),
    )
    assert (s.replay.batch_size, s.replay.concurrency, s.replay.default_target) == (500, 1, None)
    assert s.purge.schedule == "1h"
    assert s.purge.replayed_retention == timedelta(days=7)
    assert s.purge.pending_retention is None
    assert (s.purge.batch_size, s.purge.lock_timeout) == (10000, timedelta(seconds=2))
    assert (s.metrics.refresh_interval, s.metrics.max_series, s.metrics.tenant_label) == (
        timedelta(seconds=5),
        500,
        True,
    )
    assert s.policies == []


def test_toml_then_environment_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(
        tmp_path,
        """
database_url = "postgresql://from-file/db"
metrics_port = 9000
shutdown_timeout = "5s"
[listen]
poll_interval = "500ms"
probe_interval = "2m"
[replay]
batch_size = 100
default_target = { kind = "notify", channel = "jobs" }
[purge]
schedule = "0 3 * * *"
pending_retention = "30d"
""",
    )
    monkeypatch.setenv("DLQD_LISTEN__POLL_INTERVAL", "7s")
    monkeypatch.setenv("DLQD_METRICS_PORT", "9100")
    s = load_settings(path)
    assert s.dsn == "postgresql://from-file/db"
    assert s.metrics_port == 9100  # environment beats file
    assert s.listen.poll_interval == timedelta(seconds=7)  # nested env beats file
    assert s.listen.probe_interval == timedelta(minutes=2)  # file beats default
    assert s.shutdown_timeout == timedelta(seconds=5)
    assert s.replay.batch_size == 100
    assert s.purge.schedule == "0 3 * * *"
    assert s.purge.pending_retention == timedelta(days=30)


def test_config_file_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, 'database_url = "postgresql://x/y"\nlog_level = "DEBUG"\n')
    monkeypatch.setenv("DLQD_CONFIG", str(path))
    s = load_settings()
    assert s.dsn == "postgresql://x/y"
    assert s.log_level == "debug"


def test_policies_from_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLQD_DATABASE_URL", "postgresql://x/y")
    path = write(
        tmp_path,
        """
[[policies]]
name = "transient"
match = { type = ["email.*", "webhook.deliver"], error_reason = ["timeout"], max_attempts = 10 }
delay = "30s"
max_delay = "1h"
jitter = 0.1
max_replays = 5
rate_limit = "50/s"
target = { kind = "sql", statement = "SELECT jobs.enqueue(%(type)s, %(payload)s)" }

[[policies]]
name = "hooks"
match = { app_id = "billing" }
rate_limit = "120/m"
rate_limit_per = "app_id"
target = { kind = "http", url = "https://jobs.internal/replay", headers = { X = "env:T" } }

[[policies]]
name = "quarantine"
match = { error_reason = ["poison"] }
action = "park"
""",
    )
    s = load_settings(path)
    first, second, third = s.policies
    assert first.match.type == ["email.*", "webhook.deliver"]
    assert first.match.max_attempts == 10
    assert first.delay == timedelta(seconds=30)
    assert first.rate_limit == RateLimit(per_second=50)
    assert isinstance(first.target, SqlTarget)
    assert second.match.app_id == ["billing"]  # a single string is a one-element list
    assert second.rate_limit is not None
    assert second.rate_limit.per_second == 2
    assert second.rate_limit.burst == 2
    assert isinstance(second.target, HttpTarget)
    assert second.target.timeout == timedelta(seconds=10)
    assert third.action == "park"
    assert third.target is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30),
        ("5m", 300),
        ("1h", 3600),
        ("7d", 604800),
        (2, 2),
        ("1.5s", 1.5),
        ("1h30m", 5400),
        ("1d 2h", 93600),
        ("PT30S", 30),
        ("PT1H30M", 5400),
        ("P1D", 86400),
        ("P1DT12H", 129600),
    ],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ("", {}, "database_url: is required"),
        ('database_url = "postgresql://x/y"\nmetrics_port = "abc"', {}, "metrics_port:"),
        (
            'database_url = "postgresql://x/y"\n[listen]\npoll_interval = "soon"',
            {},
            "listen.poll_interval: expected a duration",
        ),
        (
            'database_url = "postgresql://x/y"',
            {"DLQD_REPLAY__BATCH_SIZE": "0"},
            "replay.batch_size:",
        ),
        ('database_url = "postgresql://x/y"\nbogus = 1', {}, "bogus: is not a known setting"),
        (
            'database_url = "postgresql://x/y"\n[[policies]]\nname = "p"\n',
            {},
            "policies[0].target: policy 'p' replays but has no target",
        ),
        (
            'database_url = "postgresql://x/y"\n[[policies]]\nname = "p"\naction = "park"\n'
            '[[policies]]\nname = "p"\naction = "park"\n',
            {},
            "policies[1].name: duplicate policy name 'p'",
        ),
        (
            'database_url = "postgresql://x/y"\n[[policies]]\nname = "p"\naction = "park"\n'
            'rate_limit = "fast"\n',
            {},
            "policies[0].rate_limit: expected a rate like 50/s",
        ),
        (
            'database_url = "postgresql://x/y"\n[purge]\nschedule = "sometimes"\n',
            {},
            "purge.schedule: expected an interval like 1h or a 5-field cron",
        ),
        ("database_url = [", {}, "invalid TOML"),
    ],
)
def test_invalid_config_names_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toml: str, env: dict[str, str], message: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, toml))
    text = str(caught.value)
    assert message in text
    assert "\n" not in text


def test_errors_never_echo_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLQD_DATABASE_URL", f"mysql://u:{SECRET}@db/x")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "database_url" in str(caught.value)
    assert SECRET not in str(caught.value)
    monkeypatch.setenv("DLQD_DATABASE_URL", f"postgresql://u:{SECRET}@db/x")
    s = load_settings()
    assert SECRET not in repr(s)
    assert SECRET not in str(s.model_dump())


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml")


def test_policies_fingerprint_tracks_policy_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DLQD_DATABASE_URL", "postgresql://x/y")
    park = {"name": "p", "action": "park"}
    a = load_settings(policies=[park])
    b = load_settings(policies=[park], metrics_port=1)
    c = load_settings(policies=[{**park, "match": {"type": ["x"]}}])
    assert a.policies_fingerprint == b.policies_fingerprint
    assert a.policies_fingerprint != c.policies_fingerprint
