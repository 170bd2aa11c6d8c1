"""What is pending, parked and unmatched, by group: for ``dlqd status`` and the metrics.

Counts come from ``dlqd_counts``, the deltas not folded yet (kept by
triggers in the transactions that change the rows, folded and reconciled by
the leader: ``dlqd.services.counter``) and the inbox entries that count their
row themselves (a single-row insert's, migration 023), parked and unmatched as the daemon
recorded them in ``dlqd_entry_state`` (read commands tell the state in
Postgres, whatever config the operator passes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dlqd.db import counts, entries
from dlqd.db.connector import Connection

GroupKey = tuple[str, str, str]
OTHER = "__other__"
#: groups a status document names; the smaller ones fold into one __other__
#: group (keys are cut to 128 characters in SQL): a status stays small
#: whatever tenants write
MAX_GROUPS = 1000


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


async def collect_status(conn: Connection) -> Status:
    """Pending, parked (by policy or by event) and unmatched rows and the oldest
    age, per group, as the daemon recorded them: no policy is consulted, so the
    answer is the same with any config, or none. From the counts the triggers
    keep (O(groups), an index probe per group for its oldest row) once the
    leader reconciled them; before, by counting the table."""
    if await counts.ready(conn):
        found = [
            Group(
                row["app_id"],
                row["type"],
                row["error_reason"],
                pending=int(row["pending"]),
                parked=min(int(row["pending"]), int(row["parked"])),
                unmatched=int(row["unmatched"]),
                oldest_pending_age_seconds=row["oldest_age"],
            )
            for row in await counts.status_groups(conn)
        ]
        for group in found:
            group.unmatched = min(group.pending - group.parked, group.unmatched)
        return Status(groups=fold(found, MAX_GROUPS))
    return await _counted_from_the_table(conn)


async def _counted_from_the_table(conn: Connection) -> Status:
    """Grouped pending counts and oldest ages (index-only), then the held rows."""
    groups: dict[GroupKey, Group] = {}
    for row in await entries.status_groups(conn):
        key = (row["app_id"], row["type"], row["error_reason"])
        groups[key] = Group(
            *key,
            pending=int(row["pending"]),
            oldest_pending_age_seconds=row["oldest_age"],
        )
    for row in await entries.status_held(conn):
        group = groups.get((row["app_id"], row["type"], row["error_reason"]))
        if group is None:
            continue  # replayed or inserted between the two queries
        group.parked = min(group.pending, int(row["parked"]))
        group.unmatched = min(group.pending - group.parked, int(row["unmatched"]))
    return Status(groups=fold(list(groups.values()), MAX_GROUPS))


def fold(groups: list[Group], limit: int) -> list[Group]:
    """The ``limit - 1`` largest groups by name, the others summed as ``__other__``;
    sorted by key."""
    if len(groups) > limit:
        ranked = sorted(groups, key=lambda g: g.pending, reverse=True)
        other = Group(OTHER, OTHER, OTHER)
        for group in ranked[limit - 1 :]:
            other.pending += group.pending
            other.parked += group.parked
            other.unmatched += group.unmatched
            if group.oldest_pending_age_seconds is not None:
                other.oldest_pending_age_seconds = max(
                    other.oldest_pending_age_seconds or 0.0, group.oldest_pending_age_seconds
                )
        groups = [*ranked[: limit - 1], other]
    return sorted(groups, key=lambda g: (g.app_id, g.type, g.error_reason))
