"""Benchmark: job_dlq as one table against a copy partitioned by day of dlq_at.

    .venv/bin/python bench/partition_bench.py [--rows 10000000] [--days 30]
        [--retention-days 20]

The measurements behind docs/partitioning.md. On its own throwaway cluster
with autovacuum on: dlqd's ``job_dlq`` (migrated, its triggers on) gets
``--rows`` rows whose ``dlq_at`` spreads evenly over the last ``--days``
days. The rows of the days older than ``--retention-days`` were replayed long
ago (past ``purge.replayed_retention``); of the newer ones, 10 % are pending.
A copy of the same rows goes into ``job_dlq_by_day``: the same columns,
partitioned by range of ``dlq_at``, one partition a day, the key
``(id, dlq_at)``, the same partial index of the pending set.

Printed, each layout beside the other:
- the purge of the old days: dlqd's purge (``job_dlq_purge`` in batches, as
  the leader runs it) against ``DETACH PARTITION`` and ``DROP TABLE`` of the
  old partitions (not ``CONCURRENTLY``: Postgres refuses that while a default
  partition exists); rows/s, the WAL each wrote, and the
  ``VACUUM`` the deletes leave behind;
- a row by its id (``dlqd show``, ``explain``, the console's row page): one
  table, the copy without ``dlq_at`` (a probe per partition) and with it;
- the first page of pending rows (``dlqd list``);
- single-row inserts, one per transaction, into an empty table of each shape
  without triggers (the cost of routing a row to its partition).
Asserts only that both layouts hold the same rows before the purge and after.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import psycopg
from psycopg.rows import dict_row

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import migrated_cluster  # type: ignore[import-not-found]

from dlqd.config import load_settings
from dlqd.db.connector import connect
from dlqd.purge import purge_rows

# the days start at midnight, so that the old days are whole partitions
FILL = """
INSERT INTO job_dlq (original_job_id, app_id, type, payload, error_reason, attempts, dlq_at,
                     replayed_at)
SELECT 'job-' || g, 'app-' || (g %% 7), 'email.send', jsonb_build_object('n', g), 'timeout', 3,
       t.dlq_at,
       CASE WHEN t.dlq_at < %(cutoff)s THEN t.dlq_at + interval '1 second'
            WHEN g %% 10 = 0 THEN NULL
            ELSE greatest(t.dlq_at, now() - interval '1 hour') END
  FROM generate_series(1, %(n)s) g
 CROSS JOIN LATERAL (SELECT %(start)s + (g - 1) * %(step)s AS dlq_at) t
