"""One transaction's work for a page of claimed rows, and what it committed.

A :class:`Batch` says what to do: rows to replay now, schedule rows to write,
parks to log, inbox entries to drop. :func:`apply` does it inside the
caller's transaction and returns an :class:`Outcome`, which the caller
reports (logs, metrics, circuit breakers) only once the transaction has
committed: nothing is counted as replayed that did not commit.

When the transaction fails as a whole (at COMMIT, say), :func:`settle_split`
retries each half of the batch in a transaction of its own, down to the one
row that fails, whose failed attempt is then recorded on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol
from uuid import UUID

import anyio

from dlqd.config import HttpTarget, NotifyTarget, Policy, Settings, SqlTarget
from dlqd.db import claims, replays
from dlqd.db.connector import Connection, transaction
from dlqd.errors import DatabaseError
from dlqd.policy import retry_delay
from dlqd.replay.http import Delivery, redact_url
from dlqd.replay.rows import Candidate
from dlqd.replay.targets import Failure, run_isolated, runner_for

Target = SqlTarget | NotifyTarget | HttpTarget
ParkReason = Literal["max_replays", "max_failures", "invalid_row", "http_4xx", "manual"]
#: the replay log's error of a row a park policy parks (express pages write the same)
POLICY_PARK = "parked by policy"


@dataclass(slots=True)
class Item:
    """A row on its way to a target."""

    row: Candidate
    policy: Policy | None  # None: a manual replay through replay.default_target
    target: Target
    due_at: datetime | None = None  # when the schedule said (kept if the throttle defers it)

    @property
    def label(self) -> str:
        return self.policy.name if self.policy else "manual"


@dataclass(slots=True)
class StateRow:
    """A schedule row (dlqd_entry_state). Built with :meth:`of`, which keeps the
    row's failure history, except where a failure writes a new one."""

    state: Literal["waiting", "parked_policy", "unmatched", "parked"]
    policy: str | None
    due_at: datetime | None = None
    parked_reason: ParkReason | None = None
    failures: int = 0
    last_error: str | None = None
    last_failure_at: datetime | None = None

    @classmethod
    def of(
        cls,
        row: Candidate,
        state: Literal["waiting", "parked_policy", "unmatched", "parked"],
        policy: str | None,
        due_at: datetime | None = None,
    ) -> StateRow:
        return cls(
            state,
            policy,
            due_at=due_at,
            failures=row.failures,
            last_error=row.last_error,
            last_failure_at=row.last_failure_at,
        )


@dataclass(slots=True)
class LogRow:
    dlq_id: UUID
    policy: str | None
    outcome: Literal["replayed", "failed", "parked"]
    error: str | None = None
    manual: bool = False


@dataclass(slots=True)
class Parked:
    """A row parked by an event: logged once, counted once."""

    row: Candidate
    policy: str | None
    reason: ParkReason
    error: str | None


@dataclass(slots=True)
class Failed:
    item: Item
    failure: Failure
    attempt: int
    retry_at: datetime | None


@dataclass(slots=True)
class Decision:
    """A per-row decision, reported at debug level after commit."""

    row: Candidate
    policy: str | None
    outcome: str
    extra: dict[str, Any] = field(default_factory=dict)


class Progress(Protocol):
    """A redrive's bookkeeping, done as the last statement of every transaction
    that replays part of its chunk: counted with the rows it counts."""

    @property
    def redrive(self) -> UUID: ...

    async def record(
        self,
        conn: Connection,
        cursor: tuple[str, UUID] | None,
        *,
        replayed: int,
        failed: int,
        skipped: int,
    ) -> None: ...


