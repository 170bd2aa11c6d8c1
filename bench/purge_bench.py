"""Benchmark: the scheduled purge against one plain DELETE of the same rows.

    .venv/bin/python bench/purge_bench.py [--rows 1000000] [--repeat 3]

On its own throwaway cluster with autovacuum on, as operators run it. Each
round inserts ``--rows`` replayed rows older than the retention (plus 10 % of
pending rows that stay), then deletes them with dlqd's purge (job_dlq_purge in
batches of purge.batch_size, each its own transaction, as the purger runs it)
and, after inserting them again, with one plain DELETE. Prints rows/s of both,
their ratio, and the slowest purge statement. Asserts nothing.
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
from dlqd.purge import purge_rows

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


async def dlqd_purge(url: str) -> tuple[float, int, float]:
    settings = load_settings(database_url=url)
    timings: list[tuple[float, int]] = []

    def observe(deleted: int, seconds: float) -> None:
        timings.append((seconds, deleted))

    conn = await connect(url, autocommit=True)
    conn.row_factory = dict_row  # type: ignore[assignment]
    try:
        started = time.perf_counter()
        result = await purge_rows(conn, settings, observe=observe)
        elapsed = time.perf_counter() - started
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
        return elapsed, result.deleted, seconds[-1]
    finally:
        await conn.close()


async def plain_delete(url: str) -> tuple[float, int]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        started = time.perf_counter()
        cur = await conn.execute(PLAIN)
        return time.perf_counter() - started, cur.rowcount


async def main(rows: int, repeat: int) -> None:
    async with migrated_cluster() as url:
        dlqd_rates, plain_rates, slowest = [], [], []
        for round_ in range(1, repeat + 1):
            expected = await fill(url, rows)
            seconds, deleted, worst = await dlqd_purge(url)
            assert deleted == expected, (deleted, expected)
            dlqd_rates.append(deleted / seconds)
            slowest.append(worst)
            expected = await fill(url, rows)
            plain_seconds, plain_deleted = await plain_delete(url)
            assert plain_deleted == expected
            plain_rates.append(plain_deleted / plain_seconds)
            print(
                f"round {round_}: dlqd purge {deleted} rows in {seconds:.2f}s "
                f"({deleted / seconds:,.0f} rows/s, slowest statement {worst * 1000:.0f} ms); "
                f"plain DELETE {plain_deleted} rows in {plain_seconds:.2f}s "
                f"({plain_deleted / plain_seconds:,.0f} rows/s)",
                flush=True,
            )
        ratio = [d / p for d, p in zip(dlqd_rates, plain_rates, strict=True)]
        print(
            f"dlqd purge: median {statistics.median(dlqd_rates):,.0f} rows/s "
            f"(min {min(dlqd_rates):,.0f}, max {max(dlqd_rates):,.0f}); "
            f"plain DELETE: median {statistics.median(plain_rates):,.0f} rows/s "
            f"(min {min(plain_rates):,.0f}, max {max(plain_rates):,.0f})"
        )
        print(
            f"ratio: median {statistics.median(ratio):.2f}x (min {min(ratio):.2f}, "
            f"max {max(ratio):.2f}); slowest purge statement: {max(slowest) * 1000:.0f} ms"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    anyio.run(main, args.rows, args.repeat)
