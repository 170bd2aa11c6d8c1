"""Claiming rows for replay: the inbox, rows of other policies, due rows.

Every claim returns *narrow* rows (``dlqd.replay.rows.Candidate``), locked
``FOR UPDATE SKIP LOCKED`` so that replicas split them, never the payload.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from dlqd.db.connector import Connection, transaction, translated
from dlqd.db.queries import q

Row = dict[str, Any]


@translated
async def inbox_entries(conn: Connection, after_seq: int, limit: int) -> list[Row]:
    cur = await conn.execute(q("inbox_entries"), {"after_seq": after_seq, "limit": limit})
    return await cur.fetchall()


@translated
async def stale_entries(
    conn: Connection,
    fingerprint: str,
    after: tuple[str, UUID],
    below: str | None,
    limit: int,
) -> list[Row]:
    cur = await conn.execute(
        q("stale_entries"),
        {
            "fingerprint": fingerprint,
            "after_fingerprint": after[0],
            "after_id": after[1],
            "below": below,
            "limit": limit,
        },
    )
    return await cur.fetchall()


@translated
async def due_entries(
    conn: Connection,
    fingerprint: str,
    blocked_policies: Collection[str],
    blocked_pairs: Collection[tuple[str, str]],
    limit: int,
) -> list[Row]:
    cur = await conn.execute(
        q("due_entries"),
        {
            "fingerprint": fingerprint,
            "blocked_policies": sorted(blocked_policies),
            "blocked_pair_policies": [p for p, _ in blocked_pairs],
            "blocked_pair_apps": [a for _, a in blocked_pairs],
            "limit": limit,
        },
    )
    return await cur.fetchall()


@translated
async def next_due(conn: Connection, fingerprint: str) -> float | None:
    """Seconds until the next scheduled row is due (<= 0: due now; None: none)."""
    cur = await conn.execute(q("next_due"), {"fingerprint": fingerprint})
    row = await cur.fetchone()
    return None if row is None or row["seconds"] is None else float(row["seconds"])


@translated
async def lock_entries(
    conn: Connection, ids: Sequence[UUID], app_id: str | None = None
) -> list[Row]:
    """Rows named by id, narrow, locked (waiting for a batch in flight);
    ``app_id``: that tenant's rows only."""
    cur = await conn.execute(q("lock_entries"), {"ids": list(ids), "app_id": app_id})
    return await cur.fetchall()


@translated
async def relock(conn: Connection, ids: Collection[UUID], manual: bool) -> dict[UUID, datetime]:
    """Of ``ids``, the rows still pending (and, unless ``manual``, not parked
    meanwhile), locked again, with the server's now()."""
    if not ids:
        return {}
    cur = await conn.execute(q("relock_rows"), {"ids": sorted(ids), "manual": manual})
    return {row["id"]: row["db_now"] for row in await cur.fetchall()}


@translated
async def delete_inbox(conn: Connection, seqs: Sequence[int]) -> None:
    await conn.execute(q("delete_inbox"), {"seqs": list(seqs)})


@dataclass(frozen=True, slots=True)
class Swept:
    moved: int  # rows put into the inbox
    scanned: int  # pending rows looked at
    after: tuple[str | None, UUID | None]  # the page's last key (where the next one starts)


@translated
async def enqueue_orphans(
    conn: Connection,
    after: tuple[str | None, UUID | None],
    limit: int,
    *,
    statement_timeout: timedelta,
    lock_timeout: timedelta,
) -> Swept:
    """One page of the pending set after ``after``: its rows with neither inbox
    entry nor schedule go to the inbox, in a transaction of its own."""
    async with transaction(conn):
        await conn.execute(
            q("sweep_plans"),
            {"statement_timeout": _ms(statement_timeout), "lock_timeout": _ms(lock_timeout)},
        )
        cur = await conn.execute(
            q("enqueue_orphans"), {"after_dlq_at": after[0], "after_id": after[1], "limit": limit}
        )
        row = await cur.fetchone()
    assert row is not None  # noqa: S101 - an aggregate row always comes back
    return Swept(int(row["moved"]), int(row["scanned"]), (row["last_dlq_at"], row["last_id"]))


def _ms(value: timedelta) -> str:
    return f"{max(1, round(value.total_seconds() * 1000))}ms"


@translated
async def wake_listen(conn: Connection, worker: str) -> None:
    """Inserters notify from now on (this worker's row is fresh)."""
    await conn.execute(q("wake_listen"), {"worker": worker})


@translated
async def wake_drain(conn: Connection, worker: str) -> None:
    """This worker looks again by itself: inserters need not notify for it."""
    await conn.execute(q("wake_drain"), {"worker": worker})


@translated
async def inbox_writers(conn: Connection) -> list[str]:
    """Virtual transaction ids of the other sessions writing the inbox now."""
    cur = await conn.execute(q("inbox_writers"))
    row = await cur.fetchone()
    return list(row["vxids"]) if row else []


@translated
async def writers_running(conn: Connection, vxids: list[str]) -> int:
    cur = await conn.execute(q("writers_running"), {"vxids": vxids})
    row = await cur.fetchone()
    return int(row["n"]) if row else 0
