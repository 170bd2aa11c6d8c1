"""The documentation says what the code does: the configuration reference is
generated from the settings model, and the documented commands run."""

from __future__ import annotations

import re
import runpy
from pathlib import Path
from typing import Any

import psycopg
from pydantic import BaseModel

from dlqd import config
from tests.conftest import ROOT, as_role

RENDER = runpy.run_path(str(ROOT / "scripts/render_configuration.py"))


def _keys(model: type[BaseModel], prefix: str) -> list[str]:
    return [prefix + name for name in model.model_fields]


def test_the_configuration_reference_is_the_settings_model() -> None:
    """Issue 18 finding 2: settings (circuit_breaker, rate_limit_per, ...) were
    documented nowhere a clone has. Every key, its variable, type and default,
    from the model (scripts/render_configuration.py)."""
    text = (ROOT / "docs/configuration.md").read_text()
    assert RENDER["updated"](text) == text, "run scripts/render_configuration.py"
    keys = (
        _keys(config.Settings, "")
        + _keys(config.ListenSettings, "listen.")
        + _keys(config.ReplaySettings, "replay.")
        + _keys(config.PurgeSettings, "purge.")
        + _keys(config.MetricsSettings, "metrics.")
        + _keys(config.Policy, "")
        + _keys(config.Match, "match.")
        + _keys(config.CircuitBreaker, "circuit_breaker.")
        + _keys(config.HttpTarget, "target.")
    )
    for key in keys:
        assert f"| `{key}` |" in text or key in ("listen", "replay", "purge", "metrics"), key
    for model in (config.Settings, config.ReplaySettings, config.Policy, config.HttpTarget):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no docstring"


def test_the_readme_points_inside_the_repository() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "shared folder" not in readme
    assert "DESIGN.md" not in readme
    for linked in re.findall(r"`(docs/[\w/.-]+\.md)`", readme):
        assert (ROOT / linked).exists(), linked
    assert "docs/configuration.md" in readme
    assert "docs/producers.md" in readme


def _blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), re.DOTALL)


def test_the_producers_page_inserts_as_it_says(db_url: str) -> None:
    """Issue 18 finding 2: nothing told a job system which columns to fill or that
    a dlqd_app session must set app.current_app_id. The page's SQL and Python
    examples run as written, as dlqd_app."""
    producers = ROOT / "docs/producers.md"
    sql_blocks = _blocks(producers, "sql")
    with psycopg.connect(as_role(db_url, "dlqd_app"), autocommit=True) as conn:
        for block in sql_blocks:
            conn.execute(block.encode())
    python = next(b for b in _blocks(producers, "python") if "INSERT INTO job_dlq" in b)
    namespace: dict[str, Any] = {"DLQ_URL": as_role(db_url, "dlqd_app")}
    exec(compile(python, str(producers), "exec"), namespace)  # noqa: S102 - our own page
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT app_id, type, error_reason, attempts, jsonb_array_length(error_history)"
            " FROM job_dlq ORDER BY dlq_at"
        ).fetchall()
        inbox = conn.execute("SELECT count(*) FROM dlqd_inbox").fetchone()
    assert rows == [("shop", "email.send", "timeout", 5, 1)] * 2
    assert inbox == (2,)  # the daemon would hear of both
    # without the tenant setting, the page's error message is the one users get
    with psycopg.connect(as_role(db_url, "dlqd_app"), autocommit=True) as conn:
        try:
            conn.execute(
                """INSERT INTO job_dlq (original_job_id, app_id, type, payload, error_reason,
                                        attempts) VALUES ('j', 'shop', 't', '{}', 'r', 1)"""
            )
        except psycopg.errors.InsufficientPrivilege as exc:
            message = str(exc).splitlines()[0]
    assert message in " ".join(producers.read_text().split())
