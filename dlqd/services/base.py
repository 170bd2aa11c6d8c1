"""The one shape of every background service (River's maintenance services).

A service has a ``name`` (its task's name in the daemon's task group), a
``run_once()`` that does one round of work and returns a small result, and
``run()``: the loop that calls it, waits ``interval()`` between rounds, and
never dies — an error is logged and retried after a capped, jittered backoff
that resets once a round succeeds. ``signals`` lets a test await a round
instead of polling.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Generic, TypeVar

import anyio
from anyio.abc import TaskStatus

from dlqd.backoff import Backoff
from dlqd.errors import error_line
from dlqd.logs import get_logger

R = TypeVar("R")


class Signal:
    """Something that happens again and again; a test awaits the next time."""

    def __init__(self) -> None:
        self._event = anyio.Event()
        self.count = 0

    def fire(self) -> None:
        self.count += 1
        event, self._event = self._event, anyio.Event()
        event.set()

    async def wait(self) -> None:
        await self._event.wait()


class Signals:
    """A service's test signals: one per round done, one per round failed."""

    def __init__(self) -> None:
        self.ran = Signal()
        self.failed = Signal()


class PeriodicService(ABC, Generic[R]):
    """``run_once()`` every ``interval()`` seconds, forever."""

    name: ClassVar[str] = "service"
    #: backoff after a failed round: from ``error_base`` up to ``error_cap`` seconds
    error_base: ClassVar[float] = 0.5
    error_cap: ClassVar[float] = 30.0
    #: report "started" only after the first round (a readiness input, say)
    started_after_first_round: ClassVar[bool] = False

    def __init__(self) -> None:
        self.signals = Signals()
        self.last_result: R | None = None
        self.log = get_logger(f"dlqd.{self.name}")

    @abstractmethod
    async def run_once(self) -> R:
        """One round of work; its small result is kept in ``last_result``."""

    @abstractmethod
    def interval(self) -> float:
        """Seconds from the end of one round to the start of the next."""

    def first_delay(self) -> float:
        """Seconds before the first round (0: at once)."""
        return 0.0

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        backoff = Backoff(base=self.error_base, cap=self.error_cap)
        started = not self.started_after_first_round
        if started:
            task_status.started()
        await anyio.sleep(self.first_delay())
        while True:
            try:
                self.last_result = await self.run_once()
            except Exception as exc:  # noqa: BLE001 - a round's failure never ends the service
                wait = backoff.next()
                self.log.warning(
                    f"{self.name} failed",
                    error=error_line(exc),
                    error_type=type(exc).__name__,
                    retry_in=round(wait, 3),
                )
                self.signals.failed.fire()
            else:
                backoff.reset()
                wait = self.interval()
                self.signals.ran.fire()
            if not started:
                started = True
                task_status.started()
            await anyio.sleep(wait)
