"""The purger (leader only): old rows out of job_dlq and the replay log, in small batches.

Schedule: ``purge.schedule`` is an interval (the first run shortly after the
replica becomes leader, then every interval) or a 5-field cron expression
(at its times, in UTC). Each batch is one call of ``job_dlq_purge`` (or
``dlqd_trim_replay_log``) in its own transaction, under ``purge.lock_timeout``
and a statement timeout; a batch that times out halves the batch size instead
of failing the run, and the size adapts as it goes: halved after a batch slower
than 200 ms, doubled (up to ``purge.batch_size``) after one faster than 50 ms.
Rows of dlqd's schedule and inbox go with their job_dlq row (ON DELETE
CASCADE), so there are no orphans to trim.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, LiteralString

import anyio
import psycopg
from psycopg_pool import AsyncConnectionPool

from dlqd.config import Settings, parse_duration
from dlqd.db.queries import q
from dlqd.metrics import Metrics
from dlqd.services.base import PeriodicService

Connection = psycopg.AsyncConnection[dict[str, Any]]

#: an interval schedule runs this long after the replica became leader
FIRST_RUN_DELAY = 5.0
#: a batch's statement may take this many lock timeouts (at least 10 s)
STATEMENT_TIMEOUT_FACTOR = 5
#: a batch slower than this halves the next one; one faster than FAST doubles it
#: again (up to purge.batch_size): no statement holds its locks for long
SLOW_BATCH_SECONDS = 0.2
FAST_BATCH_SECONDS = 0.05
MIN_ADAPTIVE_BATCH = 100
FIRST_BATCH = 1000


@dataclass(frozen=True, slots=True)
class Batched:
    deleted: int
    batches: int
    batch_size: int  # the size the run ended with (smaller after timeouts)


@dataclass(frozen=True, slots=True)
class PurgeResult:
    rows: Batched
    log: Batched
    seconds: float


def _ms(value: timedelta) -> str:
    return f"{max(1, round(value.total_seconds() * 1000))}ms"


async def batched(
    conn: Connection,
    settings: Settings,
    query: LiteralString,
    params: dict[str, Any],
    *,
    observe: Callable[[int, float], None] | None = None,
) -> Batched:
    """Call a batch-deleting function until it deletes less than a batch.

    ``observe(deleted, seconds)`` hears of every batch (the benchmark uses it).
    """
    lock_timeout = settings.purge.lock_timeout
    statement_timeout = max(lock_timeout * STATEMENT_TIMEOUT_FACTOR, timedelta(seconds=10))
    # start small (the first statement of a run pays for cold caches), then grow
    size = min(settings.purge.batch_size, FIRST_BATCH)
    total = batches = 0
    while True:
        started = anyio.current_time()
        try:
            async with conn.transaction():
                await conn.execute(
                    q("purge_timeouts"),
                    {
                        "lock_timeout": _ms(lock_timeout),
                        "statement_timeout": _ms(statement_timeout),
                    },
                )
                cur = await conn.execute(query, {**params, "batch_size": size})
                row = await cur.fetchone()
        except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled):
            if size == 1:
                raise
            size = max(1, size // 2)  # a batch that times out shrinks; the run goes on
            continue
        deleted = int(row["deleted"]) if row else 0
        took = anyio.current_time() - started
        if observe is not None:
            observe(deleted, took)
        total += deleted
        batches += 1
        if deleted < size:
            return Batched(total, batches, size)
        if took > SLOW_BATCH_SECONDS:
            size = max(min(MIN_ADAPTIVE_BATCH, size), size // 2)
        elif took < FAST_BATCH_SECONDS:
            size = min(settings.purge.batch_size, size * 2)


async def purge_rows(
    conn: Connection, settings: Settings, *, observe: Callable[[int, float], None] | None = None
) -> Batched:
    """job_dlq rows past their retention, through job_dlq_purge."""
    return await batched(
        conn,
        settings,
        q("purge_batch"),
        {
            "replayed_before": settings.purge.replayed_retention,
            "pending_before": settings.purge.pending_retention,
        },
        observe=observe,
    )


async def trim_log(conn: Connection, settings: Settings) -> Batched:
    """Replay-log rows older than purge.log_retention, through dlqd_trim_replay_log."""
    return await batched(
        conn, settings, q("trim_replay_log"), {"older_than": settings.purge.log_retention}
    )


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

    def __init__(
        self, pool: AsyncConnectionPool[Any], settings: Callable[[], Settings], metrics: Metrics
    ) -> None:
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
        return self._until_next(first=True)

    def interval(self) -> float:
        return self._until_next(first=False)

    async def run_once(self) -> PurgeResult:
        settings = self.settings()
        started = anyio.current_time()
        try:
            async with self.pool.connection() as conn:
                rows = await purge_rows(conn, settings)
                log = await trim_log(conn, settings)
        except Exception:
            self.metrics.purge_runs_total.labels("error").inc()
            raise
        seconds = anyio.current_time() - started
        self.metrics.purged_entries_total.inc(rows.deleted)
        self.metrics.purge_runs_total.labels("success").inc()
        self.metrics.last_purge_success_timestamp_seconds.set(time.time())
        self.log.info(
            "purge",
            deleted=rows.deleted,
            batches=rows.batches,
            batch_size=rows.batch_size,
            log_trimmed=log.deleted,
            duration_ms=round(seconds * 1000, 1),
        )
        return PurgeResult(rows, log, seconds)