@dataclass
class Batch:
    fingerprint: str
    db_now: datetime
    manual: bool = False
    actor: str | None = None  # a manual replay: who, and why (kept in the replay log)
    reason: str | None = None
    # a redrive's chunk: its bookkeeping, the chunk's last row (its cursor),
    # and the rows skipped before the batch was built (counted with its first part)
    progress: Progress | None = None
    cursor: tuple[str, UUID] | None = None
    carried_skips: int = 0
    replay: list[Item] = field(default_factory=list)
    states: dict[UUID, StateRow] = field(default_factory=dict)
    logs: list[LogRow] = field(default_factory=list)
    parked: list[Parked] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    policy_parked: list[str] = field(default_factory=list)  # policy names, newly parked
    inbox_seqs: list[int] = field(default_factory=list)
    # http targets answer before the transaction that records them: their answers
    deliveries: dict[UUID, Delivery] = field(default_factory=dict)

    def park(
        self,
        row: Candidate,
        policy: str | None,
        reason: ParkReason,
        error: str | None,
        *,
        failures: int | None = None,
    ) -> None:
        self.states[row.id] = StateRow(
            "parked",
            policy,
            parked_reason=reason,
            failures=row.failures if failures is None else failures,
            last_error=row.last_error if error is None else error,
            last_failure_at=row.last_failure_at,
        )
        self.logs.append(LogRow(row.id, policy, "parked", error or reason, self.manual))
        self.parked.append(Parked(row, policy, reason, error))

    def ids(self) -> set[UUID]:
        found = {i.row.id for i in self.replay} | set(self.states) | {r.dlq_id for r in self.logs}
        return found

    def only(self, ids: set[UUID], *, with_rest: bool) -> Batch:
        """The part of this batch about ``ids`` (``with_rest``: and its non-replay writes)."""
        part = Batch(
            self.fingerprint,
            self.db_now,
            self.manual,
            self.actor,
            self.reason,
            progress=self.progress,
            cursor=self.cursor,
        )
        part.replay = [i for i in self.replay if i.row.id in ids]
        part.deliveries = {k: v for k, v in self.deliveries.items() if k in ids}
        if with_rest:
            replay_ids = {i.row.id for i in self.replay}
            keep = ids | (self.ids() - replay_ids)
            part.states = {k: v for k, v in self.states.items() if k in keep}
            part.logs = [r for r in self.logs if r.dlq_id in keep]
            part.parked = [p for p in self.parked if p.row.id in keep]
            part.decisions = self.decisions
            part.policy_parked = self.policy_parked
            part.inbox_seqs = self.inbox_seqs
            part.carried_skips = self.carried_skips
        return part

    @property
    def redrive(self) -> UUID | None:
        return self.progress.redrive if self.progress is not None else None

    async def record_progress(
        self, conn: Connection, *, replayed: int, failed: int, skipped: int
    ) -> None:
        """A redrive's counts for this transaction (nothing for other batches)."""
        if self.progress is not None:
            await self.progress.record(
                conn,
                self.cursor,
                replayed=replayed,
                failed=failed,
                skipped=skipped + self.carried_skips,
            )


@dataclass
class Outcome:
    """What a committed transaction did; reported only after the commit."""

    replayed: list[tuple[Item, float | None]] = field(default_factory=list)  # item, dlq→replay
    failed: list[Failed] = field(default_factory=list)
    parked: list[Parked] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    policy_parked: list[str] = field(default_factory=list)
    skipped: int = 0
    target_seconds: dict[str, tuple[float, int]] = field(default_factory=dict)  # label → (s, rows)

    def merge(self, other: Outcome) -> None:
        self.replayed += other.replayed
        self.failed += other.failed
        self.parked += other.parked
        self.decisions += other.decisions
        self.policy_parked += other.policy_parked
        self.skipped += other.skipped
        for label, (seconds, rows) in other.target_seconds.items():
            before = self.target_seconds.get(label, (0.0, 0))
            self.target_seconds[label] = (before[0] + seconds, before[1] + rows)


async def set_replay_settings(conn: Connection, settings: Settings) -> None:
    """Bound every statement of this transaction (targets blocked on a lock
    included), and compile none by JIT (sql/queries.sql says why)."""
    await replays.bound_transaction(
        conn, settings.replay.statement_timeout, settings.replay.lock_timeout
    )


