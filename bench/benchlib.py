"""Shared by the benchmarks that run on a cluster of their own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg

from dlqd.db.connector import connect
from dlqd.db.migrations import migrate
from tests.pgcluster import Cluster


@asynccontextmanager
async def migrated_cluster() -> AsyncIterator[str]:
    """A throwaway cluster with production-like settings (autovacuum on, as
    operators run it), migrated; yields its URL and removes it afterwards."""
    with Cluster.create() as cluster:
        url = cluster.url()
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute("ALTER SYSTEM SET autovacuum = on")
            await conn.execute("SELECT pg_reload_conf()")
        conn = await connect(url, autocommit=True)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        yield url
