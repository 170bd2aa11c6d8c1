"""Operator actions behind the CLI: manual replay, purge, explain."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import anyio
import psycopg

from dlqd.config import HttpTarget, NotifyTarget, Policy, Settings, SqlTarget
from dlqd.db.queries import q
from dlqd.errors import DlqdError, UsageError
from dlqd.policy import MatchLike, Park, Replay, Unmatched, decide, matches, mismatch
from dlqd.replay.admission import replay_counts
from dlqd.replay.batch import Batch, Item, apply, set_replay_timeouts, settle_split
from dlqd.replay.evaluate import job_key
from dlqd.replay.http import HttpDeliverer, deliver_all
from dlqd.replay.report import report
from dlqd.replay.rows import Candidate
from dlqd.repository import PendingFilter
from dlqd.services.purger import purge_rows

Connection = psycopg.AsyncConnection[dict[str, Any]]


@dataclass
class ManualReplayResult:
    replayed: int = 0
    failed: int = 0
    skipped: int = 0
    dry_run: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "replayed": self.replayed,
            "failed": self.failed,
            "skipped": self.skipped,
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
) -> tuple[Policy | None, SqlTarget | NotifyTarget | HttpTarget]:
    """``via``'s target; else that of the first matching policy that has one; else
    replay.default_target."""
    policy: Policy | None = None
    target = settings.replay.default_target
    if via is not None:
        policy, target = via, settings.target_for(via)
    else:
        for candidate in settings.policies:
            if candidate.target is not None and matches(candidate.match, row):
                policy, target = candidate, candidate.target
                break
    if target is None:
        raise DlqdError(
            f"no target for row {row.id}: no matching policy has a target and "
            "replay.default_target is not set"
        )
    return policy, target


async def _selected_ids(
    conn: Connection, ids: Sequence[UUID], where: PendingFilter | None, batch: int
) -> AsyncIterator[list[UUID]]:
    if where is None:
        for start in range(0, len(ids), batch):
            yield list(ids[start : start + batch])
        return
    after: tuple[str | None, UUID | None] = (None, None)
    while True:
        cur = await conn.execute(
            q("pending_ids"),
            {
                "after_dlq_at": after[0],
                "after_id": after[1],
                **where.params(),
                "limit": batch,
            },
        )
        rows = await cur.fetchall()
        if rows:
            yield [row["id"] for row in rows]
        if len(rows) < batch:
            return
        after = (rows[-1]["dlq_at"], rows[-1]["id"])


async def count_pending(conn: Connection, where: PendingFilter) -> int:
    """How many pending rows a filter selects (for progress and confirmation)."""
    cur = await conn.execute(q("count_pending"), where.params())
    row = await cur.fetchone()
    return int(row["n"]) if row else 0


async def _locked(conn: Connection, ids: list[UUID]) -> list[dict[str, Any]]:
    cur = await conn.execute(q("lock_entries"), {"ids": ids})
    return await cur.fetchall()


async def manual_replay(
    conn: Connection,
    settings: Settings,
    *,
    ids: Sequence[UUID] = (),
    where: PendingFilter | None = None,
    dry_run: bool = False,
    rate: float | None = None,
    via: str | None = None,
    actor: str | None = None,
    reason: str | None = None,
    on_chunk: Callable[[int], object] | None = None,
) -> ManualReplayResult:
    """Replay rows now, parked ones included, ignoring delays and max_replays.

    ``conn`` is an autocommit connection: each chunk is its own transaction,
    counted only once it committed. ``rate`` spaces the chunks (never after
    the last one).
    """
    result = ManualReplayResult(dry_run=dry_run)
    through = via_policy(settings, via) if via is not None else None
    chunk = settings.replay.batch_size if rate is None else max(1, min(500, math.ceil(rate)))
    if settings.replay.default_target is None and through is None:
        # Resolve every target before replaying anything: a row without one is
        # an error for the whole command, never a partial replay.
        async for id_chunk in _selected_ids(conn, ids, where, chunk):
            for row in await _locked(conn, id_chunk):
                if not row["replayed"]:
                    manual_target(Candidate.from_row(row), settings)
    previous: tuple[int, float] | None = None  # size and start of the chunk before
    http = HttpDeliverer()
    async for id_chunk in _selected_ids(conn, ids, where, chunk):
        if rate is not None and previous is not None:
            size, started = previous
            await anyio.sleep(max(0.0, size / rate - (anyio.current_time() - started)))
        started = anyio.current_time()
        previous = (len(id_chunk), started)
        batch: Batch | None = None
        try:
            async with conn.transaction():
                await set_replay_timeouts(conn, settings)
                rows = await _locked(conn, id_chunk)
                result.skipped += len(set(id_chunk) - {row["id"] for row in rows})
                pending = [Candidate.from_row(row) for row in rows if not row["replayed"]]
                result.skipped += len(rows) - len(pending)
                if not pending:
                    continue
                if dry_run:
                    result.replayed += len(pending)
                    if on_chunk is not None:
                        on_chunk(len(id_chunk))  # a dry run reports its count as it goes
                    continue
                batch = Batch(
                    settings.policies_fingerprint,
                    rows[0]["db_now"],
                    manual=True,
                    actor=actor,
                    reason=reason,
                )
                for candidate in pending:
                    policy, target = manual_target(candidate, settings, through)
                    batch.replay.append(Item(candidate, policy, target))
                # http targets answer while this transaction holds the rows
                calls = [i for i in batch.replay if isinstance(i.target, HttpTarget)]
                if calls:
                    batch.deliveries = await deliver_all(http, conn, calls)
                outcome = await apply(conn, batch, settings)
        except psycopg.Error as exc:
            if conn.broken or batch is None or isinstance(exc, psycopg.OperationalError):
                raise
            outcome = await settle_split(conn, batch, settings, exc)
        report(outcome, None, duration=anyio.current_time() - started, manual=True)
        result.replayed += len(outcome.replayed)
        result.failed += len(outcome.failed)
        result.skipped += outcome.skipped
        if on_chunk is not None:
            on_chunk(len(id_chunk))
    await http.aclose()
    return result


async def purge(conn: Connection, settings: Settings, *, dry_run: bool = False) -> int:
    """One purge pass of job_dlq in batches (one transaction each); rows deleted."""
    if dry_run:
        cur = await conn.execute(
            q("purge_count"),
            {
                "replayed_before": settings.purge.replayed_retention,
                "pending_before": settings.purge.pending_retention,
            },
        )
        row = await cur.fetchone()
        return int(row["n"]) if row else 0
    return (await purge_rows(conn, settings)).deleted


@dataclass
class Explanation:
    """What ``dlqd explain`` says about one row (DESIGN section 6)."""

    id: UUID
    state: str  # new | waiting | parked | unmatched | replayed
    policy: str | None
    reason: str | None
    replay_count: int
    due_at: datetime | None
    verdict: str  # replay | park | unmatched | replayed
    lines: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "state": self.state,
            "policy": self.policy,
            "reason": self.reason,
            "replay_count": self.replay_count,
            "due_at": self.due_at.isoformat() if self.due_at else None,
            "verdict": self.verdict,
        }


_STATES = {
    "waiting": "waiting",
    "parked_policy": "parked",
    "parked": "parked",
    "unmatched": "unmatched",
}


def _match_lines(settings: Settings, row: MatchLike) -> list[str]:
    lines: list[str] = []
    for index, policy in enumerate(settings.policies):
        why = mismatch(policy.match, row)
        if why is None:
            lines.append(f"policy #{index} {policy.name!r}: matches (action {policy.action})")
            return lines
        lines.append(f"policy #{index} {policy.name!r}: no match: {why}")
    lines.append("no policies configured" if not settings.policies else "no policy matches")
    return lines


async def explain(conn: Connection, settings: Settings, entry_id: UUID) -> Explanation | None:
    """Which policy matches the row and why, its replay count and when it is due."""
    cur = await conn.execute(q("entry_narrow"), {"id": entry_id})
    data = await cur.fetchone()
    if data is None:
        return None
    row = Candidate.from_row(data)
    recorded = data["state"]
    state = "replayed" if row.replayed else _STATES.get(recorded or "", "new")
    lines = [f"row {row.id} (original job {row.original_job_id[:200]})"]
    lines.append(
        f"  app_id={row.app_id[:200]!r} type={row.type[:200]!r} "
        f"error_reason={row.error_reason[:200]!r} attempts={row.attempts} "
        f"dlq_at={data['dlq_at_text']}"
    )
    counts = await replay_counts(conn, [job_key(row)], settings.purge.log_retention)
    count = counts.get(job_key(row), 0)
    lines.append(f"replays of job {row.original_job_id[:200]} (app {row.app_id[:200]}): {count}")
    lines.extend(_match_lines(settings, row))
    explanation = Explanation(
        row.id,
        state,
        data["scheduled_policy"],
        data["parked_reason"],
        count,
        data["due_at"],
        "park",
        lines,
    )
    if row.replayed:
        explanation.verdict = "replayed"
        lines.append(f"verdict: replayed at {data['replayed_at_text']}: nothing left to do")
        return explanation
    if recorded == "parked":
        lines.append(
            f"verdict: parked by event ({data['parked_reason']}) until `dlqd replay {row.id}`"
        )
        if row.last_error:
            lines.append(f"last error: {row.last_error}")
        return explanation
    if row.problem is not None:
        explanation.reason = "invalid_row"
        lines.append(f"verdict: invalid row ({row.problem}): the daemon parks it for a human")
        return explanation
    decision = decide(
        row,  # type: ignore[arg-type]  # dlq_at is set whenever problem is None
        settings.policies,
        count,
        data["db_now"],
        failures=row.failures,
        last_failure_at=row.last_failure_at,
    )
    if isinstance(decision, Unmatched):
        explanation.verdict = "unmatched"
        lines.append("verdict: unmatched: stays pending until the policies change")
    elif isinstance(decision, Park):
        explanation.policy = decision.policy.name
        explanation.reason = decision.reason
        if decision.reason == "policy":
            lines.append(f"verdict: parked by policy {decision.policy.name!r}")
        else:
            lines.append(f"verdict: parked: max_replays ({decision.policy.max_replays}) reached")
    elif isinstance(decision, Replay):
        explanation.verdict = "replay"
        explanation.policy = decision.policy.name
        explanation.due_at = decision.due_at
        wait = (decision.due_at - data["db_now"]).total_seconds()
        when = "now" if wait <= 0 else f"in {wait:.1f}s"
        lines.append(
            f"verdict: replay through policy {decision.policy.name!r} "
            f"at {decision.due_at.isoformat()} ({when})"
        )
    if row.failures:
        lines.append(f"failed attempts: {row.failures}; last error: {row.last_error}")
    if settings.dry_run or (not isinstance(decision, Unmatched) and decision.policy.dry_run):
        lines.append("dry run: the daemon only logs this decision")
    return explanation


__all__ = ["ManualReplayResult", "explain", "manual_replay", "purge"]