def _target_key(target: Target) -> str:
    return target.model_dump_json()


class IsolationNeeded(Exception):
    """The lone row of an optimistic batch failed in its target, outside any
    savepoint: the transaction is lost; do the page again with isolation."""


async def apply(
    conn: Connection, batch: Batch, settings: Settings, *, optimistic: bool = False
) -> Outcome:
    """Do ``batch`` in ``conn``'s open transaction; report nothing (the caller does).

    ``optimistic``: a batch of one sql or notify row runs its target without a
    savepoint (three round trips fewer, the common case of a trickle); if the
    target fails, :class:`IsolationNeeded` is raised and the caller starts over
    with isolation. A deferred constraint failing at COMMIT takes the
    caller's settle_split path, as always.
    """
    outcome = Outcome(
        parked=list(batch.parked),
        decisions=list(batch.decisions),
        policy_parked=list(batch.policy_parked),
    )
    failures: dict[UUID, Failure] = {}
    settled: set[UUID] = set()  # neither replayed nor failed (http: parked, or gone)
    groups: dict[str, list[Item]] = {}
    for item in batch.replay:
        groups.setdefault(_target_key(item.target), []).append(item)
    for group in groups.values():
        target = group[0].target
        started = anyio.current_time()
        if isinstance(target, HttpTarget):
            for item in group:
                delivery = batch.deliveries.get(item.row.id)
                if delivery is None:
                    settled.add(item.row.id)  # purged meanwhile: nothing was sent
                    outcome.skipped += 1
                elif delivery.rejected and not batch.manual:
                    settled.add(item.row.id)
                    batch.park(
                        item.row,
                        item.label if item.policy else None,
                        "http_4xx",
                        f"{delivery.error} from {redact_url(target.url)}",
                    )
                    outcome.parked.append(batch.parked[-1])
                elif not delivery.acknowledged:
                    down = delivery.status is None or delivery.status >= 500
                    failures[item.row.id] = Failure(
                        delivery.error or "HTTP error", down, delivery.retry_after
                    )
            continue
        if optimistic and len(batch.replay) == 1:
            row = group[0].row
            try:
                await runner_for(target)(conn, [row], row.problem is not None)
            except DatabaseError as exc:
                if exc.broken:
                    raise
                raise IsolationNeeded from exc
        else:
            failures.update(
                await run_isolated(
                    conn,
                    target,
                    [i.row for i in group],
                    in_db=lambda row: row.problem is not None,
                    max_bytes=settings.replay.batch_bytes,
                )
            )
        elapsed = anyio.current_time() - started
        for item in group:
            seconds, rows = outcome.target_seconds.get(item.label, (0.0, 0))
            outcome.target_seconds[item.label] = (seconds + elapsed / len(group), rows + 1)

    succeeded = [i for i in batch.replay if i.row.id not in failures and i.row.id not in settled]
    if succeeded:
        lags = await replays.finish_replayed(
            conn,
            [i.row.id for i in succeeded],
            [i.policy.name if i.policy else None for i in succeeded],
            manual=batch.manual,
            actor=batch.actor,
            reason=batch.reason,
            inbox_seqs=batch.inbox_seqs,
            redrive=batch.redrive,
        )
        outcome.replayed = [(i, lags[i.row.id]) for i in succeeded if i.row.id in lags]
        outcome.skipped += len(succeeded) - len(outcome.replayed)

    for item in batch.replay:
        if (failure := failures.get(item.row.id)) is not None:
            record_failure(batch, item, failure, settings, outcome)
    await _write(conn, batch, inbox_done=bool(succeeded))
    await batch.record_progress(
        conn, replayed=len(outcome.replayed), failed=len(outcome.failed), skipped=outcome.skipped
    )
    return outcome


