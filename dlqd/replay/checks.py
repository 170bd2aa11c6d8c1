"""Validating targets before any replay: refused kinds, and sql statements planned.

A statement is validated through the extended protocol only (a server-side
prepare of ``EXPLAIN <statement>``): the server's parser refuses more than one
statement, EXPLAIN refuses anything but one plannable statement, and EXPLAIN
without ANALYZE plans without running. Everything happens in a transaction
that is rolled back.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import psycopg

from dlqd.config import HttpTarget, Settings, SqlTarget
from dlqd.errors import ConfigError, error_line
from dlqd.replay.http import resolved_headers
from dlqd.replay.targets import (
    compile_set_statement,
    compile_statement,
    is_set_based,
    sql_params,
)

Connection = psycopg.AsyncConnection[dict[str, Any]]


class _SampleRow:
    """A made-up row, to plan target statements with real parameter types."""

    id = UUID(int=0)
    original_job_id = "dlqd-check"
    app_id = "dlqd-check"
    type = "dlqd.check"
    error_reason = "check"
    attempts = 0


def _targets(settings: Settings) -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = [
        (f"policies[{i}].target", p.target) for i, p in enumerate(settings.policies)
    ]
    found.append(("replay.default_target", settings.replay.default_target))
    return [(where, target) for where, target in found if target is not None]


def _policy_name(settings: Settings, where: str) -> str:
    if where.startswith("policies["):
        index = int(where[len("policies[") : where.index("]")])
        return f" [policy {settings.policies[index].name!r}]"
    return ""


async def explain_sql(conn: Connection, target: SqlTarget) -> tuple[str, bool] | None:
    """Plan (never run) a statement: None when valid, else (error, is_a_syntax_error)."""
    if is_set_based(target.statement):
        text = compile_set_statement(target.statement)
        params: dict[str, Any] = {"ids": [_SampleRow().id]}
    else:
        text, names = compile_statement(target.statement)
        params = sql_params(_SampleRow(), names)
    try:
        async with conn.transaction(force_rollback=True), conn.cursor() as cur:
            await cur.execute(b"EXPLAIN " + text, params, prepare=True)
    except psycopg.Error as exc:
        if conn.broken:
            raise
        syntax = isinstance(exc, psycopg.errors.SyntaxError)
        message = error_line(exc)
        if "cannot insert multiple commands" in message:
            message = "must be exactly one SQL statement"
        elif syntax:
            message = (
                f"{message} (a target is one SELECT, INSERT, UPDATE, DELETE or MERGE statement)"
            )
        return message, syntax
    return None


async def sql_target_problems(conn: Connection, settings: Settings) -> list[tuple[str, bool]]:
    """Every sql target planned: (one line naming the target, fatal at start-up)."""
    problems: list[tuple[str, bool]] = []
    for where, target in _targets(settings):
        if isinstance(target, SqlTarget) and (found := await explain_sql(conn, target)):
            message, syntax = found
            name = _policy_name(settings, where)
            problems.append((f"{where}.statement: {message}{name}", syntax))
    return problems


def check_targets(settings: Settings) -> None:
    """What can be checked without a database: http headers read from the environment."""
    for where, target in _targets(settings):
        if isinstance(target, HttpTarget):
            try:
                resolved_headers(target)
            except ConfigError as exc:
                message = str(exc).removeprefix("invalid configuration: ")
                raise ConfigError(
                    f"invalid configuration: {where}: {message}{_policy_name(settings, where)}"
                ) from None
