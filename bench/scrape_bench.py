"""Benchmark: what a scrape and the metrics collector cost on a large table.

    .venv/bin/python bench/scrape_bench.py [--rows 10000000] [--pending 100000] [--repeat 50]

On its own throwaway cluster with autovacuum on. Fills ``job_dlq`` with
``--rows`` rows of which ``--pending`` are pending (1 % of those parked, 1 %
unmatched, as the daemon records them) over 7 tenants x 5 types x 4 reasons,
then measures:

- the collector's round (the grouped pending counts, the parked/unmatched
  counts, the NOTIFY queue usage: what runs every ``metrics.refresh_interval``),
  next to the plain-SQL floor of the same run (``count(*)`` of the pending
  rows), with the plans' scan nodes from EXPLAIN;
- a scrape: ``GET /metrics`` over HTTP from the real server (Starlette under
  hypercorn), plain text, OpenMetrics and gzip, with the collected series.

Prints medians and min/max. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import psycopg
from prometheus_client import generate_latest
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import migrated_cluster  # type: ignore[import-not-found]

from dlqd.config import load_settings
from dlqd.db.queries import q
from dlqd.metrics import Metrics
from dlqd.services.collector import Collector
from dlqd.web import build_app, serve

FILL = """
INSERT INTO job_dlq (original_job_id, app_id, type, payload, error_reason, attempts, dlq_at,
                     replayed_at)
SELECT 'job-' || g, 'app-' || (g %% 7), 'type.' || (g %% 5), jsonb_build_object('n', g),
       'reason-' || (g %% 4), 3,
       now() - interval '3 days' + g * interval '10 ms',
       CASE WHEN abs(hashint4(g)) %% %(every)s = 0 THEN NULL ELSE now() - interval '1 day' END
  FROM generate_series(1, %(n)s) g
"""
# what the daemon records for held rows: 1 % parked, 1 % unmatched
HELD = """
INSERT INTO dlqd_entry_state (dlq_id, state, policy, fingerprint, due_at, failures,
                              parked_reason, updated_at)
SELECT id, CASE WHEN n % 2 = 0 THEN 'parked' ELSE 'unmatched' END,
       CASE WHEN n % 2 = 0 THEN 'p' END, 'bench', NULL, 0,
       CASE WHEN n % 2 = 0 THEN 'max_failures' END, now()
  FROM (SELECT id, row_number() OVER () AS n FROM job_dlq WHERE replayed_at IS NULL) p
 WHERE n % 50 = 0
