"""Validating targets before any replay: refused kinds, and sql statements planned.

A statement is first read as tokens (``dlqd.statements``): exactly one
statement, starting with SELECT, INSERT, UPDATE, DELETE, MERGE, WITH or VALUES.
Then it is planned through the extended protocol only (a server-side prepare
of ``EXPLAIN (COSTS OFF) <statement as it runs>``): the server's parser refuses
more than one statement, and EXPLAIN with options in parentheses refuses
anything but one plannable statement and never runs it (``ANALYZE SELECT ...``
is a syntax error there). Everything happens in a transaction that is rolled
back, under short lock and statement timeouts.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Literal
from uuid import UUID

from dlqd.config import (
    HttpTarget,
    JobSystemTarget,
    Settings,
    SqlTarget,
    format_duration,
    run_target,
)
from dlqd.db import replays
from dlqd.db.compose import row_statement, set_statement
from dlqd.db.connector import Connection
from dlqd.errors import ConfigError, DatabaseError, StatementTimeout
from dlqd.replay.http import resolved_headers
from dlqd.replay.targets import (
    is_set_based,
    sql_params,
)
from dlqd.statements import target_problem


class _SampleRow:
    """A made-up row, to plan target statements with real parameter types."""

    id = UUID(int=0)
    original_job_id = "dlqd-check"
    app_id = "dlqd-check"
    type = "dlqd.check"
    error_reason = "check"
    attempts = 0


def _targets(settings: Settings) -> list[tuple[str, Any]]:
    """(where, target as it runs): a preset's statement is named after the
    preset (``policies[0].target (procrastinate preset)``), an operator's
    after its key (``policies[0].target.statement``)."""
    found: list[tuple[str, Any]] = [
        (f"policies[{i}].target", p.target) for i, p in enumerate(settings.policies)
    ]
    found.append(("replay.default_target", settings.replay.default_target))
    return [
        (f"{where} ({target.kind} preset)" if isinstance(target, JobSystemTarget) else where,
         run_target(target))
        for where, target in found
        if target is not None
    ]  # fmt: skip


def _statement(where: str) -> str:
    return where if where.endswith(" preset)") else f"{where}.statement"


def _policy_name(settings: Settings, where: str) -> str:
    if where.startswith("policies["):
        index = int(where[len("policies[") : where.index("]")])
        return f" [policy {settings.policies[index].name!r}]"
    return ""


#: validation waits at most this long for a lock on a table a statement uses,
#: and plans for at most VALIDATE_STATEMENT_TIMEOUT
VALIDATE_LOCK_TIMEOUT = timedelta(seconds=2)
VALIDATE_STATEMENT_TIMEOUT = timedelta(seconds=5)
Kind = Literal["syntax", "plan", "timeout"]


async def explain_sql(conn: Connection, target: SqlTarget) -> tuple[str, Kind] | None:
    """Plan (never run) a statement exactly as it will run: None when valid, else
    (one line, kind). ``EXPLAIN (COSTS OFF)``: options in parentheses, so a
    statement written ``ANALYZE SELECT ...`` is a syntax error, never EXPLAIN
    ANALYZE. Under short lock and statement timeouts: a locked table is a
    ``timeout``, not a hang."""
    if (problem := target_problem(target.statement)) is not None:
        return problem, "syntax"
    if is_set_based(target.statement):
        text = set_statement(target.statement)
        params: dict[str, Any] = {"ids": [_SampleRow().id]}
    else:
        text, names = row_statement(target.statement)
        params = sql_params(_SampleRow(), names)
    try:
        await replays.plan(
            conn,
            text,
            params,
            lock_timeout=VALIDATE_LOCK_TIMEOUT,
            statement_timeout=VALIDATE_STATEMENT_TIMEOUT,
        )
    except DatabaseError as exc:
        if exc.broken:
            raise
        message = str(exc)
        if isinstance(exc, StatementTimeout):
            return (
                f"could not be planned within {format_duration(VALIDATE_LOCK_TIMEOUT)}: "
                "a table it uses is "
                f"locked by another session ({message})",
                "timeout",
            )
        if "cannot insert multiple commands" in message:
            return "must be exactly one SQL statement", "syntax"
        if exc.sqlstate == "42601":  # syntax_error
            return (
                f"{message} (a target is one SELECT, INSERT, UPDATE, DELETE or MERGE statement)",
                "syntax",
            )
        return message, "plan"
    return None


async def sql_target_problems(conn: Connection, settings: Settings) -> list[tuple[str, Kind]]:
    """Every sql target planned: (one line naming the target, its kind)."""
    problems: list[tuple[str, Kind]] = []
    for where, target in _targets(settings):
        if isinstance(target, SqlTarget) and (found := await explain_sql(conn, target)):
            message, kind = found
            name = _policy_name(settings, where)
            problems.append((f"{_statement(where)}: {message}{name}", kind))
    return problems


def check_targets(settings: Settings) -> None:
    """What can be checked without a database: sql statements are one statement
    of a kind a target may be; http headers read from the environment."""
    for where, target in _targets(settings):
        if isinstance(target, SqlTarget) and (problem := target_problem(target.statement)):
            raise ConfigError(
                f"invalid configuration: {_statement(where)}: {problem}"
                f"{_policy_name(settings, where)}"
            )
        if isinstance(target, HttpTarget):
            try:
                resolved_headers(target)
            except ConfigError as exc:
                message = str(exc).removeprefix("invalid configuration: ")
                raise ConfigError(
                    f"invalid configuration: {where}: {message}{_policy_name(settings, where)}"
                ) from None
