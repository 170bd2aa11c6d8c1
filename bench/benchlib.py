"""Shared by the benchmarks that run on a cluster of their own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg

from dlqd.db.connector import connect
from dlqd.db.migrations import migrate
from tests.pgcluster import Cluster


@asynccontextmanager
async def migrated_cluster(*, durable: bool = False) -> AsyncIterator[str]:
    """A throwaway cluster with production-like settings (autovacuum on, as
    operators run it), migrated; yields its URL and removes it afterwards.
    ``durable``: commits wait for the disk too (fsync, synchronous_commit and
    full-page writes on, as in production; the test clusters run without)."""
    with Cluster.create() as cluster:
        url = cluster.url()
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute("ALTER SYSTEM SET autovacuum = on")
            if durable:
                for setting in ("fsync", "synchronous_commit", "full_page_writes"):
                    await conn.execute(f"ALTER SYSTEM SET {setting} = on")
            await conn.execute("SELECT pg_reload_conf()")
        conn = await connect(url, autocommit=True)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        yield url
