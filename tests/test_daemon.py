"""`dlqd run` end to end: real daemon processes against a real Postgres."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from tests.conftest import as_role, dlqd_cli
from tests.daemon_helpers import (
    FRESH_WORKERS,
    SINK_STATEMENT,
    DaemonProcess,
    scalar,
    wait_until,
    write_config,
)
from tests.factories import INSERT_MANY, row_json

pytestmark = pytest.mark.anyio

Conn = psycopg.AsyncConnection[dict[str, Any]]


def daemon_config(
    path: Path, policies: str, *, poll: str = "1h", extra: str = "", listen: str = ""
) -> Path:
    """A config file; the poll scan (1h) and the self-probe (1h) stay out of the
    way unless a test asks for them, so only NOTIFY and catch-ups find rows."""
    return write_config(
        path / "dlqd.toml",
        f"""
{extra}
[listen]
poll_interval = "{poll}"
probe_interval = "1h"
{listen}

{policies}
""",
    )


def sink_config(path: Path, extra: str = "", *, poll: str = "1h", listen: str = "") -> Path:
    """Every row replayed into the sink table."""
    return daemon_config(
        path,
        f"""
[[policies]]
name = "all"
target = {{ kind = "sql", statement = "{SINK_STATEMENT}" }}
""",
        poll=poll,
        extra=extra,
        listen=listen,
    )


def slow_pages_config(path: Path) -> Path:
    """Every row into the sink in pages of 20 that take 50 ms each: a backlog
    the worker drains for a while (the poll scan at 1 h)."""
    slow = (
        "INSERT INTO sink (dlq_id, type, payload)"
        " SELECT id, type, payload FROM replayed, pg_sleep(0.05)"
    )
    return daemon_config(
        path,
        f"""
