"""Replay targets that run inside the transaction that sets ``replayed_at``.

A batch runs as one round trip (``executemany`` in a pipeline, or one
``pg_notify`` over a JSON array) under a savepoint. When the batch fails, each
row is tried again under its own savepoint, so one bad row fails alone and the
rest of its batch still replays.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg.types.json import Jsonb

from dlqd.config import NotifyTarget, SqlTarget
from dlqd.models import DlqEntry
from dlqd.queries import q

Connection = psycopg.AsyncConnection[dict[str, Any]]


_PLACEHOLDER = re.compile(r"%\((\w+)\)s")
_JSON_COLUMNS = frozenset({"payload", "error_history"})


@functools.lru_cache(maxsize=256)
def placeholders(statement: str) -> tuple[str, ...]:
    """The job_dlq columns a statement names (config validation refuses others)."""
    return tuple(sorted(set(_PLACEHOLDER.findall(statement))))


def sql_params(entry: DlqEntry, names: Sequence[str]) -> dict[str, Any]:
    """The named columns of a row: id as uuid, JSON columns as jsonb.

    Only what the statement uses is bound: adapting unused columns costs more
    than the statement itself on a big batch.
    """
    params = {name: getattr(entry, name) for name in names}
    for name in _JSON_COLUMNS.intersection(params):
        params[name] = Jsonb(params[name])
    return params


def notify_message(entry: DlqEntry) -> dict[str, str]:
    return {
        "id": str(entry.id),
        "original_job_id": entry.original_job_id,
        "app_id": entry.app_id,
        "type": entry.type,
    }


_QUOTED = re.compile(r'"[^"]*"')


def error_line(exc: BaseException) -> str:
    """The first line of an error, for logs and the replay log.

    A data error quotes the offending value (``invalid input syntax for type
    json: "..."``), which may be part of a payload: quoted text is elided.
    """
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate.startswith("22"):
        first = _QUOTED.sub('"…"', first)
    return first[:500]


def sample_entry() -> DlqEntry:
    """A made-up row, to plan target statements with real parameter types."""
    return DlqEntry(
        id=UUID(int=0),
        original_job_id="dlqd-check",
        app_id="dlqd-check",
        type="dlqd.check",
        payload={},
        error_reason="check",
        attempts=0,
        error_history=[],
        dlq_at=datetime.now(UTC),
        replayed_at=None,
        request_id=None,
        user_id=None,
    )


async def explain_sql(conn: Connection, target: SqlTarget) -> str | None:
    """Plan (never run) a target's statement; the error line, or None when it is valid."""
    statement = b"EXPLAIN " + target.statement.encode()
    try:
        async with conn.transaction(force_rollback=True):
            await conn.execute(
                statement, sql_params(sample_entry(), placeholders(target.statement))
            )
    except psycopg.Error as exc:
        if conn.broken:
            raise
        return error_line(exc)
    return None


async def _batch_then_each(
    conn: Connection,
    entries: Sequence[DlqEntry],
    run_batch: Callable[[Sequence[DlqEntry]], Awaitable[None]],
) -> dict[UUID, str]:
    """Run the batch under a savepoint; on failure run each row alone. Returns failures."""
    try:
        async with conn.transaction():
            await run_batch(entries)
        return {}
    except psycopg.Error:
        if conn.broken:
            raise
    failures: dict[UUID, str] = {}
    for entry in entries:
        try:
            async with conn.transaction():
                await run_batch([entry])
        except psycopg.Error as exc:
            if conn.broken:
                raise
            failures[entry.id] = error_line(exc)
    return failures


async def run_sql(
    conn: Connection, target: SqlTarget, entries: Sequence[DlqEntry]
) -> dict[UUID, str]:
    statement = target.statement.encode()
    names = placeholders(target.statement)

    async def batch(rows: Sequence[DlqEntry]) -> None:
        async with conn.cursor() as cur:
            await cur.executemany(statement, [sql_params(r, names) for r in rows])

    return await _batch_then_each(conn, entries, batch)


async def run_notify(
    conn: Connection, target: NotifyTarget, entries: Sequence[DlqEntry]
) -> dict[UUID, str]:
    async def batch(rows: Sequence[DlqEntry]) -> None:
        messages = Jsonb([notify_message(r) for r in rows], dumps=json.dumps)
        await conn.execute(q("notify_many"), {"channel": target.channel, "messages": messages})

    return await _batch_then_each(conn, entries, batch)
