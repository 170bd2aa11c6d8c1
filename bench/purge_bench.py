"""Benchmark: the scheduled purge against one plain DELETE of the same rows.

    .venv/bin/python bench/purge_bench.py [--rows 1000000] [--repeat 3]
        [--log-rows 0] [--replaying 0]

On its own throwaway cluster with autovacuum on, as operators run it. Each
round inserts ``--rows`` replayed rows older than the retention (plus 10 % of
pending rows that stay), then deletes them with dlqd's purge (job_dlq_purge in
batches of purge.batch_size, each its own transaction, as the purger runs it)
and, after inserting them again, with one plain DELETE. Prints rows/s of both,
their ratio, and the slowest purge statement.

``--log-rows N``: then the same for the replay log: N entries older than
``purge.log_retention`` (plus 10 % of recent ones that stay), trimmed by
dlqd_trim_replay_log in batches, against one plain DELETE.

``--replaying R``: while dlqd's purge and trim run, a job system inserts R
rows a second and each is replayed at once (``dlqd_finish_replayed``, as every
replay finishes, each its own transaction): prints how many went through and
their slowest transaction, the wait a purge imposes on replays. Asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import anyio
import psycopg
from psycopg.rows import dict_row

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import migrated_cluster  # type: ignore[import-not-found]

from dlqd.config import load_settings
from dlqd.db.connector import connect
from dlqd.purge import purge_rows, trim_log

FILL = """
INSERT INTO job_dlq (original_job_id, app_id, type, payload, error_reason, attempts, dlq_at,
                     replayed_at)
SELECT 'job-' || g, 'app-' || (g %% 7), 'email.send', jsonb_build_object('n', g), 'timeout', 3,
       now() - interval '30 days' + g * interval '1 ms',
       CASE WHEN g %% 10 = 0 THEN NULL ELSE now() - interval '20 days' + g * interval '1 ms' END
  FROM generate_series(1, %(n)s) g
"""
PLAIN = (
    "DELETE FROM job_dlq WHERE replayed_at IS NOT NULL AND replayed_at < now() - interval '7 days'"
)


async def fill(url: str, n: int) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("TRUNCATE job_dlq CASCADE")
        await conn.execute(FILL, {"n": n})
        await conn.execute("VACUUM ANALYZE job_dlq")
        cur = await conn.execute("SELECT count(*) FROM job_dlq WHERE replayed_at IS NOT NULL")
        row = await cur.fetchone()
        return int(row[0]) if row else 0


LOG_FILL = """
INSERT INTO dlqd_replay_log (dlq_id, original_job_id, app_id, policy, outcome, manual, at)
SELECT gen_random_uuid(), 'job-' || g, 'app-' || (g %% 7), 'p', 'replayed', false,
       CASE WHEN g %% 10 = 0 THEN now() - interval '1 day'
            ELSE now() - interval '60 days' + g * interval '1 ms' END
  FROM generate_series(1, %(n)s) g
"""
LOG_PLAIN = "DELETE FROM dlqd_replay_log WHERE at < now() - interval '30 days'"
REPLAY_ONE = """
WITH row AS (
    INSERT INTO job_dlq (original_job_id, app_id, type, payload, error_reason, attempts)
    VALUES (%(job)s, 'app-live', 'email.send', '{}', 'timeout', 1) RETURNING id
)
SELECT count(*) FROM row,
       LATERAL dlqd_finish_replayed(ARRAY[row.id], ARRAY['live'], false, NULL, NULL, NULL)
