"""Leader election through Postgres: one replica at a time runs the leader-only services.

The leader holds a lease: the one row of ``dlqd_leader``, which it renews every
half ``listen.probe_interval`` for 1.5 intervals at a time, by the server's
clock alone. Followers try to take it every half interval; they succeed once
it has expired, so a leader that dies, is killed or cannot reach the
database is replaced within two probe intervals, and one that stops cleanly
hands over at once (it ends its lease). A leader that has not renewed for a
whole interval steps down before its lease can expire, so two leaders overlap
at most while clocks disagree by more than half an interval; leader-only
work (the purge) is safe to overlap anyway (it deletes with SKIP LOCKED).

Why a lease row and not an advisory lock: any role that can connect may take
any advisory lock (they need no privilege), and ``pg_locks`` shows everyone
the key the leader holds, so a tenant could hold leadership away from every
replica. Only ``dlqd`` may write ``dlqd_leader``. The renewals are one-row
UPDATEs through the pool: no session of its own, so it also works through a
transaction pooler.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import anyio
from anyio.abc import TaskStatus

from dlqd.backoff import Backoff
from dlqd.config import Settings
from dlqd.db import maintenance
from dlqd.db.connector import Pool, pooled
from dlqd.errors import error_line
from dlqd.logs import get_logger
from dlqd.metrics import Metrics
from dlqd.services.base import Signal

log = get_logger("dlqd.leader")

#: the lease lasts this many probe intervals; renewals and claims come every half
LEASE_INTERVALS = 1.5


@dataclass
class _Lease:
    """What the leader knows of its lease: renew it by ``renewed_by``
    (monotonic), or why it is ``lost``."""

    renewed_by: float
    lost: str | None = None
    changed: anyio.Event = field(default_factory=anyio.Event)


class LeaderSignals:
    def __init__(self) -> None:
        self.elected = Signal()
        self.deposed = Signal()


class LeaderElector:
    name = "leader"

    def __init__(
        self,
        pool: Pool,
        settings: Callable[[], Settings],
        metrics: Metrics,
        services: Sequence[Any],
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.metrics = metrics
        self.services = list(services)
        self.is_leader = False
        self.signals = LeaderSignals()
        # who leads, as other replicas and operators see it in dlqd_leader
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"

    def _probe(self) -> float:
        return self.settings().listen.probe_interval.total_seconds()

    async def _claim(self) -> bool:
        """Take or renew the lease (one statement); whether this replica holds it."""
        probe = self._probe()
        with anyio.fail_after(probe / 2):
            async with pooled(self.pool, wait=probe / 2) as conn:
                ttl = timedelta(seconds=probe * LEASE_INTERVALS)
                return await maintenance.claim_lease(conn, self.holder, ttl)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        backoff = Backoff(base=0.5, cap=max(1.0, self._probe()), reset_after=60.0)
        task_status.started()
        while True:
            try:
                if await self._claim():
                    backoff.reset()
                    await self._lead()
                wait = self._probe() / 2
            except Exception as exc:  # noqa: BLE001 - an election round never ends the daemon
                wait = backoff.next()
                log.warning(
                    "leader election interrupted", error=error_line(exc), retry_in=round(wait, 3)
                )
            await anyio.sleep(wait)

    async def _lead(self) -> None:
        """Run the leader-only services while the lease is renewed; return once
        it is lost (another round of the election follows)."""
        self._set(True)
        names = [s.name for s in self.services]
        log.info("leadership acquired", holder=self.holder, services=names)
        self.signals.elected.fire()
        lease = _Lease(anyio.current_time() + self._probe())
        try:
            async with anyio.create_task_group() as tg:
                for service in self.services:
                    tg.start_soon(service.run, name=service.name)
                tg.start_soon(self._renew, lease)
                # the deadline holds even while a renewal hangs on a dead connection
                while lease.lost is None:
                    left = lease.renewed_by - anyio.current_time()
                    if left <= 0:
                        lease.lost = f"lease not renewed for {self._probe():g}s"
                        break
                    with anyio.move_on_after(left):
                        await lease.changed.wait()
                    lease.changed = anyio.Event()
                self._set(False)  # at once: the services may take a moment to unwind
                tg.cancel_scope.cancel()
        except BaseException:
            # shutting down: hand over at once rather than when the lease expires
            self._set(False)
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                async with pooled(self.pool, wait=2) as conn:
                    await maintenance.release_lease(conn, self.holder)
            log.info("leadership released", holder=self.holder)
            self.signals.deposed.fire()
            raise
        log.warning("leadership lost", holder=self.holder, reason=lease.lost)
        self.signals.deposed.fire()

    async def _renew(self, lease: _Lease) -> None:
        """Renew every half interval; the lease must be renewed within a whole
        interval of the last renewal (it is 1.5 intervals long on the server)."""
        while True:
            probe = self._probe()
            await anyio.sleep(probe / 2)
            sent = anyio.current_time()
            try:
                still = await self._claim()
            except Exception as exc:  # noqa: BLE001 - retried until the deadline
                log.info("lease renewal failed: retrying", error=error_line(exc))
                continue
            if not still:
                lease.lost = "another replica holds the lease"
            else:
                lease.renewed_by = sent + probe
            lease.changed.set()

    def _set(self, leader: bool) -> None:
        self.is_leader = leader
        self.metrics.leader.set(1 if leader else 0)
