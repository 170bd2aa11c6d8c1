"""The adapters, against each job system's real schema and its own worker.

End to end: a job fails for good under the system's worker -> one row in
job_dlq, captured by the adapter's trigger -> `dlqd run` replays it by policy
through the system's preset -> the system's worker runs it again and it
succeeds. Also: a retry that is not final captures nothing; many failures in
one statement capture as many rows; installing is idempotent, refuses a
schema it cannot capture from, prints what it would do; uninstalling leaves
the system's schema as it was; no tenant can use the capture.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from tests.conftest import as_role, dlqd_cli
from tests.daemon_helpers import DaemonProcess, scalar, wait_until, write_config
from tests.job_systems import (
    graphile_worker_run_once,
    install_graphile_worker,
    install_oban,
    install_pgboss,
    install_pgqueuer,
    install_procrastinate,
    install_river,
    oban_drain,
    oban_enqueue,
    pgboss_queue,
    pgboss_send,
    pgboss_work,
    pgqueuer_enqueue,
    pgqueuer_worker,
    prepare_runs,
    procrastinate_app,
    procrastinate_worker,
    river_attempt,
    runs,
)

pytestmark = pytest.mark.anyio

#: what the daemon's role needs to replay into each system (docs/adapters/)
GRANTS = {
    "procrastinate": """
        GRANT SELECT, INSERT ON procrastinate_jobs TO dlqd;
        GRANT INSERT ON procrastinate_events TO dlqd;
        GRANT USAGE ON SEQUENCE procrastinate_jobs_id_seq, procrastinate_events_id_seq TO dlqd;
    """,
    "pgqueuer": """
        GRANT SELECT, INSERT ON pgqueuer TO dlqd;
        GRANT USAGE ON SEQUENCE pgqueuer_id_seq TO dlqd;
    """,
    "river": """
        GRANT INSERT ON river_job TO dlqd;
        GRANT USAGE ON SEQUENCE river_job_id_seq TO dlqd;
    """,
    "pgboss": """
        GRANT USAGE ON SCHEMA pgboss TO dlqd;
        GRANT SELECT ON pgboss.queue TO dlqd;
        GRANT INSERT ON pgboss.job TO dlqd;
        GRANT EXECUTE ON FUNCTION pgboss.job_now() TO dlqd;
    """,
    "oban": """
        GRANT INSERT ON oban_jobs TO dlqd;
    """,
    "graphile_worker": """
        GRANT USAGE ON SCHEMA graphile_worker TO dlqd;
        GRANT SELECT, INSERT, UPDATE ON graphile_worker._private_jobs,
              graphile_worker._private_tasks, graphile_worker._private_job_queues TO dlqd;
    """,
}


def cli(db_url: str, *args: str) -> Any:
    return dlqd_cli(*args, env={"DLQD_DATABASE_URL": db_url})


def installed(db_url: str, name: str, *extra: str) -> None:
    result = cli(db_url, "adapters", "install", name, *extra)
    assert result.returncode == 0, result.stderr
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(GRANTS[name])


def captured(db_url: str) -> list[dict[str, Any]]:
    with psycopg.connect(db_url, row_factory=dict_row) as conn:
        return conn.execute(
            """SELECT j.original_job_id, j.app_id, j.type, j.payload, j.error_reason,
                      j.attempts, j.error_history, j.replayed_at, a.system, a.job
                 FROM job_dlq j LEFT JOIN dlqd_adapter_jobs a ON a.dlq_id = j.id
                ORDER BY j.dlq_at, j.id"""
        ).fetchall()


def schema_snapshot(db_url: str) -> list[tuple[Any, ...]]:
    """What an install could change: every trigger (the clones on partitions
    included), function, table, column, index and privilege of every schema
    but the catalogs, as the catalog spells them."""
    with psycopg.connect(db_url) as conn:
        return conn.execute(
            """WITH spaces AS (
                   SELECT oid FROM pg_namespace
                    WHERE nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
                      AND nspname NOT LIKE 'pg_temp%' AND nspname NOT LIKE 'pg_toast_temp%')
               SELECT 'trigger', c.oid::regclass::text, pg_get_triggerdef(t.oid)
                 FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
                WHERE c.relnamespace IN (SELECT oid FROM spaces) AND NOT t.tgisinternal
               UNION ALL
               SELECT 'function', p.oid::regprocedure::text, md5(pg_get_functiondef(p.oid))
                 FROM pg_proc p
                WHERE p.pronamespace IN (SELECT oid FROM spaces) AND p.prokind = 'f'
               UNION ALL
               SELECT 'relation', c.oid::regclass::text,
                      c.relkind::text || coalesce(c.relacl::text, '')
                 FROM pg_class c WHERE c.relnamespace IN (SELECT oid FROM spaces)
               UNION ALL
               SELECT 'column', a.attrelid::regclass::text, a.attname || ' '
                      || format_type(a.atttypid, a.atttypmod)
                 FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
                WHERE c.relnamespace IN (SELECT oid FROM spaces) AND a.attnum > 0
                  AND NOT a.attisdropped
               ORDER BY 1, 2, 3"""
        ).fetchall()


async def replayed_by_daemon(
    db_url: str, tmp_path: Path, daemons: list[Any], *, match: str, target: str
) -> None:
    """`dlqd run`, as the least-privileged dlqd role, with one policy (the
    given match and target): until it has replayed a row."""
    config = write_config(
        tmp_path / "dlqd.toml",
        f"""
