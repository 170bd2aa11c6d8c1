"""Configuration: defaults < TOML file < environment (``DLQD_`` prefix, ``__`` nesting).

Every key and default here is part of the contract in DESIGN section 5.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import json
import math
import os
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from dlqd.db.connector import dsn_problem
from dlqd.errors import ConfigError

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
_DURATION_RE = re.compile(r"^(?:\d+(?:\.\d+)?\s*(?:ms|s|m|h|d)\s*)+$")
_ISO_RE = re.compile(
    r"^P(?:(?P<d>\d+(?:\.\d+)?)D)?"
    r"(?:T(?:(?P<h>\d+(?:\.\d+)?)H)?(?:(?P<m>\d+(?:\.\d+)?)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?)?$"
)
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# no setting needs more; it keeps every due time representable
MAX_DURATION_SECONDS = 100 * 365 * 86400
_DURATION_HELP = "expected a duration like 500ms, 30s, 5m, 1h30m, 7d or PT30S"


def _bounded(seconds: float) -> timedelta:
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("a duration must be a finite, non-negative amount")
    if seconds > MAX_DURATION_SECONDS:
        raise ValueError("a duration must not exceed 100 years")
    return timedelta(seconds=seconds)


def parse_duration(value: object) -> timedelta:
    """Parse ``500ms``, ``30s``, ``5m``, ``1h30m``, ``7d``, ISO 8601 ``PT30S``, or seconds."""
    if isinstance(value, timedelta):
        return _bounded(value.total_seconds())
    if isinstance(value, bool):
        raise ValueError(_DURATION_HELP)
    if isinstance(value, int | float):
        return _bounded(float(value))
    if isinstance(value, str):
        text = value.strip()
        if text and _DURATION_RE.match(text):
            seconds = sum(
                float(amount) * _UNIT_SECONDS[unit] for amount, unit in _DURATION_PART.findall(text)
            )
            return _bounded(seconds)
        iso = _ISO_RE.match(text.upper())
        if iso and text.upper() not in ("P", "PT") and any(iso.groupdict().values()):
            parts = {k: float(v) for k, v in iso.groupdict().items() if v}
            return _bounded(
                parts.get("d", 0) * 86400
                + parts.get("h", 0) * 3600
                + parts.get("m", 0) * 60
                + parts.get("s", 0)
            )
    raise ValueError(_DURATION_HELP)


def format_duration(value: timedelta) -> str:
    seconds = value.total_seconds()
    if seconds == 0:
        return "0s"
    for unit in ("d", "h", "m", "s"):
        size = _UNIT_SECONDS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{round(seconds * 1000)}ms"


Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
]

_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|kB|KB|KiB|MB|MiB|GB|GiB)?\s*$")
_SIZE_UNITS = {
    None: 1, "B": 1, "kB": 1000, "KB": 1000, "KiB": 1024, "MB": 1000**2, "MiB": 1024**2,
    "GB": 1000**3, "GiB": 1024**3,
}  # fmt: skip


def parse_size(value: object) -> int:
    """A size in bytes: ``16MiB``, ``512kB``, ``1GB``, or a whole number of bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 16MiB, 512kB or 1GB")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and (match := _SIZE_RE.match(value)):
        return int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    raise ValueError("expected a size like 16MiB, 512kB or 1GB")


def format_size(value: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        if value >= _SIZE_UNITS[unit] and value % _SIZE_UNITS[unit] == 0:
            return f"{value // _SIZE_UNITS[unit]}{unit}"
    return f"{value}B"


ByteSize = Annotated[
    int,
    BeforeValidator(parse_size),
    PlainSerializer(format_size, return_type=str),
]

_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m)\s*$")


class RateLimit(BaseModel):
    """A token-bucket rate: ``per_second`` tokens a second."""

    model_config = ConfigDict(frozen=True)

    per_second: float

    @property
    def burst(self) -> float:
        """The bucket holds one second of tokens, at least one."""
        return max(1.0, self.per_second)


def parse_rate(value: object) -> object:
    if isinstance(value, str):
        match = _RATE_RE.match(value)
        if not match:
            raise ValueError("expected a rate like 50/s or 600/m")
        amount = float(match.group(1))
        if amount <= 0:
            raise ValueError("a rate must be positive")
        per_second = amount if match.group(2) == "s" else amount / 60.0
        return RateLimit(per_second=per_second)
    return value


