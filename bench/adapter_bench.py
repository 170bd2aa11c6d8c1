"""Benchmark: what an adapter's capture costs the job system's failure path.

    .venv/bin/python bench/adapter_bench.py [--jobs 1000] [--rounds 3]

On its own throwaway cluster with autovacuum on, each system's schema
installed by its own tooling. Per round, for each system, ``--jobs`` jobs are
made ready to fail (running, as a worker holds them), then failed for good by
the system's own statement, timed, once without dlqd's capture and once with
it (installed by ``dlqd adapters install``), interleaved:

- Procrastinate: ``procrastinate_finish_job_v1(id, 'failed', false)``, one
  transaction per job, as its worker finishes each job;
- PgQueuer: its worker's log statement (``build_log_job_query``: the status
  set to ``failed`` and the traceback logged, in one statement), for batches
  of 100 jobs, as its worker flushes its buffer;
- Oban (its Python port): its own acknowledgement statement
  (``oban/queries/ack_job.sql``, read from the installed package), one job a
  transaction;
- River: the UPDATE its client makes of a job whose last attempt failed (as
  ``tests/job_systems.py`` writes it: River cannot run here), one a
  transaction;
- pg-boss: the INSERT of the failed row its fail statement ends in (its
  statement is built by its JavaScript; the row is what the capture sees),
  one a transaction;
- Graphile Worker: its own worker (``runOnce``) working through the jobs
  (each fails: max_attempts 1), Node's start included.

Prints the median jobs failed per second without and with the capture, and
the ratio: the capture's overhead on that path (each captured job is also a
``job_dlq`` insert, with its inbox entry and count delta); beside them, the
plain-SQL floor of the same run: as many rows written into ``job_dlq`` by
plain INSERTs, as many a statement as the system fails at once. Asserts
nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import migrated_cluster  # type: ignore[import-not-found]

from dlqd.db.connector import connect
from dlqd.operator import adapters
from tests.job_systems import (
    install_graphile_worker,
    install_oban,
    install_pgboss,
    install_pgqueuer,
    install_procrastinate,
    install_river,
    pgboss_queue,
)

BATCH = 100


async def _procrastinate_round(url: str, jobs: int) -> float:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(
            """INSERT INTO procrastinate_jobs (queue_name, task_name, args, status, attempts)
               SELECT 'bench', 'doomed', jsonb_build_object('n', g), 'doing', 0
                 FROM generate_series(1, %s) g RETURNING id""",
            [jobs],
        )
        ids = [r[0] for r in await cur.fetchall()]
        started = time.perf_counter()
        for job_id in ids:  # each its own transaction, as the worker's
            await conn.execute("SELECT procrastinate_finish_job_v1(%s, 'failed', false)", [job_id])
        return jobs / (time.perf_counter() - started)


async def _pgqueuer_round(url: str, jobs: int) -> float:
    from pgqueuer import Queries
    from pgqueuer.db import PsycopgDriver

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(
            """INSERT INTO pgqueuer (priority, entrypoint, payload, status)
               SELECT 0, 'doomed', convert_to(json_build_object('n', g)::text, 'UTF8'), 'picked'
                 FROM generate_series(1, %s) g RETURNING id""",
            [jobs],
        )
        ids = [r[0] for r in await cur.fetchall()]
        driver = PsycopgDriver(conn)
        query = Queries(driver).qbq.build_log_job_query()
        traceback = json.dumps(
            {"exception_type": "RuntimeError", "exception_message": "doomed",
             "timestamp": "2026-12-01T00:00:00Z", "traceback": "...", "job_id": 0,
             "additional_context": None}
        )  # fmt: skip
        started = time.perf_counter()
        for start in range(0, len(ids), BATCH):
            batch = ids[start : start + BATCH]
            await driver.execute(query, batch, ["failed"] * len(batch), [traceback] * len(batch))
        return jobs / (time.perf_counter() - started)


async def _oban_round(url: str, jobs: int) -> float:
    ack = (ROOT / ".venv-oban/lib/python3.12/site-packages/oban/queries/ack_job.sql").read_text()
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(
            """INSERT INTO oban_jobs (worker, args, queue, state, attempt, max_attempts,
                                      attempted_at)
               SELECT 'Bench.Doomed', jsonb_build_object('n', g), 'bench', 'executing', 1, 1,
                      timezone('UTC', now())
                 FROM generate_series(1, %s) g RETURNING id, attempted_at""",
            [jobs],
        )
        rows = await cur.fetchall()
        error = json.dumps({"at": "2026-12-01T00:00:00Z", "attempt": 1, "error": "Doomed: no"})
        started = time.perf_counter()
        for job_id, attempted_at in rows:
            await conn.execute(
                ack.encode(),
                {"state": "discarded", "schedule_in": None, "attempt_change": None,
                 "error": error, "meta": None, "id": job_id, "attempted_at": attempted_at},
            )  # fmt: skip
        return jobs / (time.perf_counter() - started)


async def _river_round(url: str, jobs: int) -> float:
    from tests.job_systems import RIVER_FAIL

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(
            """INSERT INTO river_job (args, kind, max_attempts, state, attempt, attempted_at)
               SELECT jsonb_build_object('n', g), 'doomed', 1, 'running', 1, now()
                 FROM generate_series(1, %s) g RETURNING id""",
            [jobs],
        )
        ids = [r[0] for r in await cur.fetchall()]
        started = time.perf_counter()
        for job_id in ids:
            await conn.execute(RIVER_FAIL, {"id": job_id, "error": "doomed", "state": "discarded"})
        return jobs / (time.perf_counter() - started)


async def _pgboss_round(url: str, jobs: int) -> float:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        started = time.perf_counter()
        for n in range(jobs):
            await conn.execute(
                """INSERT INTO pgboss.job (name, data, state, retry_count, retry_limit, output,
                                           completed_on)
                   VALUES ('bench', jsonb_build_object('n', %s::integer), 'failed', 1, 1,
                           '{"name": "Error", "message": "doomed"}', now())""",
                [n],
            )
        return jobs / (time.perf_counter() - started)


async def _graphile_round(url: str, jobs: int) -> float:
    from tests.job_systems import graphile_worker_run_once

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(
            """SELECT graphile_worker.add_jobs(ARRAY(
                   SELECT ROW('doomed', json_build_object('n', g), NULL, NULL, 1, NULL, NULL,
                              NULL)::graphile_worker.job_spec
                     FROM generate_series(1, %s) g))""",
            [jobs],
        )
    started = time.perf_counter()
    graphile_worker_run_once(url)
    return jobs / (time.perf_counter() - started)


async def _plain_inserts(url: str, jobs: int, per_statement: int) -> float:
    """The floor: the same dead letters written into job_dlq by plain INSERTs
    (``per_statement`` rows each, one transaction each), with no job system."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        started = time.perf_counter()
        for start in range(0, jobs, per_statement):
            await conn.execute(
                """INSERT INTO job_dlq (original_job_id, app_id, type, payload, error_reason,
                                        attempts)
                   SELECT 'plain-' || g, 'bench', 'doomed', jsonb_build_object('n', g),
                          'failed', 1
                     FROM generate_series(%s::integer, %s::integer) g""",
                [start, min(jobs, start + per_statement) - 1],
            )
        return jobs / (time.perf_counter() - started)