[listen]
poll_interval = "1s"

[[policies]]
name = "redrive"
match = {match}
target = {target}
""",
    )
    daemon = DaemonProcess(as_role(db_url, "dlqd"), config, tmp_path).start()
    daemons.append(daemon)
    await daemon.wait_ready()

    async def done() -> bool:
        n = await scalar(db_url, "SELECT count(*) FROM job_dlq WHERE replayed_at IS NOT NULL")
        return int(n) >= 1

    await wait_until(done, within=30)


# --------------------------------------------------------------------------- Procrastinate


async def test_procrastinate_job_failed_for_good_is_captured_replayed_and_runs_again(
    db_url: str, tmp_path: Path, daemons: list[Any]
) -> None:
    install_procrastinate(db_url)
    installed(db_url, "procrastinate", "--app-id", "job.queue_name")
    prepare_runs(db_url, "k1", fail_first=2)
    app = procrastinate_app(db_url)
    async with app.open_async():
        job_id = await app.tasks["flaky"].defer_async(key="k1")
    # its own worker: two attempts (retry=1), both fail; the job is failed for good
    await procrastinate_worker(db_url, ["billing"])
    assert runs(db_url, "k1") == 2
    [row] = captured(db_url)
    assert row["original_job_id"] == str(job_id)
    assert row["app_id"] == "billing"  # --app-id job.queue_name
    assert row["type"] == "flaky"
    assert row["payload"] == {"key": "k1"}  # the job's args exactly
    assert row["error_reason"] == "failed"
    assert row["attempts"] == 2
    assert [e["event"] for e in row["error_history"]] == ["deferred_for_retry", "failed"]
    assert row["system"] == "procrastinate"
    assert row["job"]["queue"] == "billing"
    assert row["job"]["priority"] == 0

    await replayed_by_daemon(
        db_url,
        tmp_path,
        daemons,
        match='{ type = ["flaky"] }',
        target='{ kind = "procrastinate", priority = 7 }',
    )
    with psycopg.connect(db_url, row_factory=dict_row) as conn:
        jobs = conn.execute(
            "SELECT id, queue_name, task_name, priority, args, status::text AS status"
            " FROM procrastinate_jobs ORDER BY id"
        ).fetchall()
    # a new job of Procrastinate's: same task, queue and args; the override's priority
    assert [(j["task_name"], j["queue_name"], j["args"], j["status"]) for j in jobs] == [
        ("flaky", "billing", {"key": "k1"}, "failed"),
        ("flaky", "billing", {"key": "k1"}, "todo"),
    ]
    assert jobs[1]["priority"] == 7
    # and its own worker runs it: the third run succeeds
    await procrastinate_worker(db_url, ["billing"])
    assert runs(db_url, "k1") == 3
    status = await scalar(
        db_url, "SELECT status::text FROM procrastinate_jobs WHERE id = %s", [jobs[1]["id"]]
    )
    assert status == "succeeded"
    # replayed once: the success captured nothing more
    assert len(captured(db_url)) == 1


async def test_procrastinate_retry_that_is_not_final_captures_nothing(db_url: str) -> None:
    install_procrastinate(db_url)
    installed(db_url, "procrastinate")
    prepare_runs(db_url, "k2", fail_first=5)
    app = procrastinate_app(db_url)
    async with app.open_async():
        job_id = await app.tasks["slow_retry"].defer_async(key="k2")
    await procrastinate_worker(db_url, ["billing"])  # one attempt; the retry is in an hour
    assert runs(db_url, "k2") == 1
    status = await scalar(
        db_url, "SELECT status::text FROM procrastinate_jobs WHERE id = %s", [job_id]
    )
    assert status == "todo"
    assert captured(db_url) == []
    # the last attempt fails: captured then, once
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE procrastinate_jobs SET scheduled_at = now() WHERE id = %s", [job_id])
    await procrastinate_worker(db_url, ["billing"])
    assert runs(db_url, "k2") == 2
    [row] = captured(db_url)
    assert (row["original_job_id"], row["app_id"], row["attempts"]) == (
        str(job_id),
        "procrastinate",
        2,
    )


async def test_procrastinate_many_failures_capture_as_many_rows(db_url: str) -> None:
    install_procrastinate(db_url)
    installed(db_url, "procrastinate", "--app-id", "job.args->>'tenant'")
    app = procrastinate_app(db_url)
    async with app.open_async():
        for n in range(1000):
            await app.tasks["doomed"].defer_async(n=n)
    await procrastinate_worker(db_url, ["bulk"], concurrency=8)
    rows = captured(db_url)
    assert len(rows) == 1000
    assert sorted(r["payload"]["n"] for r in rows) == list(range(1000))
    # no args field named tenant: the expression is NULL, the adapter's name stands in
    assert {r["app_id"] for r in rows} == {"procrastinate"}


# --------------------------------------------------------------------------- PgQueuer


async def test_pgqueuer_job_failed_for_good_is_captured_replayed_and_runs_again(
    db_url: str, tmp_path: Path, daemons: list[Any]
) -> None:
    install_pgqueuer(db_url)
    installed(db_url, "pgqueuer", "--app-id", "job.headers->>'tenant'")
    prepare_runs(db_url, "p1", fail_first=1)
    payload = b'{"key": "p1",  "to": "a@example.com"}'  # bytes as the producer wrote them
    [job_id] = await pgqueuer_enqueue(db_url, "flaky", [payload], {"tenant": "shop"})
    await pgqueuer_worker(db_url)
    assert runs(db_url, "p1") == 1
    [row] = captured(db_url)
    assert row["original_job_id"] == str(job_id)
    assert row["app_id"] == "shop"
    assert row["type"] == "flaky"
    assert row["payload"] == {"key": "p1", "to": "a@example.com"}
    assert row["error_reason"] == "ValueError"  # the exception's class, from pgqueuer_log
    assert row["attempts"] == 1
    assert row["error_history"][-1]["message"] == "p1: run 1 fails on purpose"
    assert row["job"]["headers"] == {"tenant": "shop"}

    await replayed_by_daemon(
        db_url, tmp_path, daemons, match='{ type = ["flaky"] }', target='{ kind = "pgqueuer" }'
    )
    with psycopg.connect(db_url, row_factory=dict_row) as conn:
        jobs = conn.execute(
            "SELECT id, entrypoint, payload, headers, status::text AS status"
            " FROM pgqueuer ORDER BY id"
        ).fetchall()
    assert [(j["entrypoint"], j["status"]) for j in jobs] == [
        ("flaky", "failed"),
        ("flaky", "queued"),
    ]
    assert bytes(jobs[1]["payload"]) == payload  # the exact bytes, not re-serialised JSON
    assert jobs[1]["headers"] == {"tenant": "shop"}
    await pgqueuer_worker(db_url)
    assert runs(db_url, "p1") == 2
    logged = await scalar(
        db_url,
        "SELECT string_agg(status::text, ',' ORDER BY id) FROM pgqueuer_log WHERE job_id = %s",
        [jobs[1]["id"]],
    )
    assert logged.endswith("successful")
    assert len(captured(db_url)) == 1


async def test_pgqueuer_retry_that_is_not_final_captures_nothing(db_url: str) -> None:
    install_pgqueuer(db_url)
    installed(db_url, "pgqueuer")
    prepare_runs(db_url, "p2", fail_first=5)
    [job_id] = await pgqueuer_enqueue(db_url, "retrying", [b'{"key": "p2"}'], {})

    async def retried() -> bool:
        found = await scalar(
            db_url, "SELECT status::text || attempts FROM pgqueuer WHERE id = %s", [job_id]
        )
        return bool(found == "queued1")

    await pgqueuer_worker(db_url, until=retried)  # RetryRequested: queued again, in an hour
    assert runs(db_url, "p2") == 1
    status = await scalar(db_url, "SELECT status::text FROM pgqueuer WHERE id = %s", [job_id])
    assert status == "queued"
    assert captured(db_url) == []
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE pgqueuer SET execute_after = now() WHERE id = %s", [job_id])
    await pgqueuer_worker(db_url)  # the second run fails for good (hold)
    assert runs(db_url, "p2") == 2
    [row] = captured(db_url)
    assert (row["original_job_id"], row["attempts"], row["error_reason"]) == (
        str(job_id),
        2,
        "ValueError",
    )
    # the retry's record and the failure's, oldest first
    assert [e["status"] for e in row["error_history"]] == ["queued", "failed"]


async def test_pgqueuer_failures_logged_in_one_statement_capture_every_job(
    db_url: str,
) -> None:
    """PgQueuer's worker logs a batch of outcomes in one statement: each of
    its failed jobs is captured, with its own traceback."""
    install_pgqueuer(db_url)
    installed(db_url, "pgqueuer")
    payloads: list[bytes | None] = [json.dumps({"n": n}).encode() for n in range(1000)]
    payloads.append(None)  # a job without a payload
    payloads.append(b"\xff\xfe not json")  # nor JSON, nor UTF-8
    await pgqueuer_enqueue(db_url, "doomed", payloads, {})
    await pgqueuer_worker(db_url, batch_size=100)
    rows = captured(db_url)
    assert len(rows) == len(payloads)
    assert {r["error_reason"] for r in rows} == {"RuntimeError"}
    by_payload = {json.dumps(r["payload"]) for r in rows}
    assert json.dumps({"n": 999}) in by_payload
    assert "null" in by_payload
    # not JSON: a base64 string in job_dlq, the bytes kept for the replay
    odd = [r for r in rows if isinstance(r["payload"], str)]
    assert len(odd) == 1
    assert odd[0]["job"]["payload_base64"]


# --------------------------------------------------------------------------- pg-boss


async def test_pgboss_job_failed_for_good_is_captured_replayed_and_runs_again(
    db_url: str, tmp_path: Path, daemons: list[Any]
) -> None:
    install_pgboss(db_url)
    installed(db_url, "pgboss", "--app-id", "job.data->>'tenant'")
    # a queue created after the install: its partition gets the trigger too
    pgboss_queue(db_url, "mail", retry_limit=1, retry_delay=0)
    prepare_runs(db_url, "b1", fail_first=2)
    job_id = pgboss_send(db_url, "mail", {"key": "b1", "tenant": "shop"})
    pgboss_work(db_url, "mail")  # its own worker: two attempts, both fail
    assert runs(db_url, "b1") == 2
    [row] = captured(db_url)
    assert row["original_job_id"] == job_id
    assert row["app_id"] == "shop"
    assert row["type"] == "mail"
    assert row["payload"] == {"key": "b1", "tenant": "shop"}
    assert row["error_reason"] == "TypeError"  # the error's name, from output
    assert row["attempts"] == 2
    assert row["error_history"][0]["message"] == "b1: run 2 fails on purpose"

    await replayed_by_daemon(
        db_url,
        tmp_path,
        daemons,
        match='{ type = ["mail"] }',
        target='{ kind = "pgboss", max_attempts = 3 }',
    )
    with psycopg.connect(db_url, row_factory=dict_row) as conn:
        jobs = conn.execute(
            "SELECT id::text AS id, name, data, state::text AS state, retry_limit,"
            " retry_count FROM pgboss.job ORDER BY created_on, id"
        ).fetchall()
    assert [(j["name"], j["data"], j["state"], j["retry_limit"]) for j in jobs] == [
        ("mail", {"key": "b1", "tenant": "shop"}, "failed", 1),
        ("mail", {"key": "b1", "tenant": "shop"}, "created", 2),  # max_attempts 3
    ]
    pgboss_work(db_url, "mail")  # its own worker runs it: the third run succeeds
    assert runs(db_url, "b1") == 3
    state = await scalar(
        db_url, "SELECT state::text FROM pgboss.job WHERE id = %s::uuid", [jobs[1]["id"]]
    )
    assert state == "completed"
    assert len(captured(db_url)) == 1


async def test_pgboss_retry_that_is_not_final_captures_nothing(db_url: str) -> None:
    install_pgboss(db_url)
    pgboss_queue(db_url, "slow", retry_limit=1, retry_delay=3600)
    installed(db_url, "pgboss")
    prepare_runs(db_url, "b2", fail_first=5)
    job_id = pgboss_send(db_url, "slow", {"key": "b2"})
    pgboss_work(db_url, "slow")  # one attempt: the retry is in an hour
    assert runs(db_url, "b2") == 1
    state = await scalar(db_url, "SELECT state::text FROM pgboss.job WHERE id = %s::uuid", [job_id])
    assert state == "retry"
    assert captured(db_url) == []
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE pgboss.job SET start_after = now() WHERE id = %s::uuid", [job_id])
    pgboss_work(db_url, "slow")
    [row] = captured(db_url)
    assert (row["original_job_id"], row["attempts"], row["app_id"]) == (job_id, 2, "pgboss")


# --------------------------------------------------------------------------- River


async def test_river_discarded_job_is_captured_and_replayed_as_river_documents_an_insert(
    db_url: str, tmp_path: Path, daemons: list[Any]
) -> None:
    """Schema level only (River cannot run here): on a river_job table made
    from River's documented columns, the updates River's client makes."""
    install_river(db_url)
    installed(db_url, "river", "--app-id", "job.args->>'tenant'")
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(
            """INSERT INTO river_job (args, kind, max_attempts, priority, queue, tags, metadata)
               VALUES ('{"tenant": "shop", "to": "a@example.com"}', 'email', 2, 3, 'mail',
                       '{urgent}', '{"trace": "t1"}'),
                      ('{"tenant": "shop"}', 'email', 5, 1, 'mail', '{}', '{}')
               RETURNING id"""
        ).fetchall()
        conn.execute(GRANTS["river"])
    job_id, unique_id = row[0][0], row[1][0]
    river_attempt(db_url, job_id, error="smtp: 421 try later", final=False)
    assert captured(db_url) == []  # a retry
    # the unique-job scheduler's discard of a duplicate is no failure
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            """UPDATE river_job SET state = 'discarded', finalized_at = now(),
                      metadata = metadata || '{"unique_key_conflict": "scheduler_discarded"}'
                WHERE id = %s""",
            [unique_id],
        )
    assert captured(db_url) == []
    river_attempt(db_url, job_id, error="smtp: 550 mailbox unavailable\nat send()", final=True)
    [dead] = captured(db_url)
    assert dead["original_job_id"] == str(job_id)
    assert dead["app_id"] == "shop"
    assert dead["type"] == "email"
    assert dead["payload"] == {"tenant": "shop", "to": "a@example.com"}
    assert dead["error_reason"] == "smtp: 550 mailbox unavailable"
    assert dead["attempts"] == 2
    assert [e["error"] for e in dead["error_history"]] == [
        "smtp: 421 try later",
        "smtp: 550 mailbox unavailable\nat send()",
    ]
    await replayed_by_daemon(
        db_url,
        tmp_path,
        daemons,
        match='{ type = ["email"] }',
        target='{ kind = "river", max_attempts = 4 }',
    )
    with psycopg.connect(db_url, row_factory=dict_row) as conn:
        new = conn.execute(
            """SELECT kind, args, queue, priority, max_attempts, tags, metadata,
                      state::text AS state, attempt, errors
                 FROM river_job WHERE id > %s ORDER BY id""",
            [unique_id],
        ).fetchall()
    assert new == [
        {
            "kind": "email",
            "args": {"tenant": "shop", "to": "a@example.com"},
            "queue": "mail",
            "priority": 3,
            "max_attempts": 4,  # the override
            "tags": ["urgent"],
            "metadata": {"trace": "t1"},
            "state": "available",
            "attempt": 0,
            "errors": None,
        }
    ]


# --------------------------------------------------------------------------- Graphile Worker


def graphile_add(db_url: str, task: str, payload: dict[str, Any], max_attempts: int) -> int:
    """A job added through Graphile Worker's own SQL API."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT (graphile_worker.add_job(%s, %s::json, queue_name => 'mail',"
            " max_attempts => %s, priority => 2)).id",
            [task, json.dumps(payload), max_attempts],
        ).fetchone()
    assert row is not None
    return int(row[0])