def _as_list(value: object) -> object:
    return [value] if isinstance(value, str) else value


GlobList = Annotated[list[str], BeforeValidator(_as_list)]


class _Frozen(BaseModel):
    # each field's docstring is its description: docs/configuration.md is made of them
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class Match(_Frozen):
    """Which rows a policy applies to: AND across fields, OR within a list."""

    app_id: GlobList | None = None
    """Tenants this policy applies to: exact values or shell globs (any of them)."""
    type: GlobList | None = None
    """Job types, e.g. `email.*`: exact values or shell globs (any of them)."""
    error_reason: GlobList | None = None
    """Error reasons, e.g. `timeout`: exact values or shell globs (any of them)."""
    min_attempts: int | None = Field(default=None, ge=0)
    """Rows dead-lettered after at least this many attempts."""
    max_attempts: int | None = Field(default=None, ge=0)
    """Rows dead-lettered after at most this many attempts."""

    @model_validator(mode="after")
    def _attempts_range(self) -> Match:
        if (
            self.min_attempts is not None
            and self.max_attempts is not None
            and self.min_attempts > self.max_attempts
        ):
            raise ValueError("min_attempts is greater than max_attempts")
        return self


# a literal % is written %%; a placeholder is %(column)s
_PLACEHOLDER_RE = re.compile(r"%%|%\((\w+)\)s")


class SqlTarget(_Frozen):
    kind: Literal["sql"]
    """`sql`: a statement run in the transaction that marks the row replayed (exactly once)."""
    statement: str = Field(min_length=1)
    """One SELECT, INSERT, UPDATE, DELETE or MERGE: per row with `%(column)s` placeholders of
    job_dlq columns, or once per batch over the relation `replayed` (no placeholder). A literal
    `%` is `%%`. It runs under `replay.statement_timeout` and `replay.lock_timeout`, with
    `jit = off` (as every replay transaction: a page of thousands of rows passes the default
    `jit_above_cost`, and compiling cost it more than it saved).
    """

    @field_validator("statement")
    @classmethod
    def _known_placeholders(cls, value: str) -> str:
        from dlqd.models import DlqEntry

        named = {m.group(1) for m in _PLACEHOLDER_RE.finditer(value) if m.group(1)}
        unknown = sorted(named - set(DlqEntry.model_fields))
        if unknown:
            raise ValueError(
                f"unknown placeholder(s) {', '.join(unknown)}: use job_dlq columns "
                "as %(column)s, and write a literal % as %%"
            )
        return value


class NotifyTarget(_Frozen):
    kind: Literal["notify"]
    """`notify`: `pg_notify` in the transaction that marks the row replayed."""
    channel: str = Field(min_length=1, max_length=63)
    """The channel (any role that can connect may LISTEN on it)."""
    # what a message carries: the row's id, original job id, tenant and type
    # (row), or its id alone (id): any role that can connect may LISTEN
    message: Literal["row", "id"] = "row"
    """`row`: `{"id", "original_job_id", "app_id", "type"}`; `id`: `{"id"}` alone (consumers read
    the row under their own rights).
    """


