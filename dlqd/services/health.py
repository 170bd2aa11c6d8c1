"""Health: keeps "database reachable" fresh, so ``/readyz`` answers without a query."""

from __future__ import annotations

import anyio

from dlqd.db import maintenance
from dlqd.db.connector import Pool, pooled
from dlqd.services.base import PeriodicService

#: seconds between database checks behind /readyz
HEALTH_INTERVAL = 1.0
#: a check slower than this counts as unreachable
HEALTH_TIMEOUT = 2.0


class Health(PeriodicService[bool]):
    """``run_once()`` returns whether the database answered in time."""

    name = "health"
    started_after_first_round = True  # /readyz knows the answer before READY=1

    def __init__(self, pool: Pool) -> None:
        super().__init__()
        self.pool = pool
        self.database_ok = False

    def interval(self) -> float:
        return HEALTH_INTERVAL

    async def run_once(self) -> bool:
        try:
            with anyio.fail_after(HEALTH_TIMEOUT):
                async with pooled(self.pool, wait=HEALTH_TIMEOUT) as conn:
                    await maintenance.ping(conn)
            self.database_ok = True
        except Exception:  # noqa: BLE001 - any failure means not reachable now
            self.database_ok = False
        return self.database_ok
