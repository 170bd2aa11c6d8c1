"""What the console's overview and policies pages read besides the status:
outcomes per hour and per policy (kept by the replay log's trigger), held
rows by reason, circuits, the leader's lease and its last runs."""

from __future__ import annotations

from typing import Any

from dlqd.db.connector import Connection, translated
from dlqd.db.queries import q

Row = dict[str, Any]


@translated
async def _all(conn: Connection, name: str, params: dict[str, Any] | None = None) -> list[Row]:
    cur = await conn.execute(q(name), params)
    return await cur.fetchall()


async def outcomes_by_hour(conn: Connection, hours: int) -> list[Row]:
    return await _all(conn, "outcomes_by_hour", {"hours": hours})


async def outcomes_by_policy(conn: Connection) -> list[Row]:
    return await _all(conn, "outcomes_by_policy")


async def held_by_reason(conn: Connection) -> list[Row]:
    return await _all(conn, "held_by_reason")


async def circuits(conn: Connection) -> list[Row]:
    return await _all(conn, "circuits_all")


async def last_runs(conn: Connection) -> list[Row]:
    return await _all(conn, "last_runs")


async def leader(conn: Connection) -> Row | None:
    rows = await _all(conn, "leader_lease")
    return rows[0] if rows else None
