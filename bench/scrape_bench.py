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
- the counts (migration 012): the baseline reconciliation (the table counted
  once, after the fill that ran without triggers) and a reconciliation round,
  which the leader runs at most every hundred times its duration;
- ``dlqd status`` (``collect_status``) and the console's overview;
- the reads an incident hits: ``list``'s first page (no filter, ``--state
  parked``, ``--policy``, a glob), ``explain`` and ``show``, through the
  operator layer, next to their plain-SQL floors (the first 50 pending rows
  by the pending index; one row by its key);
- a scrape: ``GET /metrics`` over HTTP from the real server (Starlette under
  hypercorn), plain text, OpenMetrics and gzip, with the collected series;
- with ``--idle SECONDS``: every pending row parked by a policy (as the daemon
  records it), then a real ``dlqd run`` with that policy, idle: the CPU of the
  daemon and of the database backends serving it over that many seconds.

Prints medians and min/max. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
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
from dlqd.db import counts
from dlqd.db.queries import q
from dlqd.filters import PendingFilter
from dlqd.metrics import Metrics
from dlqd.operator import reads
from dlqd.operator.explain import explain as explain_row
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
    async with await psycopg.AsyncConnection.connect(
        url, autocommit=True, row_factory=dict_row
    ) as conn:
        began = time.perf_counter()
        await counts.reconcile(conn)  # the baseline: what was there before the counts
        await counts.fold(conn)
        print(f"baseline reconciliation: {time.perf_counter() - began:.1f} s", flush=True)


async def explain(url: str) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        for name in ("status_counts", "held_counts"):
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


async def timed(repeat: int, step: Any) -> list[float]:
    await step()  # warm
    took: list[float] = []
    for _ in range(repeat):
        started = time.perf_counter()
        await step()
        took.append(time.perf_counter() - started)
    return took


async def incident_reads(url: str, repeat: int) -> None:
    async with await psycopg.AsyncConnection.connect(
        url, autocommit=True, row_factory=dict_row
    ) as conn:
        took = await timed(repeat, lambda: reads.status(conn))
        print(f"dlqd status (collect_status): {ms(took)}")
        print(f"console overview: {ms(await timed(repeat, lambda: reads.overview(conn)))}")
        cur = await conn.execute(
            "SELECT id FROM job_dlq WHERE replayed_at IS NULL ORDER BY dlq_at DESC LIMIT 1"
        )
        row = await cur.fetchone()
        assert row is not None
        some = row["id"]
        filters = {
            "list, first page": None,
            "list --state parked": PendingFilter(state=("parked",)),
            "list --policy p": PendingFilter(policy=("p",)),
            "list --type '*.3'": PendingFilter(type=("*.3",)),
            "list --app-id app-3 --type 'type.*'": PendingFilter(
                app_id=("app-3",), type=("type.*",)
            ),
        }
        for name, where in filters.items():
            took = await timed(repeat, lambda w=where: reads.list_rows(conn, 50, where=w))
            print(f"{name}: {ms(took)}")
        floor = await timed(
            repeat,
            lambda: conn.execute(
                "SELECT * FROM job_dlq WHERE replayed_at IS NULL ORDER BY dlq_at, id LIMIT 50"
            ),
        )
        print(f"plain-SQL floor, the first 50 pending rows: {ms(floor)}")
        print(f"explain: {ms(await timed(repeat, lambda: explain_row(conn, None, some)))}")
        print(f"show: {ms(await timed(repeat, lambda: reads.show(conn, some)))}")
        floor = await timed(
            repeat, lambda: conn.execute("SELECT * FROM job_dlq WHERE id = %s", (some,))
        )
        print(f"plain-SQL floor, one row by its key: {ms(floor)}")
        took = await timed(min(repeat, 3), lambda: counts.reconcile(conn))
        print(f"reconciliation round: {ms(took)}")


PARK_ALL = """
INSERT INTO dlqd_entry_state (dlq_id, state, policy, fingerprint, due_at, failures,
                              parked_reason, updated_at)
SELECT id, 'parked_policy', 'hold', %(fingerprint)s, NULL, 0, NULL, now()
  FROM job_dlq WHERE replayed_at IS NULL
"""
HOLD = """
[listen]
poll_interval = "30s"

[[policies]]
name = "hold"
action = "park"
"""


def cpu_seconds(pid: int) -> float:
    """User plus system CPU of one process so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0  # ended meanwhile
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def idle(url: str, seconds: float) -> None:
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "dlqd.toml"
        config.write_text(HOLD)
        settings = load_settings(config, database_url=url)
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            began = time.perf_counter()
            await conn.execute("DELETE FROM dlqd_entry_state")
            await conn.execute(PARK_ALL, {"fingerprint": settings.policies_fingerprint})
            await conn.execute("VACUUM (ANALYZE) dlqd_entry_state")
            cur = await conn.execute("SELECT count(*) FROM dlqd_entry_state")
            parked = (await cur.fetchone() or (0,))[0]
            print(f"parked {parked:,} rows in {time.perf_counter() - began:.0f} s", flush=True)
        env = {
            **os.environ,
            "DLQD_DATABASE_URL": url,
            "DLQD_METRICS_HOST": "127.0.0.1",
            "DLQD_METRICS_PORT": "0",
        }
        daemon = subprocess.Popen(  # noqa: ASYNC220 - a benchmark, nothing else runs
            [sys.executable, "-m", "dlqd", "run", "--config", str(config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            await anyio.sleep(30)  # started: the first full pass, the counts' baseline
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                cur = await conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'dlqd%%'"
                    " AND pid <> pg_backend_pid()"
                )
                backends = [pid for (pid,) in await cur.fetchall()]
            before = cpu_seconds(daemon.pid), sum(cpu_seconds(p) for p in backends)
            await anyio.sleep(seconds)
            after = cpu_seconds(daemon.pid), sum(cpu_seconds(p) for p in backends)
        finally:
            daemon.terminate()
            daemon.wait(timeout=30)
    print(
        f"idle with {parked:,} parked, {seconds:.0f} s: daemon "
        f"{(after[0] - before[0]) / seconds * 100:.2f}% of a core, its {len(backends)} "
        f"database backends {(after[1] - before[1]) / seconds * 100:.2f}% of a core"
    )


async def main(rows: int, pending: int, repeat: int, idle_seconds: float) -> None:
    async with migrated_cluster() as url:
        await fill(url, rows, pending)
        await explain(url)
        metrics = Metrics()
        await collector_rounds(url, repeat, metrics)
        await incident_reads(url, repeat)
        await scrapes(metrics, repeat)
        if idle_seconds:
            await idle(url, idle_seconds)
        print(json.dumps({"rows": rows, "pending": pending, "repeat": repeat}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--pending", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--idle", type=float, default=0.0, metavar="SECONDS")
    args = parser.parse_args()
    anyio.run(main, args.rows, args.pending, args.repeat, args.idle)