async def test_graphile_worker_job_failed_for_good_is_captured_replayed_and_runs_again(
    db_url: str, tmp_path: Path, daemons: list[Any]
) -> None:
    install_graphile_worker(db_url)
    installed(db_url, "graphile_worker", "--app-id", "job.payload->>'tenant'")
    prepare_runs(db_url, "g1", fail_first=1)
    job_id = graphile_add(db_url, "flaky", {"key": "g1", "tenant": "shop"}, max_attempts=1)
    graphile_worker_run_once(db_url)
    assert runs(db_url, "g1") == 1
    [row] = captured(db_url)
    assert row["original_job_id"] == str(job_id)
    assert row["app_id"] == "shop"
    assert row["type"] == "flaky"
    assert row["payload"] == {"key": "g1", "tenant": "shop"}
    assert row["error_reason"] == "g1: run 1 fails on purpose"
    assert row["attempts"] == 1
    assert row["job"]["queue"] == "mail"
    assert row["job"]["priority"] == 2

    await replayed_by_daemon(
        db_url,
        tmp_path,
        daemons,
        match='{ type = ["flaky"] }',
        target='{ kind = "graphile_worker", max_attempts = 3 }',
    )
    with psycopg.connect(db_url, row_factory=dict_row) as conn:
        jobs = conn.execute(
            """SELECT j.id, t.identifier, j.payload, q.queue_name, j.max_attempts, j.priority,
                      j.attempts
                 FROM graphile_worker._private_jobs j
                 JOIN graphile_worker._private_tasks t ON t.id = j.task_id
                 LEFT JOIN graphile_worker._private_job_queues q ON q.id = j.job_queue_id
                ORDER BY j.id"""
        ).fetchall()
    assert [
        (j["identifier"], j["payload"], j["queue_name"], j["max_attempts"], j["attempts"])
        for j in jobs
    ] == [
        ("flaky", {"key": "g1", "tenant": "shop"}, "mail", 1, 1),
        ("flaky", {"key": "g1", "tenant": "shop"}, "mail", 3, 0),
    ]
    assert jobs[1]["priority"] == 2
    graphile_worker_run_once(db_url)  # its own worker runs it: the second run succeeds
    assert runs(db_url, "g1") == 2
    left = await scalar(
        db_url, "SELECT count(*) FROM graphile_worker._private_jobs WHERE id = %s", [jobs[1]["id"]]
    )
    assert left == 0  # Graphile Worker deletes a job that succeeded
    assert len(captured(db_url)) == 1