def _positive(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise ValueError("must be longer than 0s")
    return value


class HttpTarget(_Frozen):
    kind: Literal["http"]
    """`http`: POST the row as JSON with `Idempotency-Key: <id>` (at least once)."""
    url: str = Field(pattern=r"^https?://")
    """`http://` or `https://`; shown redacted (credentials and query values)."""
    # the whole request, however slowly the server answers
    timeout: Annotated[Duration, AfterValidator(_positive)] = timedelta(seconds=10)
    """The whole request, however slowly the server answers."""
    headers: dict[str, str] = Field(default_factory=dict)
    """Extra headers; a value `env:NAME` is read from the daemon's environment."""
    max_in_flight: int = Field(default=10, ge=1, le=1000)
    """Requests to this target at once."""
    tls_verify: bool = True
    """Verify the server's TLS certificate."""

    @model_validator(mode="after")
    def _one_authorization(self) -> HttpTarget:
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(self.url)
            credentials = parts.username is not None or parts.password is not None
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise ValueError("url: is not a valid URL") from None
        if credentials and any(name.lower() == "authorization" for name in self.headers):
            # httpx would send the URL's credentials instead of the header
            raise ValueError(
                "url: has credentials and an Authorization header is configured too: "
                "keep one (the header, with env:NAME, keeps the secret out of the config)"
            )
        return self


class JobSystemTarget(_Frozen):
    kind: Literal["procrastinate", "pgqueuer", "pgboss", "river", "graphile_worker", "oban"]
    """A job system's preset (docs/adapters/): re-enqueue the row as a new job of that system,
    in the transaction that marks it replayed (exactly once); set-based, so express pages take it.
    """
    db_schema: str | None = Field(default=None, alias="schema", min_length=1, max_length=63)
    """The schema of the job system's tables; default: the system's own (`pgboss`,
    `graphile_worker`, else `public`)."""
    queue: str | None = Field(default=None, min_length=1)
    """The queue the job goes to (all but PgQueuer); default: the queue it came from."""
    priority: int | None = None
    """The job's priority; default: the priority it had."""
    max_attempts: int | None = Field(default=None, ge=1, le=32767)
    """The job's attempts before it fails again (pg-boss, River, Graphile Worker, Oban: kept in
    the job)."""
    run_at_delay: Duration | None = None
    """Run the job this long after its replay; default: at once."""

    model_config = ConfigDict(populate_by_name=True)  # merged with _Frozen's

    @model_validator(mode="after")
    def _overrides_it_takes(self) -> JobSystemTarget:
        from dlqd.adapters import ADAPTERS, OVERRIDES

        adapter = ADAPTERS[self.kind]
        for name in OVERRIDES:
            if getattr(self, name) is not None and name not in adapter.overrides:
                takes = ", ".join(adapter.overrides) or "none"
                raise ValueError(
                    f"{name}: {adapter.title} jobs take no {name} (overrides: {takes})"
                )
        if self.run_at_delay is not None and self.run_at_delay < timedelta(0):
            raise ValueError("run_at_delay: must not be negative")
        return self

    @functools.cached_property
    def as_sql(self) -> SqlTarget:
        """The preset as the set-based ``sql`` target every path runs."""
        from dlqd.adapters import ADAPTERS
        from dlqd.db.compose import adapter_replay

        adapter = ADAPTERS[self.kind]
        statement = adapter_replay(
            adapter,
            schema=self.db_schema or adapter.default_schema,
            queue=self.queue,
            priority=self.priority,
            max_attempts=self.max_attempts,
            run_at_delay=self.run_at_delay,
        )
        return SqlTarget(kind="sql", statement=statement)


Target = Annotated[
    SqlTarget | NotifyTarget | HttpTarget | JobSystemTarget, Field(discriminator="kind")
]
#: a target as the replay paths run it (a preset is its sql form)
RunTarget = SqlTarget | NotifyTarget | HttpTarget


def run_target(target: SqlTarget | NotifyTarget | HttpTarget | JobSystemTarget) -> RunTarget:
    return target.as_sql if isinstance(target, JobSystemTarget) else target


class CircuitBreaker(_Frozen):
    failures: int = Field(default=20, ge=1)
    """Consecutive failures that say the target is down (then the policy pauses)."""
    cool_down: Duration = timedelta(seconds=30)
    """How long the policy pauses before one trial row."""


class Policy(_Frozen):
    """One ordered policy; the first whose ``match`` fits a row decides."""

    name: str = Field(min_length=1)
    """Unique; named in logs, metrics, the replay log and `--via`."""
    match: Match = Field(default_factory=Match)
    """Which rows: AND across fields, OR within a list; empty matches every row."""
    action: Literal["replay", "park"] = "replay"
    """`replay` or `park` (left for a human)."""
    delay: Duration = timedelta(0)
    """Wait after `dlq_at` before the first replay."""
    backoff: Literal["fixed", "exponential"] = "exponential"
    """`exponential`: the n-th replay of a job waits `min(max_delay, delay * factor^n)`; `fixed`:
    `delay`.
    """
    factor: float = Field(default=2.0, ge=1.0)
    """The exponential backoff's factor (and of `retry_delay`)."""
    max_delay: Duration = timedelta(hours=1)
    """The longest wait, of a replay or a retry."""
    jitter: float = Field(default=0.0, ge=0.0, lt=1.0)
    """± fraction of the wait, from the row id (every replica, and Postgres itself, computes the
    same time, to the microsecond; in millionths)."""
    retry_delay: Duration = timedelta(seconds=1)
    """After failed attempt k of a row: `min(max_delay, retry_delay * factor^(k-1))`."""
    max_replays: int | None = Field(default=None, ge=0)
    """Successful replays of one job (app_id, original_job_id) within `purge.log_retention`; its
    next return is parked (`max_replays`).
    """
    max_failures: int = Field(default=10, ge=1)
    """Failed attempts of one row, after which it is parked (`max_failures`)."""
    rate_limit: Annotated[RateLimit | None, BeforeValidator(parse_rate)] = None
    """`N/s` or `N/m`, for the whole deployment (a token bucket in Postgres holding one second of
    tokens).
    """
    rate_limit_per: Literal["policy", "app_id"] = "policy"
    """`policy`: one bucket; `app_id`: one per tenant."""
    circuit_breaker: CircuitBreaker = Field(default_factory=CircuitBreaker)
    """`{ failures = N, cool_down = "30s" }`: pause a target that keeps failing."""
    dry_run: bool = False
    """Decide, log and count; change nothing."""
    target: Target | None = None
    """Where rows replay (`sql`, `notify` or `http`); default `replay.default_target`."""


def _at_least(text: str) -> AfterValidator:
    minimum = parse_duration(text)

    def check(value: timedelta | None) -> timedelta | None:
        if value is not None and value < minimum:
            raise ValueError(f"must be at least {text}")
        return value

    return AfterValidator(check)


def _at_most(text: str) -> AfterValidator:
    maximum = parse_duration(text)

    def check(value: timedelta) -> timedelta:
        if value > maximum:
            raise ValueError(f"must be at most {text}")
        return value

    return AfterValidator(check)


# Durations with a floor: below it a setting would spin the CPU or make no sense.
Interval = Annotated[Duration, _at_least("100ms")]
Timeout = Annotated[Duration, _at_least("10ms")]
Retention = Annotated[Duration, _at_least("1h")]


class ListenSettings(_Frozen):
    enabled: bool = True
    """LISTEN for inserts; false: poll only (behind a transaction pooler without a direct
    connection).
    """
    poll_interval: Interval = timedelta(seconds=30)
    """The periodic scan and sweep: what a lost notification waits at most."""
    probe_interval: Interval = timedelta(seconds=10)
    """The listener's self-probe; the leader's lease renews every half of it and lasts 1.5."""


class ReplaySettings(_Frozen):
    batch_size: int = Field(default=500, ge=1, le=10000)
    """Rows a page claims at once."""
    # a target statement runs over at most this many bytes of rows (as stored:
    # payload and error_history), a page replays at most this much (at least
    # one row): huge rows go alone, and never hold up everyone else's
    batch_bytes: Annotated[ByteSize, Field(ge=64 * 1024, le=1024**3)] = 16 * 1024**2
    """Stored bytes (payload, error history) a target statement runs over, and a page replays, at
    most; a bigger row goes alone.
    """
    concurrency: int = Field(default=1, ge=1, le=64)
    """Claiming workers in this replica."""
    default_target: Target | None = None
    """The target of policies without one, and of `dlqd replay` of rows no policy with a target
    matches.
    """
    # bound every replay transaction: a target blocked on a lock fails the
    # batch (a failed attempt) instead of hanging the replayer
    statement_timeout: Timeout = timedelta(seconds=10)
    """Bound on every statement of a replay transaction (a target included)."""
    lock_timeout: Timeout = timedelta(seconds=2)
    """Bound on every lock wait of a replay transaction."""
    # a pass woken by a notification starts at least this long after the
    # previous one: wake-ups within it share a pass
    wake_cooldown: Annotated[Duration, _at_most("1s")] = timedelta(0)
    """Wake-ups within it share one pass: less CPU for a steady stream, that much latency."""
    # express pages (new rows decided and replayed inside Postgres, one
    # statement per page) for the policies that allow them; false: every row
    # takes the ordinary path (the same outcomes, row by row)
    express: bool = True
    """Express pages (new rows decided and replayed inside Postgres); false: every row takes the
    ordinary path.
    """


def _validate_schedule(value: object) -> object:
    """An interval (at least 1s) or a 5-field cron expression checked by cronsim."""
    if not isinstance(value, str):
        raise ValueError("expected an interval like 1h or a 5-field cron expression")
    text = value.strip()
    try:
        interval = parse_duration(text)
    except ValueError:
        pass
    else:
        if interval < timedelta(seconds=1):
            raise ValueError("a purge interval must be at least 1s")
        return text
    if len(text.split()) != 5:
        raise ValueError("expected an interval like 1h or a 5-field cron expression")
    from cronsim import CronSim, CronSimError

    try:
        CronSim(text, datetime.now(UTC))
    except CronSimError as exc:
        raise ValueError(f"invalid cron expression: {exc}") from None
    return text


class PurgeSettings(_Frozen):
    schedule: Annotated[str, BeforeValidator(_validate_schedule)] = "1h"
    """An interval (`1h`) or a 5-field cron expression (UTC), on the leader."""
    replayed_retention: Duration = timedelta(days=7)
    """Replayed rows older than this are deleted."""
    pending_retention: Retention | None = None
    """Pending rows older than this are deleted (at least `1h`); unset: never."""
    batch_size: int = Field(default=10000, ge=1, le=1_000_000)
    """Rows a purge batch deletes at most (it adapts below that)."""
    lock_timeout: Timeout = timedelta(seconds=2)
    """A purge batch waits at most this for a lock (then shrinks)."""
    # replay log rows older than this are trimmed; max_replays counts within it
    log_retention: Retention = timedelta(days=30)
    """Replay log rows older than this are trimmed; `max_replays` counts within it."""


class MetricsSettings(_Frozen):
    refresh_interval: Annotated[Duration, _at_least("1s")] = timedelta(seconds=5)
    """How often the collector refreshes the gauges (a scrape runs no query), and the leader folds
    the counts.
    """
    reconcile_interval: Annotated[Duration, _at_least("1s")] = timedelta(minutes=1)
    """How often the leader reconciles the counts with the table (at least 100 times as long as
    the last reconciliation took): what no trigger saw is corrected, and rows restored without
    the insert trigger are found.
    """
    max_series: int = Field(default=500, ge=1, le=100_000)
    """Label sets per family; the smallest groups fold into `__other__`."""
    tenant_label: bool = True
    """The `app_id` label; false where tenants are many."""


#: keys the console masks in payloads by default ("keys named like": a key
#: matches when its letters and digits, lowercased, contain one of these)
DEFAULT_REDACT_KEYS = ("password", "secret", "token", "authorization", "api_key")
_TOKEN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class ConsoleToken(_Frozen):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    """Who acts (the replay log's actor): letters, digits and `._@-`, at most 64."""
    sha256: str
    """The token's SHA-256, lowercase hex (`dlqd console token` prints it); never the token."""
    role: Literal["viewer", "operator"]
    """`viewer`: reads only; `operator`: may replay, park, unpark, start and cancel redrives."""
    app_id: Annotated[str, Field(min_length=1, max_length=2048)] | None = None
    """Binds the token to one tenant: Postgres row-level security shows it that tenant's rows
    only.
    """

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _TOKEN_NAME_RE.match(value):
            raise ValueError("letters, digits and ._@- only, starting with a letter or digit")
        return value

    @field_validator("sha256")
    @classmethod
    def _digest(cls, value: str) -> str:
        if not _SHA256_RE.match(value):
            raise ValueError(
                "expected the token's SHA-256 as 64 lowercase hex digits "
                "(`dlqd console token NAME --role viewer` prints one)"
            )
        return value


def _redact_key(value: str) -> str:
    normalized = re.sub(r"[^a-z0-9]", "", value.lower())
    if not normalized:
        raise ValueError("a key to redact needs a letter or a digit")
    return value


class ConsoleSettings(_Frozen):
    enabled: bool = False
    """Serve the web console (`dlqd run`), on its own address."""
    host: str = "127.0.0.1"
    """Address of the console; put a TLS proxy in front of it to reach it from elsewhere."""
    port: int = Field(default=9465, ge=0, le=65535)
    """Port of the console (0: any free one); never the metrics port."""
    session_ttl: Annotated[Duration, _at_least("1m")] = timedelta(hours=8)
    """How long a browser stays signed in."""
    redact_keys: tuple[Annotated[str, AfterValidator(_redact_key)], ...] = DEFAULT_REDACT_KEYS
    """Keys masked in payloads and error histories, at any depth, by Postgres (matched on their
    letters and digits, any case: `api_key` masks `apiKey` and `X-Api-Key`).
    """
    tokens: tuple[ConsoleToken, ...] = ()
    """Who may sign in: `name`, `sha256`, `role`, optional `app_id`."""

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        return _valid_host(value)

    @model_validator(mode="after")
    def _usable(self) -> ConsoleSettings:
        names = [t.name for t in self.tokens]
        for index, name in enumerate(names):
            if name in names[:index]:
                raise ValueError(f"console.tokens[{index}].name: duplicate token name {name!r}")
        digests = [t.sha256 for t in self.tokens]
        for index, digest in enumerate(digests):
            if digest in digests[:index]:
                raise ValueError(f"console.tokens[{index}].sha256: two tokens share one token")
        if self.enabled and not self.tokens:
            raise ValueError(
                "console.tokens: the console refuses to start enabled without a token "
                "(make one with `dlqd console token NAME --role viewer`)"
            )
        return self

    def redact_patterns(self) -> list[str]:
        """The keys as Postgres matches them (letters and digits, lowercased)."""
        return [re.sub(r"[^a-z0-9]", "", k.lower()) for k in self.redact_keys]


_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)


