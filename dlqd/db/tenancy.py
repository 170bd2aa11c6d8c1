"""One tenant's view of the database: row-level security, not filters of ours.

A console request of a token bound to an ``app_id`` runs its reads inside
:func:`tenant_scope`: a transaction switched to role ``dlqd_tenant`` (no
BYPASSRLS, created by ``dlqd sql roles``) with ``app.current_app_id`` set, so
Postgres itself hides every other tenant's rows of ``job_dlq`` and of dlqd's
own tables (migration 010). A bug in a query cannot widen that.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from dlqd.db.connector import Connection, required, transaction, translated
from dlqd.db.queries import q


@asynccontextmanager
async def tenant_scope(conn: Connection, app_id: str | None) -> AsyncIterator[Connection]:
    """``conn``, scoped to ``app_id``'s rows for the block (a transaction, or a
    savepoint inside one, with the role and tenant as they were afterwards);
    ``None``: the connection's own role, unchanged (no transaction opened)."""
    if app_id is None:
        yield conn
        return
    async with transaction(conn):
        previous = await _enter(conn, app_id)
        yield conn
        await _leave(conn, previous)


@translated
async def _enter(conn: Connection, app_id: str) -> dict[str, str]:
    cur = await conn.execute(q("tenant_scope"), {"app_id": app_id})
    row = required(await cur.fetchone(), "tenant scope")
    return {"role": row["previous_role"], "app_id": row["previous_app_id"]}


@translated
async def _leave(conn: Connection, previous: dict[str, str]) -> None:
    await conn.execute(q("tenant_unscope"), previous)


@translated
async def tenant_role_problem(conn: Connection) -> str | None:
    """Why this connection cannot scope requests to a tenant (None: it can)."""
    cur = await conn.execute(q("tenant_role"))
    row = await cur.fetchone()
    fix = "run `dlqd sql roles` as an administrator"
    if row is None or not row["present"]:
        return f"role dlqd_tenant does not exist: {fix}"
    if row["superuser"] or row["bypassrls"]:
        return "role dlqd_tenant bypasses row-level security (SUPERUSER or BYPASSRLS): remove that"
    if not row["member"]:
        return f"this role is not a member of dlqd_tenant (it cannot switch to it): {fix}"
    return None
