"""Redrives: replay every pending row a filter matches, as a durable task.

``start`` counts what the filter matches (rows dead-lettered until now: those
that arrive later are not its business) and records the redrive in
``dlqd_redrives``; ``--dry-run`` only counts. A daemon replica takes it under
a lease and runs it (:func:`run`): chunks of a manual replay (``--via``, the
actor, the reason; a chunk per transaction), at its rate, with its counts
and keyset cursor written in each chunk's own transaction, so that a replica
that dies mid-way is resumed by another from the row after the last one
that committed, and nothing is counted that did not commit. One replica runs
a redrive at a time (its lease; every chunk checks it, and rolls back if
another took over), so its rate holds for the whole deployment. ``cancel``
stops it after the chunk in flight.

A redrive started by a token bound to a tenant selects its rows as that
tenant (row-level security) and replays no other tenant's row.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

import anyio

from dlqd.config import Settings
from dlqd.db import entries, redrives
from dlqd.db.connector import Connection
from dlqd.db.tenancy import tenant_scope
from dlqd.errors import DlqdError, UsageError
from dlqd.filters import PendingFilter
from dlqd.operator.replay import MIN_RATE, ReplayResult, Selection, replay, via_policy

#: a runner's lease lasts this long; it renews it (and hears of a cancel) every second
LEASE_TTL = timedelta(seconds=30)
RENEW_EVERY = 1.0
STATES = ("queued", "running", "done", "cancelled", "failed")
ACTIVE = ("queued", "running")


class LeaseLost(DlqdError):
    """Another replica runs this redrive now: the chunk in flight rolls back."""


@dataclass
class Redrive:
    """One redrive, as ``redrive list --json`` prints it (a dry run: no id)."""

    id: UUID | None
    state: str | None
    filter: dict[str, Any]
    via: str | None
    reason: str | None
    actor: str
    rate: float | None
    matched: int
    replayed: int = 0
    failed: int = 0
    skipped: int = 0
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    cancel_requested: bool = False
    error: str | None = None
    app_id: str | None = None  # the tenant it is bound to
    db_now: datetime | None = None
    dry_run: bool = False
    # rows dead-lettered by then are its business; the last one it did
    until: str | None = None
    cursor: tuple[str, UUID] | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Redrive:
        return cls(
            id=row["id"],
            state=row["state"],
            filter=json.loads(row["filter"]),
            via=row["via"],
            reason=row["reason"],
            actor=row["actor"],
            rate=row["rate"],
            matched=int(row["matched"]),
            replayed=int(row["replayed"]),
            failed=int(row["failed"]),
            skipped=int(row["skipped"]),
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            cancel_requested=bool(row["cancel_requested"]),
            error=row["error"],
            app_id=row["scope_app_id"],
            db_now=row["db_now"],
            until=row["until_at"],
            cursor=(row["cursor_at"], row["cursor_id"]) if row["cursor_at"] is not None else None,
        )

    @property
    def done(self) -> int:
        return self.replayed + self.failed + self.skipped

    @property
    def to_do(self) -> int:
        return max(0, self.matched - self.done) if self.active else 0

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def rows_per_second(self) -> float | None:
        """The rate it has kept since it started (None before it has)."""
        end = self.finished_at or self.db_now
        if self.started_at is None or end is None:
            return None
        seconds = (end - self.started_at).total_seconds()
        return self.done / seconds if seconds > 0 and self.done else None

    @property
    def seconds_left(self) -> float | None:
        rate = self.rows_per_second
        if not self.active or not rate:
            return None
        return self.to_do / rate

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "id": str(self.id) if self.id else None,
            "state": self.state,
            "filter": self.filter,
            "via": self.via,
            "reason": self.reason,
            "actor": self.actor,
            "rate": self.rate,
            "matched": self.matched,
            "replayed": self.replayed,
            "failed": self.failed,
            "skipped": self.skipped,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
        }
        if self.dry_run:
            document["dry_run"] = True
        return document


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def check_rate(rate: float | None) -> None:
    if rate is not None and not (math.isfinite(rate) and rate >= MIN_RATE):
        raise UsageError(f"rate must be at least {MIN_RATE:g} rows a second")


async def start(
    conn: Connection,
    settings: Settings,
    where: PendingFilter,
    *,
    actor: str,
    via: str | None = None,
    reason: str | None = None,
    rate: float | None = None,
    app_id: str | None = None,
    dry_run: bool = False,
) -> Redrive:
    """Count what ``where`` matches now (as tenant ``app_id`` sees it) and, unless
    ``dry_run``, record a redrive of those rows for a daemon to run."""
    check_rate(rate)
    if via is not None:
        via_policy(settings, via)
    until = await redrives.db_now(conn)
    async with tenant_scope(conn, app_id):
        matched = await entries.count_pending(conn, where, until=until)
    if dry_run:
        return Redrive(
            None, None, where.to_json(), via, reason, actor, rate, matched, dry_run=True,
            app_id=app_id,
        )  # fmt: skip
    row = await redrives.create(
        conn,
        filter=where.to_json(),
        scope=app_id,
        via=via,
        reason=reason,
        actor=actor,
        rate=rate,
        matched=matched,
        until=until,
    )
    return Redrive.from_row(row)


async def listed(conn: Connection, *, app_id: str | None = None, limit: int = 100) -> list[Redrive]:
    """The newest redrives first (a tenant sees its own only)."""
    async with tenant_scope(conn, app_id):
        rows = await redrives.listed(conn, limit)
    return [Redrive.from_row(row) for row in rows]


async def get(conn: Connection, redrive_id: UUID, *, app_id: str | None = None) -> Redrive | None:
    async with tenant_scope(conn, app_id):
        row = await redrives.get(conn, redrive_id)
    return Redrive.from_row(row) if row else None


async def cancel(
    conn: Connection, redrive_id: UUID, *, app_id: str | None = None
) -> Redrive | None:
    """Ask a redrive to stop after its chunk in flight (one nobody runs stops at
    once); None: no such redrive (for that tenant). A finished one is left as it is."""
    found = await get(conn, redrive_id, app_id=app_id)
    if found is None:
        return None
    row = await redrives.cancel(conn, redrive_id)
    return Redrive.from_row(row) if row else found


async def settled(
    conn: Connection, redrive_id: UUID, *, within: float, app_id: str | None = None
) -> Redrive | None:
    """The redrive once it is no longer active, or as it is after ``within`` seconds."""
    with anyio.move_on_after(within):
        while True:
            found = await get(conn, redrive_id, app_id=app_id)
            if found is None or not found.active:
                return found
            await anyio.sleep(0.2)
    return await get(conn, redrive_id, app_id=app_id)


# --------------------------------------------------------------------------- running one


@dataclass
class Run:
    """A replica running one redrive: its bookkeeping in every chunk's transaction
    (:class:`dlqd.replay.batch.Progress`), what the lease keeper heard."""

    redrive: UUID
    owner: str
    ttl: timedelta = LEASE_TTL
    cancel_requested: bool = False
    lost: bool = False
    wake: anyio.Event = field(default_factory=anyio.Event)

    async def record(
        self,
        conn: Connection,
        cursor: tuple[str, UUID] | None,
        *,
        replayed: int,
        failed: int,
        skipped: int,
    ) -> None:
        held = await redrives.progress(
            conn,
            self.redrive,
            self.owner,
            self.ttl,
            replayed=replayed,
            failed=failed,
            skipped=skipped,
            cursor=cursor,
        )
        if not held:
            self.lost = True
            raise LeaseLost(f"redrive {self.redrive}: another replica runs it now")

    async def pause(self, seconds: float) -> None:
        """The wait between chunks that a cancel (or a lost lease) cuts short."""
        with anyio.move_on_after(seconds):
            await self.wake.wait()

    def heard(self, cancel_requested: bool | None) -> None:
        """What a renewal answered (None: the lease is lost)."""
        if cancel_requested is None:
            self.lost = True
        elif cancel_requested:
            self.cancel_requested = True
        if self.lost or self.cancel_requested:
            self.wake.set()


async def run(
    conn: Connection,
    settings: Settings,
    claimed: Redrive,
    the_run: Run,
    *,
    stopping: Callable[[], bool],
    on_chunk: Callable[[ReplayResult], object] | None = None,
) -> tuple[str, str | None, ReplayResult]:
    """Replay what the redrive has left to do: (how it ended, an error line,
    what this run did). Ends ``"stopped"`` when ``stopping()`` (the daemon
    stops; another replica resumes it) or when the lease is lost."""
    selection = Selection(
        PendingFilter.from_json(claimed.filter),
        start=claimed.cursor,
        until=claimed.until,
        app_id=claimed.app_id,
    )
    result = ReplayResult()

    def chunk_done(_: int) -> None:
        if on_chunk is not None:
            on_chunk(result)

    try:
        await replay(
            conn,
            settings,
            where=selection,
            rate=claimed.rate,
            via=claimed.via,
            actor=claimed.actor,
            reason=claimed.reason,
            app_id=claimed.app_id,
            progress=the_run,
            stop=lambda: the_run.cancel_requested or the_run.lost or stopping(),
            pause=the_run.pause,
            on_chunk=chunk_done,
            into=result,
        )
    except LeaseLost:
        return "stopped", None, result
    except UsageError as exc:  # its --via policy is gone from the config, say
        return "failed", str(exc), result
    if the_run.lost or (stopping() and not the_run.cancel_requested):
        return "stopped", None, result
    return ("cancelled" if the_run.cancel_requested else "done"), None, result
