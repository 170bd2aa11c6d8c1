"""Replay targets that run inside the transaction that sets ``replayed_at``.

Each kind runs a whole group of rows in one round trip (``executemany`` in a
pipeline for ``sql``; one ``pg_notify`` statement for ``notify``) under a
savepoint. Deferred constraints are checked inside that savepoint (``SET
CONSTRAINTS ALL IMMEDIATE``), so a row that would fail at COMMIT fails here,
where it can be isolated. A failing group is bisected: k bad rows among n
cost O(k log n) statements, and the good rows still replay. A timeout is not
bisected: it says the target is blocked, not that a row is bad.

A statement with no placeholder that reads the relation ``replayed`` is
*set-based*: it runs once for the whole group, ``replayed`` being the group's
rows of ``job_dlq`` (``INSERT INTO jobs (kind, args) SELECT type, payload FROM
replayed``), instead of once per row.

Column values the daemon does not hold (``payload``, ``error_history``,
timestamps, ...) are read by the statement itself, inside Postgres: a
``%(payload)s`` placeholder runs as ``(SELECT payload FROM job_dlq WHERE id =
%(id)s)``. No payload ever crosses into the process.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from uuid import UUID

from dlqd.config import NotifyTarget, SqlTarget
from dlqd.db import replays
from dlqd.db.compose import PLACEHOLDER, row_statement, set_statement
from dlqd.db.connector import Connection, savepoint
from dlqd.errors import DatabaseError, LockTimeout, StatementTimeout
from dlqd.policy import MatchLike
from dlqd.statements import StatementError, tokens


@functools.lru_cache(maxsize=256)
def is_set_based(statement: str) -> bool:
    """No placeholder, and the relation ``replayed`` named (as a word of the
    statement, not of a comment or a string): once per group."""
    if any(m.group(1) for m in PLACEHOLDER.finditer(statement)):
        return False
    try:
        found = tokens(statement)
    except StatementError:
        return False
    return any(t.text.lower() == "replayed" for t in found)


class RowValues(MatchLike, Protocol):
    """What a target binds from a claimed row."""

    @property
    def id(self) -> UUID: ...
    @property
    def original_job_id(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Failure:
    """One row's failed attempt: a one-line error; whether it says the target is
    down (a timeout, a 5xx, a refused connection) rather than that the row is bad;
    and how long the target asked us to wait (``Retry-After``)."""

    error: str
    target_down: bool = False
    retry_after: float | None = None


def sql_params(row: RowValues, names: Sequence[str]) -> dict[str, Any]:
    return {name: getattr(row, name) for name in names}


async def _run_sql(
    target: SqlTarget, conn: Connection, rows: Sequence[RowValues], all_in_db: bool
) -> None:
    if is_set_based(target.statement):
        # every column comes from job_dlq itself: invalid rows included
        await replays.run_statement(
            conn, set_statement(target.statement), {"ids": [r.id for r in rows]}
        )
        return
    text, names = row_statement(target.statement, all_in_db=all_in_db)
    if len(rows) == 1:  # no pipeline to open and sync for one statement
        await replays.run_statement(conn, text, sql_params(rows[0], names))
        return
    await replays.run_statement_per_row(conn, text, [sql_params(r, names) for r in rows])


async def _run_notify(
    target: NotifyTarget, conn: Connection, rows: Sequence[RowValues], all_in_db: bool
) -> None:
    await replays.notify_rows(conn, target.channel, [r.id for r in rows], target.message == "id")


def runner_for(target: SqlTarget | NotifyTarget) -> Callable[..., Awaitable[None]]:
    if isinstance(target, SqlTarget):
        return functools.partial(_run_sql, target)
    return functools.partial(_run_notify, target)


def chunks(rows: Sequence[Any], max_bytes: int) -> list[list[Any]]:
    """``rows`` in order, cut so that each chunk's rows (``.row_bytes``) fit in
    ``max_bytes``; a row bigger than that goes alone."""
    found: list[list[Any]] = []
    size = 0
    for row in rows:
        bytes_ = int(getattr(row, "row_bytes", 0))
        if not found or (size + bytes_ > max_bytes and found[-1]):
            found.append([])
            size = 0
        found[-1].append(row)
        size += bytes_
    return found


@dataclass
class _Run:
    """One target's runs for a page: the rows that failed, and whether a lone
    row has timed out (then the target is slow for any row, and the rest of
    the page fails at once instead of each waiting for its own timeout)."""

    failures: dict[UUID, Failure]
    slow: Failure | None = None


async def run_isolated(
    conn: Connection,
    target: SqlTarget | NotifyTarget,
    rows: Sequence[RowValues],
    *,
    in_db: Callable[[Any], bool] = lambda _: False,
    max_bytes: int = 16 * 1024**2,
) -> dict[UUID, Failure]:
    """Run ``target`` for ``rows`` in ``conn``'s transaction; the rows that failed.

    Rows run in chunks of at most ``max_bytes`` (stored bytes). ``in_db(row)``
    says whether a row's key columns must be read inside Postgres too (an
    invalid row replayed by hand).
    """
    run = runner_for(target)
    state = _Run({})
    plain = [r for r in rows if not in_db(r)]
    special = [r for r in rows if in_db(r)]
    for group, all_in_db in ((plain, False), (special, True)):
        for chunk in chunks(group, max_bytes):
            await _bisect(conn, run, chunk, all_in_db, state)
    return state.failures


async def _bisect(
    conn: Connection,
    run: Callable[..., Awaitable[None]],
    rows: Sequence[RowValues],
    all_in_db: bool,
    state: _Run,
) -> None:
    """Run ``rows`` under a savepoint; on failure, each half on its own.

    A lock timeout fails the whole group (the target is blocked, not the rows
    bad). A statement timeout of several rows splits them like any failure (a
    group can be too big where each of its rows is fine); the first lone row
    that times out says the target is slow: it and every row not tried yet
    fail at once, as evidence that the target is down.
    """
    if state.slow is not None:
        state.failures.update(dict.fromkeys((r.id for r in rows), state.slow))
        return
    try:
        async with savepoint(conn):
            await run(conn, rows, all_in_db)
            await replays.check_constraints_now(conn)
        return
    except LockTimeout as exc:
        if exc.broken:
            raise
        failure = Failure(str(exc), target_down=True)
        state.failures.update(dict.fromkeys((r.id for r in rows), failure))
        return
    except DatabaseError as exc:
        if exc.broken:
            raise
        if len(rows) == 1:
            timed_out = isinstance(exc, StatementTimeout)
            failure = Failure(str(exc), target_down=timed_out)
            state.failures[rows[0].id] = failure
            if timed_out:
                state.slow = failure
            return
    middle = len(rows) // 2
    await _bisect(conn, run, rows[:middle], all_in_db, state)
    await _bisect(conn, run, rows[middle:], all_in_db, state)