"""
FLOOR = "SELECT count(*) FROM job_dlq WHERE replayed_at IS NULL"


def ms(values: list[float]) -> str:
    return (
        f"median {statistics.median(values) * 1000:.2f} ms "
        f"(min {min(values) * 1000:.2f}, max {max(values) * 1000:.2f})"
    )


def scan_nodes(plan: dict[str, Any]) -> list[str]:
    found: list[str] = []
    node_type = plan.get("Node Type", "")
    if "Scan" in node_type:
        found.append(f"{node_type} on {plan.get('Index Name') or plan.get('Relation Name')}")
    for child in plan.get("Plans", []):
        found.extend(scan_nodes(child))
    return found


async def fill(url: str, rows: int, pending: int) -> None:
    started = time.perf_counter()
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("ALTER TABLE job_dlq DISABLE TRIGGER USER")  # no inbox, no NOTIFY
        step = 1_000_000
        every = max(1, rows // pending)
        for start in range(0, rows, step):
            count = min(step, rows - start)
            await conn.execute(
                FILL.replace(
                    "generate_series(1, %(n)s)", f"generate_series({start + 1}, {start + count})"
                ),
                {"n": count, "every": every},
            )
            print(f"  filled {start + count:,} rows", flush=True)
        await conn.execute("ALTER TABLE job_dlq ENABLE TRIGGER USER")
        await conn.execute(HELD)
        await conn.execute("VACUUM (ANALYZE) job_dlq")
        await conn.execute("VACUUM (ANALYZE) dlqd_entry_state")
        cur = await conn.execute(
            "SELECT count(*) FILTER (WHERE replayed_at IS NULL), count(*) FROM job_dlq"
        )
        row = await cur.fetchone()
        assert row is not None
        print(
            f"table: {row[1]:,} rows, {row[0]:,} pending "
            f"(filled and vacuumed in {time.perf_counter() - started:.0f} s)",
            flush=True,
        )


async def explain(url: str) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        for name in ("status_groups", "status_held"):
            cur = await conn.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {q(name)}")
            row = await cur.fetchone()
            assert row is not None
            plan = row[0][0]
            print(
                f"EXPLAIN {name}: {', '.join(scan_nodes(plan['Plan']))}; "
                f"heap fetches {_heap_fetches(plan['Plan'])}; "
                f"execution {plan['Execution Time']:.1f} ms",
                flush=True,
            )


def _heap_fetches(plan: dict[str, Any]) -> int:
    return int(plan.get("Heap Fetches", 0)) + sum(_heap_fetches(c) for c in plan.get("Plans", []))


async def collector_rounds(url: str, repeat: int, metrics: Metrics) -> None:
    settings = load_settings(database_url=url)
    async with AsyncConnectionPool(
        url,
        min_size=1,
        max_size=1,
        kwargs={"autocommit": True, "row_factory": dict_row},
        open=False,
    ) as pool:
        collector = Collector(pool, lambda: settings, metrics)
        await collector.run_once()  # warm
        rounds: list[float] = []
        for _ in range(repeat):
            started = time.perf_counter()
            result = await collector.run_once()
            rounds.append(time.perf_counter() - started)
        floors: list[float] = []
        async with pool.connection() as conn:
            for _ in range(repeat):
                started = time.perf_counter()
                await conn.execute(FLOOR)
                floors.append(time.perf_counter() - started)
    print(f"collector round ({result.groups} groups, {result.series} series): {ms(rounds)}")
    print(f"plain-SQL floor, count(*) of the pending rows: {ms(floors)}")
    print(f"ratio: {statistics.median(rounds) / statistics.median(floors):.2f}x the floor")


def raw_get(port: int, headers: dict[str, str]) -> tuple[float, int]:
    """One scrape as Prometheus makes it, from a plain socket (in a worker
    thread, so that an HTTP client's own work is not counted): seconds, bytes."""
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = f"GET /metrics HTTP/1.1\r\nHost: bench\r\n{head}Connection: close\r\n\r\n"
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(request.encode())
        data = b""
        while chunk := client.recv(65536):
            data += chunk
    took = time.perf_counter() - started
    return took, len(data.split(b"\r\n\r\n", 1)[1])


async def scrapes(metrics: Metrics, repeat: int) -> None:
    renders: list[float] = []
    for _ in range(repeat):
        started = time.perf_counter()
        generate_latest(metrics.registry)
        renders.append(time.perf_counter() - started)
    print(f"rendering alone (prometheus-client generate_latest): {ms(renders)}")
    app = build_app(metrics.registry, list)
    async with anyio.create_task_group() as tg:
        port = await tg.start(serve, "127.0.0.1", 0, app)
        variants = {
            "text": {"Accept-Encoding": "identity"},
            "openmetrics": {
                "Accept": "application/openmetrics-text; version=1.0.0",
                "Accept-Encoding": "identity",
            },
            "gzip": {"Accept-Encoding": "gzip"},
        }
        for name, headers in variants.items():
            await anyio.to_thread.run_sync(raw_get, port, headers)  # warm
            took: list[float] = []
            size = 0
            for _ in range(repeat):
                seconds, size = await anyio.to_thread.run_sync(raw_get, port, headers)
                took.append(seconds)
            print(f"scrape {name:<11} ({size:,} bytes on the wire): {ms(took)}", flush=True)
        tg.cancel_scope.cancel()


async def main(rows: int, pending: int, repeat: int) -> None:
    async with migrated_cluster() as url:
        await fill(url, rows, pending)
        await explain(url)
        metrics = Metrics()
        await collector_rounds(url, repeat, metrics)
        await scrapes(metrics, repeat)
        print(json.dumps({"rows": rows, "pending": pending, "repeat": repeat}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--pending", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    anyio.run(main, args.rows, args.pending, args.repeat)