"""


async def fill_log(url: str, n: int) -> int:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("TRUNCATE dlqd_replay_log, dlqd_replay_hours")
        await conn.execute(LOG_FILL, {"n": n})
        await conn.execute("VACUUM ANALYZE dlqd_replay_log")
        cur = await conn.execute(
            "SELECT count(*) FROM dlqd_replay_log WHERE at < now() - interval '30 days'"
        )
        row = await cur.fetchone()
        return int(row[0]) if row else 0


class Replaying:
    """A job system's stream beside the purge: ``rate`` rows a second, each
    inserted and replayed in one transaction; the slowest of them timed."""

    def __init__(self, url: str, rate: float) -> None:
        self.url, self.rate = url, rate
        self.seconds: list[float] = []

    async def run(self, stop: anyio.Event) -> None:
        if self.rate <= 0:
            return
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            started, sent = time.perf_counter(), 0
            while not stop.is_set():
                due = started + sent / self.rate
                if (wait := due - time.perf_counter()) > 0:
                    await anyio.sleep(wait)
                t0 = time.perf_counter()
                await conn.execute(REPLAY_ONE, {"job": f"live-{sent}"})
                self.seconds.append(time.perf_counter() - t0)
                sent += 1

    def report(self) -> str:
        if not self.seconds:
            return ""
        ranked = sorted(self.seconds)
        return (
            f"; beside it {len(ranked)} replays: p50 {statistics.median(ranked) * 1000:.1f} ms, "
            f"p99 {ranked[int(len(ranked) * 0.99)] * 1000:.1f} ms, "
            f"slowest {ranked[-1] * 1000:.0f} ms"
        )


async def dlqd_purge(
    url: str, what: str = "rows", replaying: float = 0
) -> tuple[float, int, float, str]:
    settings = load_settings(database_url=url)
    timings: list[tuple[float, int]] = []

    def observe(deleted: int, seconds: float) -> None:
        timings.append((seconds, deleted))

    conn = await connect(url, autocommit=True)
    conn.row_factory = dict_row  # type: ignore[assignment]
    stream = Replaying(url, replaying)
    try:
        async with anyio.create_task_group() as tg:
            stop = anyio.Event()
            tg.start_soon(stream.run, stop)
            started = time.perf_counter()
            if what == "rows":
                result = await purge_rows(conn, settings, observe=observe)
            else:
                result = await trim_log(conn, settings, observe=observe)
            elapsed = time.perf_counter() - started
            stop.set()
        ranked = sorted(range(len(timings)), key=lambda i: timings[i][0], reverse=True)[:3]
        seconds = sorted(s for s, _ in timings)
        print(
            f"  {len(timings)} statements: median {statistics.median(seconds) * 1000:.0f} ms, "
            f"p95 {seconds[int(len(seconds) * 0.95)] * 1000:.0f} ms; slowest "
            + ", ".join(
                f"#{i + 1} {timings[i][0] * 1000:.0f} ms ({timings[i][1]} rows)" for i in ranked
            ),
            flush=True,
        )
        return elapsed, result.deleted, seconds[-1], stream.report()
    finally:
        await conn.close()


async def plain_delete(url: str, statement: str = PLAIN) -> tuple[float, int]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        started = time.perf_counter()
        cur = await conn.execute(statement.encode())
        return time.perf_counter() - started, cur.rowcount


async def compare(url: str, what: str, rows: int, repeat: int, replaying: float) -> None:
    """``repeat`` rounds of dlqd's batches against one plain DELETE of the same rows."""
    fill_them, plain, noun = (
        (fill, PLAIN, "purge") if what == "rows" else (fill_log, LOG_PLAIN, "trim")
    )
    dlqd_rates, plain_rates, slowest = [], [], []
    for round_ in range(1, repeat + 1):
        expected = await fill_them(url, rows)
        seconds, deleted, worst, beside = await dlqd_purge(url, what, replaying)
        assert deleted == expected, (deleted, expected)
        dlqd_rates.append(deleted / seconds)
        slowest.append(worst)
        expected = await fill_them(url, rows)
        plain_seconds, plain_deleted = await plain_delete(url, plain)
        assert plain_deleted == expected
        plain_rates.append(plain_deleted / plain_seconds)
        print(
            f"round {round_}: dlqd {noun} {deleted} rows in {seconds:.2f}s "
            f"({deleted / seconds:,.0f} rows/s, slowest statement {worst * 1000:.0f} ms{beside}); "
            f"plain DELETE {plain_deleted} rows in {plain_seconds:.2f}s "
            f"({plain_deleted / plain_seconds:,.0f} rows/s)",
            flush=True,
        )
    ratio = [d / p for d, p in zip(dlqd_rates, plain_rates, strict=True)]
    print(
        f"dlqd {noun}: median {statistics.median(dlqd_rates):,.0f} rows/s "
        f"(min {min(dlqd_rates):,.0f}, max {max(dlqd_rates):,.0f}); "
        f"plain DELETE: median {statistics.median(plain_rates):,.0f} rows/s "
        f"(min {min(plain_rates):,.0f}, max {max(plain_rates):,.0f})"
    )
    print(
        f"ratio: median {statistics.median(ratio):.2f}x (min {min(ratio):.2f}, "
        f"max {max(ratio):.2f}); slowest {noun} statement: {max(slowest) * 1000:.0f} ms",
        flush=True,
    )


async def main(rows: int, repeat: int, log_rows: int, replaying: float) -> None:
    async with migrated_cluster() as url:
        if rows:
            await compare(url, "rows", rows, repeat, replaying)
        if log_rows:
            await compare(url, "log", log_rows, repeat, replaying)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--log-rows", type=int, default=0)
    parser.add_argument("--replaying", type=float, default=0, help="replays a second beside it")
    args = parser.parse_args()
    anyio.run(main, args.rows, args.repeat, args.log_rows, args.replaying)
