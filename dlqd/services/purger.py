"""The purger (leader only): old rows out of job_dlq and the replay log, on a schedule.

Schedule: ``purge.schedule`` is an interval (the first run shortly after the
replica becomes leader, then every interval) or a 5-field cron expression
(at its times, in UTC). Each run is ``dlqd.purge``'s batches: job_dlq first,
then the replay log. Rows of dlqd's schedule and inbox go with their job_dlq
row (ON DELETE CASCADE), so there are no orphans to trim.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import anyio
from anyio.abc import TaskStatus

from dlqd.config import Settings, parse_duration
from dlqd.db import maintenance
from dlqd.db.connector import Pool, pooled
from dlqd.errors import DlqdError, error_line
from dlqd.metrics import Metrics
from dlqd.purge import Batched, purge_rows, trim_log
from dlqd.services.base import PeriodicService

#: an interval schedule runs this long after the replica became leader
FIRST_RUN_DELAY = 5.0


@dataclass(frozen=True, slots=True)
class PurgeResult:
    rows: Batched
    log: Batched
    seconds: float


def seconds_until(schedule: str, now: datetime) -> float | None:
    """Seconds from ``now`` to a cron schedule's next time; None for an interval."""
    try:
        parse_duration(schedule)
    except ValueError:
        from cronsim import CronSim

        following = next(CronSim(schedule, now))
        return max(0.0, (following - now).total_seconds())
    return None


class Purger(PeriodicService[PurgeResult]):
    name = "purger"

    def __init__(self, pool: Pool, settings: Callable[[], Settings], metrics: Metrics) -> None:
        super().__init__()
        self.pool = pool
        self.settings = settings
        self.metrics = metrics

    def _until_next(self, first: bool) -> float:
        schedule = self.settings().purge.schedule
        cron = seconds_until(schedule, datetime.now(UTC).replace(microsecond=0))
        if cron is not None:
            return cron
        interval = parse_duration(schedule).total_seconds()
        return min(FIRST_RUN_DELAY, interval) if first else interval

    def first_delay(self) -> float:
        delay = self._until_next(first=True)
        self.metrics.purge_due_timestamp_seconds.set(time.time() + delay)
        return delay

    def interval(self) -> float:
        return self._until_next(first=False)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The service's loop; the due time is this replica's only while it runs
        (the leader's)."""
        try:
            await super().run(task_status=task_status)
        finally:
            self.metrics.purge_due_timestamp_seconds.set(0)

    async def run_once(self) -> PurgeResult:
        settings = self.settings()
        started = anyio.current_time()
        try:
            async with pooled(self.pool) as conn:
                rows = await purge_rows(conn, settings)
                log = await trim_log(conn, settings)
                seconds = anyio.current_time() - started
                # what the console's overview shows as the last purge
                await maintenance.record_run(
                    conn,
                    "purge",
                    ok=True,
                    detail={
                        "deleted": rows.deleted,
                        "log_trimmed": log.deleted,
                        "seconds": round(seconds, 3),
                    },
                )
        except Exception as exc:
            self.metrics.purge_runs_total.labels("error").inc()
            with anyio.move_on_after(2), contextlib.suppress(DlqdError):
                async with pooled(self.pool, wait=1) as conn:
                    await maintenance.record_run(
                        conn, "purge", ok=False, detail={"error": error_line(exc)}
                    )
            raise
        self.metrics.purged_entries_total.inc(rows.deleted)
        self.metrics.purge_runs_total.labels("success").inc()
        self.metrics.last_purge_success_timestamp_seconds.set(time.time())
        # the next scheduled run is due now (a failing one keeps the old time)
        self.metrics.purge_due_timestamp_seconds.set(time.time() + self.interval())
        self.log.info(
            "purge",
            deleted=rows.deleted,
            batches=rows.batches,
            batch_size=rows.batch_size,
            log_trimmed=log.deleted,
            duration_ms=round(seconds * 1000, 1),
        )
        return PurgeResult(rows, log, seconds)