[[policies]]
name = "all"
target = {{ kind = "sql", statement = "{slow}" }}
""",
        extra="[replay]\nbatch_size = 20",
    )


def operator_env(db_url: str) -> dict[str, str]:
    """The CLI as an operator runs it: as the dlqd role."""
    return {"DLQD_DATABASE_URL": as_role(db_url, "dlqd")}


def spawn(daemons: list[DaemonProcess], db_url: str, config: Path, tmp: Path) -> DaemonProcess:
    """A daemon connected as the least-privileged dlqd role of sql/roles.sql."""
    daemon = DaemonProcess(as_role(db_url, "dlqd"), config, tmp).start()
    daemons.append(daemon)
    return daemon


async def pending_count(db_url: str) -> int:
    return int(await scalar(db_url, "SELECT count(*) FROM job_dlq WHERE replayed_at IS NULL"))


async def insert_rows(db_url: str, rows: list[dict[str, Any]]) -> None:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute(INSERT_MANY, {"rows": Jsonb(rows)})


async def assert_sink_matches_replayed(db_url: str, expected: int | None = None) -> int:
    """Every replayed row reached the sink exactly once, and nothing else did."""
    async with await psycopg.AsyncConnection.connect(
        db_url, autocommit=True, row_factory=dict_row
    ) as conn:
        cur = await conn.execute(
            """SELECT (SELECT count(*) FROM sink) AS sunk,
                      (SELECT count(DISTINCT dlq_id) FROM sink) AS distinct_sunk,
                      (SELECT count(*) FROM job_dlq WHERE replayed_at IS NOT NULL) AS replayed,
                      (SELECT count(*) FROM sink s JOIN job_dlq j ON j.id = s.dlq_id
                        WHERE j.replayed_at IS NOT NULL) AS both_sides,
                      (SELECT count(*) FROM dlqd_replay_log WHERE outcome = 'replayed') AS logged
            """
        )
        row = await cur.fetchone()
    assert row is not None
    assert row["sunk"] == row["distinct_sunk"] == row["replayed"] == row["both_sides"]
    assert row["logged"] == row["replayed"]
    if expected is not None:
        assert row["replayed"] == expected
    return int(row["replayed"])


async def test_exactly_once_with_three_daemons_and_concurrent_writers(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    config = sink_config(tmp_path)
    for _ in range(3):
        spawn(daemons, sink_db, config, tmp_path)
    for daemon in daemons:
        await daemon.wait_ready()

    async def writer(w: int) -> None:
        async with await psycopg.AsyncConnection.connect(sink_db, autocommit=True) as conn:
            for batch in range(50):
                rows = [
                    row_json(original_job_id=f"w{w}-{batch}-{i}", app_id=f"app-{w}")
                    for i in range(50)
                ]
                await conn.execute(INSERT_MANY, {"rows": Jsonb(rows)})

    async with anyio.create_task_group() as tg:
        for w in range(4):
            tg.start_soon(writer, w)

    async def drained() -> bool:
        return await pending_count(sink_db) == 0

    await wait_until(drained, within=120)
    await assert_sink_matches_replayed(sink_db, expected=10_000)
    # each row once, as the daemons' per-batch log events count them (after COMMIT)
    replayed_by = [
        sum(e["replayed"] for e in d.events() if e.get("event") == "batch") for d in daemons
    ]
    assert sum(replayed_by) == 10_000


async def test_rows_inserted_while_no_daemon_runs_are_replayed_on_start(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    await insert_rows(sink_db, [row_json(original_job_id=f"early{i}") for i in range(40)])
    daemon = spawn(daemons, sink_db, sink_config(tmp_path), tmp_path)
    await daemon.wait_ready()

    async def drained() -> bool:
        return await pending_count(sink_db) == 0

    await wait_until(drained, within=30)  # poll_interval is 1h: only the start-up scan
    await assert_sink_matches_replayed(sink_db, expected=40)


async def listener_backends(db_url: str, expected: int) -> bool:
    found = await scalar(
        db_url,
        """SELECT count(*) FROM pg_stat_activity
            WHERE application_name = 'dlqd listener' AND datname = current_database()""",
    )
    return int(found) == expected


async def test_listener_killed_mid_stream_reconnects_and_catches_up(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    daemon = spawn(daemons, sink_db, sink_config(tmp_path), tmp_path)
    await daemon.wait_ready()
    kills = 0
    async with await psycopg.AsyncConnection.connect(sink_db, autocommit=True) as conn:
        for i in range(300):
            await conn.execute(INSERT_MANY, {"rows": Jsonb([row_json(original_job_id=f"s{i}")])})
            if i % 100 == 50:
                await wait_until(lambda: listener_backends(sink_db, 1), within=30)
                cur = await conn.execute(
                    """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                        WHERE application_name = 'dlqd listener'
                          AND datname = current_database()"""
                )
                row = await cur.fetchone()
                assert row == (1,)
                kills += 1
            if i % 10 == 0:
                await anyio.sleep(0.01)  # a stream, not one burst

    async def drained() -> bool:
        return await pending_count(sink_db) == 0

    await wait_until(drained, within=60)  # no poll scan: notifications and catch-ups only
    await assert_sink_matches_replayed(sink_db, expected=300)

    async def reconnected() -> bool:
        return daemon.metric("dlqd_listener_reconnects_total") >= kills and (
            daemon.metric("dlqd_listener_up") == 1
        )

    await wait_until(reconnected, within=30)


async def test_delayed_replay_happens_at_its_due_time(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    config = daemon_config(
        tmp_path,
        f"""
