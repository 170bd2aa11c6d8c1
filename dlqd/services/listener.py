"""The listener: a dedicated LISTEN connection that turns NOTIFY into wake-ups.

A notification is only a wake-up; the table is the truth. On every
(re)connect the replayers are woken for a catch-up scan, so rows inserted while
the connection was down are found. A periodic self-probe (a NOTIFY sent through
the pool on a channel of this process's own) finds a connection that is up but
deaf, and replaces it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import anyio
from anyio.abc import TaskStatus

from dlqd.backoff import Backoff
from dlqd.config import Settings
from dlqd.db import maintenance
from dlqd.db.connector import Connection, Pool, connect, pooled
from dlqd.errors import DatabaseError, DatabaseUnavailable, error_line
from dlqd.logs import get_logger
from dlqd.metrics import Metrics
from dlqd.wake import Wakeup

CHANNEL = "dlqd_job_dlq"
log = get_logger("dlqd.listener")

# libpq TCP keepalives: a dead peer is noticed in about a minute even when idle
KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}


class ListenerDeaf(Exception):
    """The self-probe did not come back: the connection is up but hears nothing."""


class Listener:
    """A dedicated LISTEN connection; wakes the replayers on every notification."""

    name = "listener"

    def __init__(
        self,
        settings: Callable[[], Settings],
        pool: Pool,
        wakeup: Wakeup,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.wakeup = wakeup
        self.metrics = metrics
        self.connected = False
        self.probe_channel = f"dlqd_probe_{secrets.token_hex(6)}"
        self.backend_pid: int | None = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen forever; report started once the first LISTEN succeeded."""
        backoff = Backoff(base=0.5, cap=15.0, reset_after=60.0)
        started = False
        while True:
            up_since: float | None = None
            try:
                conn = await connect(
                    self.settings().listen_dsn,
                    autocommit=True,
                    application_name="dlqd listener",
                    **KEEPALIVES,
                )
                try:
                    await maintenance.listen(conn, CHANNEL, self.probe_channel)
                    self.backend_pid = conn.info.backend_pid
                    self._set_connected(True)
                    up_since = anyio.current_time()
                    log.info("listening", channel=CHANNEL, backend_pid=self.backend_pid)
                    # catch-up: whatever was inserted while we were not listening
                    self.wakeup.set()
                    if not started:
                        started = True
                        task_status.started()
                    await self._consume(conn)
                finally:
                    self._set_connected(False)
                    with anyio.CancelScope(shield=True):  # close even when shutting down
                        await conn.close()
            except (DatabaseError, DatabaseUnavailable, ListenerDeaf, OSError) as exc:
                if up_since is not None:
                    backoff.healthy(anyio.current_time() - up_since)
                wait = backoff.next()
                self.metrics.listener_reconnects_total.inc()
                log.warning("listener lost", error=error_line(exc), reconnect_in=round(wait, 3))
                await anyio.sleep(wait)

    def _set_connected(self, up: bool) -> None:
        self.connected = up
        self.metrics.listener_up.set(1 if up else 0)

    async def _consume(self, conn: Connection) -> None:
        probe_every = self.settings().listen.probe_interval.total_seconds()
        next_probe = anyio.current_time() + probe_every
        outstanding: str | None = None
        while True:
            timeout = max(0.0, next_probe - anyio.current_time())
            async for channel, payload in maintenance.notifications(conn, timeout):
                if channel == CHANNEL:
                    self.metrics.notifications_total.inc()
                    self.wakeup.set()
                elif channel == self.probe_channel and payload == outstanding:
                    outstanding = None
            if anyio.current_time() < next_probe:
                continue
            if outstanding is not None:
                raise ListenerDeaf(f"self-probe not heard back within {probe_every:g}s")
            outstanding = await self._send_probe()
            next_probe = anyio.current_time() + probe_every

    async def _send_probe(self) -> str | None:
        token = secrets.token_hex(8)
        try:
            async with pooled(self.pool, wait=5) as conn:
                await maintenance.notify(conn, self.probe_channel, token)
        except Exception as exc:  # noqa: BLE001 - a failed probe send says nothing of the listener
            log.info("self-probe not sent", error=error_line(exc))
            return None
        return token
