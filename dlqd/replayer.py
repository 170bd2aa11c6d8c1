"""The replayer: evaluates fresh rows by policy and replays due rows exactly once.

One pass (``run_once``) is a series of short transactions:

1. *new rows* — entries of ``dlqd_inbox`` (written by the insert trigger), in
   insertion order, locked ``FOR UPDATE SKIP LOCKED``: each row is decided;
   rows due now replay in that same transaction, the others get a schedule
   row in ``dlqd_entry_state`` (waiting with ``due_at``, parked, unmatched);
2. on a full pass (at start, every poll interval, after a policy change), rows
   scheduled under other policies are decided again;
3. *due rows* — scheduled rows whose ``due_at`` has come, claimed the same way.

A replay runs the target, sets ``replayed_at`` and writes the replay log in one
transaction, so a row is replayed exactly once whatever the number of
replicas, and a crash or a cancelled batch leaves no row half-replayed.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

import anyio
import psycopg
from anyio.abc import TaskStatus
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from dlqd.backoff import Backoff
from dlqd.config import HttpTarget, NotifyTarget, Policy, Settings, SqlTarget
from dlqd.errors import ConfigError, DatabaseUnavailable
from dlqd.logs import get_logger
from dlqd.metrics import Metrics
from dlqd.models import DlqEntry
from dlqd.policy import Park, Replay, Unmatched, decide, first_match, retry_delay
from dlqd.queries import q
from dlqd.targets import error_line, run_notify, run_sql
from dlqd.throttle import Throttle
from dlqd.wake import WakeFlag

Connection = psycopg.AsyncConnection[dict[str, Any]]
Target = SqlTarget | NotifyTarget | HttpTarget
log = get_logger("dlqd.replayer")

# errors after which a pass is abandoned and retried with backoff
TRANSIENT_ERRORS = (psycopg.OperationalError, DatabaseUnavailable, PoolTimeout)


@dataclass(slots=True)
class Item:
    """A row on its way to a target."""

    entry: DlqEntry
    policy: Policy | None  # None: a manual replay through replay.default_target
    target: Target
    failures: int = 0


@dataclass(slots=True)
class StateRow:
    state: Literal["waiting", "parked_policy", "unmatched", "parked"]
    policy: str | None
    due_at: datetime | None = None
    parked_reason: str | None = None
    failures: int = 0
    last_error: str | None = None
    last_failure_at: datetime | None = None


@dataclass(slots=True)
class LogRow:
    entry: DlqEntry
    policy: str | None
    outcome: Literal["replayed", "failed", "parked"]
    error: str | None = None
    manual: bool = False


@dataclass
class Writes:
    """What one transaction writes besides the target and ``replayed_at``: set-based."""

    fingerprint: str
    states: dict[UUID, StateRow] = field(default_factory=dict)
    logs: list[LogRow] = field(default_factory=list)

    async def flush(self, conn: Connection) -> None:
        if self.states:
            rows = list(self.states.items())
            await conn.execute(
                q("upsert_states"),
                {
                    "dlq_ids": [i for i, _ in rows],
                    "states": [s.state for _, s in rows],
                    "policies": [s.policy for _, s in rows],
                    "fingerprints": [self.fingerprint] * len(rows),
                    "due_ats": [s.due_at for _, s in rows],
                    "parked_reasons": [s.parked_reason for _, s in rows],
                    "failures": [s.failures for _, s in rows],
                    "last_errors": [s.last_error for _, s in rows],
                    "last_failure_ats": [s.last_failure_at for _, s in rows],
                },
            )
        if self.logs:
            await conn.execute(
                q("log_outcomes"),
                {
                    "dlq_ids": [r.entry.id for r in self.logs],
                    "original_job_ids": [r.entry.original_job_id for r in self.logs],
                    "app_ids": [r.entry.app_id for r in self.logs],
                    "policies": [r.policy for r in self.logs],
                    "outcomes": [r.outcome for r in self.logs],
                    "errors": [r.error for r in self.logs],
                    "manual": [r.manual for r in self.logs],
                },
            )


@dataclass
class PassResult:
    replayed: int = 0
    failed: int = 0
    parked: int = 0
    scheduled: int = 0
    unmatched: int = 0
    dry_run: int = 0
    skipped: int = 0
    # seconds until the throttle lets a blocked policy go again (None: nothing blocked)
    throttled_for: float | None = None
    # seconds until the next scheduled row is due (None: none waiting)
    next_due_in: float | None = None

    def add_throttle(self, seconds: float) -> None:
        self.throttled_for = (
            seconds if self.throttled_for is None else min(self.throttled_for, seconds)
        )


async def replay_counts(conn: Connection, original_job_ids: Sequence[str]) -> dict[str, int]:
    """Successful replays per original job, from the replay log."""
    if not original_job_ids:
        return {}
    cur = await conn.execute(q("replay_counts"), {"original_job_ids": list(original_job_ids)})
    return {row["original_job_id"]: int(row["replays"]) for row in await cur.fetchall()}


_ENTRY_FIELDS = tuple(DlqEntry.model_fields)


def _entry(row: dict[str, Any]) -> DlqEntry:
    # Postgres typed every column already (and CHECKs hold): no need to validate again
    return DlqEntry.model_construct(**{name: row[name] for name in _ENTRY_FIELDS})


def _target_key(target: Target) -> str:
    return target.model_dump_json()


def _policy_name(policy: Policy | None) -> str | None:
    return policy.name if policy else None


def _policy_label(policy: Policy | None) -> str:
    return policy.name if policy else "manual"


def log_event(
    event: str,
    entry: DlqEntry,
    policy: str | None,
    outcome: str,
    *,
    level: int = logging.INFO,
    **extra: Any,
) -> None:
    """One structured event per decision or replay: ids and labels, never the payload."""
    log.log(
        level,
        event,
        dlq_id=str(entry.id),
        app_id=entry.app_id,
        type=entry.type,
        policy=policy,
        outcome=outcome,
        **extra,
    )


async def execute_items(
    conn: Connection,
    items: Sequence[Item],
    writes: Writes,
    metrics: Metrics | None,
    *,
    db_now: datetime,
    manual: bool = False,
) -> tuple[list[Item], dict[UUID, str]]:
    """Run each item's target and mark the successes replayed, in ``conn``'s transaction.

    Returns the replayed items and the failures (id -> one-line error). Failed
    rows get a retry schedule and a log row in ``writes``.
    """
    groups: dict[str, list[Item]] = defaultdict(list)
    for item in items:
        groups[_target_key(item.target)].append(item)
    failures: dict[UUID, str] = {}
    for group in groups.values():
        target = group[0].target
        entries = [i.entry for i in group]
        started = anyio.current_time()
        if isinstance(target, SqlTarget):
            failures.update(await run_sql(conn, target, entries))
        elif isinstance(target, NotifyTarget):
            failures.update(await run_notify(conn, target, entries))
        else:
            # refused at start-up by check_supported_targets(); never reached
            failures.update(dict.fromkeys((e.id for e in entries), "http targets unsupported"))
        if metrics is not None:
            per_row = (anyio.current_time() - started) / len(group)
            for label, n in Counter(_policy_label(i.policy) for i in group).items():
                child = metrics.replay_duration_seconds.labels(label)
                for _ in range(n):
                    child.observe(per_row)

    succeeded = [i for i in items if i.entry.id not in failures]
    replayed_at: dict[UUID, datetime] = {}
    if succeeded:
        cur = await conn.execute(
            q("finish_replayed"),
            {
                "ids": [i.entry.id for i in succeeded],
                "policies": [_policy_name(i.policy) for i in succeeded],
                "manual": manual,
            },
        )
        replayed_at = {row["id"]: row["replayed_at"] for row in await cur.fetchall()}
    done = [i for i in succeeded if i.entry.id in replayed_at]
    for item in done:
        log_event("replay", item.entry, _policy_label(item.policy), "replayed", manual=manual)
    if metrics is not None:
        by_label: dict[str, list[Item]] = defaultdict(list)
        for item in done:
            by_label[_policy_label(item.policy)].append(item)
        for label, replayed in by_label.items():
            metrics.replays_total.labels(label, "replayed").inc(len(replayed))
            lag = metrics.dlq_to_replay_seconds.labels(label)
            for item in replayed:
                lag.observe(
                    max(0.0, (replayed_at[item.entry.id] - item.entry.dlq_at).total_seconds())
                )

    for item in items:
        error = failures.get(item.entry.id)
        if error is None:
            continue
        label = _policy_label(item.policy)
        writes.logs.append(LogRow(item.entry, _policy_name(item.policy), "failed", error, manual))
        if metrics is not None:
            metrics.replays_total.labels(label, "failed").inc()
        attempt = item.failures + 1
        due_at = None
        if item.policy is not None and not manual:
            due_at = db_now + retry_delay(item.policy, attempt)
            writes.states[item.entry.id] = StateRow(
                "waiting",
                item.policy.name,
                due_at=due_at,
                failures=attempt,
                last_error=error,
                last_failure_at=db_now,
            )
        log_event(
            "replay",
            item.entry,
            label,
            "failed",
            level=logging.WARNING,
            error=error,
            attempt=attempt,
            retry_at=due_at.isoformat() if due_at else None,
            manual=manual,
        )
    return done, failures


_NIL = UUID(int=0)
_MAX_UUID = UUID(int=2**128 - 1)


async def sweep_orphans(conn: Connection) -> int:
    """Move pending rows that bypassed the insert trigger into the inbox; how many."""
    cur = await conn.execute(q("enqueue_orphans"))
    return max(0, cur.rowcount)


def _is_due(seconds: float | None) -> bool:
    return seconds is not None and seconds <= 0


def _needs_replay_count(entries: Sequence[DlqEntry], policies: Sequence[Policy]) -> list[str]:
    """Original jobs whose replay count changes the decision.

    The count matters for max_replays and for an exponential delay; a policy
    replaying at once with no cap does not need it, and the query is skipped.
    """
    needed: set[str] = set()
    for entry in entries:
        policy = first_match(entry, policies)
        if policy is None or policy.action == "park":
            continue
        exponential = policy.backoff == "exponential" and policy.delay.total_seconds() > 0
        if policy.max_replays is not None or exponential:
            needed.add(entry.original_job_id)
    return sorted(needed)


class Replayer:
    """Claims and replays rows; one instance per claiming worker."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        settings: Callable[[], Settings],
        metrics: Metrics,
        throttle: Throttle,
        stopping: anyio.Event,
        *,
        dry_run_seen: set[tuple[UUID, str]] | None = None,
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.metrics = metrics
        self.throttle = throttle
        self.stopping = stopping
        # dry-run decisions are logged and counted once per row per process and config
        self.dry_run_seen = dry_run_seen if dry_run_seen is not None else set()

    # ------------------------------------------------------------------ one pass

    async def run_once(self, *, full: bool = True) -> PassResult:
        """Evaluate new rows, replay due rows; report when to look again.

        ``full`` also re-evaluates rows scheduled under other policies (after a
        config change, or left by a replica running another config).
        """
        settings = self.settings()
        fingerprint = settings.policies_fingerprint
        result = PassResult()
        batch = settings.replay.batch_size
        # one connection for the whole pass: each page is its own transaction
        async with self.pool.connection() as conn:
            seq = 0
            while not self.stopping.is_set():
                count, seq = await self._inbox_page(conn, settings, fingerprint, seq, result)
                if count < batch:
                    break
            if full:
                # fingerprints below ours, then above: both index range scans
                for start, below in (
                    (("", _NIL), fingerprint),
                    ((fingerprint, _MAX_UUID), None),
                ):
                    after = start
                    while not self.stopping.is_set():
                        count, after = await self._stale_page(
                            conn, settings, fingerprint, after, result, below=below
                        )
                        if count < batch:
                            break
            result.next_due_in = await self._next_due(conn, fingerprint)
            while not self.stopping.is_set() and _is_due(result.next_due_in):
                count = await self._due_page(conn, settings, fingerprint, result)
                if count < batch:
                    result.next_due_in = await self._next_due(conn, fingerprint)
                    break
        for name, is_open in self.throttle.open_circuits(anyio.current_time()).items():
            self.metrics.circuit_open.labels(name).set(1 if is_open else 0)
        return result

    @staticmethod
    async def _next_due(conn: Connection, fingerprint: str) -> float | None:
        """Seconds until the next scheduled row is due (<= 0: due now; None: none)."""
        cur = await conn.execute(q("next_due"), {"fingerprint": fingerprint})
        row = await cur.fetchone()
        return None if row is None or row["seconds"] is None else float(row["seconds"])

    async def _inbox_page(
        self,
        conn: Connection,
        settings: Settings,
        fingerprint: str,
        after_seq: int,
        result: PassResult,
    ) -> tuple[int, int]:
        """One page of newly inserted rows: evaluated, then out of the inbox."""
        async with conn.transaction():
            cur = await conn.execute(
                q("inbox_entries"),
                {"after_seq": after_seq, "limit": settings.replay.batch_size},
            )
            rows = await cur.fetchall()
            if not rows:
                return 0, after_seq
            kept = await self._evaluate(conn, rows, settings, fingerprint, result)
            done = [row["seq"] for row in rows if row["id"] not in kept]
            if done:
                await conn.execute(q("delete_inbox"), {"seqs": done})
        return len(rows), int(rows[-1]["seq"])

    async def _stale_page(
        self,
        conn: Connection,
        settings: Settings,
        fingerprint: str,
        after: tuple[str, UUID],
        result: PassResult,
        *,
        below: str | None,
    ) -> tuple[int, tuple[str, UUID]]:
        """One page of rows scheduled under other policies, evaluated again."""
        async with conn.transaction():
            cur = await conn.execute(
                q("stale_entries"),
                {
                    "fingerprint": fingerprint,
                    "after_fingerprint": after[0],
                    "after_id": after[1],
                    "below": below,
                    "limit": settings.replay.batch_size,
                },
            )
            rows = await cur.fetchall()
            if not rows:
                return 0, after
            await self._evaluate(conn, rows, settings, fingerprint, result)
        return len(rows), (rows[-1]["fingerprint"], rows[-1]["id"])

    async def _evaluate(
        self,
        conn: Connection,
        candidates: list[dict[str, Any]],
        settings: Settings,
        fingerprint: str,
        result: PassResult,
    ) -> set[UUID]:
        """Decide each row; replay the due ones now, schedule the others.

        Returns the ids left for a later pass (dry-run rows, which change nothing).
        """
        kept: set[UUID] = set()
        # replayed meanwhile (a manual replay) or parked by an event: nothing to decide
        rows = [r for r in candidates if r["replayed_at"] is None and r["state"] != "parked"]
        if rows:
            db_now: datetime = rows[0]["db_now"]
            entries = [_entry(row) for row in rows]
            counts = await replay_counts(conn, _needs_replay_count(entries, settings.policies))
            writes = Writes(fingerprint)
            due_now: list[tuple[Item, datetime]] = []
            for row, entry in zip(rows, entries, strict=True):
                decision = decide(
                    entry,
                    settings.policies,
                    counts.get(entry.original_job_id, 0),
                    db_now,
                    failures=row["failures"],
                    last_failure_at=row["last_failure_at"],
                )
                policy = None if isinstance(decision, Unmatched) else decision.policy
                if settings.dry_run or (policy is not None and policy.dry_run):
                    self._dry_run(entry, decision, fingerprint, result)
                    kept.add(entry.id)
                    continue
                carried = {
                    "failures": row["failures"],
                    "last_error": row["last_error"],
                    "last_failure_at": row["last_failure_at"],
                }
                if isinstance(decision, Unmatched):
                    writes.states[entry.id] = StateRow("unmatched", None, **carried)
                    result.unmatched += 1
                    self._decision(entry, None, "unmatched")
                elif isinstance(decision, Park) and decision.reason == "policy":
                    writes.states[entry.id] = StateRow(
                        "parked_policy", decision.policy.name, **carried
                    )
                    result.parked += 1
                    self.metrics.replays_total.labels(decision.policy.name, "parked").inc()
                    self._decision(entry, decision.policy.name, "parked", reason="policy")
                elif isinstance(decision, Park):
                    self._park_max_replays(entry, decision.policy, writes, carried, result)
                elif decision.is_due(db_now):
                    target = settings.target_for(decision.policy)
                    assert target is not None  # noqa: S101 - Settings guarantees a target
                    item = Item(entry, decision.policy, target, row["failures"])
                    due_now.append((item, decision.due_at))
                else:
                    writes.states[entry.id] = StateRow(
                        "waiting", decision.policy.name, due_at=decision.due_at, **carried
                    )
                    result.scheduled += 1
                    self._decision(
                        entry, decision.policy.name, "scheduled", due_at=decision.due_at.isoformat()
                    )
            deferred = await self._replay(conn, [i for i, _ in due_now], writes, db_now, result)
            due_at = {item.entry.id: due for item, due in due_now}
            for item in deferred:
                # throttled: scheduled as due now, claimed once the throttle allows
                assert item.policy is not None  # noqa: S101 - automatic replays have one
                writes.states[item.entry.id] = StateRow(
                    "waiting",
                    item.policy.name,
                    due_at=due_at[item.entry.id],
                    failures=item.failures,
                )
            await writes.flush(conn)
        return kept

    async def _due_page(
        self, conn: Connection, settings: Settings, fingerprint: str, result: PassResult
    ) -> int:
        now = anyio.current_time()
        blocked_policies, blocked_pairs = self._blocked(settings, now, result)
        async with conn.transaction():
            cur = await conn.execute(
                q("due_entries"),
                {
                    "fingerprint": fingerprint,
                    "blocked_policies": sorted(blocked_policies),
                    "blocked_pair_policies": [p for p, _ in blocked_pairs],
                    "blocked_pair_apps": [a for _, a in blocked_pairs],
                    "limit": settings.replay.batch_size,
                },
            )
            rows = await cur.fetchall()
            if not rows:
                return 0
            db_now: datetime = rows[0]["db_now"]
            by_name = {p.name: p for p in settings.policies}
            items: list[Item] = []
            for row in rows:
                policy = by_name.get(row["scheduled_policy"])
                target = settings.target_for(policy) if policy else None
                if policy is None or target is None:
                    continue  # the fingerprint matched, so this cannot happen
                items.append(Item(_entry(row), policy, target, row["failures"]))
            writes = Writes(fingerprint)
            await self._replay(conn, items, writes, db_now, result)
            await writes.flush(conn)
        return len(rows)

    # ------------------------------------------------------------------ replaying

    def _blocked(
        self, settings: Settings, now: float, result: PassResult
    ) -> tuple[set[str], set[tuple[str, str]]]:
        """Policies (and per-tenant buckets) that cannot replay right now.

        Their rows are left out of the claim, and ``result`` learns when the
        first of them may go again, so the loop sleeps exactly that long.
        """
        policies: set[str] = set()
        for policy in settings.policies:
            circuit = self.throttle.circuit(policy)
            trial_in = circuit.seconds_until_trial(now)
            if circuit.is_open(now) and trial_in > 0:
                policies.add(policy.name)
                result.add_throttle(trial_in)
            elif policy.rate_limit is not None and policy.rate_limit_per == "policy":
                bucket = self.throttle.bucket(policy, "")
                token_in = bucket.seconds_until_token(now) if bucket else 0.0
                if token_in > 0:
                    policies.add(policy.name)
                    result.add_throttle(token_in)
        pairs = self.throttle.empty_tenant_buckets(now)
        if pairs:
            result.add_throttle(self.throttle.next_tenant_token(now))
        return policies, pairs

    async def _replay(
        self,
        conn: Connection,
        items: list[Item],
        writes: Writes,
        db_now: datetime,
        result: PassResult,
    ) -> list[Item]:
        """Throttle, enforce max_replays, run targets; return what the throttle deferred."""
        if not items:
            return []
        now = anyio.current_time()
        admitted: list[Item] = []
        deferred: list[Item] = []
        for item in items:
            assert item.policy is not None  # noqa: S101 - automatic replays have a policy
            bucket = self.throttle.bucket(item.policy, item.entry.app_id)
            if bucket is not None and not bucket.try_take(now):
                deferred.append(item)
                result.add_throttle(bucket.seconds_until_token(now))
                continue
            circuit = self.throttle.circuit(item.policy)
            if not circuit.admit(now):
                if bucket is not None:
                    bucket.tokens += 1.0  # not used: give it back
                deferred.append(item)
                result.add_throttle(max(circuit.seconds_until_trial(now), 0.05))
                continue
            admitted.append(item)

        admitted = await self._enforce_max_replays(conn, admitted, writes, result)
        done, failures = await execute_items(conn, admitted, writes, self.metrics, db_now=db_now)
        result.replayed += len(done)
        result.failed += len(failures)
        result.skipped += len(admitted) - len(done) - len(failures)
        for item in admitted:
            assert item.policy is not None  # noqa: S101
            self.throttle.circuit(item.policy).record(item.entry.id not in failures, now)
        return deferred

    async def _enforce_max_replays(
        self, conn: Connection, items: list[Item], writes: Writes, result: PassResult
    ) -> list[Item]:
        limited = [i for i in items if i.policy and i.policy.max_replays is not None]
        if not limited:
            return items
        keys = sorted({i.entry.original_job_id for i in limited})
        await conn.execute(q("lock_original_jobs"), {"original_job_ids": keys})
        counts = await replay_counts(conn, keys)
        keep: list[Item] = []
        for item in items:
            policy = item.policy
            if policy is None or policy.max_replays is None:
                keep.append(item)
                continue
            key = item.entry.original_job_id
            if counts.get(key, 0) >= policy.max_replays:
                self._park_max_replays(
                    item.entry, policy, writes, {"failures": item.failures}, result
                )
                continue
            counts[key] = counts.get(key, 0) + 1
            keep.append(item)
        return keep

    def _park_max_replays(
        self,
        entry: DlqEntry,
        policy: Policy,
        writes: Writes,
        carried: dict[str, Any],
        result: PassResult,
    ) -> None:
        reason = f"max_replays ({policy.max_replays}) reached for {entry.original_job_id}"
        writes.states[entry.id] = StateRow(
            "parked",
            policy.name,
            parked_reason="max_replays",
            failures=carried.get("failures", 0),
            last_error=carried.get("last_error"),
            last_failure_at=carried.get("last_failure_at"),
        )
        writes.logs.append(LogRow(entry, policy.name, "parked", reason))
        result.parked += 1
        self.metrics.replays_total.labels(policy.name, "parked").inc()
        self._decision(entry, policy.name, "parked", reason="max_replays")

    def _dry_run(
        self,
        entry: DlqEntry,
        decision: Replay | Park | Unmatched,
        fingerprint: str,
        result: PassResult,
    ) -> None:
        key = (entry.id, fingerprint)
        if key in self.dry_run_seen:
            return
        if len(self.dry_run_seen) > 1_000_000:
            self.dry_run_seen.clear()  # bounded memory; at worst a row is logged again
        self.dry_run_seen.add(key)
        result.dry_run += 1
        label = "unmatched" if isinstance(decision, Unmatched) else decision.policy.name
        self.metrics.replays_total.labels(label, "dry_run").inc()
        would = (
            "unmatched"
            if isinstance(decision, Unmatched)
            else "park"
            if isinstance(decision, Park)
            else "replay"
        )
        self._decision(
            entry,
            label,
            "dry_run",
            would=would,
            due_at=decision.due_at.isoformat() if isinstance(decision, Replay) else None,
        )

    @staticmethod
    def _decision(entry: DlqEntry, policy: str | None, outcome: str, **extra: Any) -> None:
        log_event("decision", entry, policy, outcome, **extra)

    # ------------------------------------------------------------------ the loop

    async def run(
        self,
        flag: WakeFlag,
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Replay until ``stopping`` is set; never let one failure end the loop."""
        backoff = Backoff(base=0.2, cap=15.0)
        last_full = -math.inf
        last_fingerprint = ""
        task_status.started()
        while not self.stopping.is_set():
            # Clear the wake-up *before* looking for work: a notification that
            # lands while the pass runs then leaves the flag set and the loop
            # goes round again at once instead of sleeping on it.
            flag.clear()
            settings = self.settings()
            poll = settings.listen.poll_interval.total_seconds()
            fingerprint = settings.policies_fingerprint
            started = anyio.current_time()
            # the periodic scan: at start, every poll interval, and when the policies change
            full = fingerprint != last_fingerprint or started - last_full >= poll
            try:
                result = await self.run_once(full=full)
                if full:
                    last_full, last_fingerprint = started, fingerprint
            except TRANSIENT_ERRORS as exc:
                wait = backoff.next()
                log.warning("replayer pass failed", error=error_line(exc), retry_in=round(wait, 3))
            except Exception as exc:  # one bad pass must not end the daemon
                wait = backoff.next()
                log.error(
                    "replayer pass failed",
                    error=error_line(exc),
                    error_type=type(exc).__name__,
                    retry_in=round(wait, 3),
                    exc_info=not isinstance(exc, psycopg.Error),
                )
            else:
                backoff.reset()
                wait = self._next_wait(result, poll)
            if self.stopping.is_set():
                break
            with anyio.move_on_after(wait):
                await flag.wait()

    @staticmethod
    def _next_wait(result: PassResult, poll: float) -> float:
        wait = poll
        if result.next_due_in is not None:
            if result.next_due_in > 0:
                wait = min(wait, result.next_due_in)
            elif result.throttled_for is None:
                # due rows left that this pass could not claim (locked by another
                # replica's batch in flight): look again shortly
                wait = min(wait, 0.25)
        if result.throttled_for is not None:
            wait = min(wait, max(result.throttled_for, 0.01))
        return max(0.0, wait) if math.isfinite(wait) else poll


async def sql_target_problems(conn: Connection, settings: Settings) -> list[str]:
    """Every sql target planned with EXPLAIN: one line per statement that would fail."""
    from dlqd.targets import explain_sql

    problems: list[str] = []
    targets: list[tuple[str, Target | None]] = [
        (f"policies[{i}].target", p.target) for i, p in enumerate(settings.policies)
    ]
    targets.append(("replay.default_target", settings.replay.default_target))
    for where, target in targets:
        if isinstance(target, SqlTarget) and (error := await explain_sql(conn, target)):
            problems.append(f"{where}.statement: {error}")
    return problems


def check_supported_targets(settings: Settings) -> None:
    """Refuse targets this release cannot replay into (``http`` comes later)."""

    if isinstance(settings.replay.default_target, HttpTarget):
        raise ConfigError("replay.default_target: kind 'http' is not supported by this release")
    for index, policy in enumerate(settings.policies):
        if isinstance(policy.target, HttpTarget):
            raise ConfigError(
                f"policies[{index}].target: kind 'http' is not supported by this release"
            )
