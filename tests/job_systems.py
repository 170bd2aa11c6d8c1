"""The job systems the adapters are tested against, run by their own code.

Each system's schema is installed by its own tooling (its CLI, in a
subprocess), and its jobs run under its own worker. A job "flaky" fails
while its run count (kept in ``adapter_runs``, written by the job itself) is
below the number of failures asked for, then succeeds: so a job fails for
good under the system's worker, and runs again, and succeeds, after dlqd
replays it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import psycopg

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

RUNS_DDL = """
CREATE TABLE IF NOT EXISTS adapter_runs (
    job     text PRIMARY KEY,
    runs    integer NOT NULL,
    fail_to integer NOT NULL
)
"""


def prepare_runs(db_url: str, job: str, fail_first: int) -> None:
    """``job`` fails its first ``fail_first`` runs, then succeeds."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(RUNS_DDL)
        conn.execute(
            "INSERT INTO adapter_runs (job, runs, fail_to) VALUES (%s, 0, %s)", [job, fail_first]
        )


def runs(db_url: str, job: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT runs FROM adapter_runs WHERE job = %s", [job]).fetchone()
    assert row is not None, f"no run count for {job}"
    return int(row[0])


async def run_once(dsn: str, job: str) -> None:
    """One run of ``job``: counted, and failing while the count is low."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "UPDATE adapter_runs SET runs = runs + 1 WHERE job = %s RETURNING runs, fail_to",
            [job],
        )
        row = await cur.fetchone()
    assert row is not None, f"no run count for {job}"
    if row[0] <= row[1]:
        raise ValueError(f"{job}: run {row[0]} fails on purpose")


def run_tool(*argv: str | Path, env: dict[str, str] | None = None, cwd: Path = ROOT) -> str:
    """Run a job system's own program (its CLI, its worker); its stdout. Any
    exit but 0 fails the test, with what the program said."""
    command = [str(a) for a in argv]
    result = subprocess.run(
        command,
        env=dict(os.environ) if env is None else env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
    )
    assert result.returncode == 0, f"{command[:3]}: {result.stdout}\n{result.stderr}"
    return result.stdout


def own_tool(*args: str, env: dict[str, str]) -> None:
    """Run a job system's own CLI (installed with the test dependencies)."""
    run_tool(BIN / args[0], *args[1:], env={**os.environ, **env})


# --------------------------------------------------------------------------- Procrastinate


def procrastinate_app(dsn: str) -> Any:
    """A Procrastinate app with the test's tasks, on ``dsn``."""
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))

    @app.task(name="flaky", queue="billing", retry=1, pass_context=True)
    async def flaky(context: Any, key: str) -> None:
        await run_once(dsn, key)

    @app.task(
        name="slow_retry",
        queue="billing",
        retry=procrastinate.RetryStrategy(max_attempts=1, wait=3600),  # one retry, in an hour
    )
    async def slow_retry(key: str) -> None:
        await run_once(dsn, key)

    @app.task(name="doomed", queue="bulk")
    async def doomed(n: int) -> None:
        raise RuntimeError(f"doomed {n}")

    return app


#: the module-level app `procrastinate --app` loads, for its schema command
app = None
if os.environ.get("DLQD_PROCRASTINATE_DSN"):
    app = procrastinate_app(os.environ["DLQD_PROCRASTINATE_DSN"])


def install_procrastinate(db_url: str) -> None:
    """Procrastinate's schema, applied by its own CLI."""
    own_tool(
        "procrastinate",
        "--app=tests.job_systems.app",
        "schema",
        "--apply",
        env={"DLQD_PROCRASTINATE_DSN": db_url, "PYTHONPATH": str(ROOT)},
    )


async def procrastinate_worker(db_url: str, queues: list[str], concurrency: int = 1) -> None:
    """Procrastinate's own worker, until no job is left to run now."""
    app = procrastinate_app(db_url)
    async with app.open_async():
        await app.run_worker_async(
            queues=queues, wait=False, concurrency=concurrency, install_signal_handlers=False
        )


# --------------------------------------------------------------------------- PgQueuer


def install_pgqueuer(db_url: str) -> None:
    """PgQueuer's schema, installed by its own CLI (`pgq install`)."""
    own_tool("pgq", "install", env={"PGDSN": db_url})


async def pgqueuer_enqueue(
    db_url: str, entrypoint: str, payloads: list[bytes | None], headers: dict[str, str]
) -> list[int]:
    from pgqueuer import Queries
    from pgqueuer.db import PsycopgDriver

    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        ids = await Queries(PsycopgDriver(conn)).enqueue(
            [entrypoint] * len(payloads),
            payloads,
            [0] * len(payloads),
            headers=[headers] * len(payloads),
        )
    return [int(i) for i in ids]