async def test_graphile_worker_retry_that_is_not_final_captures_nothing(db_url: str) -> None:
    install_graphile_worker(db_url)
    installed(db_url, "graphile_worker")
    prepare_runs(db_url, "g2", fail_first=5)
    job_id = graphile_add(db_url, "flaky", {"key": "g2"}, max_attempts=2)
    graphile_worker_run_once(db_url)
    assert runs(db_url, "g2") == 1
    assert captured(db_url) == []  # an attempt left: its run_at moved on
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE graphile_worker._private_jobs SET run_at = now() WHERE id = %s", [job_id]
        )
    graphile_worker_run_once(db_url)
    assert runs(db_url, "g2") == 2
    [row] = captured(db_url)
    assert (row["original_job_id"], row["attempts"]) == (str(job_id), 2)
    # permanently_fail_jobs, Graphile Worker's admin function, captures too, once
    other = graphile_add(db_url, "doomed", {"n": 1}, max_attempts=5)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "SELECT graphile_worker.permanently_fail_jobs(ARRAY[%s]::bigint[], 'given up')",
            [other],
        )
        conn.execute(
            "UPDATE graphile_worker._private_jobs SET priority = 3 WHERE id = %s", [other]
        )  # any later update of a failed job is no new failure
    rows = captured(db_url)
    assert [(r["original_job_id"], r["error_reason"]) for r in rows[1:]] == [
        (str(other), "given up")
    ]


