"""What one replayer pass did, and when to look again."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import anyio

from dlqd.replay.batch import Batch, Outcome


@dataclass
class PassResult:
    claimed: int = 0  # rows this pass locked: 0 means the wake-up found nothing
    replayed: int = 0
    failed: int = 0
    parked: int = 0
    scheduled: int = 0
    unmatched: int = 0
    dry_run: int = 0
    skipped: int = 0
    # seconds until the throttle lets a blocked policy go again (None: nothing blocked)
    throttled_for: float | None = None
    # seconds until the next scheduled row is due (None: none waiting)
    next_due_in: float | None = None
    # this pass wrote a waiting schedule row (a delay, a retry, a lease, a
    # throttled row): the next due time must be read again
    wrote_waiting: bool = False
    # monotonic time after which the pass starts no new page (``more`` then)
    deadline: float = math.inf
    # the pass stopped with work left: the next one starts at once
    more: bool = False
    # the last page left due rows over its byte budget: more pages follow
    deferred: bool = False

    @property
    def progressed(self) -> int:
        """Rows whose state this pass changed (not those it only looked at:
        dry runs, rows skipped)."""
        return self.replayed + self.failed + self.parked + self.scheduled + self.unmatched

    def out_of_time(self) -> bool:
        if anyio.current_time() < self.deadline:
            return False
        self.more = True
        return True

    def add_throttle(self, seconds: float | None) -> None:
        if seconds is None:
            return
        self.throttled_for = (
            seconds if self.throttled_for is None else min(self.throttled_for, seconds)
        )

    def tally(self, outcome: Outcome, batch: Batch | None) -> None:
        """Count a committed transaction's outcome."""
        if outcome.failed or (
            batch is not None and any(s.state == "waiting" for s in batch.states.values())
        ):
            self.wrote_waiting = True  # a delay, a retry, a lease or a throttled row
        self.replayed += len(outcome.replayed)
        self.failed += len(outcome.failed)
        self.parked += len(outcome.parked) + len(outcome.policy_parked)
        self.skipped += outcome.skipped
        for decision in outcome.decisions:
            if decision.outcome == "scheduled":
                self.scheduled += 1
            elif decision.outcome == "unmatched":
                self.unmatched += 1
            elif decision.outcome == "dry_run":
                self.dry_run += 1


@dataclass
class ExpressPage:
    """What one committed express page did."""

    scanned: int  # inbox entries this page locked
    last_seq: int
    claimed: int  # of those, rows done here (the others are the ordinary path's)
    # policy name -> (rows, {age bucket index: rows}, sum of ages in seconds)
    replayed: dict[str, tuple[int, dict[int, int], float]] = field(default_factory=dict)
    parked: dict[str, int] = field(default_factory=dict)  # by a park policy
    scheduled: int = 0  # waiting schedule rows written
    seconds: float = 0.0
