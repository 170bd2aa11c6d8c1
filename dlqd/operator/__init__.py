"""The operator layer: what the CLI and the console do, one implementation.

Each function takes a connection (or the settings) and returns a typed result
that its caller renders: ``reads`` (status, list, show), ``explain``,
``replay`` (manual replay, park, unpark), ``purge``, ``check`` and
``migrate``. :func:`session` opens the one-off connection a command uses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from dlqd.config import Settings
from dlqd.db import migrations
from dlqd.db.connector import Connection, connection
from dlqd.db.migrations import Migration


@asynccontextmanager
async def session(settings: Settings, name: str) -> AsyncIterator[Connection]:
    """An autocommit connection for one command (``application_name`` = ``name``)."""
    async with connection(settings.dsn, autocommit=True, application_name=name) as conn:
        yield conn


async def migrate(
    settings: Settings, *, wait: float, on_wait: Callable[[str], object]
) -> list[Migration]:
    """Apply what is missing of ``sql/``; the migrations applied now."""
    async with session(settings, "dlqd migrate") as conn:
        return await migrations.migrate(conn, wait=wait, on_wait=on_wait)