[[policies]]
name = "later"
delay = "1500ms"
target = {{ kind = "sql", statement = "{SINK_STATEMENT}" }}
""",
    )
    daemon = spawn(daemons, sink_db, config, tmp_path)
    await daemon.wait_ready()
    await insert_rows(sink_db, [row_json(original_job_id=f"d{i}") for i in range(5)])

    async def drained() -> bool:
        return await pending_count(sink_db) == 0

    await wait_until(drained, within=30)
    waits = await scalar(
        sink_db,
        """SELECT array_agg(extract(epoch FROM replayed_at - dlq_at)::float8) FROM job_dlq""",
    )
    assert len(waits) == 5
    # not before its time, and not a poll (1h) later
    assert all(1.5 <= w < 60 for w in waits), waits


async def test_max_replays_parks_the_next_return_until_a_manual_replay(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    config = sink_config(tmp_path)
    config.write_text(config.read_text().replace('name = "all"', 'name = "all"\nmax_replays = 1'))
    daemon = spawn(daemons, sink_db, config, tmp_path)
    await daemon.wait_ready()

    await insert_rows(sink_db, [row_json(original_job_id="job-7")])

    async def first_replayed() -> bool:
        return await pending_count(sink_db) == 0

    await wait_until(first_replayed, within=30)
    await insert_rows(sink_db, [row_json(original_job_id="job-7")])  # the job failed again

    async def parked() -> bool:
        return bool(
            await scalar(
                sink_db,
                "SELECT count(*) FROM dlqd_entry_state "
                "WHERE state = 'parked' AND parked_reason = 'max_replays'",
            )
        )

    await wait_until(parked, within=30)
    assert await pending_count(sink_db) == 1
    assert await scalar(sink_db, "SELECT count(*) FROM sink") == 1
    second = str(await scalar(sink_db, "SELECT id FROM job_dlq WHERE replayed_at IS NULL"))

    show = dlqd_cli("show", second, "--json", env=operator_env(sink_db))
    assert [r["outcome"] for r in json.loads(show.stdout)["replays"]] == ["parked"]
    explain = dlqd_cli(
        "explain",
        second,
        "--config",
        str(config),
        env=operator_env(sink_db),
    )
    assert "parked by event (max_replays)" in explain.stdout

    # a human decides: manual replay ignores max_replays and clears the park
    manual = dlqd_cli(
        "replay",
        second,
        "--json",
        "--config",
        str(config),
        env=operator_env(sink_db),
    )
    assert manual.returncode == 0, manual.stderr
    assert json.loads(manual.stdout) == {
        "replayed": 1,
        "failed": 0,
        "skipped": 0,
        "skipped_by_reason": {"already_replayed": 0, "not_found": 0, "no_target": 0},
        "dry_run": False,
    }
    assert await pending_count(sink_db) == 0
    assert await scalar(sink_db, "SELECT count(*) FROM dlqd_entry_state") == 0
    await assert_sink_matches_replayed(sink_db, expected=2)


async def test_parked_and_unmatched_rows_stay_pending(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    config = daemon_config(
        tmp_path,
        f"""
[[policies]]
name = "quarantine"
match = {{ error_reason = ["poison"] }}
action = "park"
[[policies]]
name = "mail"
match = {{ type = ["email.*"] }}
target = {{ kind = "sql", statement = "{SINK_STATEMENT}" }}
""",
    )
    daemon = spawn(daemons, sink_db, config, tmp_path)
    await daemon.wait_ready()
    await insert_rows(
        sink_db,
        [
            row_json(original_job_id="p", type="email.send", error_reason="poison"),
            row_json(original_job_id="u", type="sms.send"),
        ],
    )
    await insert_rows(sink_db, [row_json(original_job_id="ok", type="email.send")])

    async def evaluated() -> bool:
        return await scalar(sink_db, "SELECT count(*) FROM dlqd_entry_state") == 2 and (
            await pending_count(sink_db) == 2
        )

    await wait_until(evaluated, within=30)
    states = await scalar(
        sink_db,
        """SELECT json_object_agg(j.original_job_id, s.state) FROM dlqd_entry_state s
             JOIN job_dlq j ON j.id = s.dlq_id""",
    )
    assert states == {"p": "parked_policy", "u": "unmatched"}
    status = dlqd_cli(
        "status",
        "--json",
        "--config",
        str(config),
        env=operator_env(sink_db),
    )
    document = json.loads(status.stdout)
    assert (document["pending"], document["parked"], document["unmatched"]) == (2, 1, 1)
    assert {(g["type"], g["pending"], g["parked"]) for g in document["groups"]} == {
        ("email.send", 1, 1),
        ("sms.send", 1, 0),
    }


async def test_sigterm_mid_drain_exits_0_and_leaves_no_row_half_replayed(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    async with await psycopg.AsyncConnection.connect(sink_db, autocommit=True) as conn:
        await conn.execute(
            """INSERT INTO job_dlq (original_job_id, app_id, type, payload, error_reason, attempts)
               SELECT 'bulk' || g, 'app', 'email.send', '{}', 'timeout', 1
                 FROM generate_series(1, 20000) g"""
        )
    config = sink_config(tmp_path, extra='shutdown_timeout = "20s"')
    config.write_text(config.read_text() + "\n[replay]\nbatch_size = 100\n")
    daemon = spawn(daemons, sink_db, config, tmp_path)

    async def draining() -> bool:
        return int(await scalar(sink_db, "SELECT count(*) FROM sink")) > 0

    await wait_until(draining, within=30)
    daemon.send_signal(signal.SIGTERM)
    assert await daemon.wait_exit(within=30) == 0
    replayed = await assert_sink_matches_replayed(sink_db)
    assert replayed > 0
    stopped = [e["event"] for e in daemon.events()]
    assert "stopping: finishing the batch in flight" in stopped
    assert stopped[-1] == "stopped"


async def test_back_to_back_single_inserts_never_wait_for_the_poll(
    db_url: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """Each row is inserted as soon as the previous one was replayed: a lost
    wake-up would leave a row waiting for the 1h poll and fail the deadline."""
    config = daemon_config(
        tmp_path,
        """
