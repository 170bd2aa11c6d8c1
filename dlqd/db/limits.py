"""Rate buckets and circuits shared by every replica (migration 005)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from dlqd.db.connector import Connection, translated
from dlqd.db.queries import q

Row = dict[str, Any]


@translated
async def ensure_circuits(conn: Connection, policies: Sequence[str]) -> None:
    """Circuit rows that do not exist yet (never waiting for another replica's)."""
    await conn.execute(q("circuits_ensure"), {"policies": list(policies)})


@translated
async def read_circuits(conn: Connection, policies: Sequence[str]) -> list[Row]:
    cur = await conn.execute(q("circuits_read"), {"policies": list(policies)})
    return await cur.fetchall()


@translated
async def claim_trial(conn: Connection, policy: str, lease: timedelta) -> bool:
    """The one trial of a half-open circuit, cluster-wide: whether it is ours."""
    cur = await conn.execute(q("circuit_trial"), {"policy": policy, "lease": lease})
    return await cur.fetchone() is not None


@translated
async def record_circuit(
    conn: Connection,
    policy: str,
    *,
    reset: bool,
    failures: int,
    threshold: int,
    cool_down: timedelta,
) -> Row | None:
    """(was_open, is_open) after recording attempts; None when the row is not
    committed yet (another replica's insert)."""
    cur = await conn.execute(
        q("circuit_record"),
        {
            "policy": policy,
            "reset": reset,
            "failures": failures,
            "threshold": threshold,
            "cool_down": cool_down,
        },
    )
    return await cur.fetchone()


@translated
async def take_tokens(
    conn: Connection,
    keys: Sequence[tuple[str, str]],
    rates: Sequence[float],
    bursts: Sequence[float],
    wanted: Sequence[int],
) -> list[Row]:
    """Create missing buckets, then take from each what is wanted (whole tokens,
    at most what it holds); buckets another replica holds are skipped."""
    common = {"policies": [p for p, _ in keys], "scopes": [s for _, s in keys]}
    await conn.execute(q("buckets_ensure"), {**common, "bursts": list(bursts)})
    cur = await conn.execute(
        q("buckets_take"),
        {**common, "rates": list(rates), "bursts": list(bursts), "wanted": list(wanted)},
    )
    return await cur.fetchall()