"""

SHAPE = """
CREATE TABLE {name} (LIKE job_dlq INCLUDING DEFAULTS) PARTITION BY RANGE (dlq_at);
ALTER TABLE {name} ADD PRIMARY KEY (id, dlq_at);
CREATE INDEX ON {name} (dlq_at, id) WHERE replayed_at IS NULL;
"""

BARE_ONE = """
CREATE TABLE {name} (LIKE job_dlq INCLUDING DEFAULTS);
ALTER TABLE {name} ADD PRIMARY KEY (id);
CREATE INDEX ON {name} (dlq_at, id) WHERE replayed_at IS NULL;
"""

INSERT_ONE = """
INSERT INTO {name} (original_job_id, app_id, type, payload, error_reason, attempts)
VALUES (%s, 'app-1', 'email.send', '{{"n": 1}}', 'timeout', 3)
"""


async def partitioned(conn: psycopg.AsyncConnection[dict[str, Any]], name: str, days: int) -> None:
    """``name`` partitioned by day: the ``days`` past days, today and tomorrow,
    and a default partition for what falls outside them."""
    await conn.execute(SHAPE.format(name=name).encode())
    for day in range(-days, 2):
        await conn.execute(
            f"""CREATE TABLE {name}_d{day + days:03d} PARTITION OF {name}
                FOR VALUES FROM (date_trunc('day', now()) + interval '{day} days')
                            TO (date_trunc('day', now()) + interval '{day + 1} days')""".encode()
        )
    await conn.execute(f"CREATE TABLE {name}_default PARTITION OF {name} DEFAULT".encode())


async def one(
    conn: psycopg.AsyncConnection[dict[str, Any]], sql: str, params: object = None
) -> dict[str, Any]:
    cur = await conn.execute(sql.encode(), params)  # type: ignore[arg-type]
    row = await cur.fetchone()
    assert row is not None
    return row


async def same_rows(conn: psycopg.AsyncConnection[dict[str, Any]], rows: int) -> dict[str, Any]:
    """Both layouts hold ``rows`` rows; how many of them are pending."""
    counts = await one(
        conn,
        """SELECT (SELECT count(*) FROM job_dlq) AS one,
                  (SELECT count(*) FROM job_dlq_by_day) AS by_day,
                  (SELECT count(*) FROM job_dlq WHERE replayed_at IS NULL) AS pending""",
    )
    assert counts["one"] == counts["by_day"] == rows, counts
    return counts


async def wal_bytes(conn: psycopg.AsyncConnection[dict[str, Any]], since: str) -> int:
    row = await one(conn, "SELECT pg_current_wal_lsn() - %s::pg_lsn AS n", [since])
    return int(row["n"])


async def lsn(conn: psycopg.AsyncConnection[dict[str, Any]]) -> str:
    return str((await one(conn, "SELECT pg_current_wal_lsn()::text AS l"))["l"])


def ms(values: list[float]) -> str:
    values = sorted(values)
    return (
        f"median {statistics.median(values) * 1000:.3f} ms, "
        f"p99 {values[int(len(values) * 0.99)] * 1000:.3f} ms"
    )


async def timed(
    conn: psycopg.AsyncConnection[dict[str, Any]], sql: str, params: list[list[object]]
) -> list[float]:
    seconds = []
    for p in params:
        started = time.perf_counter()
        cur = await conn.execute(sql.encode(), p, prepare=True)  # type: ignore[arg-type]
        await cur.fetchall()
        seconds.append(time.perf_counter() - started)
    return seconds


async def inserts(url: str, days: int, count: int) -> None:
    async with await psycopg.AsyncConnection.connect(
        url, autocommit=True, row_factory=dict_row
    ) as conn:
        await conn.execute(BARE_ONE.format(name="bare_one").encode())
        await partitioned(conn, "bare_by_day", days)
        rates = {}
        for name in ("bare_one", "bare_by_day", "bare_one", "bare_by_day"):
            statement = INSERT_ONE.format(name=name).encode()
            started = time.perf_counter()
            for i in range(count):
                await conn.execute(statement, [f"ins-{i}"], prepare=True)
            rates.setdefault(name, []).append(count / (time.perf_counter() - started))
        for name, label in (("bare_one", "one table"), ("bare_by_day", "by day")):
            print(
                f"single-row inserts, one session, {label} (no triggers): "
                f"{max(rates[name]):,.0f} rows/s (best of 2)"
            )


async def main(rows: int, days: int, retention_days: int, samples: int) -> None:
    async with migrated_cluster() as url:
        conn = await psycopg.AsyncConnection.connect(url, autocommit=True, row_factory=dict_row)
        try:
            bounds = await one(
                conn,
                """SELECT date_trunc('day', now()) - make_interval(days => %s) AS start,
                          date_trunc('day', now()) - make_interval(days => %s) AS cutoff""",
                [days, retention_days],
            )
            step = timedelta(seconds=days * 86400 / rows)
            started = time.perf_counter()
            await conn.execute(
                FILL.encode(),
                {"n": rows, "start": bounds["start"], "cutoff": bounds["cutoff"], "step": step},
            )
            await partitioned(conn, "job_dlq_by_day", days)
            await conn.execute("INSERT INTO job_dlq_by_day SELECT * FROM job_dlq")
            await conn.execute("VACUUM ANALYZE job_dlq")
            await conn.execute("VACUUM ANALYZE job_dlq_by_day")
            old = int(
                (
                    await one(
                        conn,
                        "SELECT count(*) AS n FROM job_dlq WHERE dlq_at < %s",
                        [bounds["cutoff"]],
                    )
                )["n"]
            )
            both = await same_rows(conn, rows)
            print(
                f"{rows:,} rows over {days} days ({both['pending']:,} pending), "
                f"{old:,} of them in the {days - retention_days} days past retention; "
                f"both layouts filled in {time.perf_counter() - started:.0f} s",
                flush=True,
            )

            # rows by id, and the first page, before the purge (the full table)
            sample = [
                [r["id"], r["dlq_at"]]
                for r in await (
                    await conn.execute(
                        "SELECT id, dlq_at FROM job_dlq WHERE dlq_at >= %s "
                        "ORDER BY random() LIMIT %s",
                        [bounds["cutoff"], samples],
                    )
                ).fetchall()
            ]
            random.shuffle(sample)
            ids = [[i] for i, _ in sample]
            for label, sql, params in (
                ("one table, by id", "SELECT * FROM job_dlq WHERE id = %s", ids),
                ("by day, by id alone", "SELECT * FROM job_dlq_by_day WHERE id = %s", ids),
                (
                    "by day, by id and dlq_at",
                    "SELECT * FROM job_dlq_by_day WHERE id = %s AND dlq_at = %s",
                    sample,
                ),
            ):
                await timed(conn, sql, params[:50])  # warm: the plan and the pages
                print(f"a row {label}: {ms(await timed(conn, sql, params))}", flush=True)
            for label, table in (("one table", "job_dlq"), ("by day", "job_dlq_by_day")):
                sql = (
                    f"SELECT id FROM {table} WHERE replayed_at IS NULL ORDER BY dlq_at, id LIMIT 50"
                )
                await timed(conn, sql, [[]] * 20)
                print(
                    f"first page of pending rows, {label}: {ms(await timed(conn, sql, [[]] * 200))}"
                )

            # the purge: dlqd's batches on the one table
            settings = load_settings(
                database_url=url, purge={"replayed_retention": f"{retention_days}d"}
            )
            purger = await connect(url, autocommit=True)
            purger.row_factory = dict_row  # type: ignore[assignment]
            batches: list[float] = []
            try:
                since = await lsn(conn)
                started = time.perf_counter()
                result = await purge_rows(
                    purger, settings, observe=lambda _, seconds: batches.append(seconds)
                )
                purge_seconds = time.perf_counter() - started
                purge_wal = await wal_bytes(conn, since)
            finally:
                await purger.close()
            assert result.deleted == old, (result.deleted, old)
            since = await lsn(conn)
            started = time.perf_counter()
            await conn.execute("VACUUM job_dlq")
            vacuum_seconds = time.perf_counter() - started
            vacuum_wal = await wal_bytes(conn, since)
            print(
                f"purge, one table (dlqd's batches): {old:,} rows in {purge_seconds:.2f} s = "
                f"{old / purge_seconds:,.0f} rows/s, {len(batches)} statements, slowest "
                f"{max(batches) * 1000:.0f} ms, WAL {purge_wal / 2**20:,.1f} MiB; then VACUUM "
                f"{vacuum_seconds:.2f} s, WAL {vacuum_wal / 2**20:,.1f} MiB",
                flush=True,
            )

            # the purge: the old partitions detached and dropped
            parts = await (
                await conn.execute(
                    """SELECT c.relname FROM pg_inherits i
                         JOIN pg_class c ON c.oid = i.inhrelid
                        WHERE i.inhparent = 'job_dlq_by_day'::regclass
                          AND c.relname <> 'job_dlq_by_day_default'
                        ORDER BY c.relname"""
                )
            ).fetchall()
            old_parts = [p["relname"] for p in parts][: days - retention_days]
            since = await lsn(conn)
            started = time.perf_counter()
            statements: list[float] = []
            for part in old_parts:
                for sql in (
                    f"SELECT EXISTS (SELECT FROM {part} WHERE replayed_at IS NULL) AS pending",
                    # not CONCURRENTLY: Postgres refuses it while a default partition
                    # exists; the plain form locks the parent (inserts wait) while it runs
                    f"ALTER TABLE job_dlq_by_day DETACH PARTITION {part}",
                    f"DROP TABLE {part}",
                ):
                    began = time.perf_counter()
                    cur = await conn.execute(sql.encode())
                    if cur.description:
                        row = await cur.fetchone()
                        assert row is not None, part
                        assert not row["pending"], part
                    statements.append(time.perf_counter() - began)
            drop_seconds = time.perf_counter() - started
            drop_wal = await wal_bytes(conn, since)
            print(
                f"purge, by day (DETACH and DROP of {len(old_parts)} partitions): "
                f"{old:,} rows in {drop_seconds:.2f} s = {old / drop_seconds:,.0f} rows/s, "
                f"slowest statement {max(statements) * 1000:.0f} ms, "
                f"WAL {drop_wal / 2**20:,.1f} MiB; nothing left to vacuum",
                flush=True,
            )
            print(
                f"ratio: the drop {purge_seconds / drop_seconds:,.0f}x as fast as dlqd's batches "
                f"({(purge_seconds + vacuum_seconds) / drop_seconds:,.0f}x with the vacuum)"
            )
            await same_rows(conn, rows - old)
        finally:
            await conn.close()
        await inserts(url, days, 20_000)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--retention-days", type=int, default=20)
    parser.add_argument("--samples", type=int, default=2000, help="rows read by id, per layout")
    args = parser.parse_args()
    anyio.run(main, args.rows, args.days, args.retention_days, args.samples)
