"""Admission: max_replays before a target runs (rate limits and circuits: ``dlqd.throttle``)."""

from __future__ import annotations

from datetime import timedelta

from dlqd.db import replays
from dlqd.db.connector import Connection
from dlqd.replay.batch import Batch, Item
from dlqd.replay.evaluate import _park_max_replays, job_key


async def enforce_max_replays(
    conn: Connection, items: list[Item], batch: Batch, retention: timedelta
) -> tuple[list[Item], list[Item]]:
    """(admitted, deferred): recount under each job's lock slot; rows over their
    policy's max_replays park. A row whose slot another replica holds (it is
    replaying a return of the same job, or of one sharing the slot) is deferred,
    never waited for: no lock anyone else takes can stall this page."""
    limited = [i for i in items if i.policy and i.policy.max_replays is not None]
    if not limited:
        return items, []
    keys = sorted({job_key(i.row) for i in limited})
    held = await replays.lock_slots(conn, keys)
    locked = [k for k in keys if k in held]
    counts = await replays.replay_counts(conn, locked, retention)
    keep: list[Item] = []
    deferred: list[Item] = []
    for item in items:
        policy = item.policy
        if policy is None or policy.max_replays is None:
            keep.append(item)
            continue
        key = job_key(item.row)
        if key not in held:
            deferred.append(item)
            continue
        if counts.get(key, 0) >= policy.max_replays:
            _park_max_replays(batch, item.row, policy)
            continue
        counts[key] = counts.get(key, 0) + 1
        keep.append(item)
    return keep, deferred