# --------------------------------------------------------------------------- Oban


async def test_oban_job_discarded_is_captured_replayed_and_runs_again(
    db_url: str, tmp_path: Path, daemons: list[Any]
) -> None:
    """Oban's Python port (Python 3.12, its own venv): its schema by `oban
    install`, its jobs run by its own executor."""
    install_oban(db_url)
    installed(db_url, "oban", "--app-id", "job.args->>'tenant'")
    prepare_runs(db_url, "o1", fail_first=2)
    job_id = oban_enqueue(db_url, "o1", max_attempts=2)
    first = oban_drain(db_url)  # attempt 1 fails: retryable, not captured
    assert first["retryable"] == 1
    assert runs(db_url, "o1") == 1
    assert captured(db_url) == []
    with psycopg.connect(db_url, autocommit=True) as conn:
        # what Oban's stager does when the retry is due
        conn.execute(
            "UPDATE oban_jobs SET state = 'available', scheduled_at = timezone('UTC', now())"
            " WHERE id = %s",
            [job_id],
        )
    assert oban_drain(db_url)["discarded"] == 1
    assert runs(db_url, "o1") == 2
    [row] = captured(db_url)
    assert row["original_job_id"] == str(job_id)
    assert row["app_id"] == "shop"
    assert row["type"].endswith("Flaky")
    assert row["payload"] == {"key": "o1", "tenant": "shop"}
    assert row["error_reason"] == "ValueError"  # a Python traceback's last line names it
    assert row["attempts"] == 2
    assert [e["attempt"] for e in row["error_history"]] == [1, 2]
    assert row["job"]["queue"] == "mail"

    await replayed_by_daemon(
        db_url,
        tmp_path,
        daemons,
        match='{ error_reason = ["ValueError"] }',
        target='{ kind = "oban", max_attempts = 5 }',
    )
    with psycopg.connect(db_url, row_factory=dict_row) as conn:
        jobs = conn.execute(
            "SELECT id, worker, args, queue, priority, max_attempts, attempt,"
            " state::text AS state FROM oban_jobs ORDER BY id"
        ).fetchall()
    assert [(j["state"], j["max_attempts"], j["attempt"]) for j in jobs] == [
        ("discarded", 2, 2),
        ("available", 5, 0),
    ]
    assert (jobs[1]["worker"], jobs[1]["args"], jobs[1]["queue"], jobs[1]["priority"]) == (
        jobs[0]["worker"],
        {"key": "o1", "tenant": "shop"},
        "mail",
        2,
    )
    done = oban_drain(db_url)  # its own executor runs it: the third run succeeds
    assert done["completed"] == 1
    assert runs(db_url, "o1") == 3
    assert len(captured(db_url)) == 1


