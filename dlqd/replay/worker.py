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
from collections.abc import Callable
from typing import Any
from uuid import UUID

import anyio
from anyio.abc import TaskStatus

from dlqd.backoff import Backoff
from dlqd.config import Settings
from dlqd.db import claims
from dlqd.db.connector import Connection, HeldConnection, Pool, pooled
from dlqd.errors import ConnectionLost, DatabaseError, DatabaseUnavailable, error_line
from dlqd.logs import get_logger
from dlqd.metrics import Metrics
from dlqd.replay.evaluate import DryRunLedger
from dlqd.replay.express import ExpressPages
from dlqd.replay.http import HttpDeliverer
from dlqd.replay.lane import HttpLane
from dlqd.replay.pages import Claim, Pages
from dlqd.replay.presence import (
    BEAT,
    DRAIN_INTERVAL,
    DRAIN_INTERVAL_MAX,
    DRAIN_ROWS,
    LINGER,
    Presence,
)
from dlqd.replay.report import Reporter
from dlqd.replay.result import PassResult
from dlqd.replay.targets import learn_server_forms, per_row_statements
from dlqd.throttle import Throttle
from dlqd.wake import WakeFlag

log = get_logger("dlqd.replayer")

# errors after which a pass is abandoned and retried with backoff
TRANSIENT_ERRORS = (ConnectionLost, DatabaseUnavailable)
# after a wake-up that found nothing to do, the next pass waits this long:
# a flood of notifications (from anyone: pg_notify needs no privilege) then
# costs at most one pass per interval, while real work never waits
SPURIOUS_WAKE_COALESCE = 0.05
# seconds a pass works before it looks at new rows again
PASS_BUDGET = 1.0

_NIL = UUID(int=0)
_MAX_UUID = UUID(int=2**128 - 1)


def _is_due(seconds: float | None) -> bool:
    return seconds is not None and seconds <= 0


