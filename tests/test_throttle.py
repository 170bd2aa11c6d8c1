"""Rate limits and circuit breakers shared through Postgres: two Throttle
instances on two connections play two replicas."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from dlqd.config import CircuitBreaker, Policy, RateLimit
from dlqd.throttle import Throttle

pytestmark = pytest.mark.anyio
LEASE = timedelta(seconds=10)


@dataclass
class Row:
    app_id: str


@dataclass
class Item:
    policy: Policy | None
    row: Row


def items(policy: Policy, n: int, app_id: str = "a") -> list[Item]:
    return [Item(policy, Row(app_id)) for _ in range(n)]


@pytest.fixture
async def replicas(dlqd_url: str) -> AsyncIterator[list[psycopg.AsyncConnection[Any]]]:
    conns = [
        await psycopg.AsyncConnection.connect(dlqd_url, autocommit=True, row_factory=dict_row)
        for _ in range(2)
    ]
    yield conns
    for conn in conns:
        await conn.close()


async def cool_down_now(conn: psycopg.AsyncConnection[Any]) -> None:
    """End every open circuit's cool-down now (what its time running out does)."""
    await conn.execute("UPDATE dlqd_circuits SET open_until = now() WHERE open_until IS NOT NULL")


async def test_a_bucket_holds_one_second_for_the_whole_deployment(
    replicas: list[psycopg.AsyncConnection[Any]],
) -> None:
    policy = Policy(name="p", rate_limit=RateLimit(per_second=5), target=None, action="park")
    one, two = Throttle(), Throttle()
    admitted, deferred, wait = await one.admit(
        replicas[0], items(policy, 8), 0.0, trial_lease=LEASE
    )
    assert (len(admitted), len(deferred)) == (5, 3)  # the burst: one second's worth
    assert wait is not None
    assert 0 < wait <= 0.2
    cur = await replicas[0].execute("SELECT updated_at FROM dlqd_rate_buckets")
    [taken] = [r["updated_at"] for r in await cur.fetchall()]
    # the other replica finds the same bucket empty, but for the tokens 5/s
    # refilled since (none, unless the machine took 200 ms for the round trips)
    admitted, deferred, _ = await two.admit(replicas[1], items(policy, 3), 0.0, trial_lease=LEASE)
    cur = await replicas[0].execute("SELECT clock_timestamp() AS now")
    [now] = [r["now"] for r in await cur.fetchall()]
    refilled = int((now - taken).total_seconds() * 5)
    assert len(admitted) + len(deferred) == 3
    assert len(admitted) <= refilled
    if deferred:
        names, _, wait = two.blocked([policy], 0.0)
        assert names == {"p"}
        assert wait is not None


async def test_a_bucket_held_by_a_replicas_open_transaction_is_skipped(
    replicas: list[psycopg.AsyncConnection[Any]],
) -> None:
    policy = Policy(name="p", rate_limit=RateLimit(per_second=100), action="park")
    one, two = Throttle(), Throttle()
    async with replicas[0].transaction():
        admitted, _, _ = await one.admit(replicas[0], items(policy, 1), 0.0, trial_lease=LEASE)
        assert len(admitted) == 1
        admitted, deferred, wait = await two.admit(
            replicas[1], items(policy, 2), 0.0, trial_lease=LEASE
        )
        assert (len(admitted), len(deferred), wait) == (0, 2, 0.05)  # no waiting on a lock


async def test_per_tenant_buckets_are_separate(
    replicas: list[psycopg.AsyncConnection[Any]],
) -> None:
    policy = Policy(
        name="p", rate_limit=RateLimit(per_second=1), rate_limit_per="app_id", action="park"
    )
    throttle = Throttle()
    batch = items(policy, 2, "a") + items(policy, 2, "b")
    admitted, deferred, _ = await throttle.admit(replicas[0], batch, 0.0, trial_lease=LEASE)
    assert sorted(i.row.app_id for i in admitted) == ["a", "b"]
    assert len(deferred) == 2
    _, pairs, _ = throttle.blocked([policy], 0.0)
    assert pairs == {("p", "a"), ("p", "b")}


async def test_one_replicas_failures_open_the_circuit_for_all_with_one_trial(
    replicas: list[psycopg.AsyncConnection[Any]],
) -> None:
    # a cool-down no loaded machine outlasts by accident; the test ends it itself
    breaker = CircuitBreaker(failures=3, cool_down=timedelta(seconds=60))
    policy = Policy(name="c", circuit_breaker=breaker, action="park")
    one, two = Throttle(), Throttle()
    # known-bad rows failing again are no evidence: the circuit stays closed
    assert await one.record(replicas[0], [(policy, False, False)] * 10, 0.0) == []
    changes = await one.record(replicas[0], [(policy, False, True)] * 3, 0.0)
    assert changes == [("c", "opened")]
    admitted, deferred, wait = await two.admit(
        replicas[1], items(policy, 2), 0.0, trial_lease=LEASE
    )
    assert (admitted, len(deferred)) == ([], 2)  # open for the other replica too
    assert wait is not None
    assert 0 < wait <= 60
    await cool_down_now(replicas[0])
    first, _, _ = await one.admit(replicas[0], items(policy, 3), 1.0, trial_lease=LEASE)
    second, _, _ = await two.admit(replicas[1], items(policy, 3), 1.0, trial_lease=LEASE)
    assert (len(first), len(second)) == (1, 0)  # one trial row, cluster-wide
    assert await one.record(replicas[0], [(policy, False, True)], 1.0) == []  # reopened
    await cool_down_now(replicas[0])
    trial, _, _ = await two.admit(replicas[1], items(policy, 3), 2.0, trial_lease=LEASE)
    assert len(trial) == 1
    assert await two.record(replicas[1], [(policy, True, True)], 2.0) == [("c", "closed")]
    admitted, _, _ = await one.admit(replicas[0], items(policy, 3), 3.0, trial_lease=LEASE)
    assert len(admitted) == 3


async def test_a_success_resets_the_count(replicas: list[psycopg.AsyncConnection[Any]]) -> None:
    policy = Policy(name="r", circuit_breaker=CircuitBreaker(failures=2), action="park")
    throttle = Throttle()
    attempts = [(policy, False, True), (policy, True, True), (policy, False, True)]
    assert await throttle.record(replicas[0], attempts, 0.0) == []
    assert throttle.open_circuits() == {"r": False}
