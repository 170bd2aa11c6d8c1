"""One leader through Postgres, and the scheduled purge it runs."""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from dlqd.config import load_settings
from dlqd.purge import purge_rows, trim_log
from dlqd.services.purger import seconds_until
from tests.conftest import as_role
from tests.daemon_helpers import SINK_STATEMENT, DaemonProcess, scalar, wait_until, write_config
from tests.factories import INSERT_MANY, row_json
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.anyio

PROBE = "500ms"


def config(tmp_path: Path, schedule: str = "1h", probe: str = PROBE) -> Path:
    """``probe``: the lease is renewed every half of it and lost a whole one after
    the last renewal; a loaded machine can stall for a good part of 500 ms."""
    return write_config(
        tmp_path / "dlqd.toml",
        f"""
[listen]
poll_interval = "1h"
probe_interval = "{probe}"
[purge]
schedule = "{schedule}"
replayed_retention = "1h"
[[policies]]
name = "all"
target = {{ kind = "sql", statement = "{SINK_STATEMENT}" }}
""",
    )


def leaders(daemons: list[DaemonProcess]) -> list[DaemonProcess]:
    return [d for d in daemons if d.process and d.process.poll() is None and _is_leader(d)]


def _is_leader(daemon: DaemonProcess) -> bool:
    value = daemon.metric("dlqd_leader")
    return value == 1


async def one_leader(daemons: list[DaemonProcess]) -> DaemonProcess:
    found: list[DaemonProcess] = []

    async def exactly_one() -> bool:
        found[:] = await anyio.to_thread.run_sync(leaders, daemons)
        return len(found) == 1

    await wait_until(exactly_one, within=30)
    return found[0]


async def start(daemons: list[DaemonProcess], db: str, cfg: Path, tmp: Path, n: int) -> None:
    for _ in range(n):
        daemons.append(DaemonProcess(as_role(db, "dlqd"), cfg, tmp).start())
    for daemon in daemons:
        await daemon.wait_ready()


