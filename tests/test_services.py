"""The service shape: rounds a test awaits through signals, never sleeps on."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from dlqd.config import load_settings
from dlqd.services.base import PeriodicService
from dlqd.services.sweeper import Sweeper
from dlqd.wake import Wakeup
from tests.factories import INSERT_MANY, row_json

pytestmark = pytest.mark.anyio


@pytest.fixture
async def pool(dlqd_url: str) -> AsyncIterator[AsyncConnectionPool[Any]]:
    p: AsyncConnectionPool[Any] = AsyncConnectionPool(
        dlqd_url, min_size=1, max_size=2, open=False,
        kwargs={"autocommit": True, "row_factory": dict_row},
    )  # fmt: skip
    await p.open()
    yield p
    await p.close()


async def test_the_sweeper_moves_rows_that_bypassed_the_trigger(
    db_url: str, dlqd_url: str, pool: AsyncConnectionPool[Any]
) -> None:
    settings = load_settings(database_url=dlqd_url, listen={"poll_interval": "100ms"})
    wakeup = Wakeup()
    flag = wakeup.flag()
    sweeper = Sweeper(pool, lambda: settings, wakeup)
    async with anyio.create_task_group() as tg:
        await tg.start(sweeper.run)
        with anyio.fail_after(10):
            await sweeper.signals.ran.wait()
        assert sweeper.last_result == 0
        assert not flag.is_set()
        async with await psycopg.AsyncConnection.connect(db_url) as conn:
            await conn.execute("SET session_replication_role = replica")
            rows = [row_json(original_job_id=f"restored{i}") for i in range(3)]
            await conn.execute(INSERT_MANY, {"rows": Jsonb(rows)})
            await conn.commit()
        with anyio.fail_after(10):
            while sweeper.last_result != 3:
                await sweeper.signals.ran.wait()
        assert flag.is_set()  # the replayers were woken
        tg.cancel_scope.cancel()


class Flaky(PeriodicService[int]):
    """Fails its first round, then counts."""

    name = "flaky"
    error_base = 0.01
    error_cap = 0.02

    def __init__(self) -> None:
        super().__init__()
        self.rounds = 0

    def interval(self) -> float:
        return 0.01

    async def run_once(self) -> int:
        self.rounds += 1
        if self.rounds == 1:
            raise RuntimeError("first round fails")
        return self.rounds


async def test_a_failing_round_never_ends_a_service() -> None:
    service = Flaky()
    async with anyio.create_task_group() as tg:
        await tg.start(service.run)
        with anyio.fail_after(10):
            await service.signals.failed.wait()
            await service.signals.ran.wait()
        assert service.last_result == 2
        assert service.signals.failed.count == 1
        tg.cancel_scope.cancel()


async def test_the_sweep_probes_indexes_whatever_the_statistics_say(
    db_url: str, dlqd_url: str, pool: AsyncConnectionPool[Any]
) -> None:
    """Issue 18 finding 14: with statistics from a quiet day (an empty inbox),
    then 30,000 new rows, the sweep was planned as a nested loop over a
    materialised inbox (15 s; minutes in a drain). Its page is index probes,
    whatever the statistics, and it moves exactly the rows without an entry."""
    from dlqd.db.queries import q

    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute("ANALYZE job_dlq, dlqd_inbox, dlqd_entry_state")  # all empty
        await conn.execute(
            """INSERT INTO job_dlq (original_job_id, app_id, type, payload, error_reason, attempts)
               SELECT 'burst' || g, 'a', 't', '{}', 'r', 1 FROM generate_series(1, 30000) g"""
        )
        await conn.execute("SET session_replication_role = replica")  # a restore: no trigger
        await conn.execute(
            """INSERT INTO job_dlq (original_job_id, app_id, type, payload, error_reason, attempts)
               SELECT 'restored' || g, 'a', 't', '{}', 'r', 1 FROM generate_series(1, 500) g"""
        )
    async with await psycopg.AsyncConnection.connect(dlqd_url, row_factory=dict_row) as conn:
        await conn.execute(q("sweep_plans"), {"statement_timeout": "10s", "lock_timeout": "2s"})
        cur = await conn.execute(
            b"EXPLAIN " + q("enqueue_orphans").encode(),
            {"after_dlq_at": None, "after_id": None, "limit": 10_000},
        )
        plan = "\n".join(row["QUERY PLAN"] for row in await cur.fetchall())
    assert "Seq Scan on dlqd_inbox" not in plan, plan
    assert "Seq Scan on dlqd_entry_state" not in plan, plan
    assert "Materialize" not in plan, plan
    assert "dlqd_inbox_dlq_id_key" in plan, plan  # the inbox, probed by its unique index
    settings = load_settings(database_url=dlqd_url)
    sweeper = Sweeper(pool, lambda: settings, Wakeup())
    assert await sweeper.run_once() == 500
    assert await sweeper.run_once() == 0  # the next round finds nothing more
