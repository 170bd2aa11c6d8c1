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

A per-row statement runs for a group of rows *inside Postgres* when its
in-server form plans (migration 017: every placeholder read from the row as
claimed, typed as job_dlq's column, the body of a SQL function of the
session's temporary schema, defined on first use): one query calls it once
per row of the group, planned once per query, and the bisection on failure
calls it again on each half.
Whether it plans is learned once per statement (:func:`learn_server_forms`);
a statement whose placeholders need the client's untyped binding (a text
value into an enum column, say), or a role that may not run the function,
(or a database without TEMPORARY for it) keeps the pipelined statements. A
lone row runs as the statement itself.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol
from uuid import UUID

import anyio

from dlqd.config import NotifyTarget, Settings, SqlTarget, run_target
from dlqd.db import replays
from dlqd.db.compose import (
    PLACEHOLDER,
    planned_server_statement,
    row_statement,
    set_statement,
)
from dlqd.db.connector import Connection, savepoint
from dlqd.errors import DatabaseError, LockTimeout, StatementTimeout
from dlqd.logs import get_logger
from dlqd.policy import MatchLike
from dlqd.statements import StatementError, target_problem, tokens

log = get_logger("dlqd.replayer")


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
    if len(rows) > 1 and runs_in_server(conn, target.statement):
        await replays.run_rows_in_server(conn, target.statement, [r.id for r in rows])
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


#: per-row statements, by database, role and text: whether their in-server
#: form runs (it plans, and the role may define it: migration 017). Learned once.
_SERVER_FORMS: dict[tuple[str, str, str, str], bool] = {}
#: how long learning a statement's form waits for a lock, and plans (it runs
#: at the start of a pass: a table locked by someone else costs the pass at
#: most this, once per _LEARN_RETRY seconds)
_LEARN_LOCK_TIMEOUT = timedelta(milliseconds=100)
_LEARN_STATEMENT_TIMEOUT = timedelta(seconds=2)
_LEARN_RETRY = 30.0
#: statements not learned yet because a table was locked: when to try again
_LEARN_AFTER: dict[tuple[str, str, str, str], float] = {}


def _form_key(conn: Connection, statement: str) -> tuple[str, str, str, str]:
    info = conn.info
    return (f"{info.host}:{info.port}", info.dbname, info.user, statement)


def runs_in_server(conn: Connection, statement: str) -> bool:
    """Whether a per-row statement's groups run inside Postgres on ``conn``'s
    database (as learned; not yet learned: no)."""
    return _SERVER_FORMS.get(_form_key(conn, statement), False)


def per_row_statements(settings: Settings) -> list[str]:
    """The per-row sql statements ``settings`` may replay rows through (found
    once per settings object: a pass asks every time)."""
    cached = _PER_ROW.get("last")
    if cached is None or cached[0] is not settings:
        found = [p.target for p in settings.policies] + [settings.replay.default_target]
        cached = (
            settings,
            [
                t.statement
                for t in (run_target(target) for target in found if target is not None)
                if isinstance(t, SqlTarget)
                and not is_set_based(t.statement)
                and target_problem(t.statement) is None
            ],
        )
        _PER_ROW["last"] = cached
    return cached[1]


#: the settings object per_row_statements last answered for, and its answer
_PER_ROW: dict[str, tuple[Settings, list[str]]] = {}


async def learn_server_forms(conn: Connection, statements: Sequence[str]) -> None:
    """Plan each statement's in-server form not planned yet (``conn`` idle, in
    autocommit). A statement whose tables are locked runs from the daemon
    meanwhile, and is tried again after _LEARN_RETRY seconds."""
    now = anyio.current_time()
    unknown = [
        s
        for s in dict.fromkeys(statements)
        if (key := _form_key(conn, s)) not in _SERVER_FORMS and _LEARN_AFTER.get(key, 0) <= now
    ]
    if not unknown:
        return
    allowed = await replays.replay_rows_allowed(conn)
    for statement in unknown:
        key = _form_key(conn, statement)
        if not allowed:
            _SERVER_FORMS[key] = False
            continue
        try:
            await replays.plan(
                conn,
                planned_server_statement(statement),
                {},
                lock_timeout=_LEARN_LOCK_TIMEOUT,
                statement_timeout=_LEARN_STATEMENT_TIMEOUT,
            )
        except StatementTimeout as exc:  # a lock timeout too: a table it uses is locked
            if exc.broken:
                raise
            _LEARN_AFTER[key] = now + _LEARN_RETRY
            continue
        except DatabaseError as exc:
            if exc.broken:
                raise
            _SERVER_FORMS[key] = False
            log.info(
                "per-row target runs row by row from the daemon: its in-server form does not plan",
                error=str(exc),
            )
            continue
        _SERVER_FORMS[key] = True


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
