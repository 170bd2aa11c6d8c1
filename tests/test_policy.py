"""The pure decision core: matching order, backoff schedule, jitter, max_replays."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from dlqd.config import Match, Policy
from dlqd.policy import (
    Park,
    Replay,
    Unmatched,
    decide,
    first_match,
    jittered_micros,
    matches,
    replay_delay,
    retry_delay,
)

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Row:
    app_id: str = "shop"
    type: str = "email.send"
    error_reason: str = "timeout"
    attempts: int = 3
    dlq_at: datetime = NOW
    id: uuid.UUID = field(default_factory=uuid.uuid4)


def policy(**fields: Any) -> Policy:
    fields.setdefault("name", "p")
    fields.setdefault("target", {"kind": "notify", "channel": "c"})
    return Policy.model_validate(fields)


def test_match_fields_and_globs() -> None:
    row = Row()
    assert matches(Match(), row)
    assert matches(Match(type=["email.*"]), row)
    assert matches(Match(type=["sms.*", "email.send"]), row)  # OR within a list
    assert not matches(Match(type=["email.*"], error_reason=["poison"]), row)  # AND across
    assert matches(Match(app_id=["sh?p"], min_attempts=3, max_attempts=3), row)
    assert not matches(Match(min_attempts=4), row)
    assert not matches(Match(max_attempts=2), row)
    assert not matches(Match(type=["Email.*"]), row)  # case-sensitive, like the data


names = st.sampled_from(["a", "b", "email.send", "email.bounce", "sms.send"])
patterns = st.lists(st.sampled_from(["a", "b", "email.*", "*", "sms.?end", "x"]), max_size=3)


@st.composite
def matches_strategy(draw: st.DrawFn) -> Match:
    def maybe(strategy: st.SearchStrategy[Any]) -> Any:
        return draw(st.one_of(st.none(), strategy))

    low = maybe(st.integers(0, 5))
    high = maybe(st.integers(0, 5))
    if low is not None and high is not None and low > high:
        low, high = high, low
    return Match(
        app_id=maybe(patterns),
        type=maybe(patterns),
        error_reason=maybe(patterns),
        min_attempts=low,
        max_attempts=high,
    )


@given(
    st.lists(matches_strategy(), max_size=6),
    st.builds(Row, app_id=names, type=names, error_reason=names, attempts=st.integers(0, 6)),
)
def test_first_matching_policy_decides(match_list: list[Match], row: Row) -> None:
    policies = [
        policy(name=f"p{i}", match=m, action="park" if i % 2 else "replay")
        for i, m in enumerate(match_list)
    ]
    chosen = first_match(row, policies)
    matching = [p for p in policies if matches(p.match, row)]
    assert chosen == (matching[0] if matching else None)
    decision = decide(row, policies, 0, NOW)
    if chosen is None:
        assert isinstance(decision, Unmatched)
    elif chosen.action == "park":
        assert decision == Park(chosen, "policy")
    else:
        assert isinstance(decision, Replay)
        assert decision.policy == chosen


@given(
    delay=st.integers(0, 3600),
    factor=st.floats(1.0, 10.0),
    max_delay=st.integers(0, 86400),
    jitter=st.floats(0.0, 0.9),
    n=st.integers(0, 200),
)
def test_exponential_schedule(
    delay: int, factor: float, max_delay: int, jitter: float, n: int
) -> None:
    p = policy(delay=delay, factor=factor, max_delay=max_delay, jitter=jitter)
    row_id = uuid.uuid4()
    base = min(float(max_delay), delay * factor**n) if delay else 0.0
    got = replay_delay(p, n, row_id).total_seconds()
    j = _jitter_factor(row_id, jitter)
    assert 1 - jitter <= j <= 1 + jitter
    # the integer form differs from the float model by the jitter's rounding
    # to millionths (at most half a millionth of base) and two truncations to
    # the microsecond (base to whole microseconds, the spread toward zero)
    assert abs(got - base * j) <= 0.5e-6 * base + 2e-6 + 1e-9 * base
    # the schedule never shrinks as the same job keeps coming back
    assert replay_delay(p, n + 1, row_id) >= replay_delay(p, n, row_id)


@given(delay=st.integers(0, 600), n=st.integers(0, 50))
def test_fixed_schedule_ignores_the_replay_count(delay: int, n: int) -> None:
    p = policy(delay=delay, backoff="fixed", factor=3.0, max_delay=1)
    assert replay_delay(p, n, uuid.uuid4()) == timedelta(seconds=delay)


def _jitter_factor(row_id: uuid.UUID, jitter: float) -> float:
    """The reference model of the jitter, in floats: the id's first 8 bytes of
    sha256 as a fraction u of 2**64, and ``1 + jitter * (2u - 1)``."""
    unit = int.from_bytes(hashlib.sha256(row_id.bytes).digest()[:8], "big") / 2**64
    return 1.0 + jitter * (2.0 * unit - 1.0)


def test_jitter_is_the_same_on_every_replica() -> None:
    row_id = uuid.UUID("12345678-1234-5678-1234-567812345678")
    # pinned values: every replica, version and process computes exactly these
    # (sha256 of the id's bytes; no per-process hash seed is involved), in
    # integers, as Postgres does (dlqd_jittered_us)
    big = 10**15
    pinned = uuid.UUID("0f8fad5b-d9cb-469f-a165-70867728950e")
    assert jittered_micros(pinned, big, 0.1) == 1060708885534991
    assert jittered_micros(uuid.UUID(int=1), big, 0.5) == 985302750191746
    assert abs(jittered_micros(pinned, big, 0.1) - big * _jitter_factor(pinned, 0.1)) <= 1
    other = subprocess.run(
        [
            sys.executable,
            "-c",
            f"from dlqd.policy import jittered_micros; import uuid; "
            f"print(jittered_micros(uuid.UUID('{row_id}'), {big}, 0.1))",
        ],
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(other.stdout) == jittered_micros(row_id, big, 0.1)  # another process agrees
    spread = {jittered_micros(uuid.uuid4(), 1000, 0.5) for _ in range(200)}
    assert len(spread) > 100  # ids really spread the due times
    assert jittered_micros(row_id, big, 0.0) == big


@given(retry=st.integers(1, 60), factor=st.floats(1.0, 4.0), k=st.integers(1, 100))
def test_retry_schedule(retry: int, factor: float, k: int) -> None:
    p = policy(retry_delay=retry, factor=factor, max_delay=3600)
    expected = min(3600.0, retry * factor ** (k - 1))
    assert abs(retry_delay(p, k).total_seconds() - expected) <= 1e-6 * expected


def test_due_time_from_dlq_at_replay_count_and_failures() -> None:
    p = policy(delay="30s", factor=2.0, max_delay="1h")
    row = Row(dlq_at=NOW)
    assert decide(row, [p], 0, NOW) == Replay(p, NOW + timedelta(seconds=30), 0)
    assert decide(row, [p], 3, NOW) == Replay(p, NOW + timedelta(seconds=240), 3)
    # after two failed attempts, the retry backoff pushes the due time out
    failed_at = NOW + timedelta(minutes=5)
    later = decide(row, [p], 0, failed_at, failures=2, last_failure_at=failed_at)
    assert isinstance(later, Replay)
    assert later.due_at == failed_at + timedelta(seconds=2)


def test_max_replays_parks() -> None:
    p = policy(max_replays=2)
    row = Row()
    assert isinstance(decide(row, [p], 1, NOW), Replay)
    assert decide(row, [p], 2, NOW) == Park(p, "max_replays")
    assert decide(row, [policy(max_replays=0)], 0, NOW) == Park(
        policy(max_replays=0), "max_replays"
    )


def test_huge_replay_counts_do_not_overflow() -> None:
    p = policy(delay="1s", factor=10.0, max_delay="1h")
    assert replay_delay(p, 10_000, uuid.uuid4()) == timedelta(hours=1)


def test_data_errors_never_echo_values(db_url: str) -> None:
    import psycopg

    from dlqd.errors import error_line

    with psycopg.connect(db_url) as conn:
        try:
            conn.execute("SELECT 'card 4111-1111'::jsonb")
        except psycopg.errors.InvalidTextRepresentation as exc:
            line = error_line(exc)
        else:
            raise AssertionError("the cast should fail")
    assert "4111" not in line
    assert line.startswith("invalid input syntax for type json")
