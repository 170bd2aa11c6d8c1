"""The counter (leader only): keeps the counts of what is pending and held.

Triggers append every change as a delta, in the transaction that makes it
(migration 012); a single-row insert's inbox entry counts its row itself
until it is taken (023). Every ``metrics.refresh_interval`` the counter folds
the deltas into ``dlqd_counts``, so that a read sums few rows, after adopting
the uncounted entries that the last interval left in the inbox. Every
``metrics.reconcile_interval`` (and at least a hundred times its own last
duration apart, so that it costs at most 1% of a database core however large
the table grows) it reconciles the counts with the table in one snapshot:
what no trigger saw (a restore with triggers off, an UPDATE by another role)
is corrected, and reported (``dlqd_count_corrections_total``). Pending rows it
finds that no trigger counted may also lack an inbox entry: then the sweep
(:class:`dlqd.services.sweeper.Sweeper`) walks the pending set and moves them
to the inbox. The first reconciliation of a database (after the upgrade that
brought the counts) is the baseline, not drift.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio

from dlqd.config import Settings
from dlqd.db import counts
from dlqd.db.connector import Pool, pooled
from dlqd.metrics import Metrics
from dlqd.services.base import PeriodicService
from dlqd.services.sweeper import Sweeper

#: reconciliations are at least this many times their own duration apart
COST_FACTOR = 100


@dataclass(frozen=True, slots=True)
class Counted:
    folded: int
    corrected: dict[str, int] | None  # None: no reconciliation this round
    swept: int


class Counter(PeriodicService[Counted]):
    name = "counter"

    def __init__(
        self, pool: Pool, settings: Callable[[], Settings], metrics: Metrics, sweeper: Sweeper
    ) -> None:
        super().__init__()
        self.pool = pool
        self.settings = settings
        self.metrics = metrics
        self.sweeper = sweeper
        self.next_reconcile = 0.0  # at once, once leader
        self.sweep_pending = False

    def interval(self) -> float:
        return self.settings().metrics.refresh_interval.total_seconds()

    async def run_once(self) -> Counted:
        settings = self.settings()
        corrected: dict[str, int] | None = None
        async with pooled(self.pool) as conn:
            folded = await counts.fold(conn)
            if anyio.current_time() >= self.next_reconcile:
                baseline = not await counts.ready(conn)
                started = anyio.current_time()
                corrected = await counts.reconcile(conn)
                took = anyio.current_time() - started
                self.next_reconcile = anyio.current_time() + max(
                    settings.metrics.reconcile_interval.total_seconds(), COST_FACTOR * took
                )
                self.metrics.counts_reconciled_timestamp_seconds.set(time.time())
                if baseline:
                    self.log.info("counts reconciled: the baseline", rows=sum(corrected.values()))
                    self.sweep_pending = True  # rows from before the counts: any orphans?
                elif corrected:
                    for kind, n in corrected.items():
                        self.metrics.count_corrections_total.labels(_family(kind)).inc(n)
                    self.log.warning(
                        "counts corrected: rows changed that no trigger saw (a restore with "
                        "triggers off, or an update by another role)",
                        corrected=corrected,
                        seconds=round(took, 3),
                    )
                    if corrected.get("pending"):
                        self.sweep_pending = True
                if corrected:
                    await counts.fold(conn)
        swept = 0
        if self.sweep_pending:
            swept = await self.sweeper.run_once()
            self.sweep_pending = not self.sweeper.finished
        return Counted(folded, corrected, swept)


def _family(kind: str) -> str:
    """A kind as a label: pending, waiting, unmatched or parked (the why is not a series)."""
    return "parked" if kind.startswith("parked:") else kind
