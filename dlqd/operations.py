"""Operator actions behind the CLI: manual replay, purge, explain."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import anyio
import psycopg

from dlqd.config import NotifyTarget, Policy, Settings, SqlTarget
from dlqd.errors import DlqdError
from dlqd.models import DlqEntry
from dlqd.policy import Park, Replay, Unmatched, decide, mismatch
from dlqd.queries import q
from dlqd.replayer import Item, Writes, execute_items, replay_counts
from dlqd.repository import PendingFilter, Repository

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


def manual_target(
    entry: DlqEntry, settings: Settings
) -> tuple[Policy | None, SqlTarget | NotifyTarget]:
    """The target of the first matching policy that has one, else replay.default_target."""
    from dlqd.policy import matches

    for policy in settings.policies:
        if policy.target is not None and matches(policy.match, entry):
            target = policy.target
            break
    else:
        policy, target = None, settings.replay.default_target  # type: ignore[assignment]
    if target is None:
        raise DlqdError(
            f"no target for row {entry.id}: no matching policy has a target and "
            "replay.default_target is not set"
        )
    if not isinstance(target, SqlTarget | NotifyTarget):
        raise DlqdError(f"row {entry.id}: kind {target.kind!r} is not supported by this release")
    return policy, target


async def _selected_ids(
    conn: Connection, ids: Sequence[UUID], where: PendingFilter | None, batch: int
) -> AsyncIterator[list[UUID]]:
    if where is None:
        for start in range(0, len(ids), batch):
            yield list(ids[start : start + batch])
        return
    repo = Repository(conn)
    cursor = None
    while True:
        page = await repo.list_pending(batch, cursor, where)
        if page.entries:
            yield [e.id for e in page.entries]
        cursor = page.next_cursor
        if cursor is None:
            return


async def manual_replay(
    conn: Connection,
    settings: Settings,
    *,
    ids: Sequence[UUID] = (),
    where: PendingFilter | None = None,
    dry_run: bool = False,
    rate: float | None = None,
) -> ManualReplayResult:
    """Replay rows now, parked ones included, ignoring delays and max_replays.

    ``conn`` is an autocommit connection: each chunk is its own transaction.
    """
    result = ManualReplayResult(dry_run=dry_run)
    chunk = settings.replay.batch_size if rate is None else max(1, min(500, math.ceil(rate)))
    if settings.replay.default_target is None:
        # Resolve every target before replaying anything: a row without one is
        # an error for the whole command, never a partial replay.
        async for id_chunk in _selected_ids(conn, ids, where, chunk):
            cur = await conn.execute(q("get_entries"), {"ids": id_chunk})
            for row in await cur.fetchall():
                if row["replayed_at"] is None:
                    manual_target(DlqEntry.model_validate(row), settings)
    async for id_chunk in _selected_ids(conn, ids, where, chunk):
        started = anyio.current_time()
        async with conn.transaction():
            cur = await conn.execute(q("lock_entries"), {"ids": id_chunk})
            rows = await cur.fetchall()
            found = {row["id"] for row in rows}
            result.skipped += len(set(id_chunk) - found)
            pending = [row for row in rows if row["replayed_at"] is None]
            result.skipped += len(rows) - len(pending)
            if not pending:
                continue
            items = []
            for row in pending:
                entry = DlqEntry.model_validate(row)
                policy, target = manual_target(entry, settings)
                items.append(Item(entry, policy, target))
            if dry_run:
                result.replayed += len(items)
                continue
            writes = Writes(settings.policies_fingerprint)
            done, failures = await execute_items(
                conn, items, writes, None, db_now=pending[0]["db_now"], manual=True
            )
            await writes.flush(conn)
            result.replayed += len(done)
            result.failed += len(failures)
            result.skipped += len(items) - len(done) - len(failures)
        if rate is not None:
            await anyio.sleep(max(0.0, len(id_chunk) / rate - (anyio.current_time() - started)))
    return result


async def purge(conn: Connection, settings: Settings, *, dry_run: bool = False) -> int:
    """One purge pass in batches (one transaction each); the number of rows deleted."""
    params = {
        "replayed_before": settings.purge.replayed_retention,
        "pending_before": settings.purge.pending_retention,
        "batch_size": settings.purge.batch_size,
    }
    if dry_run:
        cur = await conn.execute(q("purge_count"), params)
        row = await cur.fetchone()
        return int(row["n"]) if row else 0
    timeout_ms = int(settings.purge.lock_timeout.total_seconds() * 1000)
    total = 0
    batch = settings.purge.batch_size
    while True:
        try:
            async with conn.transaction():
                await conn.execute(
                    "SELECT set_config('lock_timeout', %s, true), "
                    "set_config('statement_timeout', %s, true)",
                    [f"{timeout_ms}ms", f"{timeout_ms * 5}ms"],
                )
                cur = await conn.execute(q("purge_batch"), {**params, "batch_size": batch})
                row = await cur.fetchone()
        except (psycopg.errors.LockNotAvailable, psycopg.errors.QueryCanceled):
            if batch == 1:
                raise
            batch = max(1, batch // 2)  # a batch that times out shrinks, the run goes on
            continue
        deleted = int(row["deleted"]) if row else 0
        total += deleted
        if deleted < batch:
            return total


async def explain(conn: Connection, settings: Settings, entry: DlqEntry) -> list[str]:
    """Which policy matches the row and why, its replay count and when it is due."""
    lines = [f"row {entry.id} (original job {entry.original_job_id})"]
    lines.append(
        f"  app_id={entry.app_id!r} type={entry.type!r} error_reason={entry.error_reason!r} "
        f"attempts={entry.attempts} dlq_at={entry.dlq_at.isoformat()}"
    )
    if entry.replayed_at is not None:
        lines.append(f"already replayed at {entry.replayed_at.isoformat()}")
    counts = await replay_counts(conn, [entry.original_job_id])
    count = counts.get(entry.original_job_id, 0)
    lines.append(f"replays of original job {entry.original_job_id}: {count}")
    cur = await conn.execute(q("entry_state"), {"id": entry.id})
    state = await cur.fetchone()
    for index, policy in enumerate(settings.policies):
        why = mismatch(policy.match, entry)
        if why is None:
            lines.append(f"policy #{index} {policy.name!r}: matches (action {policy.action})")
            break
        lines.append(f"policy #{index} {policy.name!r}: no match: {why}")
    if not settings.policies:
        lines.append("no policies configured")
    cur = await conn.execute("SELECT now() AS now")
    now_row = await cur.fetchone()
    now: datetime = now_row["now"] if now_row else entry.dlq_at
    failures = state["failures"] if state else 0
    decision = decide(
        entry,
        settings.policies,
        count,
        now,
        failures=failures,
        last_failure_at=state["last_failure_at"] if state else None,
    )
    if state and state["state"] == "parked":
        lines.append(
            f"verdict: parked by event ({state['parked_reason']}) until `dlqd replay {entry.id}`"
        )
    elif isinstance(decision, Unmatched):
        lines.append("verdict: unmatched: stays pending until the policies change")
    elif isinstance(decision, Park):
        if decision.reason == "policy":
            lines.append(f"verdict: parked by policy {decision.policy.name!r}")
        else:
            lines.append(f"verdict: parked: max_replays ({decision.policy.max_replays}) reached")
    elif isinstance(decision, Replay):
        wait = (decision.due_at - now).total_seconds()
        when = "now" if wait <= 0 else f"in {wait:.1f}s"
        lines.append(
            f"verdict: replay through policy {decision.policy.name!r} "
            f"at {decision.due_at.isoformat()} ({when})"
        )
    if failures:
        lines.append(
            f"failed attempts: {failures}; last error: {state['last_error'] if state else ''}"
        )
    if settings.dry_run or (not isinstance(decision, Unmatched) and decision.policy.dry_run):
        lines.append("dry run: the daemon only logs this decision")
    return lines
