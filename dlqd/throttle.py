"""Per-process rate limits (token buckets) and circuit breakers.

Times are anyio's monotonic clock in seconds, passed in by the caller so that
tests can drive them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dlqd.config import CircuitBreaker, Policy, RateLimit


@dataclass
class TokenBucket:
    """Holds one second of tokens (at least one); refills continuously."""

    rate: RateLimit
    tokens: float = field(init=False)
    updated: float | None = None

    def __post_init__(self) -> None:
        self.tokens = self.rate.burst

    def _refill(self, now: float) -> None:
        if self.updated is not None:
            elapsed = max(0.0, now - self.updated)
            self.tokens = min(self.rate.burst, self.tokens + elapsed * self.rate.per_second)
        self.updated = now

    def try_take(self, now: float) -> bool:
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def give_back(self) -> None:
        """A token taken for a row that did not run after all."""
        self.tokens = min(self.rate.burst, self.tokens + 1.0)

    def seconds_until_token(self, now: float) -> float:
        self._refill(now)
        return max(0.0, (1.0 - self.tokens) / self.rate.per_second)


@dataclass
class Circuit:
    """Opens after ``failures`` consecutive target failures; after the cool-down
    one row is tried (half-open) and its outcome closes or reopens it."""

    config: CircuitBreaker
    consecutive_failures: int = 0
    open_until: float | None = None
    probing: bool = False

    def is_open(self, now: float) -> bool:
        """Open from the failure that opened it until a success closes it (half-open included)."""
        return self.open_until is not None

    def admit(self, now: float) -> bool:
        """May one more row be attempted now?"""
        if self.open_until is None:
            return True
        if now < self.open_until or self.probing:
            return False
        self.probing = True  # the single half-open trial
        return True

    def seconds_until_trial(self, now: float) -> float:
        if self.open_until is None:
            return 0.0
        return max(0.0, self.open_until - now)

    def record(self, success: bool, now: float, *, evidence: bool = True) -> str | None:
        """Record one attempt; ``"opened"`` or ``"closed"`` when the circuit changed.

        Only ``evidence`` that the target is down counts towards opening it: a
        timeout, or the failure of a row that never failed before. A row already
        known to be bad failing again says nothing about the target (its own
        failures end in ``max_failures``), so it neither opens the circuit nor
        ends a half-open trial.
        """
        was_open = self.open_until is not None
        if success:
            self.consecutive_failures = 0
            self.open_until = None
            self.probing = False
            return "closed" if was_open else None
        if not evidence:
            if self.probing:
                self.probing = False  # inconclusive trial: another row may try
            return None
        self.consecutive_failures += 1
        if self.probing or self.consecutive_failures >= self.config.failures:
            self.open_until = now + self.config.cool_down.total_seconds()
            self.probing = False
            return None if was_open else "opened"
        return None


class Throttle:
    """Rate limits and circuits for every policy, shared by a process's workers."""

    def __init__(self) -> None:
        self._buckets: dict[tuple[str, str, RateLimit], TokenBucket] = {}
        self._circuits: dict[tuple[str, CircuitBreaker], Circuit] = {}

    def circuit(self, policy: Policy) -> Circuit:
        key = (policy.name, policy.circuit_breaker)
        circuit = self._circuits.get(key)
        if circuit is None:
            circuit = self._circuits[key] = Circuit(policy.circuit_breaker)
        return circuit

    def bucket(self, policy: Policy, app_id: str) -> TokenBucket | None:
        if policy.rate_limit is None:
            return None
        scope = app_id if policy.rate_limit_per == "app_id" else ""
        key = (policy.name, scope, policy.rate_limit)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(policy.rate_limit)
        return bucket

    def open_circuits(self, now: float) -> dict[str, bool]:
        return {name: c.is_open(now) for (name, _), c in self._circuits.items()}

    def empty_tenant_buckets(self, now: float) -> set[tuple[str, str]]:
        """(policy, app_id) pairs whose per-tenant bucket has no token now."""
        return {
            (name, scope)
            for (name, scope, _), bucket in self._buckets.items()
            if scope and bucket.seconds_until_token(now) > 0
        }

    def next_tenant_token(self, now: float) -> float:
        """Seconds until the first empty per-tenant bucket has a token again."""
        waits = [
            bucket.seconds_until_token(now)
            for (_, scope, _), bucket in self._buckets.items()
            if scope and bucket.seconds_until_token(now) > 0
        ]
        return min(waits, default=0.0)