[[policies]]
name = "ping"
target = { kind = "notify", channel = "replayed" }
""",
    )
    daemon = spawn(daemons, db_url, config, tmp_path)
    await daemon.wait_ready()
    async with (
        await psycopg.AsyncConnection.connect(db_url, autocommit=True) as listener,
        await psycopg.AsyncConnection.connect(db_url, autocommit=True) as writer,
    ):
        await listener.execute("LISTEN replayed")
        for i in range(1000):
            await writer.execute(
                INSERT_MANY, {"rows": Jsonb([row_json(original_job_id=f"b2b-{i}")])}
            )
            # the poll is an hour: a lost wake-up would wait that long, a
            # loaded machine's pass never 30 s
            with anyio.fail_after(30):
                got = [n async for n in listener.notifies(stop_after=1)]
            assert json.loads(got[0].payload)["original_job_id"] == f"b2b-{i}"
    assert await pending_count(db_url) == 0


async def test_a_failing_row_retries_alone_while_its_batch_replays(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    statement = (
        "INSERT INTO sink (dlq_id, type, payload) VALUES (%(id)s, %(type)s, "
        "CASE WHEN %(original_job_id)s = 'bad' THEN (1/0)::text::jsonb ELSE %(payload)s END)"
    )
    config = daemon_config(
        tmp_path,
        f"""