def record_failure(
    batch: Batch, item: Item, failure: Failure, settings: Settings, outcome: Outcome
) -> None:
    """A failed attempt: logged, and retried later or parked at max_failures."""
    row, policy = item.row, item.policy
    name = policy.name if policy else None
    batch.logs.append(LogRow(row.id, name, "failed", failure.error, batch.manual))
    attempt = row.failures + 1
    retry_at = None
    if policy is not None and not batch.manual:
        if attempt >= policy.max_failures:
            batch.park(
                row,
                name,
                "max_failures",
                f"{attempt} failed attempts, last: {failure.error}",
                failures=attempt,
            )
            outcome.parked.append(batch.parked[-1])
        else:
            wait = retry_delay(policy, attempt)
            if failure.retry_after is not None:  # the target said when
                wait = min(timedelta(seconds=failure.retry_after), policy.max_delay)
            retry_at = batch.db_now + wait
            batch.states[row.id] = StateRow(
                "waiting",
                name,
                due_at=retry_at,
                failures=attempt,
                last_error=failure.error,
                last_failure_at=batch.db_now,
            )
    outcome.failed.append(Failed(item, failure, attempt, retry_at))


async def _write(conn: Connection, batch: Batch, *, inbox_done: bool = False) -> None:
    """Schedule rows, log rows and inbox deletions: set-based, one statement each
    (``inbox_done``: finish_replayed already deleted the inbox entries)."""
    if batch.states:
        await replays.write_schedule(conn, batch.fingerprint, list(batch.states.items()))
    if batch.logs:
        await replays.log_outcomes(conn, batch.logs, batch.actor, batch.reason, batch.redrive)
    if batch.inbox_seqs and not inbox_done:
        await claims.delete_inbox(conn, batch.inbox_seqs)


async def settle_split(
    conn: Connection, batch: Batch, settings: Settings, error: DatabaseError
) -> Outcome:
    """``batch``'s transaction failed as a whole: bisect it in fresh transactions.

    Each half locks its rows again (skipping any another replica or a human
    took meanwhile). A single row that still fails gets a failed attempt
    recorded on its own, with the error of its transaction.
    """
    if len(batch.replay) <= 1:
        failed = list(batch.replay)
        part = batch.only({i.row.id for i in failed}, with_rest=True)
        part.replay = []
        async with transaction(conn):
            await set_replay_settings(conn, settings)
            locked = await claims.relock(
                conn, part.ids() | {i.row.id for i in failed}, batch.manual
            )
            part.states = {k: v for k, v in part.states.items() if k in locked}
            part.logs = [r for r in part.logs if r.dlq_id in locked]
            part.parked = [p for p in part.parked if p.row.id in locked]
            pending = Outcome(
                parked=list(part.parked),
                decisions=list(part.decisions),
                policy_parked=list(part.policy_parked),
            )
            for item in failed:
                if item.row.id in locked:
                    record_failure(part, item, Failure(str(error)), settings, pending)
            await _write(conn, part)
            await part.record_progress(
                conn,
                replayed=0,
                failed=len(pending.failed),
                skipped=len(failed) - len(pending.failed),
            )
        return pending
    outcome = Outcome()
    middle = len(batch.replay) // 2
    halves = [
        batch.only({i.row.id for i in batch.replay[:middle]}, with_rest=True),
        batch.only({i.row.id for i in batch.replay[middle:]}, with_rest=False),
    ]
    for half in halves:
        try:
            async with transaction(conn):
                await set_replay_settings(conn, settings)
                locked = await claims.relock(conn, half.ids(), batch.manual)
                still = [i for i in half.replay if i.row.id in locked]
                half.carried_skips += len(half.replay) - len(still)  # replayed meanwhile
                half.replay = still
                half.states = {k: v for k, v in half.states.items() if k in locked}
                half.logs = [r for r in half.logs if r.dlq_id in locked]
                result = await apply(conn, half, settings)
        except DatabaseError as exc:
            if exc.broken:
                raise
            result = await settle_split(conn, half, settings, exc)
        outcome.merge(result)
    return outcome
