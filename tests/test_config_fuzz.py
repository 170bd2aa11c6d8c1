"""Generated TOML files and DLQD_* variables: the loader answers a Settings or one
ConfigError line (exit 78), whatever it is fed; never another exception."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlqd.config import Settings, load_settings
from dlqd.errors import ConfigError

KEYS = {
    "": [
        "database_url",
        "listen_database_url",
        "metrics_host",
        "metrics_port",
        "log_format",
        "log_level",
        "shutdown_timeout",
        "dry_run",
        "bogus",
    ],
    "listen": ["enabled", "poll_interval", "probe_interval"],
    "replay": ["batch_size", "concurrency", "statement_timeout", "lock_timeout", "default_target"],
    "purge": [
        "schedule",
        "replayed_retention",
        "pending_retention",
        "batch_size",
        "lock_timeout",
        "log_retention",
    ],
    "metrics": ["refresh_interval", "max_series", "tenant_label"],
}
POLICY_KEYS = [
    "name",
    "match",
    "action",
    "delay",
    "backoff",
    "factor",
    "max_delay",
    "jitter",
    "retry_delay",
    "max_replays",
    "max_failures",
    "rate_limit",
    "rate_limit_per",
    "circuit_breaker",
    "dry_run",
    "target",
]

durations = st.sampled_from(
    ["0s", "1ms", "30s", "1h30m", "PT30S", "P1D", "99999999999d", "-1s", "1e400s", "nan", "5 m"]
)
texts = st.text(max_size=30)
scalars: st.SearchStrategy[Any] = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    texts,
    durations,
    st.sampled_from(["0 3 * * *", "99 99 99 99 99", "x y z w v", "50/s", "0/s", "nan/s"]),
    st.sampled_from(["postgresql://u@h/db", "postgresql://u@h/db?connect_timeout=abc", "x=y"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(POLICY_KEYS), inner, max_size=3),
    ),
    max_leaves=8,
)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(str(value), repr(value))
    if isinstance(value, str):
        escaped = value.encode("unicode_escape").decode("ascii").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"


@st.composite
def documents(draw: st.DrawFn) -> str:
    lines: list[str] = []
    for section, keys in KEYS.items():
        chosen = draw(st.lists(st.sampled_from(keys), unique=True, max_size=3))
        if section and chosen:
            lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(draw(values))}" for key in chosen)
    for _ in range(draw(st.integers(0, 2))):
        lines.append("[[policies]]")
        for key in draw(st.lists(st.sampled_from(POLICY_KEYS), unique=True, max_size=4)):
            lines.append(f"{key} = {toml_value(draw(values))}")
    if draw(st.booleans()):
        lines.append(draw(st.sampled_from(["[", "x = ", '"\\uD800"', "a.b.c = 1\na = 2"])))
    return "\n".join(lines) + "\n"


environments = st.dictionaries(
    st.sampled_from(
        [
            "DLQD_DATABASE_URL",
            "DLQD_POLICIES",
            "DLQD_LISTEN",
            "DLQD_LISTEN__POLL_INTERVAL",
            "DLQD_REPLAY__BATCH_SIZE",
            "DLQD_PURGE__SCHEDULE",
            "DLQD_METRICS_PORT",
            "DLQD_METRICS__REFRESH_INTERVAL",
            "DLQD_SHUTDOWN_TIMEOUT",
        ]
    ),
    st.one_of(texts, st.sampled_from(["[", "{}", "[{}]", '{"enabled": 1}', "notjson", "1h"])),
    max_size=3,
)


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    saved = {k: v for k, v in os.environ.items() if k.startswith("DLQD_")}
    for key in saved:
        del os.environ[key]
    os.environ.update({k: v.replace("\x00", "") for k, v in values.items()})
    try:
        yield
    finally:
        for key in [k for k in os.environ if k.startswith("DLQD_")]:
            del os.environ[key]
        os.environ.update(saved)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(document=documents(), env=environments, raw=st.booleans())
def test_any_config_is_a_settings_or_one_config_error_line(
    document: str, env: dict[str, str], raw: bool
) -> None:
    with tempfile.TemporaryDirectory() as folder, environment(env):
        path = Path(folder) / "dlqd.toml"
        data = document.encode("utf-8", "surrogatepass")
        path.write_bytes(data + (b"\xff" if raw else b""))
        try:
            loaded = load_settings(path)
        except ConfigError as exc:
            message = str(exc)
            assert message
            assert "\n" not in message
            assert ConfigError.exit_code == 78
        else:
            assert isinstance(loaded, Settings)
