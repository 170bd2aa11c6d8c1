"""Rows of ``job_dlq`` as pydantic models."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field


class NewEntry(BaseModel):
    """A dead letter to insert (what a job system writes)."""

    model_config = ConfigDict(frozen=True)

    original_job_id: str
    app_id: str
    type: str
    payload: Any
    error_reason: str
    attempts: int = Field(ge=0)
    error_history: list[Any] = Field(default_factory=list)
    id: UUID | None = None
    dlq_at: datetime | None = None
    request_id: str | None = None
    user_id: str | None = None


class DlqEntry(BaseModel):
    """One row of ``job_dlq``; ``replayed_at is None`` means pending."""

    model_config = ConfigDict(frozen=True)

    id: UUID
    original_job_id: str
    app_id: str
    type: str
    payload: Any
    error_reason: str
    attempts: int
    error_history: list[Any]
    dlq_at: datetime
    replayed_at: datetime | None
    request_id: str | None
    user_id: str | None

    @property
    def pending(self) -> bool:
        return self.replayed_at is None

    def to_json(self) -> dict[str, Any]:
        """Every column by name; timestamps ISO 8601, ids as strings."""
        return self.model_dump(mode="json")
