"""What an operator reads: status, a page of rows, one row with its history.

Answers come from what the daemon recorded in Postgres (waiting, parked with
its reason, unmatched, new), so they are the same with or without a config.
Rows are rendered by Postgres as JSON text: no payload is decoded here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from dlqd.db import counts, entries
from dlqd.db import overview as views
from dlqd.db.connector import Connection
from dlqd.db.entries import Page
from dlqd.db.tenancy import tenant_scope
from dlqd.filters import PendingFilter
from dlqd.status import Status, collect_status

__all__ = ["Overview", "Page", "Shown", "count_rows", "list_rows", "overview", "show", "status"]


async def status(conn: Connection) -> Status:
    """Pending, parked, unmatched and oldest age, by group."""
    return await collect_status(conn)


async def list_rows(
    conn: Connection,
    limit: int,
    cursor: str | None = None,
    where: PendingFilter | None = None,
    *,
    documents: bool = True,
    redact: Sequence[str] | None = None,
) -> Page:
    """A keyset page of pending rows; ``documents``: each as JSON text too
    (payload included, keys matching ``redact`` masked), else only what a
    table shows."""
    return await entries.Repository(conn).list_pending(
        limit, cursor, where, documents=documents, redact=redact
    )


async def count_rows(conn: Connection, where: PendingFilter | None, cap: int) -> int:
    """Pending rows a filter selects, counted up to ``cap`` (a page shows "cap+")."""
    return await entries.count_pending(conn, where or PendingFilter(), cap=cap)


@dataclass(frozen=True, slots=True)
class Shown:
    """One row (``document``: every column as JSON text; the columns as text
    for a human) and its replay history."""

    row: dict[str, Any]
    replays: list[dict[str, Any]]

    @property
    def document(self) -> str:
        return str(self.row["document"])


async def show(
    conn: Connection,
    entry_id: UUID,
    *,
    redact: Sequence[str] | None = None,
    pretty: bool = False,
) -> Shown | None:
    """One row and its replay history (``redact``: keys masked in Postgres;
    ``pretty``: the payload and error history indented too)."""
    row = await entries.document(conn, entry_id, redact, pretty=pretty)
    if row is None:
        return None
    history = await entries.history(conn, entry_id)
    replays = [
        {k: h[k] for k in ("at", "policy", "outcome", "error", "actor", "reason")} for h in history
    ]
    for entry, h in zip(replays, history, strict=True):
        if h["redrive_id"] is not None:
            entry["redrive"] = str(h["redrive_id"])
    return Shown(row, replays)


async def errors(
    conn: Connection, entry_id: UUID, *, redact: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """The row's error history, newest first (at most 50 entries): each entry's
    time and message where the job system wrote them under a usual key, and
    the entry as JSON text (keys matching ``redact`` masked)."""
    return await entries.errors(conn, entry_id, redact)


@dataclass
class Overview:
    """The console's first page: the status, and what it adds around it."""

    status: Status
    held: dict[str, int]  # waiting, unmatched, and parked rows by why
    hours: list[dict[str, Any]]  # outcomes per hour, the last 24 hours
    leader: dict[str, Any] | None
    runs: dict[str, dict[str, Any]]  # the leader's last runs (purge)
    circuits: list[dict[str, Any]]


async def overview(conn: Connection, *, app_id: str | None = None) -> Overview:
    """The status and the rest of the overview, as tenant ``app_id`` sees it (its
    rows only); the leader, its runs and the circuits are the deployment's."""
    async with tenant_scope(conn, app_id):
        status_now = await collect_status(conn)
        if await counts.ready(conn):
            held = {k.removeprefix("parked:"): n for k, n in (await counts.held(conn)).items()}
        else:
            held = {r["reason"]: int(r["n"]) for r in await views.held_by_reason(conn)}
        hours = await views.outcomes_by_hour(conn, 24)
    runs = {row["task"]: row for row in await views.last_runs(conn)}
    return Overview(
        status_now, held, hours, await views.leader(conn), runs, await views.circuits(conn)
    )


async def policy_outcomes(
    conn: Connection, *, app_id: str | None = None
) -> dict[str, Counter[str]]:
    """Outcomes by policy over the last 24 hours ('': manual, without a policy)."""
    counts: dict[str, Counter[str]] = {}
    async with tenant_scope(conn, app_id):
        rows = await views.outcomes_by_policy(conn)
    for row in rows:
        counts.setdefault(row["policy"], Counter())[row["outcome"]] += int(row["n"])
    return counts


async def circuits(conn: Connection) -> dict[str, dict[str, Any]]:
    return {row["policy"]: row for row in await views.circuits(conn)}


async def visible(conn: Connection, ids: Sequence[UUID]) -> list[UUID]:
    """Of ``ids``, the rows this connection (or tenant scope) can read."""
    return await entries.visible(conn, ids)