async def pgqueuer_worker(
    db_url: str, batch_size: int = 10, until: Callable[[], Awaitable[bool]] | None = None
) -> None:
    """PgQueuer's own QueueManager, in drain mode: until the queue is empty.
    Entrypoint ``flaky`` counts runs by its payload's key (on_failure="hold");
    ``doomed`` always fails (hold too); ``retrying`` asks for a retry (in an
    hour) on its first failed run, and fails for good on a later one. With
    ``until``: in continuous mode, until that condition holds."""
    import json

    from pgqueuer import PgQueuer
    from pgqueuer.db import PsycopgDriver
    from pgqueuer.models import Job
    from pgqueuer.types import QueueExecutionMode

    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        pgq = PgQueuer(PsycopgDriver(conn))

        @pgq.entrypoint("flaky", on_failure="hold")
        async def flaky(job: Job) -> None:
            assert job.payload is not None
            await run_once(db_url, json.loads(job.payload)["key"])

        @pgq.entrypoint("doomed", on_failure="hold")
        async def doomed(job: Job) -> None:
            raise RuntimeError("doomed")

        @pgq.entrypoint("retrying", on_failure="hold")
        async def retrying(job: Job) -> None:
            from pgqueuer import RetryRequested

            assert job.payload is not None
            key = json.loads(job.payload)["key"]
            try:
                await run_once(db_url, key)
            except ValueError:
                if runs(db_url, key) == 1:  # the first run asks for a retry, in an hour
                    raise RetryRequested(delay=timedelta(hours=1), reason="later") from None
                raise

        if until is None:
            await pgq.qm.run(
                mode=QueueExecutionMode.drain,
                dequeue_timeout=timedelta(seconds=1),
                batch_size=batch_size,
            )
            return

        async def watch() -> None:
            # a job retried later keeps the queue from draining: stop the
            # worker as its own shutdown does, once the state asked for is reached
            while not await until():  # noqa: ASYNC110 - the state lives in the database
                await anyio.sleep(0.05)
            pgq.qm.shutdown.set()

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                await pgq.qm.run(dequeue_timeout=timedelta(seconds=0.2), batch_size=batch_size)


# --------------------------------------------------------------------------- River

#: River cannot be installed here (its migrations run from its Go CLI): a
#: river_job table with the columns, types, states and checks River documents
#: for its job table, written for these tests. What it proves: the capture
#: fires on River's final failure (state -> discarded, the error appended) and
#: on nothing else, and the replay inserts a row River's schema accepts. Not:
#: that a River worker fetches and runs it.
RIVER_DDL = """
CREATE TYPE river_job_state AS ENUM
    ('available', 'cancelled', 'completed', 'discarded', 'pending', 'retryable', 'running',
     'scheduled');
CREATE TABLE river_job (
    id           bigserial PRIMARY KEY,
    state        river_job_state NOT NULL DEFAULT 'available',
    attempt      smallint NOT NULL DEFAULT 0,
    max_attempts smallint NOT NULL CHECK (max_attempts > 0),
    attempted_at timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now(),
    finalized_at timestamptz,
    scheduled_at timestamptz NOT NULL DEFAULT now(),
    priority     smallint NOT NULL DEFAULT 1 CHECK (priority BETWEEN 1 AND 4),
    args         jsonb NOT NULL,
    attempted_by text[],
    errors       jsonb[],
    kind         text NOT NULL CHECK (char_length(kind) BETWEEN 1 AND 127),
    metadata     jsonb NOT NULL DEFAULT '{}',
    queue        text NOT NULL DEFAULT 'default' CHECK (char_length(queue) BETWEEN 1 AND 127),
    tags         varchar(255)[] NOT NULL DEFAULT '{}',
    unique_key   bytea,
    unique_states bit(8),
    CHECK ((finalized_at IS NULL) = (state NOT IN ('cancelled', 'completed', 'discarded')))
);
"""

#: what River's client runs when a job's attempt fails: the error appended,
#: and the state it goes to (retryable, or discarded when attempts are used up)
RIVER_FAIL = """
UPDATE river_job
   SET state = %(state)s::river_job_state,
       finalized_at = CASE WHEN %(state)s = 'discarded' THEN now() END,
       scheduled_at = CASE WHEN %(state)s = 'retryable' THEN now() + interval '1s'
                           ELSE scheduled_at END,
       errors = array_append(errors, jsonb_build_object(
           'at', now(), 'attempt', attempt, 'error', %(error)s::text, 'trace', 'goroutine 1'))
 WHERE id = %(id)s
"""


