"""The replay worker: evaluates fresh rows by policy and replays due rows exactly once.

One pass (``run_once``) is a series of short transactions, one per page:

0. *express pages* (``dlqd.replay.express``) — new rows whose policy needs
   no Python are parked, scheduled or replayed by one statement per page;
   what they leave (or a page that failed) goes on to step 1;
1. *new rows* — entries of ``dlqd_inbox`` (written by the insert trigger), in
   insertion order, locked ``FOR UPDATE SKIP LOCKED``: each row is decided;
   rows due now replay in that same transaction, the others get a schedule
   row in ``dlqd_entry_state`` (waiting with ``due_at``, parked, unmatched);
2. on a full pass (at start, every poll interval, after a policy change), rows
   scheduled under other policies are decided again;
3. *due rows* — scheduled rows whose ``due_at`` has come, claimed the same way.

A replay runs the target, sets ``replayed_at`` and writes the replay log in one
transaction, so a row is replayed exactly once whatever the number of
replicas, and a crash or a cancelled batch leaves no row half-replayed.
Every transaction runs under ``replay.statement_timeout`` and
``replay.lock_timeout``; its outcome is counted and logged only after COMMIT.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import anyio
import psycopg
from anyio.abc import TaskGroup, TaskStatus
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from dlqd.backoff import Backoff
from dlqd.config import HttpTarget, Policy, Settings
from dlqd.db.queries import q
from dlqd.errors import DatabaseUnavailable, error_line
from dlqd.logs import get_logger
from dlqd.metrics import AGE_BUCKETS, Metrics
from dlqd.replay.admission import enforce_max_replays, replay_counts
from dlqd.replay.batch import (
    Batch,
    IsolationNeeded,
    Item,
    Outcome,
    StateRow,
    apply,
    set_replay_timeouts,
    settle_split,
)
from dlqd.replay.evaluate import DryRunLedger, evaluate, needs_replay_count
from dlqd.replay.express import ExpressPlan, plan, run_page
from dlqd.replay.http import HttpDeliverer, deliver_all, lease_seconds
from dlqd.replay.report import circuit_attempts, report, report_express
from dlqd.replay.rows import Candidate
from dlqd.throttle import Throttle
from dlqd.wake import WakeFlag

Connection = psycopg.AsyncConnection[dict[str, Any]]
log = get_logger("dlqd.replayer")

# errors after which a pass is abandoned and retried with backoff
TRANSIENT_ERRORS = (psycopg.OperationalError, DatabaseUnavailable, PoolTimeout)
# after a wake-up that found nothing to do, the next pass waits this long:
# a flood of notifications (from anyone: pg_notify needs no privilege) then
# costs at most one pass per interval, while real work never waits
SPURIOUS_WAKE_COALESCE = 0.05
# a row whose job another replica is replaying right now is due again this soon
CONTENDED_RETRY = timedelta(milliseconds=200)
# seconds a pass works before it looks at new rows again
PASS_BUDGET = 1.0

_NIL = UUID(int=0)
_MAX_UUID = UUID(int=2**128 - 1)


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


def _is_due(seconds: float | None) -> bool:
    return seconds is not None and seconds <= 0


Claim = Callable[[Connection], Awaitable[list[dict[str, Any]]]]


class Replayer:
    """Claims and replays rows; one instance per claiming worker."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        settings: Callable[[], Settings],
        metrics: Metrics,
        throttle: Throttle,
        stopping: anyio.Event,
        *,
        dry_runs: DryRunLedger | None = None,
        http: HttpDeliverer | None = None,
    ) -> None:
        self.pool = pool
        self.http = http if http is not None else HttpDeliverer()
        self.settings = settings
        self.metrics = metrics
        self.throttle = throttle
        self.stopping = stopping
        self.dry_runs = dry_runs if dry_runs is not None else DryRunLedger()
        # the next due time (monotonic) as last read, for the fingerprint it was read for
        self._next_due_at: tuple[str, float | None] | None = None
        # the express plan of the settings object it was made for
        self._express: tuple[Settings, ExpressPlan | None] | None = None
        # the last express page was full: a backlog, the next one will be too
        self._express_backlog = False
        # the http leg, beside the passes (set by run(); None: calls in line)
        self._lane: TaskGroup | None = None
        self._http_busy = False
        self._flag: WakeFlag | None = None
        # passes failed since the last one that succeeded (/readyz reports them)
        self.failures_in_a_row = 0
        self.last_error: str | None = None

    # ------------------------------------------------------------------ one pass

    async def run_once(self, *, full: bool = True) -> PassResult:
        """Evaluate new rows, replay due rows; report when to look again.

        ``full`` also re-evaluates rows scheduled under other policies (after a
        config change, or left by a replica running another config).
        """
        settings = self.settings()
        fingerprint = settings.policies_fingerprint
        result = PassResult()
        batch_size = settings.replay.batch_size
        # a pass looks at new rows first, and again at least every PASS_BUDGET:
        # a backlog of due rows (a tenant's huge ones, say) is worked through
        # in passes, never in front of the rows inserted meanwhile
        result.deadline = anyio.current_time() + PASS_BUDGET
        # one connection for the whole pass: each page is its own transaction
        async with self.pool.connection() as conn:
            after_seq = 0
            # the ordinary inbox pages: for what express left, and on every full pass
            rest = await self._express_pages(conn, settings, result) or full
            while rest and not self.stopping.is_set():
                rows = await self._page(conn, settings, self._inbox_claim(after_seq), result)
                if rows:
                    after_seq = int(rows[-1]["seq"])
                if len(rows) < batch_size or result.out_of_time():
                    break
            if full:
                # fingerprints below ours, then above: both index range scans
                ranges: list[tuple[tuple[str, UUID], str | None]] = [
                    (("", _NIL), fingerprint),
                    ((fingerprint, _MAX_UUID), None),
                ]
                for start, below in ranges:
                    after = start
                    while not self.stopping.is_set():
                        claim = self._stale_claim(fingerprint, after, below, batch_size)
                        rows = await self._page(conn, settings, claim, result)
                        if rows:
                            after = (rows[-1]["fingerprint"], rows[-1]["id"])
                        if len(rows) < batch_size:
                            break
            result.next_due_in = await self._due_in(conn, fingerprint, full or result.wrote_waiting)
            while not self.stopping.is_set() and _is_due(result.next_due_in):
                if result.out_of_time():
                    break
                claim = self._due_claim(settings, fingerprint, result)
                rows = await self._page(conn, settings, claim, result, due=True)
                if len(rows) < batch_size and not result.deferred:
                    result.next_due_in = await self._due_in(conn, fingerprint, True)
                    break
                result.deferred = False
            if full:
                # another replica may have opened (or closed) a circuit
                names = [p.name for p in settings.policies if p.action == "replay"]
                await self.throttle.read_circuits(conn, names, anyio.current_time())
        self._export_circuits()
        self.metrics.last_pass_success_timestamp_seconds.set(time.time())
        self.metrics.replayer_passes_total.inc()
        return result

    def _express_plan(self, settings: Settings) -> ExpressPlan | None:
        """The express plan for ``settings``, made once per settings object."""
        if self._express is None or self._express[0] is not settings:
            self._express = (settings, plan(settings, AGE_BUCKETS))
        return self._express[1]

    async def _express_pages(
        self, conn: Connection, settings: Settings, result: PassResult
    ) -> bool:
        """Replay the inbox's express rows (``dlqd.replay.express``), page by page;
        whether the ordinary inbox pages have work: entries an express page
        locked but left (rows express does not take), or a page that failed.
        Entries another replica held locked are that replica's to do."""
        express = self._express_plan(settings)
        if express is None:
            return True
        by_name = {p.name: p for p in express.policies.values()}
        after_seq = 0
        rest = False
        while not self.stopping.is_set():
            closed = await self.throttle.closed_circuits(conn, list(by_name), anyio.current_time())
            # an open circuit: its due rows take the ordinary path, which defers them
            replayable = [i for i, p in express.policies.items() if p.name in closed]
            started = anyio.current_time()
            try:
                page = await run_page(
                    conn,
                    express,
                    settings,
                    after_seq=after_seq,
                    replayable=replayable,
                    custom_plan=self._express_backlog,
                )
            except psycopg.Error as exc:
                if conn.broken:
                    raise
                # nothing of it happened (whatever the error: a bad row, a
                # timeout, a resource limit): the ordinary path does these rows
                # again, in smaller statements, and isolates the one that failed
                log.warning(
                    "express page failed: the ordinary path takes it", error=error_line(exc)
                )
                return True
            page.seconds = anyio.current_time() - started
            self._express_backlog = page.scanned >= settings.replay.batch_size
            if (page.scanned > page.claimed and page.claimed == 0) or result.out_of_time():
                # nothing of it was express's (or the pass's time is up): the
                # ordinary pages take the inbox from here, in insertion order
                return True
            result.claimed += page.claimed
            result.replayed += sum(rows for rows, _, _ in page.replayed.values())
            result.parked += sum(page.parked.values())
            result.scheduled += page.scheduled
            result.wrote_waiting = result.wrote_waiting or page.scheduled > 0
            rest = rest or page.scanned > page.claimed
            report_express(page, self.metrics, duration=page.seconds)
            await self._learn(conn, [(by_name[name], True, True) for name in page.replayed])
            if page.scanned < settings.replay.batch_size:
                return rest
            after_seq = page.last_seq
        return True

    async def _due_in(self, conn: Connection, fingerprint: str, read: bool) -> float | None:
        """Seconds until the next scheduled row is due. Read from Postgres unless
        nothing this replica wrote can have changed it (``read`` false): a pass
        that only replayed new rows at once then costs one round trip less.
        Rows other replicas schedule are theirs to wake for; a full pass (every
        poll interval) reads it again in any case."""
        now = anyio.current_time()
        cached = self._next_due_at
        if not read and cached is not None and cached[0] == fingerprint:
            return None if cached[1] is None else cached[1] - now
        seconds = await self._next_due(conn, fingerprint)
        self._next_due_at = (fingerprint, None if seconds is None else now + seconds)
        return seconds

    @staticmethod
    async def _next_due(conn: Connection, fingerprint: str) -> float | None:
        """Seconds until the next scheduled row is due (<= 0: due now; None: none)."""
        cur = await conn.execute(q("next_due"), {"fingerprint": fingerprint})
        row = await cur.fetchone()
        return None if row is None or row["seconds"] is None else float(row["seconds"])

    def _inbox_claim(self, after_seq: int) -> Claim:
        async def claim(conn: Connection) -> list[dict[str, Any]]:
            cur = await conn.execute(
                q("inbox_entries"),
                {"after_seq": after_seq, "limit": self.settings().replay.batch_size},
            )
            return await cur.fetchall()

        return claim

    @staticmethod
    def _stale_claim(
        fingerprint: str, after: tuple[str, UUID], below: str | None, limit: int
    ) -> Claim:
        async def claim(conn: Connection) -> list[dict[str, Any]]:
            cur = await conn.execute(
                q("stale_entries"),
                {
                    "fingerprint": fingerprint,
                    "after_fingerprint": after[0],
                    "after_id": after[1],
                    "below": below,
                    "limit": limit,
                },
            )
            return await cur.fetchall()

        return claim

    def _due_claim(self, settings: Settings, fingerprint: str, result: PassResult) -> Claim:
        blocked_policies, blocked_pairs = self._blocked(settings, anyio.current_time(), result)

        async def claim(conn: Connection) -> list[dict[str, Any]]:
            cur = await conn.execute(
                q("due_entries"),
                {
                    "fingerprint": fingerprint,
                    "blocked_policies": sorted(blocked_policies),
                    "blocked_pair_policies": [p for p, _ in blocked_pairs],
                    "blocked_pair_apps": [a for _, a in blocked_pairs],
                    "limit": settings.replay.batch_size,
                },
            )
            return await cur.fetchall()

        return claim

    async def _page(
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
            async with conn.transaction():
                # per transaction (SET LOCAL): a session setting would stay on
                # a pooler's server connection, not follow this one
                await set_replay_timeouts(conn, settings)
                rows = await claim(conn)
                if not rows:
                    return rows
                batch = await self._prepare(conn, rows, settings, result, due=due)
                http_items = self._lease(batch, defer=self._http_busy)
                optimistic = not isolate and len(rows) == 1
                outcome = await apply(conn, batch, settings, optimistic=optimistic)
        except IsolationNeeded:
            # nothing of that transaction happened: the same claim again, isolated
            return await self._page(conn, settings, claim, result, due=due, isolate=True)
        except psycopg.Error as exc:
            if conn.broken or batch is None:
                raise
            # the transaction failed as a whole (at COMMIT, say, or over a
            # resource limit): nothing of it happened; find the row responsible
            # by halves
            log.warning(
                "batch failed as a whole: retrying it in halves",
                error=error_line(exc),
                rows=len(batch.replay),
            )
            outcome = await settle_split(conn, batch, settings, exc)
        result.claimed += len(rows)
        self._tally(outcome, batch, result)
        await self._after_commit(conn, outcome, started)
        if batch is not None and http_items:
            if self._lane is None:  # a pass run on its own (tests): the calls in line
                await self._call_http(conn, settings, batch, http_items, result)
            else:
                # beside the replays, never in front of them: a slow receiver
                # holds up its own rows only
                self._http_busy = True
                self._lane.start_soon(self._deliver_in_lane, settings, batch, http_items)
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
        if defer:
            for item in http_items:
                assert item.policy is not None  # noqa: S101 - automatic replays have one
                batch.states[item.row.id] = StateRow(
                    "waiting",
                    item.policy.name,
                    due_at=item.due_at or batch.db_now,
                    failures=item.row.failures,
                    last_error=item.row.last_error,
                    last_failure_at=item.row.last_failure_at,
                )
            return []
        counts: dict[str, int] = {}
        for item in http_items:
            key = item.target.model_dump_json()
            counts[key] = counts.get(key, 0) + 1
        for item in http_items:
            assert isinstance(item.target, HttpTarget)  # noqa: S101 - filtered above
            assert item.policy is not None  # noqa: S101 - automatic replays have one
            lease = lease_seconds(item.target, counts[item.target.model_dump_json()])
            batch.states[item.row.id] = StateRow(
                "waiting",
                item.policy.name,
                due_at=batch.db_now + timedelta(seconds=lease),
                failures=item.row.failures,
                last_error=item.row.last_error,
                last_failure_at=item.row.last_failure_at,
            )
        return http_items

    async def _deliver_in_lane(self, settings: Settings, leased: Batch, items: list[Item]) -> None:
        """The calls for one page, on a connection of their own; the replayer
        hears when they are done (rows of http policies wait for that)."""
        try:
            async with self.pool.connection() as conn:
                await self._call_http(conn, settings, leased, items, PassResult())
        except Exception as exc:  # noqa: BLE001 - the rows stay leased: due again after it
            log.warning("http deliveries failed", error=error_line(exc), rows=len(items))
        finally:
            self._http_busy = False
            if self._flag is not None:
                self._flag.set()

    async def _call_http(
        self,
        conn: Connection,
        settings: Settings,
        leased: Batch,
        items: list[Item],
        result: PassResult,
    ) -> None:
        """Call, then record the answers in a second short transaction."""
        started = anyio.current_time()
        deliveries = await deliver_all(self.http, conn, items)
        batch = Batch(leased.fingerprint, leased.db_now, deliveries=deliveries)
        try:
            async with conn.transaction():
                await set_replay_timeouts(conn, settings)
                cur = await conn.execute(
                    q("relock_rows"), {"ids": [i.row.id for i in items], "manual": False}
                )
                locked = {row["id"]: row["db_now"] for row in await cur.fetchall()}
                if not locked:
                    return  # another replica took them over (an expired lease)
                batch.db_now = next(iter(locked.values()))
                batch.replay = [i for i in items if i.row.id in locked]
                outcome = await apply(conn, batch, settings)
        except psycopg.Error as exc:
            if conn.broken:
                raise
            outcome = await settle_split(conn, batch, settings, exc)
        self._tally(outcome, batch, result)
        await self._after_commit(conn, outcome, started)

    async def _after_commit(self, conn: Connection, outcome: Outcome, started: float) -> None:
        """Report a committed transaction, and let the shared circuits learn from it."""
        report(outcome, self.metrics, duration=anyio.current_time() - started)
        await self._learn(conn, circuit_attempts(outcome))

    async def _learn(self, conn: Connection, attempts: list[tuple[Policy, bool, bool]]) -> None:
        """Let the shared circuits learn from committed attempts."""
        if not attempts:
            return
        changes = await self.throttle.record(conn, attempts, anyio.current_time())
        for name, change in changes:
            if change == "opened":
                log.warning("circuit opened", policy=name)
            else:
                log.info("circuit closed", policy=name)
        self._export_circuits()

    def _export_circuits(self) -> None:
        for name, is_open in self.throttle.open_circuits().items():
            self.metrics.circuit_open.labels(name).set(1 if is_open else 0)

    @staticmethod
    def _tally(outcome: Outcome, batch: Batch | None, result: PassResult) -> None:
        if outcome.failed or (
            batch is not None and any(s.state == "waiting" for s in batch.states.values())
        ):
            result.wrote_waiting = True  # a delay, a retry, a lease or a throttled row
        result.replayed += len(outcome.replayed)
        result.failed += len(outcome.failed)
        result.parked += len(outcome.parked) + len(outcome.policy_parked)
        result.skipped += outcome.skipped
        for decision in outcome.decisions:
            if decision.outcome == "scheduled":
                result.scheduled += 1
            elif decision.outcome == "unmatched":
                result.unmatched += 1
            elif decision.outcome == "dry_run":
                result.dry_run += 1

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
            counts = await replay_counts(conn, keys, retention)
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
                assert item.policy is not None  # noqa: S101 - automatic replays have one
                batch.states[item.row.id] = StateRow(
                    "waiting",
                    item.policy.name,
                    due_at=item.due_at,
                    failures=item.row.failures,
                    last_error=item.row.last_error,
                    last_failure_at=item.row.last_failure_at,
                )
        batch.replay, contended = await enforce_max_replays(conn, admitted, batch, retention)
        for item in contended:
            # another replica is replaying a return of the same job: after it
            assert item.policy is not None  # noqa: S101 - max_replays comes from a policy
            batch.states[item.row.id] = StateRow(
                "waiting",
                item.policy.name,
                due_at=db_now + CONTENDED_RETRY,
                failures=item.row.failures,
                last_error=item.row.last_error,
                last_failure_at=item.row.last_failure_at,
            )
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
                if item.due_at is not None and item.policy is not None:
                    # a new row: scheduled as due (its inbox entry goes)
                    batch.states[item.row.id] = StateRow(
                        "waiting",
                        item.policy.name,
                        due_at=item.due_at,
                        failures=item.row.failures,
                        last_error=item.row.last_error,
                        last_failure_at=item.row.last_failure_at,
                    )
                continue
            kept.append(item)
            size += bytes_
        batch.replay = kept

    def _blocked(
        self, settings: Settings, now: float, result: PassResult
    ) -> tuple[set[str], set[tuple[str, str]]]:
        """Policies (and per-tenant buckets) that cannot replay right now, as far
        as this replica learned; their rows are left out of the claim, and
        ``result`` learns when the first may go again, so the loop sleeps that long."""
        names, pairs, wait = self.throttle.blocked(settings.policies, now)
        result.add_throttle(wait)
        if self._http_busy:
            # their rows are claimed once the calls in flight are done (a wake-up)
            names |= {
                p.name for p in settings.policies if isinstance(settings.target_for(p), HttpTarget)
            }
        return names, pairs

    # ------------------------------------------------------------------ the loop

    async def run(
        self,
        flag: WakeFlag,
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Replay until ``stopping`` is set; never let one failure end the loop.
        The http calls of a page run beside the passes, in a task group of
        their own, which the loop waits for when it stops."""
        self._flag = flag
        async with anyio.create_task_group() as lane:
            self._lane = lane
            try:
                await self._loop(flag, task_status)
            finally:
                self._lane = None

    async def _loop(self, flag: WakeFlag, task_status: TaskStatus[None]) -> None:
        backoff = Backoff(base=0.2, cap=15.0)
        last_full = -math.inf
        last_fingerprint = ""
        woken = False
        task_status.started()
        while not self.stopping.is_set():
            # Clear the wake-up *before* looking for work: a notification that
            # lands while the pass runs then leaves the flag set and the loop
            # goes round again at once instead of sleeping on it.
            flag.clear()
            settings = self.settings()
            poll = settings.listen.poll_interval.total_seconds()
            fingerprint = settings.policies_fingerprint
            started = anyio.current_time()
            # the periodic scan: at start, every poll interval, and when the policies change
            full = fingerprint != last_fingerprint or started - last_full >= poll
            idle = False
            try:
                result = await self.run_once(full=full)
                if full:
                    last_full, last_fingerprint = started, fingerprint
            except TRANSIENT_ERRORS as exc:
                wait = backoff.next()
                self._failed(exc)
                log.warning("replayer pass failed", error=error_line(exc), retry_in=round(wait, 3))
            except Exception as exc:  # one bad pass must not end the daemon
                wait = backoff.next()
                self._failed(exc)
                log.error(
                    "replayer pass failed",
                    error=error_line(exc),
                    error_type=type(exc).__name__,
                    retry_in=round(wait, 3),
                    exc_info=not isinstance(exc, psycopg.Error),
                )
            else:
                backoff.reset()
                self.failures_in_a_row, self.last_error = 0, None
                wait = self._next_wait(result, poll)
                idle = woken and result.claimed == 0
            if self.stopping.is_set():
                break
            woken = False
            with anyio.move_on_after(wait):
                if idle:
                    # a wake-up that found nothing: the wake-ups of the next
                    # interval coalesce into one pass
                    await anyio.sleep(SPURIOUS_WAKE_COALESCE)
                await flag.wait()
                woken = True
            cooldown = settings.replay.wake_cooldown.total_seconds()
            if woken and cooldown > 0:
                # a steady stream of single inserts: the wake-ups within the
                # cooldown share one pass (less CPU per row, that much latency)
                await anyio.sleep(max(0.0, started + cooldown - anyio.current_time()))

    def _failed(self, exc: BaseException) -> None:
        self.failures_in_a_row += 1
        self.last_error = error_line(exc)

    @staticmethod
    def _next_wait(result: PassResult, poll: float) -> float:
        if result.more:
            return 0.0
        wait = poll
        if result.next_due_in is not None:
            if result.next_due_in > 0:
                wait = min(wait, result.next_due_in)
            elif result.throttled_for is None:
                # due rows left that this pass could not claim (locked by another
                # replica's batch in flight): look again shortly
                wait = min(wait, 0.25)
        if result.throttled_for is not None:
            wait = min(wait, max(result.throttled_for, 0.01))
        return max(0.0, wait) if math.isfinite(wait) else poll
