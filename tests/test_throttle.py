"""Token buckets and circuit breakers, driven by an explicit clock."""

from __future__ import annotations

from datetime import timedelta

from dlqd.config import CircuitBreaker, Policy, RateLimit
from dlqd.throttle import Circuit, Throttle, TokenBucket


def test_bucket_holds_one_second_and_refills() -> None:
    bucket = TokenBucket(RateLimit(per_second=5))
    assert sum(bucket.try_take(0.0) for _ in range(10)) == 5  # burst = one second's worth
    assert not bucket.try_take(0.1)
    assert abs(bucket.seconds_until_token(0.1) - 0.1) < 1e-9
    assert bucket.try_take(0.2)
    assert sum(bucket.try_take(10.0) for _ in range(10)) == 5  # never more than the burst


def test_slow_rates_still_allow_one() -> None:
    bucket = TokenBucket(RateLimit(per_second=0.5))  # 30/m
    assert bucket.try_take(0.0)
    assert not bucket.try_take(1.0)
    assert bucket.try_take(2.0)


def test_circuit_opens_cools_down_and_tries_one() -> None:
    circuit = Circuit(CircuitBreaker(failures=3, cool_down=timedelta(seconds=10)))
    for t in range(3):
        assert circuit.admit(t)
        circuit.record(False, t)
    assert circuit.is_open(3)
    assert not circuit.admit(5)
    assert circuit.seconds_until_trial(5) == 7
    assert circuit.admit(12)  # the half-open trial
    assert not circuit.admit(12)  # only one
    circuit.record(False, 12)  # trial failed: open again for a full cool-down
    assert not circuit.admit(21)
    assert circuit.admit(22)
    circuit.record(True, 22)
    assert not circuit.is_open(22)
    assert all(circuit.admit(23) for _ in range(5))


def test_success_resets_the_count() -> None:
    circuit = Circuit(CircuitBreaker(failures=2))
    circuit.record(False, 0)
    circuit.record(True, 0)
    circuit.record(False, 0)
    assert not circuit.is_open(0)


def test_per_tenant_buckets() -> None:
    throttle = Throttle()
    p = Policy(name="p", action="park", rate_limit=RateLimit(per_second=1), rate_limit_per="app_id")
    a, b = throttle.bucket(p, "a"), throttle.bucket(p, "b")
    assert a is not None
    assert b is not None
    assert a is not b
    assert a.try_take(0.0)
    assert b.try_take(0.0)
    assert throttle.empty_tenant_buckets(0.0) == {("p", "a"), ("p", "b")}
    shared = Policy(name="q", action="park", rate_limit=RateLimit(per_second=1))
    assert throttle.bucket(shared, "a") is throttle.bucket(shared, "b")
