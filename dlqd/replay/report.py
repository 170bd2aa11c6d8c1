"""Reporting a committed transaction: metrics, circuit breakers, logs.

Called only after COMMIT succeeded, so counters and logs say what happened.
At ``info``: one ``batch`` event per transaction that did anything (counts by
policy and outcome), one event per row parked by an event, one warning per
failed attempt, one per circuit change. Per-row decisions and replays are
``debug``: the per-row audit trail is the replay log table.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import anyio

from dlqd.config import Policy
from dlqd.db.connector import Connection
from dlqd.logs import get_logger
from dlqd.metrics import LATENCY_BUCKETS, Metrics, bucket_index, observe_counts
from dlqd.replay.batch import Outcome
from dlqd.replay.result import ExpressPage
from dlqd.replay.rows import Candidate
from dlqd.throttle import Throttle

log = get_logger("dlqd.replayer")


def _row_fields(row: Candidate) -> dict[str, Any]:
    # ids and labels only, never the payload; key columns cut for the log line
    return {"dlq_id": str(row.id), "app_id": row.app_id[:200], "type": row.type[:200]}


def report(
    outcome: Outcome,
    metrics: Metrics | None,
    *,
    duration: float,
    manual: bool = False,
) -> Counter[tuple[str, str]]:
    """Count, record and log ``outcome``; return its counts by (policy, outcome)."""
    counts: Counter[tuple[str, str]] = Counter()
    debug = log.is_enabled_for(logging.DEBUG)

    for item, lag in outcome.replayed:
        counts[(item.label, "replayed")] += 1
        if metrics is not None and lag is not None:
            metrics.dlq_to_replay_seconds.labels(item.label).observe(max(0.0, lag))
        if debug:
            log.debug(
                "replay",
                **_row_fields(item.row),
                policy=item.label,
                outcome="replayed",
                manual=manual,
            )
    if metrics is not None:
        for label, (seconds, rows) in outcome.target_seconds.items():
            if rows:
                child = metrics.replay_duration_seconds.labels(label)
                index = bucket_index(LATENCY_BUCKETS, seconds / rows)
                observe_counts(child, {index: rows}, seconds)

    for failed in outcome.failed:
        item = failed.item
        counts[(item.label, "failed")] += 1
        log.warning(
            "replay failed",
            **_row_fields(item.row),
            policy=item.label,
            outcome="failed",
            error=failed.failure.error,
            attempt=failed.attempt,
            retry_at=failed.retry_at.isoformat() if failed.retry_at else None,
            manual=manual,
        )

    parked_by: Counter[tuple[str, str]] = Counter()
    for parked in outcome.parked:
        label = parked.policy or "none"
        counts[(label, "parked")] += 1
        parked_by[(label, parked.reason)] += 1
        log.info(
            "parked",
            **_row_fields(parked.row),
            policy=parked.policy,
            outcome="parked",
            reason=parked.reason,
            error=parked.error,
        )
    for name in outcome.policy_parked:
        counts[(name, "parked")] += 1
        parked_by[(name, "policy")] += 1

    for decision in outcome.decisions:
        if decision.outcome == "dry_run":
            counts[(decision.policy or "unmatched", "dry_run")] += 1
            log.info(
                "decision",
                **_row_fields(decision.row),
                policy=decision.policy,
                outcome="dry_run",
                **decision.extra,
            )
        elif debug:
            log.debug(
                "decision",
                **_row_fields(decision.row),
                policy=decision.policy,
                outcome=decision.outcome,
                **decision.extra,
            )

    if metrics is not None:
        for (label, kind), n in counts.items():
            metrics.replays_total.labels(label, kind).inc(n)
        for (label, reason), n in parked_by.items():
            metrics.parked_total.labels(label, reason).inc(n)

    if counts:
        by_policy: dict[str, dict[str, int]] = {}
        for (label, kind), n in sorted(counts.items()):
            by_policy.setdefault(label, {})[kind] = n
        log.info(
            "batch",
            replayed=sum(n for (_, k), n in counts.items() if k == "replayed"),
            failed=sum(n for (_, k), n in counts.items() if k == "failed"),
            parked=sum(n for (_, k), n in counts.items() if k == "parked"),
            policies=by_policy,
            duration_ms=round(duration * 1000, 1),
            manual=manual,
        )
    return counts


def report_express(page: ExpressPage, metrics: Metrics | None, *, duration: float) -> None:
    """Count, record and log a committed express page, per policy, not per row:
    the same counters and histograms as :func:`report`, and the same ``batch``
    event (marked ``express``). Its rows are in the replay log and schedule tables."""
    replayed = sum(rows for rows, _, _ in page.replayed.values())
    parked = sum(page.parked.values())
    if metrics is not None:
        per_row = bucket_index(LATENCY_BUCKETS, page.seconds / max(replayed, 1))
        for name, (rows, ages, age_sum) in page.replayed.items():
            metrics.replays_total.labels(name, "replayed").inc(rows)
            observe_counts(metrics.dlq_to_replay_seconds.labels(name), ages, age_sum)
            observe_counts(
                metrics.replay_duration_seconds.labels(name),
                {per_row: rows},
                page.seconds * rows / replayed,
            )
        for name, rows in page.parked.items():
            metrics.replays_total.labels(name, "parked").inc(rows)
            metrics.parked_total.labels(name, "policy").inc(rows)
    if not replayed and not parked:
        return  # schedule rows only: decisions, logged at debug by the ordinary path
    policies: dict[str, dict[str, int]] = {}
    for name, (rows, _, _) in page.replayed.items():
        policies.setdefault(name, {})["replayed"] = rows
    for name, rows in page.parked.items():
        policies.setdefault(name, {})["parked"] = rows
    log.info(
        "batch",
        replayed=replayed,
        failed=0,
        parked=parked,
        policies=dict(sorted(policies.items())),
        duration_ms=round(duration * 1000, 1),
        manual=False,
        express=True,
    )


def circuit_attempts(outcome: Outcome) -> list[tuple[Policy, bool, bool]]:
    """The committed attempts a circuit learns from: (policy, succeeded, evidence).

    Evidence that the target is down: a timeout, a 5xx, a refused connection,
    or the failure of a row that never failed before. A row already known to
    be bad failing again says nothing about the target (max_failures ends it).
    """
    attempts: list[tuple[Policy, bool, bool]] = [
        (item.policy, True, True) for item, _ in outcome.replayed if item.policy is not None
    ]
    for failed in outcome.failed:
        if failed.item.policy is not None:
            evidence = failed.failure.target_down or failed.item.row.failures == 0
            attempts.append((failed.item.policy, False, evidence))
    return attempts


class Reporter:
    """After a COMMIT: counters, histograms and logs (:func:`report`), and the
    shared circuits learn from the attempts (their gauges follow)."""

    def __init__(self, metrics: Metrics, throttle: Throttle) -> None:
        self.metrics = metrics
        self.throttle = throttle

    async def committed(self, conn: Connection, outcome: Outcome, started: float) -> None:
        report(outcome, self.metrics, duration=anyio.current_time() - started)
        await self.learn(conn, circuit_attempts(outcome))

    async def learn(self, conn: Connection, attempts: list[tuple[Policy, bool, bool]]) -> None:
        """Let the shared circuits learn from committed attempts."""
        if not attempts:
            return
        changes = await self.throttle.record(conn, attempts, anyio.current_time())
        for name, change in changes:
            if change == "opened":
                log.warning("circuit opened", policy=name)
            else:
                log.info("circuit closed", policy=name)
        self.export_circuits()

    def export_circuits(self) -> None:
        for name, is_open in self.throttle.open_circuits().items():
            self.metrics.circuit_open.labels(name).set(1 if is_open else 0)
