"""Reading and writing ``job_dlq`` rows for operators: the typed repository
(DESIGN section 2), the documents ``show`` and ``list`` print, status, and
parking by hand.

Rows for operators are rendered by Postgres (``document``: the row as JSON
text): the daemon never decodes a payload, nor a timestamp Python cannot hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from psycopg.types.json import Jsonb

from dlqd.db.connector import Connection, translated
from dlqd.db.queries import q
from dlqd.errors import DatabaseError, UsageError
from dlqd.filters import PendingFilter, decode_cursor, encode_cursor
from dlqd.models import DlqEntry, NewEntry

Row = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Page:
    """One page of pending rows, each rendered by Postgres as JSON text."""

    rows: list[Row]
    next_cursor: str | None


class Repository:
    """Typed calls over one connection; the caller owns the transaction."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    async def get(self, entry_id: UUID) -> DlqEntry | None:
        row = await _one(self.conn, "get_entry", {"id": entry_id})
        return DlqEntry.model_validate(row) if row else None

    async def insert(self, entry: NewEntry) -> DlqEntry:
        params = entry.model_dump()
        params["payload"] = Jsonb(entry.payload)
        params["error_history"] = Jsonb(entry.error_history)
        row = await _one(self.conn, "insert_entry", params)
        return DlqEntry.model_validate(row)  # INSERT ... RETURNING always returns the row

    async def mark_replayed(self, entry_id: UUID) -> bool:
        """Set ``replayed_at``; False when the row is gone or was replayed already."""
        return await _one(self.conn, "mark_replayed", {"id": entry_id}) is not None

    async def list_pending(
        self,
        limit: int,
        cursor: str | None = None,
        where: PendingFilter | None = None,
        *,
        documents: bool = True,
    ) -> Page:
        """One page of pending rows in (dlq_at, id) order, never by OFFSET.

        ``documents``: each row also as JSON text (every column, the payload
        included); without, only what a table of rows shows.
        """
        if limit < 1:
            raise UsageError("limit must be at least 1")
        after_at, after_id = decode_cursor(cursor) if cursor else (None, None)
        params = {
            "after_dlq_at": after_at,
            "after_id": after_id,
            **(where or PendingFilter()).params(),
            "documents": documents,
            # one extra row tells whether another page exists
            "limit": limit + 1,
        }
        try:
            rows = await _all(self.conn, "list_pending", params)
        except DatabaseError as exc:
            if exc.sqlstate is not None and exc.sqlstate.startswith("22"):
                # a cursor that decodes but whose timestamp Postgres does not accept
                raise UsageError(
                    "invalid cursor: pass the next_cursor printed by a previous page"
                ) from None
            raise
        page = rows[:limit]
        next_cursor = None
        if len(rows) > limit:
            next_cursor = encode_cursor(page[-1]["dlq_at"], page[-1]["id"])
        return Page(rows=page, next_cursor=next_cursor)


@translated
async def _one(conn: Connection, name: str, params: dict[str, Any] | None = None) -> Row | None:
    cur = await conn.execute(q(name), params)
    return await cur.fetchone()


@translated
async def _all(conn: Connection, name: str, params: dict[str, Any] | None = None) -> list[Row]:
    cur = await conn.execute(q(name), params)
    return await cur.fetchall()


async def document(conn: Connection, entry_id: UUID) -> Row | None:
    """One row rendered for ``show``: ``document`` (JSON text) and columns as text."""
    return await _one(conn, "entry_document", {"id": entry_id})


async def history(conn: Connection, entry_id: UUID) -> list[Row]:
    """The row's replay log, oldest first."""
    return await _all(conn, "replay_history", {"id": entry_id})


async def narrow(conn: Connection, entry_id: UUID) -> Row | None:
    """One row as a policy sees it, with its recorded state (``explain``)."""
    return await _one(conn, "entry_narrow", {"id": entry_id})


async def pending_ids(
    conn: Connection, where: PendingFilter, after: tuple[str | None, UUID | None], limit: int
) -> list[Row]:
    """A keyset page of the pending rows a filter selects: (id, dlq_at text)."""
    return await _all(
        conn,
        "pending_ids",
        {"after_dlq_at": after[0], "after_id": after[1], **where.params(), "limit": limit},
    )


async def count_pending(conn: Connection, where: PendingFilter) -> int:
    row = await _one(conn, "count_pending", where.params())
    return int(row["n"]) if row else 0


async def status_groups(conn: Connection) -> list[Row]:
    return await _all(conn, "status_groups")


async def status_held(conn: Connection) -> list[Row]:
    return await _all(conn, "status_held")


async def park(
    conn: Connection, ids: Sequence[UUID], actor: str | None, reason: str | None
) -> list[UUID]:
    """Park pending rows by hand (sticky, like a park by event), logged; the ids parked."""
    rows = await _all(conn, "park_entries", {"ids": list(ids), "actor": actor, "reason": reason})
    return [row["id"] for row in rows]


async def unpark(
    conn: Connection, ids: Sequence[UUID], actor: str | None, reason: str | None
) -> list[UUID]:
    """Unpark rows (parked by hand or by an event): their schedule row goes, and
    they are decided again as new rows; logged. The ids unparked."""
    rows = await _all(conn, "unpark_entries", {"ids": list(ids), "actor": actor, "reason": reason})
    return [row["id"] for row in rows]
