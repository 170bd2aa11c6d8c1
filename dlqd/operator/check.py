"""``dlqd check``: the configuration, the database, the schema, every target."""

from __future__ import annotations

from collections.abc import Callable

from dlqd.config import Settings
from dlqd.db import maintenance
from dlqd.db.connector import connection, describe_dsn
from dlqd.db.migrations import require_current_schema
from dlqd.errors import ConfigError, DlqdError
from dlqd.replay.checks import check_targets, sql_target_problems


async def check(settings: Settings, config_file: str | None, say: Callable[[str], object]) -> None:
    """Check everything ``dlqd run`` would, saying each step on ``say``; raise
    ConfigError (exit 78) for an invalid config, DlqdError for a target that
    could not be validated (a locked table), DatabaseUnavailable (69)."""
    check_targets(settings)
    if settings.listen_dsn != settings.dsn:
        async with connection(settings.listen_dsn, application_name="dlqd check") as conn:
            say(_reachable(settings.listen_dsn, await maintenance.ping(conn)))
    async with connection(settings.dsn, autocommit=True, application_name="dlqd check") as conn:
        say(_reachable(settings.dsn, await maintenance.ping(conn)))
        await require_current_schema(conn)
        say("schema: up to date")
        problems = await sql_target_problems(conn, settings)
    invalid = [text for text, kind in problems if kind != "timeout"]
    if invalid:
        raise ConfigError("invalid configuration: " + "; ".join(invalid))
    if problems:
        raise DlqdError("; ".join(text for text, _ in problems))
    if config_file is None:
        say(
            f"config: no config file read (--config or DLQD_CONFIG), "
            f"{len(settings.policies)} policies from the environment"
        )
    else:
        say(f"config: ok ({config_file}: {len(settings.policies)} policies)")


def _reachable(dsn: str, version: int) -> str:
    return f"database {describe_dsn(dsn)}: reachable (server_version_num {version})"