async def test_oban_schema_of_elixir_with_errors_as_an_array_of_jsonb(db_url: str) -> None:
    """Oban for Elixir keeps errors as jsonb[] (its Python port: jsonb): the
    install accepts both, and the capture reads both."""
    install_oban(db_url)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            """ALTER TABLE oban_jobs DROP COLUMN errors,
                   ADD COLUMN errors jsonb[] NOT NULL DEFAULT ARRAY[]::jsonb[]"""
        )
    installed(db_url, "oban")
    with psycopg.connect(db_url, autocommit=True) as conn:
        [job_id] = conn.execute(
            """INSERT INTO oban_jobs (worker, args, queue, max_attempts, attempt, state)
               VALUES ('MyApp.Mailer', '{"to": "a@example.com"}', 'mail', 1, 1, 'executing')
               RETURNING id"""
        ).fetchone() or [None]
        # as Oban for Elixir records the last failure
        conn.execute(
            """UPDATE oban_jobs SET state = 'discarded', discarded_at = timezone('UTC', now()),
                      errors = array_append(errors, jsonb_build_object(
                          'at', now(), 'attempt', 1,
                          'error', '** (RuntimeError) smtp down' || chr(10) || '  x.ex:1'))
                WHERE id = %s""",
            [job_id],
        )
    [row] = captured(db_url)
    assert (row["type"], row["error_reason"], row["app_id"]) == (
        "MyApp.Mailer",
        "RuntimeError",
        "oban",
    )
    assert row["error_history"][0]["attempt"] == 1