async def test_exactly_one_leader_and_it_moves_when_the_leader_is_killed(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    await start(daemons, sink_db, config(tmp_path), tmp_path, 3)
    first = await one_leader(daemons)
    assert first.process is not None
    killed_at = time.monotonic()
    first.process.send_signal(signal.SIGKILL)
    first.process.wait()
    second = await one_leader([d for d in daemons if d is not first])
    moved = time.monotonic() - killed_at
    print(f"leadership moved {moved:.2f}s after SIGKILL (probe_interval {PROBE})")
    assert second is not first
    assert any(e.get("event") == "leadership acquired" for e in second.events())
    # the others replay as before
    async with await psycopg.AsyncConnection.connect(sink_db, autocommit=True) as conn:
        await conn.execute(INSERT_MANY, {"rows": Jsonb([row_json(original_job_id="after")])})

    async def replayed() -> bool:
        return int(await scalar(sink_db, "SELECT count(*) FROM sink")) == 1

    await wait_until(replayed, within=30)


async def test_a_leader_that_cannot_reach_the_database_steps_down_and_another_leads(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    port = int(psycopg.conninfo.conninfo_to_dict(sink_db)["port"])
    proxy = TcpProxy(port)
    # its traffic goes through this process's proxy: a lease that no stall
    # of a loaded machine loses before the cut
    cfg = config(tmp_path, probe="2s")
    async with anyio.create_task_group() as tg:
        await proxy.run(tg)
        proxied = psycopg.conninfo.make_conninfo(as_role(sink_db, "dlqd"), port=str(proxy.port))
        first = DaemonProcess(proxied, cfg, tmp_path).start()
        daemons.append(first)
        await first.wait_ready()
        assert await one_leader([first]) is first
        second = DaemonProcess(as_role(sink_db, "dlqd"), cfg, tmp_path).start()
        daemons.append(second)
        await second.wait_ready()
        assert await one_leader(daemons) is first  # the lease stays with its holder

        def losses() -> int:
            return sum(e.get("event") == "leadership lost" for e in first.events())

        # a stall of a loaded machine may have cost it the lease once already
        # (and it won it back): the loss that counts is one after the cut
        before = losses()
        cut_at = time.monotonic()
        proxy.deaf_after = 0  # its new connections hear nothing either
        proxy.deafen_all()

        async def deposed() -> bool:
            return losses() > before

        await wait_until(deposed, within=30)
        assert await one_leader(daemons) is second
        print(f"leadership moved {time.monotonic() - cut_at:.2f}s after the cut (probe 2s)")
        proxy.deaf_after = None
        for link in proxy.links:
            link.deaf = False  # let the first one stop cleanly
        tg.cancel_scope.cancel()


async def test_a_stopping_leader_hands_over_at_once(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    cfg = write_config(
        tmp_path / "slow-probe.toml",
        config(tmp_path).read_text().replace(f'"{PROBE}"', '"20s"'),
    )
    await start(daemons, sink_db, cfg, tmp_path, 2)
    first = await one_leader(daemons)
    first.send_signal(signal.SIGTERM)
    assert await first.wait_exit() == 0
    events = [e["event"] for e in first.events()]
    assert "leadership released" in events
    assert "leadership lost" not in events  # a clean stop is no warning
    # the lease ended with the stop: the other takes over at its next try
    # (half a probe interval, 10 s), not when a 30 s lease would have expired
    rest = [d for d in daemons if d is not first]
    with anyio.fail_after(20):
        assert await one_leader(rest) is rest[0]


async def test_the_purge_runs_on_the_leader_only(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    async with await psycopg.AsyncConnection.connect(sink_db, autocommit=True) as conn:
        await conn.execute(
            """INSERT INTO job_dlq (original_job_id, app_id, type, payload, error_reason,
                                    attempts, dlq_at, replayed_at)
               SELECT 'old' || g, 'a', 't', '{}', 'r', 1, now() - interval '3 days',
                      now() - interval '2 days'
                 FROM generate_series(1, 25) g"""
        )
        await conn.execute(
            """INSERT INTO dlqd_replay_log (dlq_id, original_job_id, app_id, outcome, at)
               SELECT gen_random_uuid(), 'j' || g, 'a', 'replayed',
                      now() - CASE WHEN g <= 4 THEN interval '40 days' ELSE interval '1 day' END
                 FROM generate_series(1, 6) g"""
        )
    # a lease that stays where it is for the whole test (who purged is the point)
    await start(daemons, sink_db, config(tmp_path, schedule="1s", probe="5s"), tmp_path, 2)
    leader = await one_leader(daemons)

    async def purged() -> bool:
        # the run deletes rows first, then trims the log: wait for both
        rows = int(await scalar(sink_db, "SELECT count(*) FROM job_dlq"))
        log = int(await scalar(sink_db, "SELECT count(*) FROM dlqd_replay_log"))
        return rows == 0 and log <= 2

    await wait_until(purged, within=30)
    assert await scalar(sink_db, "SELECT count(*) FROM dlqd_replay_log") == 2  # 30d retention

    async def counted() -> bool:
        return leader.metric("dlqd_purged_entries_total") == 25

    await wait_until(counted, within=30)
    assert leader.metric('dlqd_purge_runs_total{outcome="success"}') >= 1
    assert leader.metric("dlqd_last_purge_success_timestamp_seconds") > time.time() - 60
    runs = [e for e in leader.events() if e.get("event") == "purge"]
    assert runs
    assert runs[0]["deleted"] == 25
    assert runs[0]["log_trimmed"] == 4
    # the next run is due within the schedule's second (issue 18 finding 9)
    assert time.time() - 5 < leader.metric("dlqd_purge_due_timestamp_seconds") < time.time() + 5
    for daemon in daemons:
        if daemon is not leader:
            assert not any(e.get("event") == "purge" for e in daemon.events())
            assert daemon.metric('dlqd_purge_runs_total{outcome="success"}') == 0
            assert daemon.metric("dlqd_purge_due_timestamp_seconds") == 0


def test_cron_schedule_times() -> None:
    now = datetime(2026, 11, 28, 21, 59, 30, tzinfo=UTC)
    assert seconds_until("0 22 * * *", now) == 30.0
    assert seconds_until("*/15 * * * *", now) == 30.0
    assert seconds_until("0 3 * * *", now) == 5 * 3600 + 30
    assert seconds_until("1h", now) is None  # an interval, not a cron expression


@pytest.fixture
async def owner_conn(db_url: str) -> AsyncIterator[psycopg.AsyncConnection[dict[str, Any]]]:
    conn = await psycopg.AsyncConnection.connect(db_url, autocommit=True, row_factory=dict_row)
    yield conn
    await conn.close()


async def test_a_batch_that_times_out_shrinks_and_the_run_goes_on(
    db_url: str, dlqd_url: str, owner_conn: psycopg.AsyncConnection[dict[str, Any]]
) -> None:
    await owner_conn.execute(
        """INSERT INTO job_dlq (original_job_id, app_id, type, payload, error_reason,
                                attempts, dlq_at, replayed_at)
           SELECT 'old' || g, 'a', 't', '{}', 'r', 1, now() - interval '9 days',
                  now() - interval '8 days'
             FROM generate_series(1, 20) g"""
    )
    settings = load_settings(
        database_url=dlqd_url, purge={"batch_size": 8, "lock_timeout": "100ms"}
    )
    blocker = await psycopg.AsyncConnection.connect(db_url)
    await blocker.execute("LOCK TABLE job_dlq IN SHARE MODE")  # DELETE must wait for it
    purger = await psycopg.AsyncConnection.connect(
        dlqd_url, autocommit=True, row_factory=dict_row, application_name="purge-under-test"
    )
    result: list[Any] = []
    sizes: list[int] = []
    timeouts: list[int] = []

    async def timed_out(size: int) -> None:
        timeouts.append(size)
        if len(timeouts) == 2:
            await blocker.rollback()  # the next batch finds the table free

    async def purge() -> None:
        result.append(
            await purge_rows(
                purger, settings, observe=lambda n, _: sizes.append(n), timed_out=timed_out
            )
        )

    try:
        with anyio.fail_after(60):
            await purge()
    finally:
        await blocker.close()
        await purger.close()
    [batched] = result
    assert batched.deleted == 20
    assert timeouts == [8, 4]
    assert sizes[0] == 2  # 8 → 4 → 2 after two lock timeouts; then it grows back


async def test_log_retention_trims_only_old_rows(
    dlqd_url: str, owner_conn: psycopg.AsyncConnection[dict[str, Any]]
) -> None:
    await owner_conn.execute(
        """INSERT INTO dlqd_replay_log (dlq_id, original_job_id, app_id, outcome, at)
           SELECT gen_random_uuid(), 'j' || g, 'a', 'replayed',
                  now() - make_interval(days => g)
             FROM generate_series(1, 10) g"""
    )
    settings = load_settings(database_url=dlqd_url, purge={"log_retention": "5d", "batch_size": 2})
    async with await psycopg.AsyncConnection.connect(
        dlqd_url, autocommit=True, row_factory=dict_row
    ) as conn:
        trimmed = await trim_log(conn, settings)
    assert trimmed.deleted == 6  # days 5 (just past 5d) to 10
    cur = await owner_conn.execute("SELECT count(*) AS n FROM dlqd_replay_log")
    assert await cur.fetchone() == {"n": 4}


async def test_the_log_trim_goes_on_from_where_its_last_batch_ended(
    dlqd_url: str, owner_conn: psycopg.AsyncConnection[dict[str, Any]]
) -> None:
    """Batches start at the `at` the last one reached (a batch from the oldest end
    walks every entry the earlier ones deleted); entries of one transaction share
    their `at`, and a batch that stops among them leaves none behind."""
    # one second for the entries and the bound below: the clock may pass a
    # whole second between the statements
    cur = await owner_conn.execute("SELECT date_trunc('second', now()) AS base")
    row = await cur.fetchone()
    assert row is not None
    base = row["base"]
    await owner_conn.execute(
        """INSERT INTO dlqd_replay_log (dlq_id, original_job_id, app_id, outcome, at)
           SELECT gen_random_uuid(), 'j' || d || '-' || k, 'a', 'replayed',
                  %(base)s - make_interval(days => d)
             FROM generate_series(1, 10) d, generate_series(1, 5) k""",
        {"base": base},
    )
    settings = load_settings(database_url=dlqd_url, purge={"log_retention": "5d", "batch_size": 3})
    sizes: list[int] = []
    async with await psycopg.AsyncConnection.connect(
        dlqd_url, autocommit=True, row_factory=dict_row
    ) as conn:
        trimmed = await trim_log(conn, settings, observe=lambda n, _: sizes.append(n))
        # from a bound on, what lies before it is not this batch's
        cur = await conn.execute(
            """SELECT deleted, reached FROM dlqd_trim_replay_log_after('1 day 1 hour', 100,
                   %(base)s - interval '3 days')""",
            {"base": base},
        )
        onwards = await cur.fetchone()
    assert trimmed.deleted == 30  # days 5 to 10, five entries each
    assert sum(sizes) == 30
    assert max(sizes) <= 3
    assert trimmed.batches == len(sizes) >= 10
    assert onwards is not None
    assert onwards["deleted"] == 10  # days 3 and 2, not 4
    cur = await owner_conn.execute(
        """SELECT extract(day FROM %(base)s - at)::int AS d, count(*) AS n
             FROM dlqd_replay_log GROUP BY 1 ORDER BY 1""",
        {"base": base},
    )
    assert await cur.fetchall() == [{"d": 1, "n": 5}, {"d": 4, "n": 5}]
