"""Builders for test rows."""

from __future__ import annotations

import itertools
from datetime import datetime
from typing import Any
from uuid import UUID

from dlqd.models import NewEntry

_counter = itertools.count(1)


def new_entry(**overrides: Any) -> NewEntry:
    n = next(_counter)
    fields: dict[str, Any] = {
        "original_job_id": f"job-{n}",
        "app_id": "app-a",
        "type": "email.send",
        "payload": {"to": f"user{n}@example.com", "n": n},
        "error_reason": "timeout",
        "attempts": 3,
        "error_history": [{"attempt": 1, "error": "timeout"}],
    }
    fields.update(overrides)
    return NewEntry(**fields)


INSERT_MANY = """
INSERT INTO job_dlq (id, original_job_id, app_id, type, payload, error_reason, attempts, dlq_at)
SELECT coalesce(r.id, gen_random_uuid()), r.original_job_id, r.app_id, r.type, r.payload,
       r.error_reason, r.attempts, coalesce(r.dlq_at, now())
  FROM jsonb_to_recordset(%(rows)s) AS r(id uuid, original_job_id text, app_id text, type text,
       payload jsonb, error_reason text, attempts int, dlq_at timestamptz)
"""


def row_json(
    *,
    original_job_id: str,
    app_id: str = "app-a",
    type: str = "email.send",
    error_reason: str = "timeout",
    attempts: int = 3,
    dlq_at: datetime | None = None,
    id: UUID | None = None,
    payload: Any = None,
) -> dict[str, Any]:
    return {
        "id": str(id) if id else None,
        "original_job_id": original_job_id,
        "app_id": app_id,
        "type": type,
        "payload": payload if payload is not None else {"job": original_job_id},
        "error_reason": error_reason,
        "attempts": attempts,
        "dlq_at": dlq_at.isoformat() if dlq_at else None,
    }