def _valid_host(value: str) -> str:
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if not _HOSTNAME_RE.match(value):
        raise ValueError("expected an IP address or a host name") from None
    return value


def _default_log_format() -> Literal["json", "console"]:
    return "console" if sys.stderr.isatty() else "json"


class Settings(BaseSettings):
    """dlqd's whole configuration. Read with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        use_attribute_docstrings=True,
        env_prefix="DLQD_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    database_url: SecretStr
    """The database (required). A `postgresql://` URL or a libpq string; never logged."""
    listen_database_url: SecretStr | None = None
    """A direct connection for LISTEN (when `database_url` goes through a transaction pooler);
    default `database_url`.
    """
    metrics_host: str = "0.0.0.0"  # noqa: S104 - the metrics endpoint is meant to be scraped
    """Address of `/metrics`, `/healthz`, `/readyz`."""
    metrics_port: int = Field(default=9464, ge=0, le=65535)
    """Port of `/metrics`, `/healthz`, `/readyz` (0: any free one)."""
    log_format: Literal["json", "console"] = Field(default_factory=_default_log_format)
    """`json` or `console`; default json when stderr is not a terminal."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """`debug`, `info`, `warning` or `error`. Commands other than `run` log errors only unless it
    is set.
    """
    shutdown_timeout: Duration = timedelta(seconds=30)
    """SIGTERM: the batch in flight may take this long to finish."""
    dry_run: bool = False
    """Every policy decides, logs and counts, and changes nothing."""
    listen: ListenSettings = Field(default_factory=ListenSettings)
    """The LISTEN connection and the periodic scan."""
    replay: ReplaySettings = Field(default_factory=ReplaySettings)
    """Claiming and replaying."""
    purge: PurgeSettings = Field(default_factory=PurgeSettings)
    """The scheduled purge (on the leader)."""
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    """The collector behind `/metrics`."""
    console: ConsoleSettings = Field(default_factory=ConsoleSettings)
    """The web console (off by default)."""
    policies: list[Policy] = Field(default_factory=list)
    """Ordered policies: the first that matches a row decides."""

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("database_url", "listen_database_url")
    @classmethod
    def _postgres_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        text = value.get_secret_value()
        if not text.strip():
            raise ValueError("must not be empty")
        if "://" in text and not text.startswith(("postgres://", "postgresql://")):
            raise ValueError("expected a postgresql:// URL or a libpq connection string")
        problem = dsn_problem(text)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("metrics_host")
    @classmethod
    def _host(cls, value: str) -> str:
        return _valid_host(value)

    @model_validator(mode="after")
    def _console_apart(self) -> Settings:
        if (
            self.console.enabled
            and self.console.port != 0
            and self.console.port == self.metrics_port
        ):
            raise ValueError(
                "console.port: must differ from metrics_port (the console is never served "
                "beside /metrics)"
            )
        return self

    @model_validator(mode="after")
    def _policies_consistent(self) -> Settings:
        seen: set[str] = set()
        for index, policy in enumerate(self.policies):
            if policy.name in seen:
                raise ValueError(f"policies[{index}].name: duplicate policy name {policy.name!r}")
            seen.add(policy.name)
            if (
                policy.action == "replay"
                and policy.target is None
                and self.replay.default_target is None
            ):
                raise ValueError(
                    f"policies[{index}].target: policy {policy.name!r} replays but has "
                    "no target and replay.default_target is not set"
                )
        return self

    @property
    def listen_dsn(self) -> str:
        return (self.listen_database_url or self.database_url).get_secret_value()

    @property
    def dsn(self) -> str:
        return self.database_url.get_secret_value()

    def target_for(self, policy: Policy) -> RunTarget | None:
        target = policy.target or self.replay.default_target
        return None if target is None else run_target(target)

    @functools.cached_property
    def policies_fingerprint(self) -> str:
        """A hash of everything that decides a row's schedule (computed once: frozen).

        Stored beside each computed due time so that a config change (or a
        replica running another config) re-evaluates the rows.
        """
        document = {
            "policies": [p.model_dump(mode="json") for p in self.policies],
            "default_target": (
                self.replay.default_target.model_dump(mode="json")
                if self.replay.default_target
                else None
            ),
        }
        canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = _CONFIG_FILE.get("path")
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


# load_settings() hands the chosen TOML path to settings_customise_sources here,
# because pydantic-settings builds sources from the class, not the instance.
_CONFIG_FILE: dict[str, Path | None] = {}


def _field_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in ("sql", "notify", "http") or "[" in item:
            continue  # discriminator tags and validator names are noise to an operator
        else:
            parts.append(("." if parts else "") + item)
    return "".join(parts) or "config"


def describe_validation_error(error: ValidationError) -> str:
    """One line naming the field(s) and reason(s), never echoing input values."""
    messages: list[str] = []
    for item in error.errors(include_input=False, include_url=False):
        message = str(item["msg"]).removeprefix("Value error, ")
        if item["type"] == "missing":
            message = "is required"
        elif item["type"] == "extra_forbidden":
            message = "is not a known setting"
        loc = tuple(item["loc"])
        if ": " in message and (not loc or message.startswith(_field_path(loc) + ".")):
            messages.append(message)  # model-level errors name their own field
        else:
            messages.append(f"{_field_path(loc)}: {message}")
    return "; ".join(messages)


#: DLQD_ variables that are not settings (the config file, the operator's name,
#: the binaries of throwaway clusters, the test suite's own)
OTHER_VARIABLES = frozenset({"DLQD_CONFIG", "DLQD_ACTOR", "DLQD_PG_BINDIR"})
OTHER_PREFIXES = ("DLQD_TEST_",)


def _refuse_unknown_variables() -> None:
    """A ``DLQD_`` variable that names no setting is a typo (nested keys are
    checked by the settings themselves: ``extra="forbid"``)."""
    import difflib

    known = {f"DLQD_{name.upper()}" for name in Settings.model_fields}
    for variable in os.environ:
        if not variable.startswith("DLQD_") or variable in OTHER_VARIABLES:
            continue
        if variable.startswith(OTHER_PREFIXES) or variable.split("__", 1)[0] in known:
            continue
        close = difflib.get_close_matches(variable, sorted(known | OTHER_VARIABLES), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"invalid configuration: {variable}: is not a known setting{hint}")


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Read the configuration, raising :class:`ConfigError` with a one-line reason."""
    path_text = str(config_file) if config_file is not None else os.environ.get("DLQD_CONFIG")
    path = Path(path_text) if path_text else None
    if path is not None:
        if path.is_dir():
            raise ConfigError(f"config file {path}: is a directory")
        if not path.is_file():
            raise ConfigError(f"config file {path}: not found")
        try:
            import tomllib

            with path.open("rb") as handle:
                tomllib.load(handle)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: invalid TOML: {exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path}: invalid TOML: not UTF-8 text") from None
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc.strerror}") from None
    _refuse_unknown_variables()
    _CONFIG_FILE["path"] = path
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration: {describe_validation_error(exc)}") from None
    except SettingsError as exc:
        # an environment variable holding a nested value that is not JSON
        match = re.search(r'field "(\w+)"', str(exc))
        name = match.group(1) if match else "config"
        raise ConfigError(
            f"invalid configuration: {name}: DLQD_{name.upper()} is not valid JSON"
        ) from None
    except (OverflowError, RecursionError, UnicodeError) as exc:
        raise ConfigError(f"invalid configuration: {type(exc).__name__}") from None
    finally:
        _CONFIG_FILE.pop("path", None)
