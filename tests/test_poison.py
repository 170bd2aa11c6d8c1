"""Issue: no row, statement, lock or client can stop dlqd.

Each test is one finding, tried as a hostile or careless user would, against
real `dlqd run` processes connected as the least-privileged ``dlqd`` role.
"""

from __future__ import annotations

import contextlib
import json
import resource
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import ROOT, as_role, dlqd_cli
from tests.daemon_helpers import (
    SINK_STATEMENT,
    DaemonProcess,
    scalar,
    wait_until,
    write_config,
)
from tests.factories import INSERT_MANY, row_json

pytestmark = pytest.mark.anyio


def config(tmp_path: Path, policies: str, extra: str = "") -> Path:
    return write_config(
        tmp_path / "dlqd.toml",
        f"""
{extra}
[listen]
poll_interval = "1h"
probe_interval = "1h"

{policies}
""",
    )


SINK_POLICY = f"""
[[policies]]
name = "all"
target = {{ kind = "sql", statement = "{SINK_STATEMENT}" }}
"""


async def start(
    daemons: list[DaemonProcess], db_url: str, cfg: Path, tmp_path: Path, **env: str
) -> DaemonProcess:
    daemon = DaemonProcess(as_role(db_url, "dlqd"), cfg, tmp_path, **env).start()
    daemons.append(daemon)
    await daemon.wait_ready()
    return daemon


async def as_tenant(db_url: str, app_id: str, statement: str, params: Any = None) -> None:
    """Run ``statement`` as a tenant of the job system (role dlqd_app)."""
    async with await psycopg.AsyncConnection.connect(
        as_role(db_url, "dlqd_app"), autocommit=True
    ) as conn:
        await conn.execute("SELECT set_config('app.current_app_id', %s, false)", [app_id])
        await conn.execute(statement.encode(), params)


async def insert_rows(db_url: str, rows: list[dict[str, Any]]) -> None:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute(INSERT_MANY, {"rows": Jsonb(rows)})


POISON = {
    "infinity": "'infinity'",
    "minus_infinity": "'-infinity'",
    "bc": "'0001-01-01 00:00:00+00 BC'",
    "far_future": "'8999-12-31 00:00:00+00'",
    "year_9500": "'9500-01-01 00:00:00+00'",
}