# --------------------------------------------------------------------------- install, uninstall


async def test_install_is_idempotent_and_uninstall_leaves_the_schema_as_it_was(
    db_url: str,
) -> None:
    install_procrastinate(db_url)
    before = schema_snapshot(db_url)
    first = cli(db_url, "adapters", "install", "procrastinate", "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["previous"] is None
    again = cli(db_url, "adapters", "install", "procrastinate", "--app-id", "job.queue_name")
    assert again.returncode == 0, again.stderr
    assert "replaced: dlqd" in again.stdout  # the function of the first install, replaced
    during = schema_snapshot(db_url)
    assert during != before
    triggers = await scalar(
        db_url,
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'procrastinate_jobs'::regclass"
        " AND tgname = 'dlqd_capture'",
    )
    assert triggers == 1
    gone = cli(db_url, "adapters", "uninstall", "procrastinate")
    assert gone.returncode == 0, gone.stderr
    assert schema_snapshot(db_url) == before
    # and a failure then captures nothing
    app = procrastinate_app(db_url)
    async with app.open_async():
        await app.tasks["doomed"].defer_async(n=1)
    await procrastinate_worker(db_url, ["bulk"])
    assert captured(db_url) == []


INSTALLERS: dict[str, Any] = {
    "procrastinate": install_procrastinate,
    "pgqueuer": install_pgqueuer,
    "pgboss": install_pgboss,
    "river": install_river,
    "graphile_worker": install_graphile_worker,
    "oban": install_oban,
}


@pytest.mark.parametrize("system", sorted(INSTALLERS))
async def test_uninstall_leaves_each_system_as_it_was(db_url: str, system: str) -> None:
    INSTALLERS[system](db_url)
    if system == "pgboss":
        pgboss_queue(db_url, "before", retry_limit=1, retry_delay=0)
    before = schema_snapshot(db_url)
    result = cli(db_url, "adapters", "install", system)
    assert result.returncode == 0, result.stderr
    if system == "pgboss":  # a queue created meanwhile: its partition gets a clone
        pgboss_queue(db_url, "during", retry_limit=1, retry_delay=0)
        before = [*before, *[r for r in schema_snapshot(db_url) if "dlqd" not in str(r)]]
        before = sorted(set(before))
    assert schema_snapshot(db_url) != before
    result = cli(db_url, "adapters", "uninstall", system)
    assert result.returncode == 0, result.stderr
    assert sorted(set(schema_snapshot(db_url))) == sorted(set(before))


async def test_print_changes_nothing_and_what_it_prints_installs(db_url: str) -> None:
    install_pgqueuer(db_url)
    before = schema_snapshot(db_url)
    printed = cli(db_url, "adapters", "install", "pgqueuer", "--app-id", "billing", "--print")
    assert printed.returncode == 0, printed.stderr
    assert "CREATE TRIGGER dlqd_capture" in printed.stdout
    assert schema_snapshot(db_url) == before
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(printed.stdout.encode())  # as a DBA applies it
    await pgqueuer_enqueue(db_url, "doomed", [b"{}"], {})
    await pgqueuer_worker(db_url)
    [row] = captured(db_url)
    assert row["app_id"] == "billing"
    removal = cli(db_url, "adapters", "uninstall", "pgqueuer", "--print")
    assert removal.returncode == 0, removal.stderr
    assert "DROP TRIGGER IF EXISTS dlqd_capture" in removal.stdout
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(removal.stdout.encode())
    assert schema_snapshot(db_url) == before


async def test_install_refuses_a_schema_it_cannot_capture_from(db_url: str) -> None:
    missing = cli(db_url, "adapters", "install", "pgqueuer")
    assert missing.returncode == 1
    assert missing.stderr.startswith("dlqd: error: pgqueuer: cannot capture from schema")
    assert "no table public.pgqueuer" in missing.stderr
    install_procrastinate(db_url)
    with psycopg.connect(db_url, autocommit=True) as conn:
        # a version whose args are text: the payload could not be kept exactly
        conn.execute("ALTER TABLE procrastinate_jobs ALTER COLUMN args TYPE text")
    before = schema_snapshot(db_url)
    wrong = cli(db_url, "adapters", "install", "procrastinate")
    assert wrong.returncode == 1
    assert "procrastinate_jobs.args is text, not jsonb" in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1
    assert schema_snapshot(db_url) == before


@pytest.mark.parametrize(
    ("app_id", "message"),
    [
        ("job.no_such_column", "--app-id: column job.no_such_column does not exist"),
        ("job.queue_name); DROP TABLE job_dlq; --", "--app-id: is one SQL expression"),
        ("job.queue_name $dlqd_capture$", "--app-id: must not contain"),
        ("", "--app-id: is empty"),
    ],
)
async def test_a_bad_app_id_is_refused_and_installs_nothing(
    db_url: str, app_id: str, message: str
) -> None:
    install_procrastinate(db_url)
    before = schema_snapshot(db_url)
    result = cli(db_url, "adapters", "install", "procrastinate", "--app-id", app_id)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert schema_snapshot(db_url) == before
    assert await scalar(db_url, "SELECT to_regclass('job_dlq') IS NOT NULL")


async def test_adapters_list_needs_no_database() -> None:
    result = dlqd_cli("adapters", "list", "--json")
    assert result.returncode == 0, result.stderr
    found = {a["name"]: a for a in json.loads(result.stdout)}
    assert set(found) == {"procrastinate", "pgqueuer", "pgboss", "river", "graphile_worker", "oban"}
    assert found["procrastinate"]["versions_tested"] == ["3.10.0"]
    assert found["pgqueuer"]["target"]["overrides"] == ["priority", "run_at_delay"]
    for adapter in found.values():
        assert (Path(__file__).parent.parent / adapter["docs"]).is_file()


async def test_no_tenant_can_use_the_capture(db_url: str) -> None:
    """dlqd_capture writes any tenant's rows: only its owner may call it, and
    only the owner may attach a capture function to a table."""
    install_procrastinate(db_url)
    installed(db_url, "procrastinate")
    with psycopg.connect(db_url) as conn:
        [config] = conn.execute(
            "SELECT proconfig FROM pg_proc WHERE prosecdef"
            " AND proname = 'dlqd_capture_procrastinate_public'"
        ).fetchone() or [None]
    # the capture runs with the owner's rights: no name a caller defines reaches it
    assert config == ["search_path=pg_catalog, public, pg_temp"]
    tenant = as_role(db_url, "dlqd_app")
    with psycopg.connect(tenant, autocommit=True) as conn:
        conn.execute("SET app.current_app_id = 'attacker'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT dlqd_capture('x', 'victim', '1', 't', '{}', 'r', 1, '[]', '{}')")
        conn.execute("CREATE TEMP TABLE mine (id bigint, status text)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(
                "CREATE TRIGGER t AFTER UPDATE ON pg_temp.mine FOR EACH ROW"
                " EXECUTE FUNCTION dlqd_capture_procrastinate_public()"
            )
    assert captured(db_url) == []


async def test_a_preset_is_checked_like_any_sql_target(db_url: str, tmp_path: Path) -> None:
    """`dlqd check` plans a preset's statement: a system not installed is named."""
    config = write_config(
        tmp_path / "dlqd.toml",
        """
[[policies]]
name = "redrive"
target = { kind = "procrastinate" }
""",
    )
    result = dlqd_cli("check", "--config", str(config), env={"DLQD_DATABASE_URL": db_url})
    assert result.returncode == 78
    assert "policies[0].target (procrastinate preset):" in result.stderr
    assert "procrastinate_defer_jobs_v1" in result.stderr or "procrastinate" in result.stderr
    install_procrastinate(db_url)
    result = dlqd_cli("check", "--config", str(config), env={"DLQD_DATABASE_URL": db_url})
    assert result.returncode == 0, result.stderr


def test_a_preset_refuses_an_override_its_system_has_not() -> None:
    from dlqd.config import load_settings
    from dlqd.errors import ConfigError

    with pytest.raises(ConfigError, match="PgQueuer jobs take no queue"):
        load_settings(
            database_url="postgresql://localhost/x",
            policies=[{"name": "p", "target": {"kind": "pgqueuer", "queue": "q"}}],
        )
