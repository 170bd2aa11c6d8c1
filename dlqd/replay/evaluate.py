"""Deciding claimed rows: each becomes a replay now, a schedule row, or a park.

Pure apart from the batch it fills: no clock (``batch.db_now`` is Postgres's
``now()``), no connection. Any exception while deciding one row parks that
row (``invalid_row``) and leaves the others untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from uuid import UUID

from dlqd.config import Policy, Settings
from dlqd.errors import error_line
from dlqd.policy import Park, Unmatched, decide, first_match
from dlqd.replay.batch import POLICY_PARK, Batch, Decision, Item, LogRow, StateRow
from dlqd.replay.rows import Candidate

JobKey = tuple[str, str]  # (app_id, original_job_id): what max_replays counts


def job_key(row: Candidate) -> JobKey:
    return (row.app_id, row.original_job_id)


def needs_replay_count(rows: Sequence[Candidate], policies: Sequence[Policy]) -> list[JobKey]:
    """Jobs whose replay count changes the decision.

    The count matters for max_replays and for an exponential delay; a policy
    replaying at once with no cap does not need it, and the query is skipped.
    """
    needed: set[JobKey] = set()
    for row in rows:
        if row.problem is not None:
            continue
        policy = first_match(row, policies)
        if policy is None or policy.action == "park":
            continue
        exponential = policy.backoff == "exponential" and policy.delay.total_seconds() > 0
        if policy.max_replays is not None or exponential:
            needed.add(job_key(row))
    return sorted(needed)


class DryRunLedger:
    """Dry-run decisions are logged and counted once per row per process and config."""

    def __init__(self, limit: int = 1_000_000) -> None:
        self._seen: set[tuple[UUID, str]] = set()
        self._limit = limit

    def first_time(self, row_id: UUID, fingerprint: str) -> bool:
        key = (row_id, fingerprint)
        if key in self._seen:
            return False
        if len(self._seen) >= self._limit:
            self._seen.clear()  # bounded memory; at worst a row is logged again
        self._seen.add(key)
        return True


def evaluate(
    rows: Sequence[Candidate],
    settings: Settings,
    counts: dict[JobKey, int],
    batch: Batch,
    dry_runs: DryRunLedger,
) -> None:
    """Decide every row of a claimed page into ``batch``."""
    for row in rows:
        if row.replayed or row.state == "parked":
            # replayed meanwhile (by hand) or parked by an event: nothing to decide
            _done(batch, row)
            continue
        if row.problem is not None:
            batch.park(row, None, "invalid_row", row.problem)
            _done(batch, row)
            continue
        try:
            kept = _decide_one(row, settings, counts, batch, dry_runs)
        except Exception as exc:  # noqa: BLE001 - one row's problem is that row's alone
            batch.states.pop(row.id, None)
            batch.park(row, None, "invalid_row", f"cannot decide: {error_line(exc)}")
            kept = False
        if not kept:
            _done(batch, row)


def _done(batch: Batch, row: Candidate) -> None:
    if row.seq is not None:
        batch.inbox_seqs.append(row.seq)


def _decide_one(
    row: Candidate,
    settings: Settings,
    counts: dict[JobKey, int],
    batch: Batch,
    dry_runs: DryRunLedger,
) -> bool:
    """Decide one row; True when it stays in the inbox (dry run changes nothing)."""
    decision = decide(
        row,  # type: ignore[arg-type]  # dlq_at is set whenever problem is None
        settings.policies,
        counts.get(job_key(row), 0),
        batch.db_now,
        failures=row.failures,
        last_failure_at=row.last_failure_at,
    )
    policy = None if isinstance(decision, Unmatched) else decision.policy
    if settings.dry_run or (policy is not None and policy.dry_run):
        if dry_runs.first_time(row.id, batch.fingerprint):
            would = (
                "unmatched"
                if isinstance(decision, Unmatched)
                else "park"
                if isinstance(decision, Park)
                else "replay"
            )
            due_at = getattr(decision, "due_at", None)
            batch.decisions.append(
                Decision(
                    row,
                    policy.name if policy else "unmatched",
                    "dry_run",
                    {"would": would, "due_at": due_at.isoformat() if due_at else None},
                )
            )
        return True
    if isinstance(decision, Unmatched):
        batch.states[row.id] = StateRow.of(row, "unmatched", None)
        batch.decisions.append(Decision(row, None, "unmatched"))
    elif isinstance(decision, Park) and decision.reason == "policy":
        name = decision.policy.name
        batch.states[row.id] = StateRow.of(row, "parked_policy", name)
        # counted when a row becomes parked, not each time it is looked at again
        if not (row.state == "parked_policy" and row.scheduled_policy == name):
            batch.policy_parked.append(name)
            batch.logs.append(LogRow(row.id, name, "parked", POLICY_PARK))
            batch.decisions.append(Decision(row, name, "parked", {"reason": "policy"}))
    elif isinstance(decision, Park):
        _park_max_replays(batch, row, decision.policy)
    elif decision.is_due(batch.db_now):
        target = settings.target_for(decision.policy)
        if target is None:  # Settings refuses a replay policy without one
            raise ValueError(f"policy {decision.policy.name!r} has no target")
        batch.replay.append(Item(row, decision.policy, target, decision.due_at))
    else:
        name = decision.policy.name
        batch.states[row.id] = StateRow.of(row, "waiting", name, decision.due_at)
        batch.decisions.append(
            Decision(row, name, "scheduled", {"due_at": decision.due_at.isoformat()})
        )
    return False


def _park_max_replays(batch: Batch, row: Candidate, policy: Policy) -> None:
    batch.park(
        row,
        policy.name,
        "max_replays",
        f"max_replays ({policy.max_replays}) reached for job {row.original_job_id[:200]}",
    )
