"""Whether inserters need to wake this worker: its row in ``dlqd_wake``.

A NOTIFY costs every inserting transaction a cluster-wide lock held through
its commit (PostgreSQL serialises notifying commits), which halves the
inserts of eight concurrent sessions. So the insert trigger notifies only
while some worker *listens*: its row is there, fresh (a heartbeat every
``BEAT`` seconds, fresh for ``FRESH``). A worker that finds rows coming faster
than one per pass (a backlog, a flood) drains: it takes its row away and
looks again by itself, every 5 to 40 ms as the rows come; when no pass found
``DRAIN_ROWS`` for ``LINGER`` (the flood is over, or is a trickle the NOTIFY
serves better) it puts its row back, notes the transactions that were writing
the inbox at that moment (they may have skipped their NOTIFY), keeps looking
by itself until they have ended, and looks once more: no row is left waiting
for a poll, and no writer's long transaction holds the worker up. With no worker
listening at all (no daemon), inserters send no NOTIFY: a daemon that starts
scans the inbox first.
"""

from __future__ import annotations

import anyio

from dlqd.db import claims
from dlqd.db.connector import Pool, pooled
from dlqd.errors import DlqdError, error_line
from dlqd.logs import get_logger

log = get_logger("dlqd.replayer")

#: a listening worker renews its row this often; inserters trust it this long
BEAT = 10.0
FRESH = 30.0  # the trigger's own interval (migration 012): keep them in step
#: a pass that claimed at least this many rows makes the worker drain (rows
#: come faster than one per pass: the NOTIFYs would cost more than looking)
DRAIN_ROWS = 2
#: between the passes of a drain: from the first, doubled while passes find
#: fewer than DRAIN_ROWS rows, up to the last (a trickle costs few passes)
DRAIN_INTERVAL = 0.005
DRAIN_INTERVAL_MAX = 0.04
#: a drain ends after this long without a pass of DRAIN_ROWS rows (then the worker listens)
LINGER = 0.1


class Presence:
    """One worker's row; ``enabled`` false (no LISTEN): never a row, no NOTIFY needed."""

    def __init__(self, pool: Pool, worker: str, *, enabled: bool) -> None:
        self.pool = pool
        self.worker = worker
        self.enabled = enabled
        self.listening = False
        self.beat_at = -float("inf")
        # inbox writers in flight when the row came back (virtual transaction ids)
        self.writers: list[str] = []

    async def listen(self) -> None:
        """Put the row back (inserters notify again) and note the inbox writers
        in flight: until :meth:`writers_done`, the caller keeps looking by itself."""
        if not self.enabled:
            return
        async with pooled(self.pool) as conn:
            await claims.wake_listen(conn, self.worker)
            self.listening, self.beat_at = True, anyio.current_time()
            self.writers = await claims.inbox_writers(conn)

    async def writers_done(self) -> bool:
        """Whether the writers :meth:`listen` noted have all ended (their rows
        are visible now: the caller looks once more)."""
        if not self.writers:
            return True
        async with pooled(self.pool) as conn:
            if await claims.writers_running(conn, self.writers):
                return False
        self.writers = []
        return True

    async def drain(self) -> None:
        """Take the row away: this worker looks again by itself."""
        if not self.enabled or not self.listening:
            return
        async with pooled(self.pool) as conn:
            await claims.wake_drain(conn, self.worker)
        self.listening, self.writers = False, []  # the drain's passes see their rows

    async def beat(self) -> None:
        """Keep a listening worker's row fresh."""
        if self.enabled and self.listening and anyio.current_time() - self.beat_at >= BEAT:
            async with pooled(self.pool) as conn:
                await claims.wake_listen(conn, self.worker)
            self.beat_at = anyio.current_time()

    async def leave(self) -> None:
        """At stop: the row goes (a worker that is gone wakes for nothing)."""
        if not self.enabled:
            return
        try:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                async with pooled(self.pool, wait=1) as conn:
                    await claims.wake_drain(conn, self.worker)
        except DlqdError as exc:
            log.info("wake row not removed (it goes stale)", error=error_line(exc))
        self.listening = False
