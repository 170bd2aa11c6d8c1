"""Redrives: durable tasks in Postgres that a daemon runs, from the CLI and the
console; progress, cancel, a crash resumed by another replica, exactly once."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import as_role, dlqd_cli
from tests.console_helpers import console_config, rows_of, seed, start_console
from tests.daemon_helpers import DaemonProcess, scalar, wait_until

pytestmark = pytest.mark.anyio

CONTRACT_KEYS = {
    "id", "state", "filter", "via", "reason", "actor", "rate", "matched", "replayed", "failed",
    "skipped", "created_at", "started_at", "finished_at",
}  # fmt: skip


def cli(db_url: str, *args: str, config: Path | None = None) -> Any:
    env = {"DLQD_DATABASE_URL": as_role(db_url, "dlqd"), "DLQD_ACTOR": "carol"}
    extra = ["--config", str(config)] if config else []
    result = dlqd_cli("redrive", *args, *extra, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout) if "--json" in args else result.stdout


def sink_state(db_url: str) -> dict[str, int]:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            """SELECT (SELECT count(*) FROM sink) AS sunk,
                      (SELECT count(DISTINCT dlq_id) FROM sink) AS distinct_sunk,
                      (SELECT count(*) FROM job_dlq WHERE replayed_at IS NOT NULL) AS replayed,
                      (SELECT count(*) FROM dlqd_replay_log
                        WHERE outcome = 'replayed' AND redrive_id IS NOT NULL) AS logged"""
        ).fetchone()
    assert row is not None
    return dict(zip(("sunk", "distinct_sunk", "replayed", "logged"), row, strict=True))


async def test_start_list_and_a_dry_run_from_the_cli(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    seed(sink_db, rows_of("shop", 30) + rows_of("crm", 10, type="sms.send"))
    config = console_config(tmp_path)
    dry = cli(sink_db, "start", "--type", "email.*", "--via", "sink", "--dry-run", "--json",
              config=config)  # fmt: skip
    assert set(dry) == CONTRACT_KEYS | {"dry_run"}
    assert (dry["id"], dry["state"], dry["matched"], dry["dry_run"]) == (None, None, 30, True)
    assert int(await scalar(sink_db, "SELECT count(*) FROM dlqd_redrives")) == 0
    started = cli(
        sink_db, "start", "--type", "email.*", "--app-id", "shop", "--via", "sink",
        "--reason", "relay fixed", "--rate", "1000", "--json", config=config,
    )  # fmt: skip
    assert set(started) == CONTRACT_KEYS
    assert started["state"] == "queued"
    assert started["matched"] == 30
    assert started["actor"] == "carol"
    assert started["reason"] == "relay fixed"
    assert started["filter"]["type"] == ["email.*"]
    assert started["filter"]["app_id"] == ["shop"]
    console = await start_console(sink_db, tmp_path, daemons, config)

    async def done() -> bool:
        listed = cli(sink_db, "list", "--json")
        return bool(listed[0]["state"] == "done")

    await wait_until(done, 30)
    [finished] = cli(sink_db, "list", "--json")
    assert (finished["replayed"], finished["failed"], finished["skipped"]) == (30, 0, 0)
    assert finished["started_at"]
    assert finished["finished_at"]
    assert sink_state(sink_db) == {"sunk": 30, "distinct_sunk": 30, "replayed": 30, "logged": 30}
    with psycopg.connect(sink_db) as conn:
        actors = conn.execute(
            "SELECT DISTINCT actor, reason, redrive_id::text FROM dlqd_replay_log WHERE manual"
        ).fetchall()
    assert actors == [("carol", "relay fixed", started["id"])]
    table = cli(sink_db, "list")
    assert started["id"] in table
    assert "done" in table
    assert console.daemon.metric('dlqd_redrive_rows_total{outcome="replayed"}') == 30
    assert console.daemon.metric("dlqd_redrives_running") == 0


async def test_progress_cancel_half_way_and_exactly_the_rows_it_reports(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    seed(sink_db, rows_of("shop", 200))
    console = await start_console(sink_db, tmp_path, daemons)
    with console.client("ops-token") as client:
        # 200 rows at 20/s: 7 s between the 60th row and the last for the cancel to land
        started = client.post("/redrives", json={"via": "sink", "rate": 20, "reason": "r"})
        redrive = started.json()
        assert redrive["matched"] == 200
        seen: list[int] = []

        async def moving() -> bool:
            [now] = client.get("/redrives?format=json").json()
            seen.append(now["replayed"])
            return now["replayed"] >= 60

        await wait_until(moving, 30)
        assert len(set(seen)) > 1  # the progress moved while we watched
        assert console.daemon.metric("dlqd_redrives_running") == 1
        cancelled = client.post(f"/redrives/{redrive['id']}/cancel").json()
        assert cancelled["id"] == redrive["id"]

        async def stopped() -> bool:
            [now] = client.get("/redrives?format=json").json()
            return bool(now["state"] == "cancelled")

        await wait_until(stopped, 15)
        [final] = client.get("/redrives?format=json").json()
    assert 60 <= final["replayed"] < 200
    state = sink_state(sink_db)
    # exactly what it reports, once each
    assert state == {
        "sunk": final["replayed"], "distinct_sunk": final["replayed"],
        "replayed": final["replayed"], "logged": final["replayed"],
    }  # fmt: skip
    assert console.daemon.metric('dlqd_redrive_rows_total{outcome="replayed"}') == final["replayed"]
    # and it stays so: nothing runs it any more
    assert cli(sink_db, "list", "--json")[0]["replayed"] == final["replayed"]
    # cancelling a finished one changes nothing
    again = dlqd_cli(
        "redrive", "cancel", redrive["id"], "--json",
        env={"DLQD_DATABASE_URL": as_role(sink_db, "dlqd")},
    )  # fmt: skip
    assert json.loads(again.stdout)["state"] == "cancelled"


async def test_a_crashed_replica_is_resumed_by_another_exactly_once(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    seed(sink_db, rows_of("shop", 120))
    config = console_config(tmp_path)
    first = await start_console(sink_db, tmp_path, daemons, config)
    with first.client("ops-token") as client:
        # 120 rows at 15/s: the kill lands well before the last, on a loaded machine too
        redrive = client.post("/redrives", json={"via": "sink", "rate": 15}).json()

    async def some() -> bool:
        return int(await scalar(sink_db, "SELECT replayed FROM dlqd_redrives")) >= 30

    await wait_until(some, 30)
    first.daemon.send_signal(signal.SIGKILL)
    await first.daemon.wait_exit()
    done_before = int(await scalar(sink_db, "SELECT replayed FROM dlqd_redrives"))
    assert done_before < 120
    # a replica that dies holds the lease until it expires; the next one resumes then
    second = await start_console(sink_db, tmp_path, daemons, config)

    async def finished() -> bool:
        return await scalar(sink_db, "SELECT state FROM dlqd_redrives") == "done"

    await wait_until(finished, 90)
    with second.client("ops-token") as client:
        [final] = client.get("/redrives?format=json").json()
    assert final["id"] == redrive["id"]
    assert (final["replayed"], final["failed"]) == (120, 0)
    assert sink_state(sink_db) == {
        "sunk": 120,
        "distinct_sunk": 120,
        "replayed": 120,
        "logged": 120,
    }
    resumed = [e for e in second.daemon.events() if e.get("event") == "redrive running"]
    assert resumed
    assert resumed[0]["resumed"] is True


async def test_a_stopping_replica_hands_its_redrive_over_at_once(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    seed(sink_db, rows_of("shop", 100))
    config = console_config(tmp_path)
    first = await start_console(sink_db, tmp_path, daemons, config)
    second = await start_console(sink_db, tmp_path, daemons, config)
    with first.client("ops-token") as client:
        client.post("/redrives", json={"via": "sink", "rate": 20})

    async def running_somewhere() -> bool:
        return int(await scalar(sink_db, "SELECT replayed FROM dlqd_redrives")) >= 10

    await wait_until(running_somewhere, 30)
    owner = await scalar(sink_db, "SELECT owner FROM dlqd_redrives")
    runner, other = (first, second) if str(first.daemon.process.pid) in owner else (second, first)  # type: ignore[union-attr]
    runner.daemon.send_signal(signal.SIGTERM)
    assert await runner.daemon.wait_exit() == 0
    assert any(e.get("event") == "redrive handed over" for e in runner.daemon.events())

    async def taken_over() -> bool:
        now = await scalar(sink_db, "SELECT owner FROM dlqd_redrives")
        return now is not None and str(other.daemon.process.pid) in now  # type: ignore[union-attr]

    # well before the 30 s lease would have expired
    await wait_until(taken_over, 10)

    async def finished() -> bool:
        return await scalar(sink_db, "SELECT state FROM dlqd_redrives") == "done"

    await wait_until(finished, 30)
    assert sink_state(sink_db) == {
        "sunk": 100,
        "distinct_sunk": 100,
        "replayed": 100,
        "logged": 100,
    }


async def test_a_queued_redrive_is_cancelled_at_once_and_one_with_a_lost_via_fails(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    seed(sink_db, rows_of("shop", 5))
    config = console_config(tmp_path)
    queued = cli(sink_db, "start", "--via", "sink", "--json", config=config)
    cancelled = cli(sink_db, "cancel", queued["id"], "--json")
    assert cancelled["state"] == "cancelled"
    assert cancelled["finished_at"]
    doomed = cli(sink_db, "start", "--via", "sink", "--json", config=config)
    # the daemon runs with a config where the policy is gone
    config.write_text(config.read_text().replace('name = "sink"', 'name = "renamed"'))
    await start_console(sink_db, tmp_path, daemons, config)

    async def failed() -> bool:
        return (
            await scalar(sink_db, "SELECT state FROM dlqd_redrives WHERE id = %s", (doomed["id"],))
            == "failed"
        )

    await wait_until(failed, 30)
    error = await scalar(sink_db, "SELECT error FROM dlqd_redrives WHERE id = %s", (doomed["id"],))
    assert "--via sink: no such policy" in error
    assert int(await scalar(sink_db, "SELECT count(*) FROM sink")) == 0
    missing = dlqd_cli(
        "redrive", "cancel", "00000000-0000-0000-0000-000000000000",
        env={"DLQD_DATABASE_URL": as_role(sink_db, "dlqd")},
    )  # fmt: skip
    assert missing.returncode == 1
    assert "no redrive with id" in missing.stderr
    bad = dlqd_cli("redrive", "start", "--via", "nope", "--config", str(config),
                   env={"DLQD_DATABASE_URL": as_role(sink_db, "dlqd")})  # fmt: skip
    assert bad.returncode == 2
    assert "--via nope: no such policy" in bad.stderr
