"""The daemon's own upkeep: purge and trim, the leader's lease, health, the
listener's channels, server gauges."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any, Literal

import psycopg

from dlqd.db.compose import listen_statement
from dlqd.db.connector import Connection, required, transaction, translate, translated
from dlqd.db.queries import q

Row = dict[str, Any]


def _ms(value: timedelta) -> str:
    return f"{max(1, round(value.total_seconds() * 1000))}ms"


@translated
async def delete_batch(
    conn: Connection,
    what: Literal["rows", "log"],
    params: dict[str, Any],
    size: int,
    *,
    after: datetime | None = None,
    lock_timeout: timedelta,
    statement_timeout: timedelta,
) -> tuple[int, datetime | None]:
    """One batch of ``job_dlq_purge`` (rows) or ``dlqd_trim_replay_log_after``
    (log), in a transaction of its own under the given timeouts: rows deleted,
    and for the log the ``at`` the batch reached (the next batch's ``after``;
    the rows' purge takes none and reaches none)."""
    query = q("purge_batch") if what == "rows" else q("trim_replay_log")
    async with transaction(conn):
        await conn.execute(
            q("purge_timeouts"),
            {"lock_timeout": _ms(lock_timeout), "statement_timeout": _ms(statement_timeout)},
        )
        cur = await conn.execute(query, {**params, "batch_size": size, "after": after})
        row = await cur.fetchone()
    done = required(row, f"{what} batch")
    return int(done["deleted"]), done.get("reached")


@translated
async def purge_count(
    conn: Connection, replayed_before: timedelta, pending_before: timedelta | None
) -> int:
    """How many rows a purge pass would delete now."""
    cur = await conn.execute(
        q("purge_count"), {"replayed_before": replayed_before, "pending_before": pending_before}
    )
    row = await cur.fetchone()
    return int(row["n"]) if row else 0


@translated
async def claim_lease(conn: Connection, holder: str, ttl: timedelta) -> bool:
    """Take or renew the leader's lease (one statement); whether ``holder`` holds it."""
    cur = await conn.execute(q("leader_claim"), {"holder": holder, "ttl": ttl})
    return await cur.fetchone() is not None


@translated
async def release_lease(conn: Connection, holder: str) -> None:
    await conn.execute(q("leader_release"), {"holder": holder})


@translated
async def lease(conn: Connection) -> Row | None:
    """Who holds the leader's lease, whether it is current, since when."""
    cur = await conn.execute(q("leader_lease"))
    return await cur.fetchone()


@translated
async def ping(conn: Connection) -> int:
    """The server's version number (a round trip)."""
    cur = await conn.execute(q("ping"))
    row = await cur.fetchone()
    return int(row["server_version_num"]) if row else 0


@translated
async def notification_queue_usage(conn: Connection) -> float:
    cur = await conn.execute(q("notification_queue_usage"))
    row = await cur.fetchone()
    return float(row["usage"]) if row else 0.0


@translated
async def listen(conn: Connection, *channels: str) -> None:
    for channel in channels:
        await conn.execute(listen_statement(channel))


@translated
async def notify(conn: Connection, channel: str, payload: str) -> None:
    await conn.execute(q("notify"), {"channel": channel, "payload": payload})


async def notifications(conn: Connection, within: float) -> AsyncIterator[tuple[str, str]]:
    """(channel, payload) of the notifications that arrive within ``within`` seconds."""
    try:
        async for note in conn.notifies(timeout=within):
            yield note.channel, note.payload
    except psycopg.Error as exc:
        raise translate(exc, conn) from exc


@translated
async def record_run(conn: Connection, task: str, *, ok: bool, detail: dict[str, Any]) -> None:
    """When the leader's ``task`` last finished, whether it succeeded, what it did."""
    from psycopg.types.json import Jsonb

    await conn.execute(q("record_run"), {"task": task, "ok": ok, "detail": Jsonb(detail)})


@translated
async def console_key(conn: Connection, candidate: bytes) -> bytes:
    """The console's session key: ``candidate`` if no replica made one before."""
    cur = await conn.execute(q("console_key"), {"key": candidate})
    return bytes(required(await cur.fetchone(), "console key")["key"])
