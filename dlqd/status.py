"""What is pending, parked and unmatched, by group: for ``dlqd status`` and the metrics.

Counts come from the index-only grouped query; parked-by-policy and unmatched
are derived by running the policies over the groups (not over rows), and
parked-by-event rows come from the schedule table.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import psycopg

from dlqd.config import Policy
from dlqd.policy import first_match
from dlqd.queries import q

Connection = psycopg.AsyncConnection[dict[str, Any]]
GroupKey = tuple[str, str, str]


@dataclass
class Group:
    app_id: str
    type: str
    error_reason: str
    pending: int = 0
    parked: int = 0
    unmatched: int = 0
    oldest_pending_age_seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "app_id": self.app_id,
            "type": self.type,
            "error_reason": self.error_reason,
            "pending": self.pending,
            "parked": self.parked,
            "oldest_pending_age_seconds": self.oldest_pending_age_seconds,
        }


@dataclass
class Status:
    groups: list[Group] = field(default_factory=list)

    @property
    def pending(self) -> int:
        return sum(g.pending for g in self.groups)

    @property
    def parked(self) -> int:
        return sum(g.parked for g in self.groups)

    @property
    def unmatched(self) -> int:
        return sum(g.unmatched for g in self.groups)

    @property
    def oldest_pending_age_seconds(self) -> float | None:
        ages = [g.oldest_pending_age_seconds for g in self.groups]
        known = [a for a in ages if a is not None]
        return max(known) if known else None

    def to_json(self) -> dict[str, Any]:
        return {
            "pending": self.pending,
            "parked": self.parked,
            "unmatched": self.unmatched,
            "oldest_pending_age_seconds": self.oldest_pending_age_seconds,
            "groups": [g.to_json() for g in self.groups],
        }


_NIL = UUID(int=0)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class _Probe:
    """A stand-in row for matching a whole group against the policies."""

    app_id: str
    type: str
    error_reason: str
    attempts: int
    id: UUID = _NIL
    dlq_at: datetime = _EPOCH


def _classify(policies: list[Policy], probe: _Probe) -> str:
    policy = first_match(probe, policies)
    if policy is None:
        return "unmatched"
    return "parked" if policy.action == "park" else "replay"


async def collect_status(conn: Connection, policies: list[Policy]) -> Status:
    cur = await conn.execute(q("status_groups"))
    groups: dict[GroupKey, Group] = {}
    for row in await cur.fetchall():
        key = (row["app_id"], row["type"], row["error_reason"])
        groups[key] = Group(
            *key,
            pending=int(row["pending"]),
            oldest_pending_age_seconds=max(0.0, row["oldest_age"]),
        )

    # (group, attempts) -> pending; attempts only matter when a policy reads them
    reads_attempts = any(
        p.match.min_attempts is not None or p.match.max_attempts is not None for p in policies
    )
    buckets: dict[tuple[GroupKey, int], int] = {}
    if reads_attempts:
        cur = await conn.execute(q("status_attempts"))
        for row in await cur.fetchall():
            key = (row["app_id"], row["type"], row["error_reason"])
            buckets[(key, int(row["attempts"]))] = int(row["pending"])
    else:
        buckets = {(key, 0): g.pending for key, g in groups.items()}

    event_parked: dict[tuple[GroupKey, int], int] = defaultdict(int)
    cur = await conn.execute(q("status_event_parked"))
    for row in await cur.fetchall():
        key = (row["app_id"], row["type"], row["error_reason"])
        attempts = int(row["attempts"]) if reads_attempts else 0
        event_parked[(key, attempts)] += int(row["parked"])

    for (key, attempts), pending in buckets.items():
        group = groups.get(key)
        if group is None:
            continue  # inserted between the two queries
        by_event = min(event_parked.get((key, attempts), 0), pending)
        verdict = _classify(policies, _Probe(*key, attempts=attempts))
        if verdict == "parked":
            group.parked += pending
        elif verdict == "unmatched":
            group.parked += by_event
            group.unmatched += pending - by_event
        else:
            group.parked += by_event
    ordered = sorted(groups.values(), key=lambda g: (g.app_id, g.type, g.error_reason))
    return Status(groups=ordered)
