"""The sweeper: rows that reached job_dlq without the insert trigger.

A restore with ``session_replication_role = replica`` or a disabled trigger
writes rows with no inbox entry and no notification. Every poll interval the
sweeper moves pending rows with neither inbox entry nor schedule into the
inbox and wakes the replayers.
"""

from __future__ import annotations

from collections.abc import Callable

from dlqd.config import Settings
from dlqd.db import claims
from dlqd.db.connector import Pool, pooled
from dlqd.services.base import PeriodicService
from dlqd.wake import Wakeup


class Sweeper(PeriodicService[int]):
    """``run_once()`` returns how many rows it moved into the inbox."""

    name = "sweeper"

    def __init__(self, pool: Pool, settings: Callable[[], Settings], wakeup: Wakeup) -> None:
        super().__init__()
        self.pool = pool
        self.settings = settings
        self.wakeup = wakeup

    def interval(self) -> float:
        return self.settings().listen.poll_interval.total_seconds()

    async def run_once(self) -> int:
        async with pooled(self.pool) as conn:
            moved = await claims.enqueue_orphans(conn)
        if moved:
            self.log.warning("rows found without an inbox entry", rows=moved)
            self.wakeup.set()
        return moved
