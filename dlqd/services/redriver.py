"""The redriver: runs redrives (``dlqd redrive start``, the console) on every replica.

Every round it takes the oldest redrive nobody runs (queued, or running
under a lease that expired: its replica died) and runs it to the end
(:func:`dlqd.operator.redrive.run`), renewing its lease every second and
hearing a cancel at the same time. When the daemon stops, it lets go after
the chunk in flight and ends its lease, so that another replica resumes at
once.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass

import anyio

from dlqd.config import Settings
from dlqd.db import redrives
from dlqd.db.connector import Connection, Pool, pooled
from dlqd.errors import DlqdError, error_line
from dlqd.metrics import Metrics
from dlqd.operator import redrive as operator
from dlqd.operator.replay import ReplayResult
from dlqd.services.base import PeriodicService

#: how often an idle replica looks for a redrive to run
POLL = 1.0


@dataclass(frozen=True, slots=True)
class Redriven:
    """What a round did: the redrive it ran (None: none to run) and how it ended."""

    redrive: str | None
    ended: str | None


class Redriver(PeriodicService[Redriven]):
    name = "redriver"

    def __init__(
        self,
        pool: Pool,
        settings: Callable[[], Settings],
        metrics: Metrics,
        stopping: anyio.Event,
    ) -> None:
        super().__init__()
        self.pool = pool
        self.settings = settings
        self.metrics = metrics
        self.stopping = stopping
        self.owner = f"{socket.gethostname()}:{os.getpid()}/{secrets.token_hex(4)}"
        self.idle = anyio.Event()
        self.idle.set()

    def interval(self) -> float:
        return POLL

    async def run_once(self) -> Redriven:
        if self.stopping.is_set():
            return Redriven(None, None)
        async with pooled(self.pool) as conn:
            row = await redrives.claim(conn, self.owner, operator.LEASE_TTL)
            if row is None:
                return Redriven(None, None)
            claimed = operator.Redrive.from_row(row)
            self.idle = anyio.Event()
            try:
                ended = await self._run(conn, claimed)
            finally:
                self.idle.set()
        return Redriven(str(claimed.id), ended)

    async def _run(self, conn: Connection, claimed: operator.Redrive) -> str:
        if claimed.id is None:
            raise DlqdError("a claimed redrive without an id")
        the_run = operator.Run(claimed.id, self.owner)
        self.log.info(
            "redrive running",
            redrive=str(claimed.id),
            actor=claimed.actor,
            matched=claimed.matched,
            rate=claimed.rate,
            resumed=claimed.cursor is not None,
        )
        counted = ReplayResult()

        def count(result: ReplayResult) -> None:
            """Metrics of the chunk that just committed (the growth since the last)."""
            for outcome, now, before in (
                ("replayed", result.replayed, counted.replayed),
                ("failed", result.failed, counted.failed),
                ("skipped", result.skipped, counted.skipped),
            ):
                if now > before:
                    self.metrics.redrive_rows_total.labels(outcome).inc(now - before)
            counted.replayed, counted.failed = result.replayed, result.failed
            counted.skipped_by_reason = result.skipped_by_reason.copy()

        self.metrics.redrives_running.inc()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._keep_lease, the_run)
                try:
                    ended, error, _ = await operator.run(
                        conn,
                        self.settings(),
                        claimed,
                        the_run,
                        stopping=self.stopping.is_set,
                        on_chunk=count,
                    )
                finally:
                    tg.cancel_scope.cancel()
        finally:
            self.metrics.redrives_running.dec()
        if ended == "stopped":
            if not the_run.lost:
                await redrives.release(conn, claimed.id, self.owner)
            self.log.info("redrive handed over", redrive=str(claimed.id), lease_lost=the_run.lost)
            return ended
        finished = await redrives.finish(conn, claimed.id, self.owner, ended, error)
        if finished is not None:
            done = operator.Redrive.from_row(finished)
            log = self.log.warning if ended == "failed" else self.log.info
            log(
                f"redrive {ended}",
                redrive=str(claimed.id),
                replayed=done.replayed,
                failed=done.failed,
                skipped=done.skipped,
                error=error,
            )
        return ended

    async def _keep_lease(self, the_run: operator.Run) -> None:
        """Renew the lease every second; hear a cancel; note a lease lost."""
        while not the_run.lost:
            await anyio.sleep(operator.RENEW_EVERY)
            try:
                async with pooled(self.pool, wait=operator.RENEW_EVERY) as conn:
                    heard = await redrives.renew(conn, the_run.redrive, self.owner, the_run.ttl)
            except DlqdError as exc:
                # a chunk in flight checks the lease itself: this is only a renewal
                self.log.warning("redrive lease not renewed", error=error_line(exc))
                continue
            the_run.heard(heard)
