"""Wake-ups from the listener to the replay workers."""

from __future__ import annotations

import anyio


class WakeFlag:
    """A resettable flag. A worker clears it *before* looking for work, so a
    wake-up that arrives while it works is never lost."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        if self._event.is_set():
            self._event = anyio.Event()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()


class Wakeup:
    """Broadcasts one wake-up to every worker's own flag."""

    def __init__(self) -> None:
        self._flags: list[WakeFlag] = []

    def flag(self) -> WakeFlag:
        flag = WakeFlag()
        self._flags.append(flag)
        return flag

    def set(self) -> None:
        for flag in self._flags:
            flag.set()
