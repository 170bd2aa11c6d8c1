"""Purging in small batches: old rows out of job_dlq, old entries out of the replay log.

Each batch is one call of ``job_dlq_purge`` (or ``dlqd_trim_replay_log_after``,
which goes on from the ``at`` the last batch reached) in its own transaction,
under ``purge.lock_timeout`` and a statement timeout; a batch that times out
halves the batch size instead of failing the run, and the size adapts as it
goes: halved after a batch slower than 200 ms, doubled (up to
``purge.batch_size``) after one faster than 50 ms. The scheduled purge
(``dlqd.services.purger``, on the leader) and ``dlqd purge`` both run it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import anyio

from dlqd.config import Settings
from dlqd.db import maintenance
from dlqd.db.connector import Connection
from dlqd.errors import StatementTimeout

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


async def batched(
    conn: Connection,
    settings: Settings,
    what: Literal["rows", "log"],
    params: dict[str, Any],
    *,
    observe: Callable[[int, float], None] | None = None,
    timed_out: Callable[[int], Awaitable[None]] | None = None,
) -> Batched:
    """Call a batch-deleting function until it deletes less than a batch.

    ``observe(deleted, seconds)`` hears of every batch (the benchmark uses it),
    ``timed_out(size)`` of every batch that timed out, before the next one.
    """
    lock_timeout = settings.purge.lock_timeout
    statement_timeout = max(lock_timeout * STATEMENT_TIMEOUT_FACTOR, timedelta(seconds=10))
    # start small (the first statement of a run pays for cold caches), then grow
    size = min(settings.purge.batch_size, FIRST_BATCH)
    total = batches = 0
    after: datetime | None = None  # where the last batch ended (the log's; rows: none)
    while True:
        started = anyio.current_time()
        try:
            deleted, reached = await maintenance.delete_batch(
                conn,
                what,
                params,
                size,
                after=after,
                lock_timeout=lock_timeout,
                statement_timeout=statement_timeout,
            )
        except StatementTimeout:
            if timed_out is not None:
                await timed_out(size)
            if size == 1:
                raise
            size = max(1, size // 2)  # a batch that times out shrinks; the run goes on
            continue
        took = anyio.current_time() - started
        if observe is not None:
            observe(deleted, took)
        total += deleted
        batches += 1
        after = reached
        if deleted < size:
            return Batched(total, batches, size)
        if took > SLOW_BATCH_SECONDS:
            size = max(min(MIN_ADAPTIVE_BATCH, size), size // 2)
        elif took < FAST_BATCH_SECONDS:
            size = min(settings.purge.batch_size, size * 2)


async def purge_rows(
    conn: Connection,
    settings: Settings,
    *,
    observe: Callable[[int, float], None] | None = None,
    timed_out: Callable[[int], Awaitable[None]] | None = None,
) -> Batched:
    """job_dlq rows past their retention, through job_dlq_purge."""
    return await batched(
        conn,
        settings,
        "rows",
        {
            "replayed_before": settings.purge.replayed_retention,
            "pending_before": settings.purge.pending_retention,
        },
        observe=observe,
        timed_out=timed_out,
    )


async def trim_log(
    conn: Connection,
    settings: Settings,
    *,
    observe: Callable[[int, float], None] | None = None,
) -> Batched:
    """Replay-log rows older than purge.log_retention, through dlqd_trim_replay_log."""
    return await batched(
        conn, settings, "log", {"older_than": settings.purge.log_retention}, observe=observe
    )


async def count(conn: Connection, settings: Settings) -> int:
    """How many job_dlq rows a purge pass would delete now."""
    return await maintenance.purge_count(
        conn, settings.purge.replayed_retention, settings.purge.pending_retention
    )
