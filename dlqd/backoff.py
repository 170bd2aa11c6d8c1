"""Capped, jittered exponential backoff that resets after a healthy period."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """``next()`` gives the next wait: full jitter over ``min(cap, base * 2**n)``.

    ``healthy(seconds)`` resets the sequence when the thing being retried stayed
    up for at least ``reset_after`` seconds, so one blip after a long healthy
    run does not inherit the long waits of an old outage.
    """

    base: float = 0.5
    cap: float = 30.0
    reset_after: float = 60.0
    attempt: int = 0
    _random: random.Random = field(default_factory=random.Random)

    def next(self) -> float:
        ceiling = min(self.cap, self.base * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 32)
        # at least half the ceiling: never hammer, never wait needlessly long
        return float(ceiling / 2 + self._random.uniform(0, ceiling / 2))

    def reset(self) -> None:
        self.attempt = 0

    def healthy(self, seconds: float) -> None:
        if seconds >= self.reset_after:
            self.reset()
