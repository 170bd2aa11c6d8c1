"""One page of the ordinary path: claim, decide, admit, apply, in one transaction.

A page claims rows (``dlqd.db.claims``: new rows from the inbox, rows of
other policies, due rows), decides the new ones by policy
(``dlqd.replay.evaluate``), admits what the shared limits allow
(``dlqd.throttle``, ``dlqd.replay.admission``), keeps its replays within a
byte budget, runs them (``dlqd.replay.batch``) and commits; only then are the
outcomes reported. Its http rows are leased and handed to the http leg
(``dlqd.replay.lane``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import anyio

from dlqd.config import HttpTarget, Settings
from dlqd.db import replays
from dlqd.db.connector import Connection, transaction
from dlqd.errors import DatabaseError
from dlqd.logs import get_logger
from dlqd.replay.admission import enforce_max_replays
from dlqd.replay.batch import (
    Batch,
    IsolationNeeded,
    Item,
    StateRow,
    apply,
    set_replay_settings,
    settle_split,
)
from dlqd.replay.evaluate import DryRunLedger, evaluate, needs_replay_count
from dlqd.replay.http import lease_seconds
from dlqd.replay.lane import HttpLane
from dlqd.replay.report import Reporter
from dlqd.replay.result import PassResult
from dlqd.replay.rows import Candidate

log = get_logger("dlqd.replayer")

# a row whose job another replica is replaying right now is due again this soon
CONTENDED_RETRY = timedelta(milliseconds=200)

Claim = Callable[[Connection], Awaitable[list[dict[str, Any]]]]


class Pages:
    """Runs the ordinary path's pages for one worker."""

    def __init__(self, reporter: Reporter, lane: HttpLane, dry_runs: DryRunLedger) -> None:
        self.reporter = reporter
        self.throttle = reporter.throttle
        self.lane = lane
        self.dry_runs = dry_runs

    async def run(
        self,
        conn: Connection,
        settings: Settings,
        claim: Claim,
        result: PassResult,
        *,
        due: bool = False,
        isolate: bool = False,
    ) -> list[dict[str, Any]]:
        """One transaction: claim a page, decide, replay, write; report after COMMIT.

        A page of one row runs its target without a savepoint unless ``isolate``
        (see ``apply``); when that target fails, the page is done again isolated.
        """
        started = anyio.current_time()
        batch: Batch | None = None
        rows: list[dict[str, Any]] = []
        http_items: list[Item] = []
        try:
            async with transaction(conn):
                # per transaction (SET LOCAL): a session setting would stay on
                # a pooler's server connection, not follow this one
                await set_replay_settings(conn, settings)
                rows = await claim(conn)
                if not rows:
                    return rows
                batch = await self._prepare(conn, rows, settings, result, due=due)
                http_items = self._lease(batch, defer=self.lane.busy)
                optimistic = not isolate and len(rows) == 1
                outcome = await apply(conn, batch, settings, optimistic=optimistic)
        except IsolationNeeded:
            # nothing of that transaction happened: the same claim again, isolated
            return await self.run(conn, settings, claim, result, due=due, isolate=True)
        except DatabaseError as exc:
            if exc.broken or batch is None:
                raise
            # the transaction failed as a whole (at COMMIT, say, or over a
            # resource limit): nothing of it happened; find the row responsible
            # by halves
            log.warning(
                "batch failed as a whole: retrying it in halves",
                error=str(exc),
                rows=len(batch.replay),
            )
            outcome = await settle_split(conn, batch, settings, exc)
        result.claimed += len(rows)
        result.tally(outcome, batch)
        await self.reporter.committed(conn, outcome, started)
        if batch is not None and http_items:
            await self.lane.submit(conn, settings, batch, http_items, result)
        return rows

    @staticmethod
    def _lease(batch: Batch, *, defer: bool = False) -> list[Item]:
        """Take the http items out of the transaction: their rows are leased
        (due again only after the calls could have ended), called after COMMIT.
        ``defer``: the calls of an earlier page are still running: the rows are
        scheduled as due instead, for a page once those are done."""
        http_items = [i for i in batch.replay if isinstance(i.target, HttpTarget)]
        if not http_items:
            return []
        batch.replay = [i for i in batch.replay if not isinstance(i.target, HttpTarget)]
        counts: dict[str, int] = {}
        for item in http_items:
            key = item.target.model_dump_json()
            counts[key] = counts.get(key, 0) + 1
        for item in http_items:
            assert isinstance(item.target, HttpTarget)  # noqa: S101 - filtered above
            if defer:
                _schedule(batch, item, item.due_at or batch.db_now)
            else:
                lease = lease_seconds(item.target, counts[item.target.model_dump_json()])
                _schedule(batch, item, batch.db_now + timedelta(seconds=lease))
        return [] if defer else http_items

    async def _prepare(
        self,
        conn: Connection,
        rows: list[dict[str, Any]],
        settings: Settings,
        result: PassResult,
        *,
        due: bool,
    ) -> Batch:
        """Decide (new and stale rows) or look up (due rows), then admit."""
        db_now: datetime = rows[0]["db_now"]
        batch = Batch(settings.policies_fingerprint, db_now)
        candidates = [Candidate.from_row(row) for row in rows]
        retention = settings.purge.log_retention
        if due:
            by_name = {p.name: p for p in settings.policies}
            for row in candidates:
                policy = by_name.get(row.scheduled_policy or "")
                target = settings.target_for(policy) if policy else None
                if row.problem is not None:
                    batch.park(row, row.scheduled_policy, "invalid_row", row.problem)
                elif policy is not None and target is not None:
                    batch.replay.append(Item(row, policy, target))
        else:
            keys = needs_replay_count(candidates, settings.policies)
            counts = await replays.replay_counts(conn, keys, retention)
            evaluate(candidates, settings, counts, batch, self.dry_runs)

        self._fit_bytes(batch, settings.replay.batch_bytes, result)
        trial_lease = settings.replay.statement_timeout + timedelta(seconds=5)
        admitted, deferred, wait = await self.throttle.admit(
            conn, batch.replay, anyio.current_time(), trial_lease=trial_lease
        )
        result.add_throttle(wait)
        for item in deferred:
            if item.due_at is not None:
                # a new row held back by the throttle: scheduled as due, claimed once it allows
                _schedule(batch, item, item.due_at)
        batch.replay, contended = await enforce_max_replays(conn, admitted, batch, retention)
        for item in contended:
            # another replica is replaying a return of the same job: after it
            _schedule(batch, item, db_now + CONTENDED_RETRY)
        return batch

    @staticmethod
    def _fit_bytes(batch: Batch, budget: int, result: PassResult) -> None:
        """Keep the page's replays within ``budget`` stored bytes (the first one
        always); the rest are due again at once, for the next pages: a page of
        a tenant's huge rows takes one of them at a time, not all of them."""
        kept: list[Item] = []
        size = 0
        for item in batch.replay:
            bytes_ = 0 if isinstance(item.target, HttpTarget) else item.row.row_bytes
            if kept and size + bytes_ > budget:
                result.deferred = True
                if item.due_at is not None:
                    _schedule(batch, item, item.due_at)  # a new row: its inbox entry goes
                continue
            kept.append(item)
            size += bytes_
        batch.replay = kept

    def blocked(
        self, settings: Settings, now: float, result: PassResult
    ) -> tuple[set[str], set[tuple[str, str]]]:
        """Policies (and per-tenant buckets) that cannot replay right now, as far
        as this replica learned; their rows are left out of the claim, and
        ``result`` learns when the first may go again, so the loop sleeps that long."""
        names, pairs, wait = self.throttle.blocked(settings.policies, now)
        result.add_throttle(wait)
        if self.lane.busy:
            # their rows are claimed once the calls in flight are done (a wake-up)
            names |= {
                p.name for p in settings.policies if isinstance(settings.target_for(p), HttpTarget)
            }
        return names, pairs


def _schedule(batch: Batch, item: Item, due_at: datetime) -> None:
    """``item``'s row waits for ``due_at`` under its policy (failure history kept)."""
    assert item.policy is not None  # noqa: S101 - the daemon's replays have one
    batch.states[item.row.id] = StateRow.of(item.row, "waiting", item.policy.name, due_at)