[[policies]]
name = "all"
retry_delay = "100ms"
target = {{ kind = "sql", statement = "{statement}" }}
""",
    )
    await insert_rows(
        sink_db,
        [row_json(original_job_id=n) for n in ["a", "b", "bad", "c", "d"]],
    )
    daemon = spawn(daemons, sink_db, config, tmp_path)
    await daemon.wait_ready()

    async def retried() -> bool:
        failures = await scalar(
            sink_db,
            "SELECT count(*) FROM dlqd_replay_log WHERE outcome = 'failed'",
        )
        return int(failures) >= 3

    await wait_until(retried, within=30)
    assert await assert_sink_matches_replayed(sink_db) == 4
    bad = await scalar(
        sink_db,
        """SELECT row_to_json(s) FROM dlqd_entry_state s JOIN job_dlq j ON j.id = s.dlq_id
            WHERE j.original_job_id = 'bad'""",
    )
    assert bad["state"] == "waiting"
    assert bad["failures"] >= 3
    assert "division by zero" in bad["last_error"]
    assert daemon.metric('dlqd_replays_total{outcome="failed",policy="all"}') >= 3


async def test_poll_only_mode_and_http_endpoints(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    config = sink_config(tmp_path, poll="200ms", listen="enabled = false")
    daemon = spawn(daemons, sink_db, config, tmp_path)
    await daemon.wait_ready()
    assert daemon.http("/healthz") == (200, "ok\n")
    assert daemon.http("/nope")[0] == 404
    await insert_rows(sink_db, [row_json(original_job_id=f"poll{i}") for i in range(10)])

    async def drained() -> bool:
        return await pending_count(sink_db) == 0

    await wait_until(drained, within=30)
    assert daemon.metric('dlqd_build_info{version="0.1.0"}') == 1
    assert daemon.metric("dlqd_notifications_total") == 0  # nobody listened


async def test_dry_run_decides_and_changes_nothing(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    await insert_rows(sink_db, [row_json(original_job_id=f"dry{i}") for i in range(3)])
    daemon = spawn(daemons, sink_db, sink_config(tmp_path, extra="dry_run = true"), tmp_path)
    await daemon.wait_ready()

    async def counted() -> bool:
        return daemon.metric('dlqd_replays_total{outcome="dry_run",policy="all"}') == 3

    await wait_until(counted, within=30)
    assert await pending_count(sink_db) == 3
    assert await scalar(sink_db, "SELECT count(*) FROM sink") == 0
    assert await scalar(sink_db, "SELECT count(*) FROM dlqd_entry_state") == 0
    decisions = [e for e in daemon.events() if e.get("outcome") == "dry_run"]
    assert len(decisions) == 3
    assert all(e["would"] == "replay" and "payload" not in e for e in decisions)


async def test_rows_that_bypassed_the_trigger_are_found_by_the_periodic_scan(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """A restore with session_replication_role = replica fires no trigger: no
    NOTIFY, no inbox entry, no count. The leader's reconciliation sees the
    counts drift, corrects them (and says so), and its sweep finds the rows."""
    config = sink_config(tmp_path, '[metrics]\nreconcile_interval = "1s"', poll="300ms")
    daemon = spawn(daemons, sink_db, config, tmp_path)
    await daemon.wait_ready()

    async def baseline_taken() -> bool:
        # the first reconciliation is the baseline (what was there before), not drift
        return daemon.metric("dlqd_counts_reconciled_timestamp_seconds") > 0

    await wait_until(baseline_taken, within=30)
    conn = await psycopg.AsyncConnection.connect(sink_db, autocommit=True)
    async with conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        rows = [row_json(original_job_id=f"restored{i}") for i in range(7)]
        await conn.execute(INSERT_MANY, {"rows": Jsonb(rows)})
        cur = await conn.execute("SELECT count(*) FROM dlqd_inbox")
        assert await cur.fetchone() == (0,)  # really bypassed (checked before commit)

    async def drained() -> bool:
        return await pending_count(sink_db) == 0

    await wait_until(drained, within=30)
    await assert_sink_matches_replayed(sink_db, expected=7)
    assert daemon.metric("dlqd_notifications_total") == 0
    # the drift was reported: seven pending rows no trigger counted
    assert 'dlqd_count_corrections_total{kind="pending"} 7.0' in daemon.http("/metrics")[1]


async def test_rate_limit_spaces_replays(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """rate_limit = 5/s: a burst of one second's tokens, then one row every 200 ms."""
    config = sink_config(tmp_path)
    config.write_text(
        config.read_text().replace('name = "all"', 'name = "all"\nrate_limit = "5/s"')
    )
    await insert_rows(sink_db, [row_json(original_job_id=f"r{i}") for i in range(15)])
    daemon = spawn(daemons, sink_db, config, tmp_path)
    await daemon.wait_ready()

    async def drained() -> bool:
        return await pending_count(sink_db) == 0

    await wait_until(drained, within=30)
    spread = await scalar(
        sink_db, "SELECT extract(epoch FROM max(replayed_at) - min(replayed_at)) FROM job_dlq"
    )
    # 5 at once, then 10 more at 5 a second: at least 2 s from first to last
    assert float(spread) >= 1.9
    await assert_sink_matches_replayed(sink_db, expected=15)


