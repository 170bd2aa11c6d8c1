"""A small typed repository over ``job_dlq``."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg.types.json import Jsonb

from dlqd.errors import UsageError
from dlqd.models import DlqEntry, NewEntry
from dlqd.queries import q

Connection = psycopg.AsyncConnection[dict[str, Any]]


def encode_cursor(dlq_at: datetime, entry_id: UUID) -> str:
    """An opaque keyset cursor: the (dlq_at, id) of the last row of a page."""
    raw = json.dumps([dlq_at.isoformat(), str(entry_id)], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, UUID]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        dlq_at_text, id_text = json.loads(base64.urlsafe_b64decode(padded.encode()))
        dlq_at = datetime.fromisoformat(dlq_at_text)
        if dlq_at.tzinfo is None:
            raise ValueError("naive timestamp")
        return dlq_at, UUID(id_text)
    except (ValueError, TypeError, binascii.Error, json.JSONDecodeError):
        raise UsageError(
            "invalid cursor: pass the next_cursor printed by a previous page"
        ) from None


@dataclass(frozen=True, slots=True)
class Page:
    entries: list[DlqEntry]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class PendingFilter:
    app_id: str | None = None
    type: str | None = None
    error_reason: str | None = None


def parse_entry_id(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise UsageError(f"invalid id {text!r}: expected a UUID") from None


class Repository:
    """Domain calls over one connection; the caller owns the transaction."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    async def get(self, entry_id: UUID) -> DlqEntry | None:
        cur = await self.conn.execute(q("get_entry"), {"id": entry_id})
        row = await cur.fetchone()
        return DlqEntry.model_validate(row) if row else None

    async def insert(self, entry: NewEntry) -> DlqEntry:
        params = entry.model_dump()
        params["payload"] = Jsonb(entry.payload)
        params["error_history"] = Jsonb(entry.error_history)
        cur = await self.conn.execute(q("insert_entry"), params)
        row = await cur.fetchone()
        return DlqEntry.model_validate(row)  # INSERT ... RETURNING always returns the row

    async def mark_replayed(self, entry_id: UUID) -> bool:
        """Set ``replayed_at``; False when the row is gone or was replayed already."""
        cur = await self.conn.execute(q("mark_replayed"), {"id": entry_id})
        return await cur.fetchone() is not None

    async def list_pending(
        self,
        limit: int,
        cursor: str | None = None,
        where: PendingFilter = PendingFilter(),
    ) -> Page:
        """One page of pending rows in (dlq_at, id) order, never by OFFSET."""
        if limit < 1:
            raise UsageError("limit must be at least 1")
        after_at, after_id = decode_cursor(cursor) if cursor else (None, None)
        cur = await self.conn.execute(
            q("list_pending"),
            {
                "after_dlq_at": after_at,
                "after_id": after_id,
                "app_id": where.app_id,
                "type": where.type,
                "error_reason": where.error_reason,
                # one extra row tells whether another page exists
                "limit": limit + 1,
            },
        )
        rows = await cur.fetchall()
        entries = [DlqEntry.model_validate(row) for row in rows[:limit]]
        next_cursor = None
        if len(rows) > limit:
            last = entries[-1]
            next_cursor = encode_cursor(last.dlq_at, last.id)
        return Page(entries=entries, next_cursor=next_cursor)
