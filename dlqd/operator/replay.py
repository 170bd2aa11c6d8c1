"""Manual replay, parking and unparking: what an operator does to rows.

Manual replay sends rows through a target now, parked ones included, ignoring
delays and ``max_replays``: through ``--via POLICY``'s target, else that of
the first matching policy that has one, else ``replay.default_target``. A row
without a target is skipped with that reason, never a reason to stop the
others. Each chunk of rows is one transaction (exactly once for ``sql`` and
``notify`` targets; an ``http`` target answers while the chunk holds its
rows), counted only once it committed.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import anyio

from dlqd.config import HttpTarget, NotifyTarget, Policy, Settings, SqlTarget, run_target
from dlqd.db import claims, entries
from dlqd.db.connector import Connection, transaction
from dlqd.db.tenancy import tenant_scope
from dlqd.errors import DatabaseError, UsageError
from dlqd.filters import PendingFilter
from dlqd.policy import matches
from dlqd.replay.batch import Batch, Item, Progress, apply, set_replay_settings, settle_split
from dlqd.replay.http import HttpDeliverer, deliver_all
from dlqd.replay.report import report
from dlqd.replay.rows import Candidate

#: failed rows a result names (the count is always whole)
MAX_NAMED_FAILURES = 20
#: the slowest manual rate: below it a replay would, in effect, never end
MIN_RATE = 0.01
SKIP_REASONS = ("already_replayed", "not_found", "no_target")

Target = SqlTarget | NotifyTarget | HttpTarget


@dataclass
class ReplayResult:
    """What a manual replay did (``replay --json``)."""

    dry_run: bool = False
    replayed: int = 0
    failed: int = 0
    skipped_by_reason: Counter[str] = field(default_factory=Counter)
    # the first failures: (id, one line), and ids named that do not exist
    failures: list[tuple[UUID, str]] = field(default_factory=list)
    missing: list[UUID] = field(default_factory=list)
    named: int = 0  # ids named by the operator (0: a filter)

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_reason.values())

    @property
    def ok(self) -> bool:
        """Nothing failed, and when ids were named, at least one of them exists."""
        return self.failed == 0 and not (self.named and len(self.missing) == self.named)

    def to_json(self) -> dict[str, Any]:
        return {
            "replayed": self.replayed,
            "failed": self.failed,
            "skipped": self.skipped,
            "skipped_by_reason": {r: self.skipped_by_reason[r] for r in SKIP_REASONS},
            "dry_run": self.dry_run,
        }


def via_policy(settings: Settings, name: str) -> Policy:
    """The policy ``replay --via NAME`` sends rows through (it must have a target)."""
    for policy in settings.policies:
        if policy.name == name:
            if settings.target_for(policy) is None:
                raise UsageError(
                    f"--via {name}: the policy has no target and replay.default_target is not set"
                )
            return policy
    known = ", ".join(p.name for p in settings.policies) or "none configured"
    raise UsageError(f"--via {name}: no such policy (policies: {known})")


def manual_target(
    row: Candidate, settings: Settings, via: Policy | None = None
) -> tuple[Policy | None, Target | None]:
    """``via``'s target; else that of the first matching policy that has one; else
    replay.default_target; (None, None) when there is none."""
    if via is not None:
        return via, settings.target_for(via)
    for candidate in settings.policies:
        if candidate.target is not None and matches(candidate.match, row):
            return candidate, run_target(candidate.target)
    default = settings.replay.default_target
    return None, None if default is None else run_target(default)


Key = tuple[str, UUID]  # a keyset position: (dlq_at as text, id)


@dataclass(frozen=True, slots=True)
class Selection:
    """Rows a replay selects by filter: those ``where`` matches, after
    ``start``, dead-lettered by ``until``, as tenant ``app_id`` sees them."""

    where: PendingFilter
    start: Key | None = None
    until: str | None = None
    app_id: str | None = None


async def _selected(
    conn: Connection, ids: Sequence[UUID], selection: Selection | None, size: int
) -> AsyncIterator[tuple[list[UUID], Key | None]]:
    """Chunks of ids, each with the keyset position of its last row (by filter)."""
    if selection is None:
        for start in range(0, len(ids), size):
            yield list(ids[start : start + size]), None
        return
    after: tuple[str | None, UUID | None] = selection.start or (None, None)
    while True:
        async with tenant_scope(conn, selection.app_id):
            rows = await entries.pending_ids(conn, selection.where, after, size, selection.until)
        if rows:
            yield [row["id"] for row in rows], (rows[-1]["dlq_at"], rows[-1]["id"])
        if len(rows) < size:
            return
        after = (rows[-1]["dlq_at"], rows[-1]["id"])


async def replay(
    conn: Connection,
    settings: Settings,
    *,
    ids: Sequence[UUID] = (),
    where: PendingFilter | Selection | None = None,
    dry_run: bool = False,
    rate: float | None = None,
    via: str | None = None,
    actor: str | None = None,
    reason: str | None = None,
    app_id: str | None = None,
    on_chunk: Callable[[int], object] | None = None,
    pause: Callable[[float], Awaitable[None]] = anyio.sleep,
    progress: Progress | None = None,
    stop: Callable[[], bool] | None = None,
    into: ReplayResult | None = None,
) -> ReplayResult:
    """Replay rows now (by ``ids``, or every pending row ``where`` selects).

    ``conn`` is an autocommit connection: each chunk is its own transaction.
    ``rate`` (rows a second) spaces the chunks with ``pause``, never after the
    last one. ``app_id``: a tenant's rows only (a tenant-bound console token),
    selected under row-level security. ``progress``: a redrive's bookkeeping,
    in each chunk's transaction; ``stop()`` true: no further chunk starts.
    ``into``: the result to add to (read by ``on_chunk`` as it grows).
    """
    if rate is not None and not (math.isfinite(rate) and rate >= MIN_RATE):
        raise UsageError(f"--rate must be at least {MIN_RATE:g} rows a second")
    result = into if into is not None else ReplayResult()
    result.dry_run, result.named = dry_run, len(set(ids))
    through = via_policy(settings, via) if via is not None else None
    size = settings.replay.batch_size if rate is None else max(1, min(500, math.ceil(rate)))
    selection = Selection(where, app_id=app_id) if isinstance(where, PendingFilter) else where
    if selection is not None and app_id is not None and selection.app_id != app_id:
        raise UsageError("a tenant's replay selects that tenant's rows")
    previous: tuple[int, float] | None = None  # size and start of the chunk before
    http = HttpDeliverer()
    try:
        async for chunk, last in _selected(conn, list(dict.fromkeys(ids)), selection, size):
            if stop is not None and stop():
                break
            if rate is not None and previous is not None:
                done, started = previous
                await pause(max(0.0, done / rate - (anyio.current_time() - started)))
                if stop is not None and stop():
                    break
            started = anyio.current_time()
            previous = (len(chunk), started)
            await _chunk(
                conn,
                settings,
                chunk,
                through=through,
                actor=actor,
                reason=reason,
                app_id=app_id,
                http=http,
                result=result,
                progress=progress,
                cursor=last,
            )
            if on_chunk is not None:
                on_chunk(len(chunk))
    finally:
        await http.aclose()
    return result


async def _chunk(
    conn: Connection,
    settings: Settings,
    chunk: list[UUID],
    *,
    through: Policy | None,
    actor: str | None,
    reason: str | None,
    app_id: str | None,
    http: HttpDeliverer,
    result: ReplayResult,
    progress: Progress | None,
    cursor: Key | None,
) -> None:
    started = anyio.current_time()
    batch: Batch | None = None
    try:
        async with transaction(conn):
            await set_replay_settings(conn, settings)
            rows = await claims.lock_entries(conn, chunk, app_id)
            found = {row["id"] for row in rows}
            missing = [i for i in chunk if i not in found]
            skips = Counter({"not_found": len(missing)})
            pending = [Candidate.from_row(row) for row in rows if not row["replayed"]]
            skips["already_replayed"] += len(rows) - len(pending)
            items: list[Item] = []
            for candidate in pending:
                policy, target = manual_target(candidate, settings, through)
                if target is None:
                    skips["no_target"] += 1
                else:
                    items.append(Item(candidate, policy, target))
            if not items or result.dry_run:
                if progress is not None:
                    await progress.record(conn, cursor, replayed=0, failed=0, skipped=len(chunk))
                result.missing += missing
                result.skipped_by_reason.update(skips)
                result.replayed += len(items) if result.dry_run else 0
                return
            batch = Batch(
                settings.policies_fingerprint,
                rows[0]["db_now"],
                manual=True,
                actor=actor,
                reason=reason,
                progress=progress,
                cursor=cursor,
                carried_skips=skips.total(),
            )
            batch.replay = items
            # http targets answer while this transaction holds the rows
            calls = [i for i in items if isinstance(i.target, HttpTarget)]
            if calls:
                batch.deliveries = await deliver_all(http, conn, calls)
            outcome = await apply(conn, batch, settings)
    except DatabaseError as exc:
        if exc.broken or batch is None:
            raise
        outcome = await settle_split(conn, batch, settings, exc)
    # counted once committed: a chunk that rolled back counts nothing
    result.missing += missing
    result.skipped_by_reason.update(skips)
    report(outcome, None, duration=anyio.current_time() - started, manual=True)
    result.replayed += len(outcome.replayed)
    result.failed += len(outcome.failed)
    result.skipped_by_reason["already_replayed"] += outcome.skipped
    for failed in outcome.failed:
        if len(result.failures) < MAX_NAMED_FAILURES:
            result.failures.append((failed.item.row.id, failed.failure.error))


@dataclass
class ParkResult:
    """Rows an operator parked or unparked, and the ids that could not be."""

    changed: list[UUID]
    unchanged: list[UUID]
    state: str  # what the changed rows are now: parked, or new (decided again)

    def to_json(self) -> list[dict[str, str]]:
        return [{"id": str(i), "state": self.state} for i in self.changed]


async def park(
    conn: Connection,
    ids: Sequence[UUID],
    *,
    actor: str | None,
    reason: str | None,
    app_id: str | None = None,
) -> ParkResult:
    """Park pending rows by hand: sticky until a replay or an unpark; logged
    (``app_id``: that tenant's rows only)."""
    changed = await entries.park(conn, list(dict.fromkeys(ids)), actor, reason, app_id)
    return ParkResult(changed, [i for i in ids if i not in set(changed)], "parked")


async def unpark(
    conn: Connection,
    ids: Sequence[UUID],
    *,
    actor: str | None,
    reason: str | None,
    app_id: str | None = None,
) -> ParkResult:
    """Unpark rows parked by hand or by an event: decided again as new rows;
    logged (``app_id``: that tenant's rows only)."""
    changed = await entries.unpark(conn, list(dict.fromkeys(ids)), actor, reason, app_id)
    return ParkResult(changed, [i for i in ids if i not in set(changed)], "new")
