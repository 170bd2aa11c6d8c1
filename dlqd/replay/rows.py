"""The narrow row: what the daemon holds of a claimed ``job_dlq`` row.

Claims return the columns a policy decides on and the row's schedule state,
never ``payload`` or ``error_history``: targets read those inside Postgres.
A row that cannot be decided (an infinite ``dlq_at``, over-long key columns)
arrives with ``problem`` set and ``dlq_at`` None, so nothing a tenant wrote
can fail to load here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any
from uuid import UUID


@dataclass(frozen=True, slots=True)
class Candidate:
    id: UUID
    original_job_id: str
    app_id: str
    type: str
    error_reason: str
    attempts: int
    dlq_at: datetime | None  # None when ``problem`` is set
    problem: str | None
    replayed: bool
    failures: int
    last_error: str | None
    last_failure_at: datetime | None
    state: str | None  # dlqd_entry_state.state, None while new
    scheduled_policy: str | None
    seq: int | None  # dlqd_inbox.seq for rows claimed from the inbox
    row_bytes: int = 0  # payload and error_history as stored (never read here)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Candidate:
        values: dict[str, Any] = {name: row.get(name) for name in _FIELDS}
        values["failures"] = int(values["failures"] or 0)
        values["replayed"] = bool(values["replayed"])
        values["row_bytes"] = int(values["row_bytes"] or 0)
        return cls(**values)


_FIELDS = tuple(f.name for f in fields(Candidate))