async def _set_capture(url: str, name: str, on: bool) -> None:
    conn = await connect(url, autocommit=True)
    try:
        if on:
            await adapters.install(conn, name)
        else:
            await adapters.uninstall(conn, name)
    finally:
        await conn.close()


async def main(jobs: int, rounds: int) -> None:
    async with migrated_cluster() as url:
        install_procrastinate(url)
        install_pgqueuer(url)
        install_oban(url)
        install_river(url)
        install_pgboss(url)
        pgboss_queue(url, "bench", retry_limit=1, retry_delay=0)
        install_graphile_worker(url)
        with psycopg.connect(url) as conn:
            version = conn.execute("SHOW server_version").fetchone()
        print(f"PostgreSQL {version[0] if version else '?'}, {jobs} jobs a round, {rounds} rounds")
        runs: dict[tuple[str, bool], list[float]] = {}
        systems: list[tuple[str, Any, int]] = [
            ("procrastinate", _procrastinate_round, 1),
            ("pgqueuer", _pgqueuer_round, BATCH),
            ("oban", _oban_round, 1),
            ("river", _river_round, 1),
            ("pgboss", _pgboss_round, 1),
            ("graphile_worker", _graphile_round, 1),
        ]
        plain: dict[str, list[float]] = {}
        for _ in range(rounds):
            for name, one_round, per_statement in systems:
                for on in (False, True):
                    await _set_capture(url, name, on)
                    runs.setdefault((name, on), []).append(await one_round(url, jobs))
                plain.setdefault(name, []).append(await _plain_inserts(url, jobs, per_statement))
        for name, _, per_statement in systems:
            without = statistics.median(runs[(name, False)])
            with_ = statistics.median(runs[(name, True)])
            print(
                f"{name:15} failed jobs/s: without capture {without:8.0f}   "
                f"with capture {with_:8.0f}   ratio {with_ / without:.2f}x   "
                f"(rounds with: {', '.join(f'{v:.0f}' for v in runs[(name, True)])})"
            )
            print(
                f"{'':15} plain INSERT into job_dlq, {per_statement} row(s) a statement: "
                f"{statistics.median(plain[name]):8.0f} rows/s (writing the dead letters at all)"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    anyio.run(main, options.jobs, options.rounds)
