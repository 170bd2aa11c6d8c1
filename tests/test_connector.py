"""The replay worker's connection, held from one pass to the next."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from dlqd.db.connector import HeldConnection
from dlqd.errors import DatabaseError
from tests.daemon_helpers import wait_until

pytestmark = pytest.mark.anyio


def _available(pool: AsyncConnectionPool[Any]) -> int:
    return int(pool.get_stats()["pool_available"])


async def _until(condition: Any) -> None:
    """The pool replaces and returns connections in its own tasks: poll its stats."""

    async def holds() -> bool:
        return bool(condition())

    await wait_until(holds, within=10)


async def test_a_held_connection_is_kept_checked_and_given_back(db_url: str) -> None:
    async with AsyncConnectionPool(
        db_url, min_size=2, max_size=2, kwargs={"autocommit": True, "row_factory": dict_row}
    ) as pool:
        await pool.wait()
        held = HeldConnection(pool, check_after=3600, keep_for=3600)
        async with held.connection() as first:
            pid = first.info.backend_pid
        async with held.connection() as again:
            assert again is first
        assert pool.get_stats()["requests_num"] == 1  # taken from the pool once
        assert _available(pool) == 1  # held between the uses

        # its backend ends while it is held: unused for check_after, it is
        # checked, given back, and another one is used, without an error
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as admin:
            await admin.execute("SELECT pg_terminate_backend(%s)", [pid])
        held.check_after = 0
        async with held.connection() as fresh:
            assert fresh is not first
            assert (await (await fresh.execute("SELECT 1 AS one")).fetchone()) == {"one": 1}

        # a use that fails gives the connection back
        with pytest.raises(DatabaseError):
            async with held.connection() as conn:
                await conn.execute("SELECT 1 / 0")
        await _until(lambda: _available(pool) == 2)

        # so does a use that leaves a transaction open (the pool rolls it back)
        async with held.connection() as conn:
            await conn.execute("BEGIN")
        await _until(lambda: _available(pool) == 2)
        async with held.connection() as conn:
            assert conn.info.transaction_status == TransactionStatus.IDLE

        # kept for keep_for: given back, and one is taken from the pool again
        taken = pool.get_stats()["requests_num"]
        held.keep_for = 0
        async with held.connection():
            pass
        assert pool.get_stats()["requests_num"] == taken + 1

        await held.release()
        await _until(lambda: _available(pool) == 2)
