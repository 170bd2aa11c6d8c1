"""What one replay transaction writes and runs: targets, schedule rows, the
replay log, lock slots, and the express page.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol
from uuid import UUID

import psycopg
from psycopg import AsyncClientCursor, AsyncRawCursor
from psycopg.pq import TransactionStatus

from dlqd.db.compose import (
    Positional,
    Prepared,
    Statement,
    deallocate,
    explained,
    replay_rows,
    row_function_name,
    server_row_statement,
)
from dlqd.db.connector import Connection, transaction, translate, translated
from dlqd.db.queries import q

Row = dict[str, Any]


def _ms(value: timedelta) -> str:
    return f"{max(1, round(value.total_seconds() * 1000))}ms"


@translated
async def bound_transaction(conn: Connection, statement: timedelta, lock: timedelta) -> None:
    """Bound every statement of this transaction, and compile none by JIT
    (SET LOCAL: a session setting would stay on a pooler's server connection)."""
    await conn.execute(
        q("transaction_settings"), {"statement_timeout": _ms(statement), "lock_timeout": _ms(lock)}
    )


@translated
async def check_constraints_now(conn: Connection) -> None:
    """Deferred constraints checked now, where a failing row can be isolated."""
    await conn.execute(q("constraints_immediate"))


@translated
async def run_statement(conn: Connection, statement: Statement, params: dict[str, Any]) -> None:
    """An operator's target statement (composed by ``dlqd.db.compose``)."""
    await conn.execute(statement, params)


@translated
async def run_statement_per_row(
    conn: Connection, statement: Statement, params: Sequence[dict[str, Any]]
) -> None:
    """A per-row target for many rows, pipelined (one round trip)."""
    async with conn.cursor() as cur:
        await cur.executemany(statement, list(params))


@translated
async def run_rows_in_server(conn: Connection, statement: str, ids: Sequence[UUID]) -> None:
    """A per-row target's in-server form for many rows (migration 017): its
    session function defined if this session has not yet, then called once
    per row by one query; pipelined, one round trip."""
    async with conn.pipeline():
        await conn.execute(q("define_row_function"), row_definition(statement))
        await conn.execute(replay_rows(statement), {"ids": list(ids)})


def row_definition(statement: str) -> dict[str, str]:
    """What defines ``statement``'s session function (``define_row_function``)."""
    return {"name": row_function_name(statement), "statement": server_row_statement(statement)}


@translated
async def replay_rows_allowed(conn: Connection) -> bool:
    """Whether this role may define per-row session functions (migration 017
    applied, EXECUTE on dlqd_define_row_function, TEMPORARY on the database)."""
    cur = await conn.execute(q("replay_rows_allowed"))
    row = await cur.fetchone()
    return row is not None and bool(row["allowed"])


@translated
async def notify_rows(conn: Connection, channel: str, ids: Sequence[UUID], only_id: bool) -> None:
    await conn.execute(q("notify_rows"), {"channel": channel, "ids": list(ids), "only_id": only_id})


@translated
async def finish_replayed(
    conn: Connection,
    ids: Sequence[UUID],
    policies: Sequence[str | None],
    *,
    manual: bool,
    actor: str | None,
    reason: str | None,
    inbox_seqs: Sequence[int],
    redrive: UUID | None = None,
) -> dict[UUID, float | None]:
    """Mark, unschedule and log the rows whose target succeeded (and drop the
    page's inbox entries); the rows marked, with their dlq-to-replay seconds."""
    cur = await conn.execute(
        q("finish_replayed"),
        {
            "ids": list(ids),
            "policies": list(policies),
            "manual": manual,
            "actor": actor,
            "reason": reason,
            "inbox_seqs": list(inbox_seqs),
            "redrive": redrive,
        },
    )
    return {row["id"]: row["lag_seconds"] for row in await cur.fetchall()}


class LogEntry(Protocol):
    @property
    def dlq_id(self) -> UUID: ...
    @property
    def policy(self) -> str | None: ...
    @property
    def outcome(self) -> str: ...
    @property
    def error(self) -> str | None: ...
    @property
    def manual(self) -> bool: ...


@translated
async def log_outcomes(
    conn: Connection,
    entries: Sequence[LogEntry],
    actor: str | None,
    reason: str | None,
    redrive: UUID | None = None,
) -> None:
    await conn.execute(
        q("log_outcomes"),
        {
            "dlq_ids": [e.dlq_id for e in entries],
            "policies": [e.policy for e in entries],
            "outcomes": [e.outcome for e in entries],
            "errors": [e.error for e in entries],
            "manual": [e.manual for e in entries],
            "actor": actor,
            "reason": reason,
            "redrive": redrive,
        },
    )


class ScheduleRow(Protocol):
    @property
    def state(self) -> str: ...
    @property
    def policy(self) -> str | None: ...
    @property
    def due_at(self) -> datetime | None: ...
    @property
    def parked_reason(self) -> str | None: ...
    @property
    def failures(self) -> int: ...
    @property
    def last_error(self) -> str | None: ...
    @property
    def last_failure_at(self) -> datetime | None: ...


@translated
async def write_schedule(
    conn: Connection, fingerprint: str, rows: Sequence[tuple[UUID, ScheduleRow]]
) -> None:
    """Schedule rows (dlqd_entry_state), inserted or replaced, set-based."""
    await conn.execute(
        q("upsert_states"),
        {
            "dlq_ids": [i for i, _ in rows],
            "states": [s.state for _, s in rows],
            "policies": [s.policy for _, s in rows],
            "fingerprints": [fingerprint] * len(rows),
            "due_ats": [s.due_at for _, s in rows],
            "parked_reasons": [s.parked_reason for _, s in rows],
            "failures": [s.failures for _, s in rows],
            "last_errors": [s.last_error for _, s in rows],
            "last_failure_ats": [s.last_failure_at for _, s in rows],
        },
    )


JobKey = tuple[str, str]  # (app_id, original_job_id)


@translated
async def replay_counts(
    conn: Connection, keys: Sequence[JobKey], retention: timedelta
) -> dict[JobKey, int]:
    """Successful replays per (app_id, original_job_id) within the log's retention."""
    if not keys:
        return {}
    cur = await conn.execute(
        q("replay_counts"),
        {
            "app_ids": [k[0] for k in keys],
            "original_job_ids": [k[1] for k in keys],
            "retention": retention,
        },
    )
    return {
        (row["app_id"], row["original_job_id"]): int(row["replays"]) for row in await cur.fetchall()
    }


@translated
async def lock_slots(conn: Connection, keys: Sequence[tuple[str, str]]) -> set[tuple[str, str]]:
    """Of ``keys`` ((app_id, original_job_id) of jobs under max_replays), those
    whose lock slot this transaction now holds (never waits), stamped with it."""
    cur = await conn.execute(
        q("lock_slots"),
        {"app_ids": [k[0] for k in keys], "job_ids": [k[1] for k in keys]},
    )
    return {(row["app_id"], row["original_job_id"]) for row in await cur.fetchall()}


@translated
async def plan(
    conn: Connection,
    statement: Statement,
    params: dict[str, Any],
    *,
    lock_timeout: timedelta,
    statement_timeout: timedelta,
) -> None:
    """Plan ``statement`` (``EXPLAIN (COSTS OFF)``, never run) in a transaction
    rolled back, under the timeouts; the server's objection raised as dlqd's."""
    async with transaction(conn, force_rollback=True):
        await conn.execute(
            q("validation_timeouts"),
            {"lock_timeout": _ms(lock_timeout), "statement_timeout": _ms(statement_timeout)},
        )
        async with conn.cursor() as cur:
            await cur.execute(explained(statement), params, prepare=True)


@translated
async def http_body_size(conn: Connection, row_id: UUID) -> int | None:
    cur = await conn.execute(q("http_body_size"), {"id": row_id})
    row = await cur.fetchone()
    return None if row is None else int(row["size"])


@translated
async def http_body(conn: Connection, row_id: UUID) -> bytes | None:
    """The row as an http target sends it (rendered by Postgres, UTF-8)."""
    cur = await conn.execute(q("http_body"), {"id": row_id})
    row = await cur.fetchone()
    return None if row is None else bytes(row["body"])


@dataclass
class _Session:
    """What dlqd knows of one connection's server session."""

    direct: bool  # no pooler between: the session is this connection's alone
    prepared: set[str] = field(default_factory=set)  # its express page statements
    rendered: dict[Any, bytes] = field(default_factory=dict)  # statements with their literals


_SESSIONS: weakref.WeakKeyDictionary[Connection, _Session] = weakref.WeakKeyDictionary()


async def _session(conn: Connection) -> _Session:
    """The connection's session, asked once: a pooler answers with a backend
    pid of its own, and may hand each transaction another server session."""
    session = _SESSIONS.get(conn)
    if session is None:
        cur = await conn.execute(q("backend_pid"))
        row = await cur.fetchone()
        session = _Session(direct=row is not None and row["pid"] == conn.info.backend_pid)
        _SESSIONS[conn] = session
    return session


def _rendered(conn: Connection, session: _Session, name: str, params: dict[str, Any]) -> bytes:
    """Named query ``name`` with ``params`` written in as literals (once per session)."""
    key = (name, tuple(params.items()))
    text = session.rendered.get(key)
    if text is None:
        text = AsyncClientCursor(conn).mogrify(q(name), params).encode()
        session.rendered[key] = text
    return text


async def express_page(
    conn: Connection,
    statement: Positional,
    prepared: Prepared,
    params: dict[str, Any],
    *,
    statement_timeout: timedelta,
    lock_timeout: timedelta,
    custom_plan: bool,
    row_statements: Sequence[str] = (),
) -> Row:
    """One express page in its own transaction, in one round trip.

    On a connection of its own (no pooler between), the page is one simple
    query: ``BEGIN``, the timeouts, ``EXECUTE`` of the page statement (``PREPARE``d
    once per session, its constants written in as literals) and ``COMMIT``.
    A trickle runs a page per row, and this is its cost: the same four
    statements pipelined cost psycopg twice the CPU (one wait on the socket
    per statement). Behind a pooler, which may hand the next transaction
    another server session, the statements are pipelined, with ``statement``
    prepared by psycopg where the pooler keeps prepared statements.

    Either way, when a statement fails the server skips the rest and the
    transaction is left aborted: it is rolled back here, and the error
    raised. (An implicit transaction, no BEGIN and COMMIT, is cheaper still,
    but a deferred constraint then fails at the Sync itself, which psycopg
    reports as a broken pipeline rather than as the constraint's error.)

    ``custom_plan``: plan the statement for these parameters rather than take
    the prepared statement's generic plan, which Postgres may settle on after
    a few small pages: planned for nothing in particular, a full page took 5x
    longer with it (724 ms against 134 ms for 5000 rows). Worth its planning
    time (under a millisecond) for a full page, not for a trickle's one row.

    ``row_statements``: the per-row statements whose session functions the
    page calls, defined first where this session has not yet (migration 017).
    """
    timeouts = {"statement_timeout": _ms(statement_timeout), "lock_timeout": _ms(lock_timeout)}
    try:
        session = await _session(conn)
        if session.direct:
            return await _express_script(
                conn,
                session,
                prepared.execute(params),
                prepared=prepared,
                timeouts=timeouts,
                custom_plan=custom_plan,
                row_statements=row_statements,
            )
        async with conn.pipeline():
            await conn.execute(q("begin"))
            await conn.execute(q("transaction_settings"), timeouts)
            if custom_plan:
                await conn.execute(q("custom_plans"))
            for text in row_statements:
                await conn.execute(q("define_row_function"), row_definition(text))
            cur = AsyncRawCursor(conn)
            await cur.execute(statement.text, statement.values(params))
            await conn.execute(q("commit"))
        row = await cur.fetchone()
    except psycopg.Error as exc:
        # (a cancelled page leaves the connection to the pool, which resets it)
        if not conn.broken and conn.info.transaction_status != TransactionStatus.IDLE:
            try:
                await conn.rollback()
            except psycopg.Error as rollback:
                raise translate(rollback, conn) from exc
        raise translate(exc, conn) from exc
    assert row is not None  # noqa: S101 - an aggregate row always comes back
    return row


async def _express_script(
    conn: Connection,
    session: _Session,
    execute: bytes,
    *,
    prepared: Prepared,
    timeouts: dict[str, str],
    custom_plan: bool,
    row_statements: Sequence[str],
) -> Row:
    """The express page as one simple query (see ``express_page``): its
    statement ``PREPARE``d first where this session has not yet.

    psycopg deallocates every prepared statement of the session, ours too,
    when a transaction of the connection rolls back (a failed page of the
    ordinary path, say): the page that then finds its statement gone has
    done nothing yet, and is run again once, prepared again."""
    # the session functions the page calls (defined before it is prepared)
    defined = [
        _rendered(conn, session, "define_row_function", row_definition(text))
        for text in row_statements
    ]
    bounded = _rendered(conn, session, "transaction_settings", timeouts)
    script = [q("begin").encode(), bounded]
    if custom_plan:
        script.append(q("custom_plans").encode())
    script.extend(defined)
    script.append(execute)
    script.append(q("commit").encode())
    query = b";\n".join(script)
    for retry in (True, False):
        await _prepare(conn, session, prepared, [bounded, *defined])
        cur = conn.cursor()
        try:
            await cur.execute(query, prepare=False)
        except psycopg.errors.InvalidSqlStatementName:
            if not retry:
                raise
            await conn.rollback()
            session.prepared.clear()
            continue
        for _ in range(len(script) - 2):
            cur.nextset()  # to the EXECUTE's result
        row = await cur.fetchone()
        assert row is not None  # noqa: S101 - an aggregate row always comes back
        return row
    raise AssertionError("unreachable")  # pragma: no cover


async def _prepare(
    conn: Connection, session: _Session, page: Prepared, first: Sequence[bytes]
) -> None:
    """``page`` prepared in the session, alone there (a plan of settings since
    reloaded is deallocated), after the statements ``first`` (the page's
    timeouts, its session functions defined). ``PREPARE`` locks the tables the
    statement names, under those timeouts, in a transaction of its own: a
    prepared statement outlives the transaction that prepared it."""
    if page.name in session.prepared:
        return
    for old in session.prepared:
        with contextlib.suppress(psycopg.errors.InvalidSqlStatementName):
            await conn.execute(deallocate(old), prepare=False)
    session.prepared.clear()
    query = b";\n".join([q("begin").encode(), *first, page.prepare, q("commit").encode()])
    try:
        await conn.execute(query, prepare=False)
    except psycopg.errors.DuplicatePreparedStatement:
        # prepared already (by a page whose outcome was lost); if the
        # rollback deallocates it, the page finds out and prepares again
        await conn.rollback()
    session.prepared.add(page.name)
