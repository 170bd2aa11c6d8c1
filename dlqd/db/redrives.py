"""Redrives in Postgres (``dlqd_redrives``): created, listed, claimed under a
lease, advanced chunk by chunk in the chunk's own transaction, finished or
cancelled. See :mod:`dlqd.operator.redrive` for what a redrive is."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import UUID

from psycopg.types.json import Jsonb

from dlqd.db.connector import Connection, required, translated
from dlqd.db.queries import q

Row = dict[str, Any]


@translated
async def db_now(conn: Connection) -> str:
    cur = await conn.execute(q("db_now"))
    return str(required(await cur.fetchone(), "now()")["now"])


@translated
async def create(
    conn: Connection,
    *,
    filter: dict[str, Any],
    scope: str | None,
    via: str | None,
    reason: str | None,
    actor: str,
    rate: float | None,
    matched: int,
    until: str,
) -> Row:
    cur = await conn.execute(
        q("redrive_create"),
        {
            "filter": Jsonb(filter),
            "scope": scope,
            "via": via,
            "reason": reason,
            "actor": actor,
            "rate": rate,
            "matched": matched,
            "until": until,
        },
    )
    return required(await cur.fetchone(), "a new redrive")


@translated
async def listed(conn: Connection, limit: int) -> list[Row]:
    cur = await conn.execute(q("redrive_list"), {"limit": limit})
    return await cur.fetchall()


@translated
async def get(conn: Connection, redrive_id: UUID) -> Row | None:
    cur = await conn.execute(q("redrive_get"), {"id": redrive_id})
    return await cur.fetchone()


@translated
async def claim(conn: Connection, owner: str, ttl: timedelta) -> Row | None:
    cur = await conn.execute(q("redrive_claim"), {"owner": owner, "ttl": ttl})
    return await cur.fetchone()


@translated
async def progress(
    conn: Connection,
    redrive_id: UUID,
    owner: str,
    ttl: timedelta,
    *,
    replayed: int,
    failed: int,
    skipped: int,
    cursor: tuple[str, UUID] | None,
) -> bool:
    """Count a part of a chunk and move the cursor, in its transaction; False
    when this replica no longer holds the redrive (the caller rolls back)."""
    cur = await conn.execute(
        q("redrive_progress"),
        {
            "id": redrive_id,
            "owner": owner,
            "ttl": ttl,
            "replayed": replayed,
            "failed": failed,
            "skipped": skipped,
            "cursor_at": cursor[0] if cursor else None,
            "cursor_id": cursor[1] if cursor else None,
        },
    )
    return await cur.fetchone() is not None


@translated
async def renew(conn: Connection, redrive_id: UUID, owner: str, ttl: timedelta) -> bool | None:
    """Extend the lease; whether a cancel was asked for (None: the lease is lost)."""
    cur = await conn.execute(q("redrive_renew"), {"id": redrive_id, "owner": owner, "ttl": ttl})
    row = await cur.fetchone()
    return None if row is None else bool(row["cancel_requested"])


@translated
async def finish(
    conn: Connection, redrive_id: UUID, owner: str, state: str, error: str | None = None
) -> Row | None:
    cur = await conn.execute(
        q("redrive_finish"), {"id": redrive_id, "owner": owner, "state": state, "error": error}
    )
    return await cur.fetchone()


@translated
async def cancel(conn: Connection, redrive_id: UUID) -> Row | None:
    cur = await conn.execute(q("redrive_cancel"), {"id": redrive_id})
    return await cur.fetchone()


@translated
async def release(conn: Connection, redrive_id: UUID, owner: str) -> None:
    """End this replica's lease on a redrive it leaves running: another resumes it now."""
    await conn.execute(q("redrive_release"), {"id": redrive_id, "owner": owner})
