"""``dlqd purge``: one purge pass now, as the leader's scheduled one does."""

from __future__ import annotations

from dlqd import purge as batches
from dlqd.config import Settings
from dlqd.db.connector import Connection


async def purge(conn: Connection, settings: Settings, *, dry_run: bool = False) -> int:
    """Rows deleted (with ``dry_run``: the rows it would delete)."""
    if dry_run:
        return await batches.count(conn, settings)
    return (await batches.purge_rows(conn, settings)).deleted
