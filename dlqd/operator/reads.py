"""What an operator reads: status, a page of rows, one row with its history.

Answers come from what the daemon recorded in Postgres (waiting, parked with
its reason, unmatched, new), so they are the same with or without a config.
Rows are rendered by Postgres as JSON text: no payload is decoded here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from dlqd.db import entries
from dlqd.db.connector import Connection
from dlqd.db.entries import Page
from dlqd.filters import PendingFilter
from dlqd.status import Status, collect_status

__all__ = ["Page", "Shown", "list_rows", "show", "status"]


async def status(conn: Connection) -> Status:
    """Pending, parked, unmatched and oldest age, by group."""
    return await collect_status(conn)


async def list_rows(
    conn: Connection,
    limit: int,
    cursor: str | None = None,
    where: PendingFilter | None = None,
    *,
    documents: bool = True,
) -> Page:
    """A keyset page of pending rows; ``documents``: each as JSON text too
    (payload included), else only what a table shows."""
    return await entries.Repository(conn).list_pending(limit, cursor, where, documents=documents)


@dataclass(frozen=True, slots=True)
class Shown:
    """One row (``document``: every column as JSON text; the columns as text
    for a human) and its replay history."""

    row: dict[str, Any]
    replays: list[dict[str, Any]]

    @property
    def document(self) -> str:
        return str(self.row["document"])


async def show(conn: Connection, entry_id: UUID) -> Shown | None:
    row = await entries.document(conn, entry_id)
    if row is None:
        return None
    history = await entries.history(conn, entry_id)
    replays = [
        {k: h[k] for k in ("at", "policy", "outcome", "error", "actor", "reason")} for h in history
    ]
    return Shown(row, replays)
