"""``dlqd explain``: which policy matches a row, why the others do not, its
replay count, its recorded state and the verdict. With policies given (a
config), the verdict is theirs; with none, the one the daemon recorded."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from dlqd.config import PurgeSettings, Settings
from dlqd.db import entries, replays
from dlqd.db.connector import Connection
from dlqd.policy import MatchLike, Park, Replay, Unmatched, decide, mismatch
from dlqd.replay.evaluate import job_key
from dlqd.replay.rows import Candidate


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


async def explain(
    conn: Connection, settings: Settings | None, entry_id: UUID
) -> Explanation | None:
    """``settings`` None (or without policies): the verdict the daemon recorded."""
    return await _explain(conn, settings or _RECORDED, entry_id)


class _Recorded:
    """No configuration: no policies, the default log retention."""

    policies: tuple[()] = ()
    dry_run = False
    purge = PurgeSettings()


_RECORDED: Any = _Recorded()


async def _explain(conn: Connection, settings: Settings, entry_id: UUID) -> Explanation | None:
    """Which policy matches the row and why, its replay count and when it is due."""
    data = await entries.narrow(conn, entry_id)
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
    counts = await replays.replay_counts(conn, [job_key(row)], settings.purge.log_retention)
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
    if not settings.policies:
        return _as_recorded(explanation, data, lines)
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


def _as_recorded(explanation: Explanation, data: dict[str, Any], lines: list[str]) -> Explanation:
    """No policies loaded (no --config): the verdict the daemon recorded."""
    lines[-1] = "no policies loaded (pass --config): the verdict is what the daemon recorded"
    recorded = data["state"]
    if recorded == "waiting":
        explanation.verdict = "replay"
        due = data["due_at"]
        lines.append(
            f"verdict: waiting to replay through policy {data['scheduled_policy']!r}"
            f" at {due.isoformat() if due else '-'}"
        )
    elif recorded == "parked_policy":
        explanation.verdict = "park"
        explanation.reason = "policy"
        lines.append(f"verdict: parked by policy {data['scheduled_policy']!r}")
    elif recorded == "unmatched":
        explanation.verdict = "unmatched"
        lines.append("verdict: unmatched: no policy of the daemon matched it")
    else:
        explanation.verdict = "unmatched"
        lines.append("verdict: new: the daemon has not decided it yet")
    if data["failures"]:
        lines.append(f"failed attempts: {data['failures']}; last error: {data['last_error']}")
    return explanation
