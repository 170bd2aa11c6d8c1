"""Policy decisions: pure functions of a row, the policies, Postgres-held counts and ``now``.

Nothing here reads a clock or opens a connection, so every replica (and every
restart) computes the same decision and due time for the same row.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from fnmatch import fnmatchcase
from typing import Literal, Protocol
from uuid import UUID

from dlqd.config import Match, Policy


class MatchLike(Protocol):
    """The columns a policy's ``match`` reads."""

    @property
    def app_id(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def error_reason(self) -> str: ...
    @property
    def attempts(self) -> int: ...


class EntryLike(MatchLike, Protocol):
    """The columns a decision reads."""

    @property
    def id(self) -> UUID: ...
    @property
    def dlq_at(self) -> datetime: ...


@dataclass(frozen=True, slots=True)
class Replay:
    """Replay through ``policy`` at ``due_at``."""

    policy: Policy
    due_at: datetime
    replay_count: int

    def is_due(self, now: datetime) -> bool:
        return self.due_at <= now


@dataclass(frozen=True, slots=True)
class Park:
    """Leave the row for a human. ``reason`` is ``policy`` or ``max_replays``."""

    policy: Policy
    reason: Literal["policy", "max_replays"]


@dataclass(frozen=True, slots=True)
class Unmatched:
    """No policy matches: the row stays pending until the policies change."""


Decision = Replay | Park | Unmatched


def _any_glob(value: str, patterns: Sequence[str] | None) -> bool:
    return patterns is None or any(fnmatchcase(value, p) for p in patterns)


def mismatch(match: Match, entry: MatchLike) -> str | None:
    """Why ``entry`` does not match (the first failing field), or None when it does."""
    for field, value, patterns in (
        ("app_id", entry.app_id, match.app_id),
        ("type", entry.type, match.type),
        ("error_reason", entry.error_reason, match.error_reason),
    ):
        if not _any_glob(value, patterns):
            return f"{field} {value[:200]!r} matches none of {patterns}"
    if match.min_attempts is not None and entry.attempts < match.min_attempts:
        return f"attempts {entry.attempts} < min_attempts {match.min_attempts}"
    if match.max_attempts is not None and entry.attempts > match.max_attempts:
        return f"attempts {entry.attempts} > max_attempts {match.max_attempts}"
    return None


def matches(match: Match, entry: MatchLike) -> bool:
    return mismatch(match, entry) is None


def first_match(entry: MatchLike, policies: Sequence[Policy]) -> Policy | None:
    for policy in policies:
        if matches(policy.match, entry):
            return policy
    return None


_MICROSECOND = timedelta(microseconds=1)
#: jitter in millionths: the integer both Python and Postgres compute with
JITTER_SCALE = 1_000_000
_TWO_64 = 2**64


def _hash_unit(entry_id: UUID) -> int:
    """The row id's first 8 bytes of sha256 as an unsigned integer: uniform in [0, 2**64)."""
    return int.from_bytes(hashlib.sha256(entry_id.bytes).digest()[:8], "big")


def jittered_micros(entry_id: UUID, micros: int, jitter: float) -> int:
    """``micros`` ± ``jitter`` of it, from the row id alone, in integers only:
    ``micros + trunc(micros * (2u - 2**64) * ppm / (2**64 * 10**6))`` with u
    the id's hash and ppm the jitter in millionths. ``dlqd_jittered_us`` in
    Postgres (migration 013) is the same expression, so both paths agree to
    the microsecond."""
    ppm = round(jitter * JITTER_SCALE)
    if ppm <= 0 or micros == 0:
        return micros
    spread = micros * (2 * _hash_unit(entry_id) - _TWO_64) * ppm
    quotient = abs(spread) // (_TWO_64 * JITTER_SCALE)  # toward zero, as numeric div()
    return micros + (quotient if spread >= 0 else -quotient)


def _capped(base: timedelta, factor: float, exponent: int, cap: timedelta) -> timedelta:
    seconds = base.total_seconds()
    cap_seconds = cap.total_seconds()
    # stop multiplying once past the cap: factor ** exponent can overflow
    for _ in range(exponent):
        if seconds >= cap_seconds:
            break
        seconds *= factor
    return timedelta(seconds=min(seconds, cap_seconds))


def base_delay(policy: Policy, replay_count: int) -> timedelta:
    """The n-th replay's delay before jitter: exponential ``min(max_delay,
    delay * factor**n)``; fixed ``delay``."""
    if policy.backoff == "fixed":
        return policy.delay
    return _capped(policy.delay, policy.factor, replay_count, policy.max_delay)


def replay_delay(policy: Policy, replay_count: int, entry_id: UUID) -> timedelta:
    """Wait after ``dlq_at`` before the n-th replay (n = ``replay_count``) of a
    job: :func:`base_delay` ± ``jitter`` from the row id (:func:`jittered_micros`)."""
    micros = base_delay(policy, replay_count) // _MICROSECOND
    return timedelta(microseconds=jittered_micros(entry_id, micros, policy.jitter))


def retry_delay(policy: Policy, failures: int) -> timedelta:
    """Wait after failed attempt k (k = ``failures`` >= 1) of one row."""
    return _capped(policy.retry_delay, policy.factor, max(0, failures - 1), policy.max_delay)


def decide(
    entry: EntryLike,
    policies: Sequence[Policy],
    replay_count: int,
    now: datetime,
    *,
    failures: int = 0,
    last_failure_at: datetime | None = None,
) -> Decision:
    """The first matching policy decides: replay (and when), park, or unmatched.

    ``replay_count`` is the number of successful replays of the row's
    ``original_job_id`` so far; ``failures`` and ``last_failure_at`` describe
    failed attempts of this row. ``now`` only bounds a due time computed from a
    failure that lies in the future of a clock-skewed replica.
    """
    policy = first_match(entry, policies)
    if policy is None:
        return Unmatched()
    if policy.action == "park":
        return Park(policy, "policy")
    if policy.max_replays is not None and replay_count >= policy.max_replays:
        return Park(policy, "max_replays")
    due_at = entry.dlq_at + replay_delay(policy, replay_count, entry.id)
    if failures > 0 and last_failure_at is not None:
        retry_at = min(last_failure_at, now) + retry_delay(policy, failures)
        due_at = max(due_at, retry_at)
    return Replay(policy, due_at, replay_count)