def install_river(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(RIVER_DDL)


def river_attempt(db_url: str, job_id: int, *, error: str, final: bool) -> None:
    """One failed attempt of a River job, as River's client records it."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE river_job SET state = 'running', attempt = attempt + 1,"
            " attempted_at = now() WHERE id = %s",
            [job_id],
        )
        conn.execute(
            RIVER_FAIL,
            {"id": job_id, "error": error, "state": "discarded" if final else "retryable"},
        )


# --------------------------------------------------------------------------- Graphile Worker

NODE_DIR = ROOT / "tests" / "node"
NODE_BIN = NODE_DIR / "node_modules" / ".bin"


def node_uri(db_url: str) -> str:
    """``db_url`` (a URI or key=value conninfo) as the URI node-postgres reads."""
    from urllib.parse import quote

    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(db_url)
    host = str(params.get("host") or "127.0.0.1")
    user = quote(str(params.get("user") or "postgres"))
    port = str(params.get("port") or "5432")
    dbname = quote(str(params.get("dbname") or "postgres"))
    if host.startswith("/"):
        return f"postgresql://{user}@/{dbname}?host={quote(host)}&port={port}"
    return f"postgresql://{user}@{host}:{port}/{dbname}"


def _node_env() -> dict[str, str]:
    # the Node of tests/node's lock first: its current majors need Node >= 22
    return {**os.environ, "PATH": f"{NODE_BIN}:{os.environ.get('PATH', '')}"}


def _node(script: str, *args: str) -> str:
    return run_tool(NODE_BIN / "node", NODE_DIR / script, *args, env=_node_env(), cwd=NODE_DIR)


def install_graphile_worker(db_url: str) -> None:
    """Graphile Worker's schema, installed by its own CLI (`graphile-worker --schema-only`)."""
    uri = node_uri(db_url)
    run_tool(NODE_BIN / "graphile-worker", "--connection", uri, "--schema-only", env=_node_env())


def install_pgboss(db_url: str) -> None:
    """pg-boss's schema, created by its own CLI (`pg-boss create`)."""
    uri = node_uri(db_url)
    run_tool(NODE_BIN / "pg-boss", "create", "--connection-string", uri, env=_node_env())


def pgboss_queue(db_url: str, name: str, retry_limit: int, retry_delay: int) -> None:
    _node("pg_boss.mjs", "queue", node_uri(db_url), name, str(retry_limit), str(retry_delay))


def pgboss_send(db_url: str, name: str, data: dict[str, Any]) -> str:
    import json

    out = _node("pg_boss.mjs", "send", node_uri(db_url), name, json.dumps(data))
    return str(json.loads(out.splitlines()[0])["id"])


def pgboss_work(db_url: str, name: str) -> None:
    """pg-boss's own worker (boss.work) on queue ``name``, until nothing is due."""
    _node("pg_boss.mjs", "work", node_uri(db_url), name)


def graphile_worker_run_once(db_url: str) -> None:
    """Graphile Worker's own runOnce: every job due now, then exit."""
    _node("graphile_worker.mjs", node_uri(db_url))


# --------------------------------------------------------------------------- Oban

OBAN_PYTHON = ROOT / ".venv-oban" / "bin" / "python"
OBAN_APP = ROOT / "tests" / "oban" / "oban_app.py"


def _oban(*args: str) -> str:
    assert OBAN_PYTHON.exists(), "no .venv-oban: scripts/test makes it (Python 3.12)"
    # dlqd's own venv must not leak into Oban's interpreter
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    return run_tool(OBAN_PYTHON, *args, env=env)


def install_oban(db_url: str) -> None:
    """Oban's schema, installed by its own CLI (`oban install`)."""
    _oban(str(OBAN_PYTHON.parent / "oban"), "install", "--dsn", db_url)


def oban_enqueue(db_url: str, key: str, max_attempts: int) -> int:
    import json

    return int(json.loads(_oban(str(OBAN_APP), "enqueue", db_url, key, str(max_attempts)))["id"])


def oban_drain(db_url: str) -> dict[str, int]:
    """Oban's own executor: every due job of queue mail, then exit; the outcomes."""
    import json

    out: dict[str, int] = json.loads(_oban(str(OBAN_APP), "drain", db_url).splitlines()[-1])
    return out
