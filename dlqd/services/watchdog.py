"""The systemd watchdog: ``WATCHDOG=1`` at half the interval systemd asked for."""

from __future__ import annotations

from dlqd.sdnotify import sd_notify
from dlqd.services.base import PeriodicService


class Watchdog(PeriodicService[bool]):
    """``run_once()`` returns whether the notification was delivered."""

    name = "watchdog"

    def __init__(self, every: float) -> None:
        super().__init__()
        self.every = every

    def interval(self) -> float:
        return self.every

    async def run_once(self) -> bool:
        return sd_notify("WATCHDOG=1")
