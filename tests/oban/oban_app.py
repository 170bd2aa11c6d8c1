"""Oban's Python port, run by its own code for dlqd's adapter tests.

Runs in .venv-oban (Python 3.12, requirements/oban.lock), not in dlqd's venv:

    .venv-oban/bin/python tests/oban/oban_app.py enqueue DSN KEY MAX_ATTEMPTS
    .venv-oban/bin/python tests/oban/oban_app.py drain DSN

``flaky`` counts its runs by its args' key in ``adapter_runs`` and fails
while the count is low. ``drain`` runs every available job of queue
``mail``, through Oban's own executor and its own acknowledgement SQL, then
exits.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import psycopg
from oban import Oban, worker
from oban.testing import drain_queue
from psycopg_pool import AsyncConnectionPool

DSN = sys.argv[2]


@worker(queue="mail")
class Flaky:
    async def process(self, job: Any) -> None:
        async with await psycopg.AsyncConnection.connect(DSN, autocommit=True) as conn:
            cur = await conn.execute(
                "UPDATE adapter_runs SET runs = runs + 1 WHERE job = %s RETURNING runs, fail_to",
                [job.args["key"]],
            )
            row = await cur.fetchone()
        if row is None:
            raise LookupError(f"no run count for {job.args['key']}")
        if row[0] <= row[1]:
            raise ValueError(f"{job.args['key']}: run {row[0]} fails on purpose")


async def main(command: str) -> None:
    pool = AsyncConnectionPool(DSN, open=False)
    await pool.open()
    try:
        oban = Oban(pool=pool)
        if command == "enqueue":
            key, max_attempts = sys.argv[3], int(sys.argv[4])
            job = await oban.enqueue(
                Flaky.new({"key": key, "tenant": "shop"}, max_attempts=max_attempts, priority=2)
            )
            print(json.dumps({"id": job.id}))
        elif command == "drain":
            # the jobs available now: a retry (scheduled later) waits, as in production
            outcomes = await drain_queue("mail", oban=oban, with_safety=True, with_scheduled=False)
            print(json.dumps(outcomes))
        else:
            raise SystemExit(f"unknown command {command!r}")
    finally:
        await pool.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
