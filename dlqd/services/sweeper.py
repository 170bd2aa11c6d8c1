"""The sweep: rows that reached job_dlq without the insert trigger.

A restore with ``session_replication_role = replica`` or a disabled trigger
writes rows with no inbox entry and no notification; no trigger counts them
either, so the leader's reconciliation of the counts finds them
(:mod:`dlqd.services.counter`) and has the sweep walk the pending set in keyset
pages (each row probed in two indexes: no plan can make it quadratic), for at
most ``RUN_BUDGET`` seconds a round, going on from where it stopped in the
next round, until it reached the end (``finished``); the rows with neither
inbox entry nor schedule go into the inbox, and the replayers wake. Nothing
walks the pending set while the counts say nothing is missing: ten million
parked rows cost no sweep.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from uuid import UUID

import anyio

from dlqd.config import Settings
from dlqd.db import claims
from dlqd.db.connector import Pool, pooled
from dlqd.services.base import PeriodicService
from dlqd.wake import Wakeup

#: pending rows a page of the sweep looks at
PAGE = 10_000
#: seconds a round sweeps before it lets the next round go on
RUN_BUDGET = 2.0
STATEMENT_TIMEOUT = timedelta(seconds=10)


class Sweeper(PeriodicService[int]):
    """``run_once()`` returns how many rows it moved into the inbox."""

    name = "sweeper"

    def __init__(self, pool: Pool, settings: Callable[[], Settings], wakeup: Wakeup) -> None:
        super().__init__()
        self.pool = pool
        self.settings = settings
        self.wakeup = wakeup
        # where the next page starts (None: the pending set's beginning)
        self.after: tuple[str | None, UUID | None] = (None, None)
        self.finished = False  # the last round reached the end of the pending set

    def interval(self) -> float:
        return self.settings().listen.poll_interval.total_seconds()

    async def run_once(self) -> int:
        settings = self.settings()
        moved = 0
        self.finished = False
        deadline = anyio.current_time() + RUN_BUDGET
        async with pooled(self.pool) as conn:
            while anyio.current_time() < deadline:
                page = await claims.enqueue_orphans(
                    conn,
                    self.after,
                    PAGE,
                    statement_timeout=STATEMENT_TIMEOUT,
                    lock_timeout=settings.replay.lock_timeout,
                )
                moved += page.moved
                if page.scanned < PAGE:
                    self.after = (None, None)  # the whole set swept: from the start next time
                    self.finished = True
                    break
                self.after = page.after
        if moved:
            self.log.warning("rows found without an inbox entry", rows=moved)
            self.wakeup.set()
        return moved