class Replayer:
    """Claims and replays rows; one instance per claiming worker."""

    def __init__(
        self,
        pool: Pool,
        settings: Callable[[], Settings],
        metrics: Metrics,
        throttle: Throttle,
        stopping: anyio.Event,
        *,
        dry_runs: DryRunLedger | None = None,
        http: HttpDeliverer | None = None,
        worker: str | None = None,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.metrics = metrics
        self.throttle = throttle
        self.stopping = stopping
        self.reporter = Reporter(metrics, throttle)
        self.lane = HttpLane(
            pool, http if http is not None else HttpDeliverer(), self.reporter, done=self._wake
        )
        self.pages = Pages(
            self.reporter, self.lane, dry_runs if dry_runs is not None else DryRunLedger()
        )
        self.express = ExpressPages(self.reporter)
        # the loop's connection, kept from one pass to the next (see run)
        self.held: HeldConnection | None = None
        # the next due time (monotonic) as last read, for the fingerprint it was read for
        self._next_due_at: tuple[str, float | None] | None = None
        self._flag: WakeFlag | None = None
        # passes failed since the last one that succeeded (/readyz reports them)
        self.failures_in_a_row = 0
        self.last_error: str | None = None
        # whether inserters notify this worker (a row while it listens; none
        # while it drains); no name, or no LISTEN: never a row
        self.presence = Presence(
            pool, worker or "", enabled=worker is not None and settings().listen.enabled
        )
        self.draining = False
        self.drain_wait = DRAIN_INTERVAL  # between the passes of a drain
        self.quiet_since: float | None = None  # the drain's passes found few rows since

    def _wake(self) -> None:
        if self._flag is not None:
            self._flag.set()

    # ------------------------------------------------------------------ one pass

    async def run_once(self, *, full: bool = True) -> PassResult:
        """Evaluate new rows, replay due rows; report when to look again.

        ``full`` also re-evaluates rows scheduled under other policies (after a
        config change, or left by a replica running another config).
        """
        settings = self.settings()
        fingerprint = settings.policies_fingerprint
        result = PassResult()
        size = settings.replay.batch_size
        # a pass looks at new rows first, and again at least every PASS_BUDGET:
        # a backlog of due rows (a tenant's huge ones, say) is worked through
        # in passes, never in front of the rows inserted meanwhile
        result.deadline = anyio.current_time() + PASS_BUDGET
        # one connection for the whole pass: each page is its own transaction
        connection = pooled(self.pool) if self.held is None else self.held.connection()
        async with connection as conn:
            # per-row statements not seen yet: does their in-server form plan?
            await learn_server_forms(conn, per_row_statements(settings))
            # the ordinary inbox pages: for what express left, and on every full pass
            rest = await self.express.run(conn, settings, result, self.stopping) or full
            after_seq = 0
            while rest and not self.stopping.is_set():
                rows = await self.pages.run(conn, settings, _inbox(after_seq, size), result)
                if rows:
                    after_seq = int(rows[-1]["seq"])
                if len(rows) < size or result.out_of_time():
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
                        claim = _stale(fingerprint, after, below, size)
                        rows = await self.pages.run(conn, settings, claim, result)
                        if rows:
                            after = (rows[-1]["fingerprint"], rows[-1]["id"])
                        if len(rows) < size:
                            break
            result.next_due_in = await self._due_in(conn, fingerprint, full or result.wrote_waiting)
            while not self.stopping.is_set() and _is_due(result.next_due_in):
                if result.out_of_time():
                    break
                claim = self._due(settings, fingerprint, result)
                rows = await self.pages.run(conn, settings, claim, result, due=True)
                if len(rows) < size and not result.deferred:
                    result.next_due_in = await self._due_in(conn, fingerprint, True)
                    break
                result.deferred = False
            if full:
                # another replica may have opened (or closed) a circuit
                names = [p.name for p in settings.policies if p.action == "replay"]
                await self.throttle.read_circuits(conn, names, anyio.current_time())
        self.reporter.export_circuits()
        self.metrics.last_pass_success_timestamp_seconds.set(time.time())
        self.metrics.replayer_passes_total.inc()
        return result

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
        seconds = await claims.next_due(conn, fingerprint)
        self._next_due_at = (fingerprint, None if seconds is None else now + seconds)
        return seconds

    def _due(self, settings: Settings, fingerprint: str, result: PassResult) -> Claim:
        blocked, pairs = self.pages.blocked(settings, anyio.current_time(), result)
        size = settings.replay.batch_size

        async def claim(conn: Connection) -> list[dict[str, Any]]:
            return await claims.due_entries(conn, fingerprint, blocked, pairs, size)

        return claim

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
        # passes follow each other closely in a trickle (one per row): they
        # keep their connection rather than take one from the pool each time
        self.held = HeldConnection(self.pool)
        async with anyio.create_task_group() as tasks:
            self.lane.tasks = tasks
            try:
                await self._loop(flag, task_status)
            finally:
                self.lane.tasks = None
                await self.held.release()
                self.held = None
                await self.presence.leave()

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
                if not self.presence.listening and not self.draining:
                    # inserters notify from now on; while those in flight
                    # (their NOTIFY perhaps skipped) run, look by itself
                    await self.presence.listen()
                    self.draining = bool(self.presence.writers)
                    self._drain_from_start()
                result = await self.run_once(full=full)
                if full:
                    last_full, last_fingerprint = started, fingerprint
                await self._drain_or_listen(result, flag)
            except TRANSIENT_ERRORS as exc:
                wait = backoff.next()
                # put the row back once it works again
                self.presence.listening = self.draining = False
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
                    exc_info=not isinstance(exc, DatabaseError),
                )
            else:
                backoff.reset()
                self.failures_in_a_row, self.last_error = 0, None
                wait = self._next_wait(result, poll)
                if self.draining:
                    wait = min(wait, self.drain_wait)  # no notification comes: look again
                elif self.presence.listening:
                    wait = min(wait, BEAT)  # the row stays fresh (inserters notify)
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

    async def _drain_or_listen(self, result: PassResult, flag: WakeFlag) -> None:
        """Rows coming faster than one per pass (a backlog, a flood): drain,
        looking again by itself, so that inserters need not notify; the
        interval doubles while passes find few rows. No pass with as many as
        ``DRAIN_ROWS`` for ``LINGER``: listen again, keep looking until the
        inbox writers in flight then have ended, and look once more (see
        ``presence``)."""
        # rows that changed, not rows claimed: a dry run's rows are looked at
        # again by every pass, and would keep a worker draining for nothing
        busy = result.more or result.progressed >= DRAIN_ROWS
        if not self.draining:
            if busy:
                await self.presence.drain()
                self.draining = self.presence.enabled
                self._drain_from_start()
            else:
                await self.presence.beat()
            return
        if busy:
            await self.presence.drain()  # its row away again, if it was back
            self._drain_from_start()
            return
        # a pass with fewer rows: the drain slows down, and ends after LINGER of
        # them (a trickle, one row a look, is the NOTIFY's business again)
        self.drain_wait = min(self.drain_wait * 2, DRAIN_INTERVAL_MAX)
        now = anyio.current_time()
        if self.quiet_since is None:
            self.quiet_since = now
        if now - self.quiet_since < LINGER:
            return
        if not self.presence.listening:
            await self.presence.listen()  # inserters notify from now on
        if await self.presence.writers_done():
            self.draining = False
            flag.set()  # their rows are visible now: look once more

    def _drain_from_start(self) -> None:
        """The drain looks again at its shortest interval, and no quiet pass has been seen."""
        self.drain_wait, self.quiet_since = DRAIN_INTERVAL, None

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


def _inbox(after_seq: int, limit: int) -> Claim:
    async def claim(conn: Connection) -> list[dict[str, Any]]:
        return await claims.inbox_entries(conn, after_seq, limit)

    return claim


def _stale(fingerprint: str, after: tuple[str, UUID], below: str | None, limit: int) -> Claim:
    async def claim(conn: Connection) -> list[dict[str, Any]]:
        return await claims.stale_entries(conn, fingerprint, after, below, limit)

    return claim
