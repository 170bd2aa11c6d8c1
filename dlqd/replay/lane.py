"""The http leg: deliveries of leased rows, beside the replayer's passes.

A page's http rows are *leased* in its transaction (due again only after the
calls could have ended) and delivered after COMMIT, here, on a connection of
their own: a slow receiver holds up its own rows, never the passes. The
answers are recorded in a second short transaction (marked, failed, or
parked on a 4xx). While a page's deliveries run, the replayer claims no more
rows of http policies (they wait, due), and it is woken when they are done.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
from anyio.abc import TaskGroup

from dlqd.config import Settings
from dlqd.db import claims
from dlqd.db.connector import Connection, Pool, pooled, transaction
from dlqd.errors import DatabaseError, error_line
from dlqd.logs import get_logger
from dlqd.replay.batch import Batch, Item, apply, set_replay_settings, settle_split
from dlqd.replay.http import HttpDeliverer, deliver_all
from dlqd.replay.report import Reporter
from dlqd.replay.result import PassResult

log = get_logger("dlqd.replayer")


class HttpLane:
    """One page's deliveries at a time, in ``tasks`` (None: in line, as a pass
    run on its own in tests does)."""

    def __init__(
        self,
        pool: Pool,
        deliverer: HttpDeliverer,
        reporter: Reporter,
        *,
        done: Callable[[], None] = lambda: None,
    ) -> None:
        self.pool = pool
        self.deliverer = deliverer
        self.reporter = reporter
        self.done = done
        self.tasks: TaskGroup | None = None
        self.busy = False

    async def submit(
        self,
        conn: Connection,
        settings: Settings,
        leased: Batch,
        items: list[Item],
        result: PassResult,
    ) -> None:
        """Deliver ``items`` (leased by the committed ``leased`` page): beside the
        passes when a task group runs the lane, else now on ``conn``."""
        if self.tasks is None:
            await self.deliver(conn, settings, leased, items, result)
            return
        self.busy = True
        self.tasks.start_soon(self._beside, settings, leased, items)

    async def _beside(self, settings: Settings, leased: Batch, items: list[Item]) -> None:
        try:
            async with pooled(self.pool) as conn:
                await self.deliver(conn, settings, leased, items, PassResult())
        except Exception as exc:  # noqa: BLE001 - the rows stay leased: due again after it
            log.warning("http deliveries failed", error=error_line(exc), rows=len(items))
        finally:
            self.busy = False
            self.done()

    async def deliver(
        self,
        conn: Connection,
        settings: Settings,
        leased: Batch,
        items: list[Item],
        result: PassResult,
    ) -> None:
        """Call, then record the answers in a second short transaction."""
        started = anyio.current_time()
        deliveries = await deliver_all(self.deliverer, conn, items)
        batch = Batch(leased.fingerprint, leased.db_now, deliveries=deliveries)
        try:
            async with transaction(conn):
                await set_replay_settings(conn, settings)
                locked = await claims.relock(conn, [i.row.id for i in items], manual=False)
                if not locked:
                    return  # another replica took them over (an expired lease)
                batch.db_now = next(iter(locked.values()))
                batch.replay = [i for i in items if i.row.id in locked]
                outcome = await apply(conn, batch, settings)
        except DatabaseError as exc:
            if exc.broken:
                raise
            outcome = await settle_split(conn, batch, settings, exc)
        result.tally(outcome, batch)
        await self.reporter.committed(conn, outcome, started)