async def test_circuit_breaker_pauses_a_failing_policy(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    config = daemon_config(
        tmp_path,
        """
[[policies]]
name = "broken"
retry_delay = "50ms"
circuit_breaker = { failures = 3, cool_down = "2s" }
target = { kind = "sql", statement = "SELECT 1/0" }
""",
    )
    await insert_rows(sink_db, [row_json(original_job_id=f"c{i}") for i in range(4)])
    daemon = spawn(daemons, sink_db, config, tmp_path)
    await daemon.wait_ready()

    async def trial_made() -> bool:
        # the first batch (4 failures) opened the circuit; one trial after the cool-down
        return int(await scalar(sink_db, "SELECT count(*) FROM dlqd_replay_log")) >= 5

    await wait_until(trial_made, within=30)
    assert daemon.metric('dlqd_circuit_open{policy="broken"}') == 1
    attempts = await scalar(
        sink_db, "SELECT array_agg(extract(epoch FROM at)::float8 ORDER BY at) FROM dlqd_replay_log"
    )
    first_batch, trial = attempts[:4], attempts[4]
    assert trial - max(first_batch) >= 1.9  # nothing tried during the cool-down
    assert await pending_count(sink_db) == 4  # failing rows stay, for a human or a fix


async def test_inserters_skip_the_notify_while_the_worker_drains_and_no_row_waits(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """While the worker drains a backlog (it looks again by itself) it has no
    fresh row in dlqd_wake, and inserters send no NOTIFY (whose commit lock
    serialises them); while it listens, they do. With the poll scan at 1 h,
    every row inserted during the drain is still replayed at once."""
    daemon = spawn(daemons, sink_db, slow_pages_config(tmp_path), tmp_path)
    await daemon.wait_ready()
    listener = await psycopg.AsyncConnection.connect(sink_db, autocommit=True)
    await listener.execute("LISTEN dlqd_job_dlq")
    writer = await psycopg.AsyncConnection.connect(sink_db, autocommit=True)
    notified: list[bool] = []  # per insert: whether a worker's row was fresh (it notified)
    inserted = 0

    async def insert(n: int) -> None:
        nonlocal inserted
        # repeatable read: the trigger decides on the snapshot this count saw
        async with writer.transaction():
            await writer.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            cur = await writer.execute(FRESH_WORKERS)
            fresh = await cur.fetchone()
            batch = [row_json(original_job_id=f"r{inserted + i}") for i in range(n)]
            await writer.execute(INSERT_MANY, {"rows": Jsonb(batch)})
        inserted += n
        notified.append(fresh is not None and fresh[0] > 0)

    async def draining() -> bool:
        return int(await scalar(sink_db, FRESH_WORKERS)) == 0

    try:
        await insert(600)  # a backlog of 30 pages, 50 ms each
        with anyio.fail_after(60):
            while notified.count(False) < 5:
                await insert(1)
                if len(notified) % 50 == 0 and not notified.count(False):
                    # the worker has not begun to drain (on a loaded machine it
                    # may not have woken yet): wait for it, then insert again
                    await wait_until(draining, within=30)

        async def drained() -> bool:
            return await pending_count(sink_db) == 0

        await wait_until(drained, within=60)  # no row waits for the hourly poll
        await writer.execute("NOTIFY dlqd_job_dlq, 'end'")
        got: list[str] = []
        with anyio.fail_after(10):
            async for note in listener.notifies():
                if note.payload == "end":
                    break
                got.append(note.payload)
    finally:
        await listener.close()
        await writer.close()
    await assert_sink_matches_replayed(sink_db, expected=inserted)
    assert notified[0]  # the daemon listened when the backlog came
    assert len(got) == notified.count(True)  # one NOTIFY per insert that saw a fresh row


async def test_a_row_whose_notify_was_skipped_in_a_long_transaction_is_still_found(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """A transaction inserts while the worker drains (no NOTIFY) and stays open
    past the drain. The worker listens again, replays other rows meanwhile (the
    open transaction holds nothing up), and finds the late row when it commits,
    with the poll scan at 1 h."""
    daemon = spawn(daemons, sink_db, slow_pages_config(tmp_path), tmp_path)
    await daemon.wait_ready()

    async def draining() -> bool:
        return int(await scalar(sink_db, FRESH_WORKERS)) == 0

    async def listening() -> bool:
        return int(await scalar(sink_db, FRESH_WORKERS)) > 0

    async def replayed(original_job_id: str) -> bool:
        query = "SELECT replayed_at IS NOT NULL FROM job_dlq WHERE original_job_id = %s"
        return bool(await scalar(sink_db, query, [original_job_id]))

    await insert_rows(sink_db, [row_json(original_job_id=f"b{i}") for i in range(600)])
    await wait_until(draining, within=30)
    late = await psycopg.AsyncConnection.connect(sink_db)
    try:
        await late.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        cur = await late.execute(FRESH_WORKERS)
        assert await cur.fetchone() == (0,)  # the trigger below sees no worker: no NOTIFY
        await late.execute(INSERT_MANY, {"rows": Jsonb([row_json(original_job_id="late")])})
        await wait_until(listening, within=60)  # the backlog is gone
        await insert_rows(sink_db, [row_json(original_job_id="meanwhile")])
        await wait_until(lambda: replayed("meanwhile"), within=10)
        assert not await replayed("late")  # not committed yet
        await late.commit()
    finally:
        await late.close()
    # at once, not at the listening worker's next look of its own (every 10 s)
    await wait_until(lambda: replayed("late"), within=6)
    await assert_sink_matches_replayed(sink_db, expected=602)


async def test_rows_looked_at_again_by_every_pass_do_not_keep_the_worker_draining(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """A dry run's rows are claimed and left as they are by every pass: they
    are no backlog. The worker listens again instead of polling every few ms."""
    config = sink_config(tmp_path)
    config.write_text(config.read_text().replace('name = "all"', 'name = "all"\ndry_run = true'))
    daemon = spawn(daemons, sink_db, config, tmp_path)
    await daemon.wait_ready()
    await insert_rows(sink_db, [row_json(original_job_id=f"d{i}") for i in range(40)])

    async def dry_run_logged() -> bool:
        lines = daemon.http("/metrics")[1].splitlines()
        dry = [
            line
            for line in lines
            if line.startswith("dlqd_replays_total{") and 'outcome="dry_run"' in line
        ]
        return bool(dry) and float(dry[0].rsplit(" ", 1)[1]) == 40

    async def listening() -> bool:
        return int(await scalar(sink_db, FRESH_WORKERS)) > 0

    await wait_until(dry_run_logged, within=30)
    await wait_until(listening, within=10)
    before = daemon.metric("dlqd_replayer_passes_total")
    await anyio.sleep(1)  # a window to count passes in, not a wait for a condition
    # a draining worker would pass every 5 to 40 ms: 25 or more in that second
    assert daemon.metric("dlqd_replayer_passes_total") - before < 15
    assert int(await scalar(sink_db, FRESH_WORKERS)) > 0  # and still listening


async def test_a_trickle_after_a_burst_is_heard_by_notify_again(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """A burst makes the worker drain; a trickle that follows (a row every
    60 ms, one per look) is no backlog: the worker listens again while it
    goes on, instead of polling for each row."""
    # every change of the worker's row, as it happens: a drain of a fraction
    # of a second is seen however slowly this test polls
    async with await psycopg.AsyncConnection.connect(sink_db, autocommit=True) as conn:
        await conn.execute(
            # the daemon's own role writes the log (no SECURITY DEFINER code)
            """CREATE TABLE public.wake_changes (n bigserial, op text);
               GRANT INSERT ON public.wake_changes TO PUBLIC;
               GRANT USAGE ON SEQUENCE public.wake_changes_n_seq TO PUBLIC;
               CREATE FUNCTION public.note_wake_change() RETURNS trigger LANGUAGE plpgsql
                   SET search_path = pg_catalog, pg_temp AS $$
               BEGIN INSERT INTO public.wake_changes (op) VALUES (TG_OP); RETURN NULL; END $$;
               CREATE TRIGGER note_wake_change AFTER INSERT OR UPDATE OR DELETE ON dlqd_wake
                   FOR EACH ROW EXECUTE FUNCTION public.note_wake_change()"""
        )
    daemon = spawn(daemons, sink_db, sink_config(tmp_path), tmp_path)
    await daemon.wait_ready()

    async def listening() -> bool:
        return int(await scalar(sink_db, FRESH_WORKERS)) > 0

    halfway, trickled = anyio.Event(), anyio.Event()

    async def trickle() -> None:
        for i in range(200):
            await insert_rows(sink_db, [row_json(original_job_id=f"t{i}")])
            if i == 50:
                halfway.set()
            await anyio.sleep(0.06)  # the trickle's pace, not a wait for a condition
        trickled.set()

    await wait_until(listening, within=30)
    start = await scalar(sink_db, "SELECT coalesce(max(n), 0) FROM wake_changes")
    await insert_rows(sink_db, [row_json(original_job_id=f"b{i}") for i in range(50)])

    async def drained_burst() -> bool:
        query = "SELECT count(*) FROM wake_changes WHERE n > %s AND op = 'DELETE'"
        return int(await scalar(sink_db, query, [start])) > 0

    await wait_until(drained_burst, within=30)  # the burst: it drains
    async with anyio.create_task_group() as tg:
        tg.start_soon(trickle)
        with anyio.fail_after(60):
            await halfway.wait()
        # well into the trickle, the worker listens (it is not draining row by row)
        await wait_until(listening, within=60)
        assert not trickled.is_set()
        tg.cancel_scope.cancel()
