"""Backoff schedule and the wake-up flag's clear-before-work contract."""

from __future__ import annotations

import random

import anyio
import pytest

from dlqd.backoff import Backoff
from dlqd.wake import Wakeup


def test_backoff_grows_caps_and_resets_after_a_healthy_period() -> None:
    backoff = Backoff(base=0.5, cap=8.0, reset_after=60.0, _random=random.Random(7))
    waits = [backoff.next() for _ in range(8)]
    ceilings = [0.5, 1, 2, 4, 8, 8, 8, 8]
    for wait, ceiling in zip(waits, ceilings, strict=True):
        assert ceiling / 2 <= wait <= ceiling  # jittered, never above the cap
    backoff.healthy(10.0)  # a short blip: keep backing off
    assert backoff.next() >= 4.0
    backoff.healthy(61.0)  # up for a minute: start again from the base
    assert backoff.next() <= 0.5


@pytest.mark.anyio
async def test_a_wake_up_during_work_is_not_lost() -> None:
    """The worker clears its flag before looking for work; a wake-up that
    arrives while it works leaves the flag set, so it goes round again."""
    wakeup = Wakeup()
    flag = wakeup.flag()
    other = wakeup.flag()
    passes = 0
    async with anyio.create_task_group() as tg:

        async def worker() -> None:
            nonlocal passes
            while True:
                flag.clear()  # before the work
                passes += 1
                if passes == 2:
                    return
                wakeup.set()  # a notification lands mid-pass
                with anyio.fail_after(5):  # a lost wake-up would hang here
                    await flag.wait()

        tg.start_soon(worker)
    assert passes == 2
    assert other.is_set()  # broadcast to every worker
