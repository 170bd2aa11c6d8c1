"""What is pending and held, per group, from counts that triggers keep
(migration 012): read in O(groups), folded and reconciled by the leader."""

from __future__ import annotations

from typing import Any

from dlqd.db.connector import Connection, translated
from dlqd.db.queries import q

Row = dict[str, Any]


@translated
async def ready(conn: Connection) -> bool:
    """Whether the counts were reconciled once (before: count the table)."""
    cur = await conn.execute(q("counts_ready"))
    row = await cur.fetchone()
    return bool(row and row["ready"])


@translated
async def status_groups(conn: Connection) -> list[Row]:
    """Per group (keys as labels): pending, parked, unmatched, the oldest age."""
    cur = await conn.execute(q("status_counts"))
    return await cur.fetchall()


@translated
async def held(conn: Connection) -> dict[str, int]:
    """Held rows by kind: waiting, unmatched, parked:<why>."""
    cur = await conn.execute(q("held_counts"))
    return {row["kind"]: int(row["n"]) for row in await cur.fetchall()}


@translated
async def fold(conn: Connection) -> int:
    """Fold the deltas into the counts; how many delta rows it folded."""
    cur = await conn.execute(q("fold_counts"))
    row = await cur.fetchone()
    return int(row["folded"]) if row else 0


@translated
async def reconcile(conn: Connection) -> dict[str, int]:
    """Correct the counts against the table; rows corrected per kind."""
    cur = await conn.execute(q("reconcile_counts"))
    return {row["kind"]: int(row["corrected"]) for row in await cur.fetchall()}
