"""`dlqd replay --rate`: chunks are spaced, and nothing waits after the last one."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from dlqd.config import load_settings
from dlqd.filters import PendingFilter
from dlqd.operator.replay import replay
from tests.factories import INSERT_MANY, row_json

pytestmark = pytest.mark.anyio

NOTIFY_ALL = [{"name": "go", "target": {"kind": "notify", "channel": "replayed"}}]


@pytest.mark.parametrize(("rows", "rate", "chunks"), [(3, 1.0, 3), (10, 4.0, 3), (1, 1.0, 1)])
async def test_rate_sleeps_between_chunks_never_after_the_last(
    conn: psycopg.AsyncConnection[dict[str, Any]],
    rows: int,
    rate: float,
    chunks: int,
) -> None:
    await conn.execute(
        INSERT_MANY,
        {"rows": Jsonb([row_json(original_job_id=f"r{i}") for i in range(rows)])},
    )
    events: list[tuple[str, float]] = []

    async def recorded_sleep(seconds: float) -> None:  # the command's only pause
        events.append(("sleep", seconds))

    settings = load_settings(database_url="postgresql://unused", policies=NOTIFY_ALL)
    result = await replay(
        conn,  # type: ignore[arg-type]
        settings,
        where=PendingFilter(app_id=("app-a",)),
        rate=rate,
        on_chunk=lambda size: events.append(("chunk", size)),
        pause=recorded_sleep,  # this replay's own pauses, no one else's
    )
    assert result.replayed == rows
    kinds = [kind for kind, _ in events]
    assert kinds.count("chunk") == chunks
    assert kinds.count("sleep") == chunks - 1
    assert kinds[-1] == "chunk"  # the command ends with its last chunk, not a pause
    # each pause spaces the chunk before it: its size over the rate, less its time
    sizes = [size for kind, size in events if kind == "chunk"]
    pauses = [seconds for kind, seconds in events if kind == "sleep"]
    for size, pause in zip(sizes, pauses, strict=False):
        assert 0 <= pause <= size / rate
    replayed = await conn.execute("SELECT count(*) AS n FROM job_dlq WHERE replayed_at IS NOT NULL")
    assert (await replayed.fetchone() or {})["n"] == rows
