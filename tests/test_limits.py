"""Rate limits and circuit breakers hold for the whole deployment (real daemons)."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import as_role
from tests.daemon_helpers import SINK_STATEMENT, DaemonProcess, scalar, wait_until, write_config
from tests.factories import INSERT_MANY, row_json

pytestmark = pytest.mark.anyio


async def start(daemons: list[DaemonProcess], db: str, cfg: Path, tmp: Path, n: int) -> None:
    for _ in range(n):
        daemons.append(DaemonProcess(as_role(db, "dlqd"), cfg, tmp).start())
    for daemon in daemons:
        await daemon.wait_ready()


async def insert(db_url: str, prefix: str, n: int) -> None:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        rows = [row_json(original_job_id=f"{prefix}{i}") for i in range(n)]
        await conn.execute(INSERT_MANY, {"rows": Jsonb(rows)})


async def test_three_replicas_share_one_rate_limit(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    cfg = write_config(
        tmp_path / "dlqd.toml",
        f"""
[listen]
poll_interval = "1h"
probe_interval = "1h"
[[policies]]
name = "slow"
rate_limit = "10/s"
target = {{ kind = "sql", statement = "{SINK_STATEMENT}" }}
""",
    )
    await start(daemons, sink_db, cfg, tmp_path, 3)
    await insert(sink_db, "r", 60)

    async def drained() -> bool:
        return int(await scalar(sink_db, "SELECT count(*) FROM sink")) == 60

    await wait_until(drained, within=60)
    spread = float(
        await scalar(
            sink_db, "SELECT extract(epoch FROM max(replayed_at) - min(replayed_at)) FROM job_dlq"
        )
    )
    print(f"60 rows at 10/s over 3 replicas: {spread:.2f}s from first to last replay")
    # a burst of 10, then 10 a second between the three: at least ~5 s (three
    # per-replica buckets would have taken under 2 s)
    assert spread >= 4.5
    by_replica = [
        sum(e["replayed"] for e in d.events() if e.get("event") == "batch") for d in daemons
    ]
    assert sum(by_replica) == 60


async def test_one_replicas_failures_open_the_circuit_for_all(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    cfg = write_config(
        tmp_path / "dlqd.toml",
        """
[listen]
poll_interval = "300ms"
probe_interval = "1h"
[[policies]]
name = "down"
retry_delay = "50ms"
max_failures = 1
circuit_breaker = { failures = 3, cool_down = "3s" }
target = { kind = "sql", statement = "SELECT 1/0" }
""",
    )
    await start(daemons, sink_db, cfg, tmp_path, 2)
    await insert(sink_db, "c", 3)

    async def open_everywhere() -> bool:
        return all(d.metric('dlqd_circuit_open{policy="down"}') == 1 for d in daemons)

    await wait_until(open_everywhere, within=30)
    opened = [d for d in daemons if any(e.get("event") == "circuit opened" for e in d.events())]
    assert len(opened) >= 1
    # every row fails once and parks (max_failures = 1): each later attempt is a
    # fresh row, so each trial is evidence and a failed one reopens the circuit
    cool_down_ends = await scalar(
        sink_db, "SELECT extract(epoch FROM open_until) FROM dlqd_circuits"
    )
    failed = "SELECT count(*) FROM dlqd_replay_log WHERE outcome = 'failed'"
    before = int(await scalar(sink_db, failed))
    await insert(sink_db, "later", 5)  # fresh rows wait out the cool-down on both replicas

    async def two_trials() -> bool:
        return int(await scalar(sink_db, failed)) >= before + 2

    await wait_until(two_trials, within=60)
    trials = await scalar(
        sink_db,
        """SELECT array_agg(extract(epoch FROM at)::float8 ORDER BY at) FROM dlqd_replay_log
            WHERE outcome = 'failed' AND original_job_id LIKE 'later%%'""",
    )
    # nothing during the cool-down; then one trial at a time, cluster-wide, each
    # failed trial reopening it for a whole cool-down
    assert trials[0] >= float(cool_down_ends) - 0.05
    assert trials[1] - trials[0] >= 2.9
