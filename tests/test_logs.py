"""Logs for humans and machines: bounded volume at info, counters count events."""

from __future__ import annotations

import signal
from pathlib import Path

import psycopg
import pytest

from tests.conftest import as_role
from tests.daemon_helpers import DaemonProcess, scalar, wait_until, write_config

pytestmark = pytest.mark.anyio


async def test_many_unmatched_rows_write_a_bounded_number_of_info_lines(
    db_url: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    cfg = write_config(
        tmp_path / "dlqd.toml",
        '[listen]\npoll_interval = "1h"\nprobe_interval = "1h"\n'
        '[[policies]]\nname = "mail"\nmatch = { type = ["email.*"] }\naction = "park"\n',
    )
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute(
            """INSERT INTO job_dlq (original_job_id, app_id, type, payload, error_reason, attempts)
               SELECT 'u' || g, 'a', 'sms.send', '{}', 'timeout', 1
                 FROM generate_series(1, 20000) g"""
        )
    daemon = DaemonProcess(as_role(db_url, "dlqd"), cfg, tmp_path).start()
    daemons.append(daemon)
    await daemon.wait_ready()

    async def evaluated() -> bool:
        return int(await scalar(db_url, "SELECT count(*) FROM dlqd_entry_state")) == 20000

    await wait_until(evaluated, within=120)
    lines = daemon.logs().splitlines()
    # per-row decisions are debug: at info, a handful of start-up lines and no
    # more than one line per batch (500 rows) — 20,000 rows, not 20,000 lines
    assert len(lines) < 20000 / 500 + 20, len(lines)
    assert not any("error ignored terminating" in line for line in lines)


async def test_a_reload_does_not_count_parked_rows_again(
    db_url: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    body = (
        '[listen]\npoll_interval = "1h"\nprobe_interval = "1h"\n'
        '[[policies]]\nname = "hold"\naction = "park"\n'
        '[[policies]]\nname = "other"\nmatch = {{ type = ["x"] }}\naction = "park"\n'
        "jitter = {jitter}\n"
    )
    cfg = write_config(tmp_path / "dlqd.toml", body.format(jitter="0.1"))
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute(
            """INSERT INTO job_dlq (original_job_id, app_id, type, payload, error_reason, attempts)
               SELECT 'p' || g, 'a', 't', '{}', 'r', 1 FROM generate_series(1, 5) g"""
        )
    daemon = DaemonProcess(as_role(db_url, "dlqd"), cfg, tmp_path).start()
    daemons.append(daemon)
    await daemon.wait_ready()
    parked = 'dlqd_replays_total{outcome="parked",policy="hold"}'

    async def counted() -> bool:
        return daemon.metric(parked) == 5

    await wait_until(counted, within=30)
    fingerprint = await scalar(db_url, "SELECT min(fingerprint) FROM dlqd_entry_state")
    # another policy changes: the fingerprint changes, every row is decided again
    cfg.write_text(body.format(jitter="0.2"))
    daemon.send_signal(signal.SIGHUP)

    async def re_evaluated() -> bool:
        now = await scalar(db_url, "SELECT max(fingerprint) FROM dlqd_entry_state")
        return (
            bool(now != fingerprint)
            and int(
                await scalar(
                    db_url, "SELECT count(*) FROM dlqd_entry_state WHERE fingerprint = %s", [now]
                )
            )
            == 5
        )

    await wait_until(re_evaluated, within=30)
    assert daemon.metric(parked) == 5  # the same rows, parked once: counted once


def test_repeated_lines_are_held_back_and_counted() -> None:
    """Issue 18 finding 15: one line per kind per interval; the next one says
    how many were held back."""
    import time

    from dlqd.logs import RepeatLimiter

    limiter = RepeatLimiter(interval=2.0)  # the 1,000 calls below fall within it, loaded or not
    kind = ("asyncio", "socket.accept() out of system resource")
    assert limiter.allow(kind) == 0
    assert [limiter.allow(kind) for _ in range(1000)] == [None] * 1000
    assert limiter.allow(("asyncio", "another kind")) == 0  # kinds are counted apart
    deadline = time.monotonic() + 10
    while (held := limiter.allow(kind)) is None:
        assert time.monotonic() < deadline
    assert held >= 1000