async def test_poison_rows_from_a_tenant_are_parked_and_every_other_row_flows(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """Finding 1: a payload nested 5,000 deep, dlq_at = ±infinity, 1 BC or far in the
    future (with a delay), inserted by a tenant, never stop the others."""
    deep = "[" * 5000 + "]" * 5000
    cfg = config(
        tmp_path,
        f"""
[[policies]]
name = "later"
match = {{ type = ["delayed"] }}
delay = "1d"
target = {{ kind = "sql", statement = "{SINK_STATEMENT}" }}
{SINK_POLICY}""",
    )
    daemon = await start(daemons, sink_db, cfg, tmp_path)
    insert = (
        "INSERT INTO job_dlq (original_job_id, app_id, type, payload, error_reason, attempts,"
        " dlq_at) VALUES (%s, 'evil', %s, %s::jsonb, 'x', 1, {})"
    )
    await as_tenant(sink_db, "evil", insert.format("now()"), ["deep", "t", deep])
    for name, dlq_at in POISON.items():
        await as_tenant(sink_db, "evil", insert.format(dlq_at), [name, "delayed", "{}"])
    await insert_rows(sink_db, [row_json(original_job_id=f"good{i}") for i in range(20)])

    async def settled() -> bool:
        parked = await scalar(
            sink_db,
            "SELECT count(*) FROM dlqd_entry_state WHERE parked_reason = 'invalid_row'",
        )
        sunk = await scalar(sink_db, "SELECT count(*) FROM sink")
        return int(parked) == 4 and int(sunk) == 21

    await wait_until(settled, within=60)
    # the deep payload reached the target intact: the daemon never decoded it
    depth = await scalar(
        sink_db,
        "SELECT length(s.payload::text) FROM sink s JOIN job_dlq j ON j.id = s.dlq_id "
        "WHERE j.original_job_id = 'deep'",
    )
    assert depth == len(deep)
    parked = await scalar(
        sink_db,
        """SELECT json_object_agg(j.original_job_id, s.last_error) FROM dlqd_entry_state s
             JOIN job_dlq j ON j.id = s.dlq_id WHERE s.parked_reason = 'invalid_row'""",
    )
    assert set(parked) == {"infinity", "minus_infinity", "bc", "year_9500"}
    assert parked["infinity"] == "dlq_at is infinite"
    assert "outside the supported range" in parked["bc"]
    # 8999-12-31 plus a day is representable: scheduled, not parked
    far = await scalar(
        sink_db,
        """SELECT s.state FROM dlqd_entry_state s JOIN job_dlq j ON j.id = s.dlq_id
            WHERE j.original_job_id = 'far_future'""",
    )
    assert far == "waiting"
    # logged and counted once each, however many passes look at them
    daemon.send_signal(signal.SIGHUP)
    await wait_until(
        lambda: _has_event(daemon, "config reloaded"),
        within=30,
    )
    await insert_rows(sink_db, [row_json(original_job_id="after-reload")])
    await wait_until(lambda: _sunk(sink_db, 22), within=30)
    logged = await scalar(sink_db, "SELECT count(*) FROM dlqd_replay_log WHERE outcome = 'parked'")
    assert logged == 4
    events = [e for e in daemon.events() if e.get("event") == "parked"]
    assert len(events) == 4
    assert all(e["reason"] == "invalid_row" for e in events)
    assert daemon.metric('dlqd_replays_total{outcome="parked",policy="none"}') == 4

    async def collected() -> bool:
        return (
            daemon.pending_metric(
                'dlqd_pending_entries{app_id="evil",error_reason="x",type="delayed"}'
            )
            == 5
        )

    await wait_until(collected, within=30)  # the collector survives the same rows

    # every CLI command shows them
    env = {"DLQD_DATABASE_URL": as_role(sink_db, "dlqd")}
    ids = await scalar(
        sink_db,
        "SELECT json_object_agg(original_job_id, id) FROM job_dlq WHERE replayed_at IS NULL",
    )
    listed = dlqd_cli("list", "--json", "--limit", "10000", env=env)
    assert listed.returncode == 0, listed.stderr
    shown = {e["original_job_id"]: e for e in json.loads(listed.stdout)["entries"]}
    assert shown["infinity"]["dlq_at"] == "infinity"
    assert dlqd_cli("list", env=env).returncode == 0
    status = dlqd_cli("status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["pending"] == 5
    for name in ("infinity", "bc", "minus_infinity"):
        for args in (["show", ids[name]], ["show", ids[name], "--json"]):
            result = dlqd_cli(*args, env=env)
            assert result.returncode == 0, result.stderr
        explained = dlqd_cli("explain", ids[name], "--config", str(cfg), env=env)
        assert explained.returncode == 0, explained.stderr
        assert "parked by event (invalid_row)" in explained.stdout
    deep_shown = dlqd_cli("show", _replayed_id(sink_db, "deep"), "--json", env=env)
    assert deep_shown.returncode == 0, deep_shown.stderr
    assert len(deep_shown.stdout) > 10_000
    # a human may still replay an invalid row: the target reads it inside Postgres
    manual = dlqd_cli("replay", ids["infinity"], "--json", "--config", str(cfg), env=env)
    assert manual.returncode == 0, manual.stderr
    assert json.loads(manual.stdout)["replayed"] == 1
    assert daemon.process is not None
    assert daemon.process.poll() is None


def _replayed_id(db_url: str, original_job_id: str) -> str:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT id::text FROM job_dlq WHERE original_job_id = %s", [original_job_id]
        ).fetchone()
        assert row is not None
        return str(row[0])


async def _has_event(daemon: DaemonProcess, name: str) -> bool:
    return any(e.get("event") == name for e in daemon.events())


async def _sunk(db_url: str, n: int) -> bool:
    return int(await scalar(db_url, "SELECT count(*) FROM sink")) >= n


def test_check_and_start_never_run_the_target_statement(db_url: str, tmp_path: Path) -> None:
    """Finding 2: a multi-statement target is refused (78) and nothing of it runs."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO dlqd_replay_log (dlq_id, original_job_id, app_id, outcome) "
            "VALUES (gen_random_uuid(), 'keep', 'a', 'failed')"
        )
    env = {"DLQD_DATABASE_URL": db_url, "DLQD_METRICS_PORT": "0"}
    for statement in (
        "SELECT 1; COMMIT; DELETE FROM dlqd_replay_log",
        "DELETE FROM dlqd_replay_log; SELECT %(id)s",
        "COMMIT",
    ):
        target = f'{{ kind = "sql", statement = "{statement}" }}'
        cfg = config(tmp_path, f'[[policies]]\nname = "sneaky"\ntarget = {target}')
        for command in ("check", "run"):
            result = dlqd_cli(command, "--config", str(cfg), env=env)
            assert result.returncode == 78, (statement, command, result.stderr)
            assert "policies[0].target.statement" in result.stderr
            assert "'sneaky'" in result.stderr
            assert result.stderr.count("\n") == 1
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM dlqd_replay_log").fetchone() == (1,)


async def test_a_row_failing_at_commit_is_never_counted_as_replayed(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """Finding 3: a deferred constraint fails at COMMIT; only what committed counts."""
    async with await psycopg.AsyncConnection.connect(sink_db, autocommit=True) as conn:
        await conn.execute(
            """CREATE TABLE jobs_parent (name text PRIMARY KEY);
               INSERT INTO jobs_parent VALUES ('email.send');
               CREATE TABLE jobs (dlq_id uuid, kind text REFERENCES jobs_parent
                                  DEFERRABLE INITIALLY DEFERRED);
               GRANT SELECT, INSERT ON jobs, jobs_parent TO dlqd"""
        )
    statement = "INSERT INTO jobs (dlq_id, kind) VALUES (%(id)s, %(type)s)"
    cfg = config(
        tmp_path,
        f"""
[[policies]]
name = "fk"
retry_delay = "100ms"
max_failures = 3
target = {{ kind = "sql", statement = "{statement}" }}
""",
    )
    daemon = await start(daemons, sink_db, cfg, tmp_path)
    await insert_rows(
        sink_db,
        [row_json(original_job_id=f"ok{i}") for i in range(5)]
        + [row_json(original_job_id="orphan", type="no.such.kind")],
    )

    async def parked() -> bool:
        return bool(
            await scalar(
                sink_db,
                "SELECT count(*) FROM dlqd_entry_state WHERE parked_reason = 'max_failures'",
            )
        )

    await wait_until(parked, within=60)
    assert await scalar(sink_db, "SELECT count(*) FROM jobs") == 5
    assert await scalar(sink_db, "SELECT count(*) FROM job_dlq WHERE replayed_at IS NOT NULL") == 5
    assert daemon.metric('dlqd_replays_total{outcome="replayed",policy="fk"}') == 5
    assert daemon.metric('dlqd_replays_total{outcome="failed",policy="fk"}') == 3
    replayed_events = sum(e["replayed"] for e in daemon.events() if e.get("event") == "batch")
    assert replayed_events == 5
    failed = [e for e in daemon.events() if e.get("event") == "replay failed"]
    assert len(failed) == 3
    assert all("foreign key" in e["error"] for e in failed)


async def test_a_target_blocked_on_a_lock_times_out_and_retries(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """Finding 4: with the target's table locked, a batch fails on lock_timeout,
    retries, and replays once the lock is gone; passes keep completing."""
    cfg = config(
        tmp_path,
        SINK_POLICY.replace('name = "all"', 'name = "all"\nretry_delay = "200ms"'),
        extra='[replay]\nstatement_timeout = "1s"\nlock_timeout = "300ms"\n',
    )
    daemon = await start(daemons, sink_db, cfg, tmp_path)

    # ready means started, not that a pass has completed: on a loaded machine the
    # first pass could still be running into the rows below (and retry them
    # until its time is up), with no completed pass yet to compare against
    async def a_pass_completed() -> bool:
        return daemon.metric("dlqd_last_pass_success_timestamp_seconds") > 0

    await wait_until(a_pass_completed, within=30)
    async with await psycopg.AsyncConnection.connect(sink_db) as locker:
        await locker.execute("LOCK TABLE sink IN ACCESS EXCLUSIVE MODE")
        await insert_rows(sink_db, [row_json(original_job_id=f"l{i}") for i in range(3)])

        async def timed_out() -> bool:
            failed = [e for e in daemon.events() if e.get("event") == "replay failed"]
            return len(failed) >= 6  # two attempts of the three rows

        await wait_until(timed_out, within=30)
        failed = [e for e in daemon.events() if e.get("event") == "replay failed"]
        assert all("lock timeout" in e["error"] for e in failed)
        before = daemon.metric("dlqd_last_pass_success_timestamp_seconds")
        assert before > 0

        async def passes_go_on() -> bool:
            return daemon.metric("dlqd_last_pass_success_timestamp_seconds") > before

        await wait_until(passes_go_on, within=30)
        await locker.rollback()
    await wait_until(lambda: _sunk(sink_db, 3), within=30)


async def test_max_failures_parks_a_row_that_keeps_failing(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """Finding 5: failed rows no longer retry forever."""
    cfg = config(
        tmp_path,
        """
[[policies]]
name = "broken"
retry_delay = "20ms"
max_failures = 4
circuit_breaker = { failures = 1000 }
target = { kind = "sql", statement = "SELECT 1/0" }
""",
    )
    await start(daemons, sink_db, cfg, tmp_path)
    await insert_rows(sink_db, [row_json(original_job_id="doomed")])

    async def parked() -> bool:
        state = await scalar(
            sink_db, "SELECT parked_reason || ':' || failures FROM dlqd_entry_state"
        )
        return state == "max_failures:4"

    await wait_until(parked, within=30)
    outcomes = await scalar(sink_db, "SELECT array_agg(outcome ORDER BY id) FROM dlqd_replay_log")
    assert outcomes == ["failed"] * 4 + ["parked"]


async def test_max_replays_is_counted_per_tenant(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """Finding 6: two tenants with the same original_job_id each get their own count."""
    cfg = config(tmp_path, SINK_POLICY.replace('name = "all"', 'name = "all"\nmax_replays = 1'))
    await start(daemons, sink_db, cfg, tmp_path)
    await insert_rows(sink_db, [row_json(original_job_id="job-1", app_id="tenant-a")])
    await wait_until(lambda: _sunk(sink_db, 1), within=30)
    await insert_rows(sink_db, [row_json(original_job_id="job-1", app_id="tenant-b")])
    await wait_until(lambda: _sunk(sink_db, 2), within=30)
    await insert_rows(sink_db, [row_json(original_job_id="job-1", app_id="tenant-a")])

    async def parked() -> bool:
        return bool(await scalar(sink_db, "SELECT count(*) FROM dlqd_entry_state"))

    await wait_until(parked, within=30)
    state = await scalar(
        sink_db,
        """SELECT j.app_id || ':' || s.parked_reason FROM dlqd_entry_state s
             JOIN job_dlq j ON j.id = s.dlq_id""",
    )
    assert state == "tenant-a:max_replays"


async def test_the_dlqd_role_cannot_delete_rows_or_rewrite_its_log(dlqd_url: str) -> None:
    """Finding 7: a careless target runs with no more than dlqd's rights."""
    async with await psycopg.AsyncConnection.connect(dlqd_url, autocommit=True) as conn:
        for statement in (
            "DELETE FROM job_dlq",
            "DELETE FROM dlqd_replay_log",
            "UPDATE dlqd_replay_log SET outcome = 'replayed'",
            "UPDATE job_dlq SET payload = '{}'",
            "TRUNCATE dlqd_replay_log",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                await conn.execute(statement.encode())
        # what it needs still works: the purge and trim functions run as their owner
        cur = await conn.execute("SELECT job_dlq_purge('7 days'), dlqd_trim_replay_log('30 days')")
        assert await cur.fetchone() == (0, 0)


async def test_a_dangerous_target_cannot_delete_other_tenants_rows(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    statement = "DELETE FROM job_dlq WHERE app_id <> %(app_id)s"
    cfg = config(
        tmp_path,
        f"""
[[policies]]
name = "oops"
match = {{ app_id = ["tenant-a"] }}
max_failures = 1
target = {{ kind = "sql", statement = "{statement}" }}
""",
    )
    await start(daemons, sink_db, cfg, tmp_path)
    await insert_rows(
        sink_db,
        [
            row_json(original_job_id="b1", app_id="tenant-b"),
            row_json(original_job_id="a1", app_id="tenant-a"),
        ],
    )

    async def parked() -> bool:
        return bool(
            await scalar(
                sink_db,
                "SELECT count(*) FROM dlqd_entry_state WHERE parked_reason = 'max_failures'",
            )
        )

    await wait_until(parked, within=30)
    assert await scalar(sink_db, "SELECT count(*) FROM job_dlq") == 2
    error = await scalar(sink_db, "SELECT error FROM dlqd_replay_log WHERE outcome = 'failed'")
    assert "permission denied" in error


async def test_sixty_ten_megabyte_payloads_never_enter_the_daemon(
    db_url: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """Finding 8a: peak memory does not grow with payload sizes."""
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute(
            "CREATE TABLE sizes (dlq_id uuid, bytes int); GRANT SELECT, INSERT ON sizes TO dlqd"
        )
        await conn.execute(
            """INSERT INTO job_dlq (original_job_id, app_id, type, payload, error_reason, attempts)
               SELECT 'big' || g, 'a', 't',
                      jsonb_build_object('blob', repeat(md5(g::text), 10 * 1024 * 1024 / 32)),
                      'x', 1
                 FROM generate_series(1, 60) g"""
        )
    statement = "INSERT INTO sizes VALUES (%(id)s, octet_length(%(payload)s::text))"
    cfg = config(
        tmp_path,
        f'[[policies]]\nname = "big"\ntarget = {{ kind = "sql", statement = "{statement}" }}',
    )
    daemon = await start(daemons, db_url, cfg, tmp_path)

    async def done() -> bool:
        return int(await scalar(db_url, "SELECT count(*) FROM sizes")) == 60

    await wait_until(done, within=120)
    assert int(await scalar(db_url, "SELECT min(bytes) FROM sizes")) > 10 * 1024 * 1024
    assert daemon.process is not None
    status = await anyio.Path(f"/proc/{daemon.process.pid}/status").read_text()
    peak_kb = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
    print(f"peak RSS with 60 x 10 MB payloads: {peak_kb / 1024:.1f} MB")
    # the payloads (600 MB) never crossed into the process: a margin no load can
    # trip (the daemon's own size does not grow with the machine's load)
    assert peak_kb < 300 * 1024


def _low_fd_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


async def test_idle_clients_beyond_the_fd_limit_never_kill_the_daemon(
    sink_db: str, tmp_path: Path
) -> None:
    """Finding 8b: more idle connections to the metrics port than descriptors."""
    daemon = DaemonProcess(as_role(sink_db, "dlqd"), config(tmp_path, SINK_POLICY), tmp_path)
    log = daemon.log_path.open("ab")
    daemon.process = subprocess.Popen(  # noqa: ASYNC220 - started once, not awaited
        [sys.executable, "-m", "dlqd", "run", "--config", str(daemon.config)],
        env=daemon.env,
        stdout=log,
        stderr=log,
        cwd=ROOT,
        preexec_fn=_low_fd_limit,  # noqa: PLW1509 - the daemon's own limit, set before exec
    )
    log.close()
    clients: list[socket.socket] = []
    try:
        await daemon.wait_ready()
        for _ in range(400):
            client = socket.socket()
            client.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                client.connect(("127.0.0.1", daemon.port))
            clients.append(client)
        await insert_rows(sink_db, [row_json(original_job_id="during")])
        await wait_until(lambda: _sunk(sink_db, 1), within=30)
        assert daemon.process.poll() is None
        for client in clients:
            client.close()
        clients.clear()

        async def serving() -> bool:
            status, _ = await anyio.to_thread.run_sync(daemon.http, "/healthz")
            return status == 200

        await wait_until(serving, within=30)
        assert daemon.process.poll() is None
    finally:
        for client in clients:
            client.close()
        daemon.stop()


async def test_reconnecting_clients_beyond_the_fd_limit_do_not_flood_the_log(
    sink_db: str, tmp_path: Path
) -> None:
    """Issue 18 finding 15: 300 idle, reconnecting clients against a daemon with
    few descriptors wrote 317,000 log lines in 60 s. Repeated errors are one
    line per kind per interval, with a count."""
    daemon = DaemonProcess(as_role(sink_db, "dlqd"), config(tmp_path, SINK_POLICY), tmp_path)
    log = daemon.log_path.open("ab")
    daemon.process = subprocess.Popen(  # noqa: ASYNC220 - started once, not awaited
        [sys.executable, "-m", "dlqd", "run", "--config", str(daemon.config)],
        env=daemon.env,
        stdout=log,
        stderr=log,
        cwd=ROOT,
        preexec_fn=_low_fd_limit,  # noqa: PLW1509 - the daemon's own limit, set before exec
    )
    log.close()
    try:
        await daemon.wait_ready()
        before = len(daemon.logs().splitlines())
        stop = anyio.Event()

        async def client() -> None:
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    stream = await anyio.connect_tcp("127.0.0.1", daemon.port)
                    await anyio.sleep(0.5)
                    await stream.aclose()

        async with anyio.create_task_group() as tg:
            for _ in range(300):
                tg.start_soon(client)
            with anyio.move_on_after(10):  # the flood's length, not a wait for a result
                await stop.wait()
            stop.set()
        lines = daemon.logs().splitlines()[before:]
        print(f"{len(lines)} log lines in 10 s of 300 reconnecting clients")
        assert daemon.process.poll() is None
        assert len(lines) < 300  # one line per kind per 10 s (test_logs: with the count)
        await insert_rows(sink_db, [row_json(original_job_id="after the flood")])
        await wait_until(lambda: _sunk(sink_db, 1), within=30)
    finally:
        daemon.stop()


async def test_a_notification_flood_costs_a_bounded_number_of_passes(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """Finding 8c: any role can pg_notify('dlqd_job_dlq', ''): wake-ups coalesce."""
    daemon = await start(daemons, sink_db, config(tmp_path, SINK_POLICY), tmp_path)
    before = daemon.metric("dlqd_replayer_passes_total")  # must be exported
    started = anyio.current_time()
    async with await psycopg.AsyncConnection.connect(
        as_role(sink_db, "dlqd_app"), autocommit=True
    ) as conn:
        for _ in range(5000):
            await conn.execute("SELECT pg_notify('dlqd_job_dlq', '')")
    await insert_rows(sink_db, [row_json(original_job_id="real")])
    await wait_until(lambda: _sunk(sink_db, 1), within=30)  # real work still flows
    elapsed = anyio.current_time() - started
    passes = daemon.metric("dlqd_replayer_passes_total") - before
    # at most one pass per 50 ms of flood (plus a few for the real row)
    assert passes <= elapsed / 0.05 + 10, (passes, elapsed)
    assert daemon.metric("dlqd_notifications_total") >= 5000


def _cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = dlqd_cli(*args, env=env)
    return result.returncode, result.stderr


def test_bad_cli_input_gets_its_exit_code(db_url: str) -> None:
    """Finding 9: usage errors exit 2, never 'unexpected …' (1)."""
    import base64

    env = {"DLQD_DATABASE_URL": db_url}
    forged = base64.urlsafe_b64encode(b'["2020-01-01T00:00:00+00:00",{}]').decode()
    nested = base64.urlsafe_b64encode(b"[" * 3000 + b"]" * 3000).decode()
    bad_time = base64.urlsafe_b64encode(
        b'["not a time","00000000-0000-0000-0000-000000000000"]'
    ).decode()
    for args in (
        ["list", "--cursor", forged],
        ["list", "--cursor", nested],
        ["list", "--cursor", bad_time],
        ["list", "--limit", "99999999999999999999"],
        ["replay", "--all", "--rate", "nan"],
        ["replay", "--all", "--rate", "inf"],
    ):
        code, stderr = _cli(*args, env=env)
        assert code == 2, (args, stderr)
        assert "unexpected" not in stderr
        last = stderr.strip().splitlines()[-1]  # after argparse's usage lines: one error
        assert last.startswith("dlqd"), stderr
        assert "error:" in last, stderr


@pytest.mark.parametrize(
    ("toml", "env", "field"),
    [
        (b'database_url = "postgresql://x/y"\n\xff\xfe = 1\n', {}, "not UTF-8"),
        (b'shutdown_timeout = "99999999999d"\n', {}, "shutdown_timeout"),
        (b"", {"DLQD_POLICIES": "["}, "policies"),
        (b"", {"DLQD_LISTEN": "notjson"}, "listen"),
        (b'[purge]\nschedule = "x y z w v"\n', {}, "purge.schedule"),
        (b'[purge]\nschedule = "99 99 99 99 99"\n', {}, "purge.schedule"),
        (b'[purge]\npending_retention = "30m"\n', {}, "purge.pending_retention"),
        (b'metrics_host = "not a host!!"\n', {}, "metrics_host"),
        (b'[metrics]\nrefresh_interval = "0s"\n', {}, "metrics.refresh_interval"),
        (b"", {"DLQD_DATABASE_URL": "postgresql://u@h/db?connect_timeout=abc"}, "database_url"),
    ],
)
def test_bad_config_exits_78_at_once_naming_the_field(
    tmp_path: Path, toml: bytes, env: dict[str, str], field: str
) -> None:
    path = tmp_path / "dlqd.toml"
    path.write_bytes(toml)
    full_env = {"DLQD_DATABASE_URL": "postgresql://u@127.0.0.1:1/db", **env}
    result = dlqd_cli("check", "--config", str(path), env=full_env)
    # 78 naming the field: the config was refused before any connection (an
    # unreachable database would be 69)
    assert result.returncode == 78, result.stderr
    assert field in result.stderr
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


async def test_control_characters_are_escaped_in_human_output(db_url: str) -> None:
    """Finding 10: values cannot drive the operator's terminal."""
    await insert_rows(
        db_url,
        [
            row_json(
                original_job_id="esc",
                app_id="evil\n\x1b[31mred\x07",
                type="t\x1b]0;title\x07",
                error_reason="r\r\x9b2J",
            )
        ],
    )
    row_id = await scalar(db_url, "SELECT id::text FROM job_dlq")
    env = {"DLQD_DATABASE_URL": db_url}
    for args in (["show", row_id], ["status"], ["list"], ["explain", row_id]):
        result = dlqd_cli(*args, env=env)
        assert result.returncode == 0, (args, result.stderr)
        for raw in ("\x1b", "\x07", "\r", "\x9b"):
            assert raw not in result.stdout, (args, raw)
        assert "\\x1b" in result.stdout, args


async def test_a_rows_own_failures_never_open_the_circuit_for_the_others(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """Finding 11: rows known to be bad retry without pausing fresh rows."""
    statement = (
        "INSERT INTO sink (dlq_id, type, payload) VALUES (%(id)s, %(type)s, "
        "CASE WHEN %(error_reason)s = 'bad' THEN (1/0)::text::jsonb ELSE %(payload)s END)"
    )
    cfg = config(
        tmp_path,
        f"""
[[policies]]
name = "mixed"
retry_delay = "20ms"
factor = 1.0
max_failures = 1000
circuit_breaker = {{ failures = 3, cool_down = "1h" }}
target = {{ kind = "sql", statement = "{statement}" }}
""",
    )
    daemon = await start(daemons, sink_db, cfg, tmp_path)
    # a stream: one bad row among good ones, each inserted on its own
    for i in range(120):
        reason = "bad" if i % 20 == 0 else "timeout"
        await insert_rows(sink_db, [row_json(original_job_id=f"s{i}", error_reason=reason)])
        if i % 10 == 9:
            await wait_until(lambda n=i: _good_sunk(sink_db, n), within=30)
    retries = await scalar(
        sink_db, "SELECT max(failures) FROM dlqd_entry_state WHERE state = 'waiting'"
    )
    assert retries >= 3  # the bad rows kept failing, consecutively, many times
    assert daemon.metric('dlqd_circuit_open{policy="mixed"}') == 0
    assert not any(e.get("event") == "circuit opened" for e in daemon.events())


async def _good_sunk(db_url: str, last: int) -> bool:
    good = last + 1 - (last // 20 + 1)
    return int(await scalar(db_url, "SELECT count(*) FROM sink")) >= good


def test_password_never_printed_with_a_bad_dsn_option() -> None:
    secret = "pw-Secret-123"
    url = f"postgresql://u:{secret}@127.0.0.1:1/db?sslmode=sometimes"
    result = dlqd_cli("check", env={"DLQD_DATABASE_URL": url})
    assert result.returncode == 78
    assert secret not in result.stderr + result.stdout
    assert "sslmode" in result.stderr


async def test_a_transaction_failing_as_a_whole_is_retried_by_halves(
    sink_db: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """Finding 3, the general case: whatever fails outside a target's savepoint (here
    a trigger on the replay log refusing one row's replay) rolls the whole
    transaction back. The batch is retried by halves; the rest replays, and only
    what committed is counted."""
    async with await psycopg.AsyncConnection.connect(sink_db, autocommit=True) as conn:
        await conn.execute(
            """CREATE FUNCTION refuse_doomed() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN
                   IF NEW.original_job_id = 'doomed' AND NEW.outcome = 'replayed' THEN
                       RAISE EXCEPTION 'refused by the audit trigger';
                   END IF;
                   RETURN NEW;
               END $$;
               CREATE TRIGGER refuse_doomed BEFORE INSERT ON dlqd_replay_log
                   FOR EACH ROW EXECUTE FUNCTION refuse_doomed()"""
        )
    cfg = config(tmp_path, SINK_POLICY.replace('name = "all"', 'name = "all"\nmax_failures = 2'))
    await insert_rows(
        sink_db,
        [row_json(original_job_id=f"fine{i}") for i in range(7)]
        + [row_json(original_job_id="doomed")]
        + [row_json(original_job_id=f"also{i}") for i in range(8)],
    )
    daemon = await start(daemons, sink_db, cfg, tmp_path)

    async def settled() -> bool:
        parked = await scalar(
            sink_db, "SELECT count(*) FROM dlqd_entry_state WHERE parked_reason = 'max_failures'"
        )
        return int(parked) == 1

    await wait_until(settled, within=60)
    assert await scalar(sink_db, "SELECT count(*) FROM job_dlq WHERE replayed_at IS NOT NULL") == 15
    # the sink holds exactly the committed replays: the doomed row's inserts rolled back
    assert await scalar(sink_db, "SELECT count(*) FROM sink") == 15
    assert daemon.metric('dlqd_replays_total{outcome="replayed",policy="all"}') == 15
    assert daemon.metric('dlqd_replays_total{outcome="failed",policy="all"}') == 2
    errors = await scalar(
        sink_db, "SELECT array_agg(error) FROM dlqd_replay_log WHERE outcome = 'failed'"
    )
    assert all("refused by the audit trigger" in e for e in errors)
    assert any(
        e.get("event") == "batch failed as a whole: retrying it in halves" for e in daemon.events()
    )
