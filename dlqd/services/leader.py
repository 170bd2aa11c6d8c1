"""Leader election through Postgres: one replica at a time runs the leader-only services.

The leader holds a session-level advisory lock on a connection of its own (to
``listen_database_url``: session locks need a direct connection, as LISTEN
does). Why a lock and not a lease row: the server drops the lock the moment
the holder's session ends — the process exits, is killed, or its connection
is terminated — so a follower, trying every ``listen.probe_interval``, takes
over within one interval, with no clock to trust and no row to expire. The
leader pings its connection every interval and steps down (cancelling the
leader-only services) as soon as a ping fails or times out. The one case a
lock cannot see at once is a network partition that leaves the server's
backend alive: the server then releases the lock when TCP keepalives give up
on the session (dlqd asks for keepalives on this connection). Leader-only work
(purge) is safe to overlap for that moment: it deletes with SKIP LOCKED.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import anyio
import psycopg
from anyio.abc import TaskStatus

from dlqd.backoff import Backoff
from dlqd.config import Settings
from dlqd.db import connect
from dlqd.errors import DatabaseUnavailable
from dlqd.logs import get_logger
from dlqd.metrics import Metrics
from dlqd.queries import q
from dlqd.replay.targets import error_line
from dlqd.services.base import Signal
from dlqd.services.listener import KEEPALIVES

log = get_logger("dlqd.leader")


class Service(Protocol):
    name: str

    async def run(self, *, task_status: TaskStatus[None] = ...) -> None: ...


class LeadershipLost(Exception):
    """The leader's connection stopped answering."""


# errors after which the elector reconnects and campaigns again
RECOVERABLE = (psycopg.Error, DatabaseUnavailable, OSError, LeadershipLost, TimeoutError)


class LeaderSignals:
    def __init__(self) -> None:
        self.elected = Signal()
        self.deposed = Signal()


class LeaderElector:
    name = "leader"

    def __init__(
        self,
        settings: Callable[[], Settings],
        metrics: Metrics,
        services: Sequence[Any],
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.services = list(services)
        self.is_leader = False
        self.signals = LeaderSignals()
        self.backend_pid: int | None = None

    def _probe(self) -> float:
        return self.settings().listen.probe_interval.total_seconds()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        backoff = Backoff(base=0.5, cap=max(1.0, self._probe()), reset_after=60.0)
        task_status.started()
        while True:
            try:
                conn = await connect(
                    self.settings().listen_dsn,
                    autocommit=True,
                    application_name="dlqd leader",
                    **KEEPALIVES,
                )
                try:
                    self.backend_pid = conn.info.backend_pid
                    backoff.reset()
                    await self._campaign(conn)
                finally:
                    with anyio.CancelScope(shield=True):
                        await conn.close()
            except (
                psycopg.Error,
                DatabaseUnavailable,
                OSError,
                LeadershipLost,
                TimeoutError,
            ) as exc:
                wait = backoff.next()
                log.warning(
                    "leader election interrupted", error=error_line(exc), retry_in=round(wait, 3)
                )
                await anyio.sleep(wait)

    async def _campaign(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Try for the lock every probe interval; lead while it is held."""
        while True:
            with anyio.fail_after(self._probe()):
                cur = await conn.execute(q("leader_try_lock"))
                row = await cur.fetchone()
            if row is not None and row["locked"]:
                await self._lead(conn)  # returns only by an exception
            await anyio.sleep(self._probe())

    async def _lead(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._set(True)
        log.info(
            "leadership acquired",
            backend_pid=self.backend_pid,
            services=[s.name for s in self.services],
        )
        self.signals.elected.fire()
        try:
            async with anyio.create_task_group() as tg:
                for service in self.services:
                    tg.start_soon(service.run, name=service.name)
                while True:
                    await anyio.sleep(self._probe())
                    try:
                        with anyio.fail_after(self._probe()):
                            await conn.execute("SELECT 1")
                    except (psycopg.Error, TimeoutError) as exc:
                        raise LeadershipLost(f"leader connection lost: {error_line(exc)}") from exc
        except ExceptionGroup as group:  # the task group wraps what ended it
            first = group.exceptions[0]
            raise LeadershipLost(error_line(first)) from group
        finally:
            self._set(False)
            log.warning("leadership lost")
            self.signals.deposed.fire()

    def _set(self, leader: bool) -> None:
        self.is_leader = leader
        self.metrics.leader.set(1 if leader else 0)
