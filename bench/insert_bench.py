"""Benchmark: what dlqd's triggers cost the job system's concurrent inserts.

    .venv/bin/python bench/insert_bench.py [--clients 8] [--seconds 15] [--rounds 3]

On its own throwaway cluster with autovacuum on. pgbench runs ``--clients``
sessions, each inserting one row per transaction into ``job_dlq`` (as a job
system dead-letters one job at a time), in these setups, interleaved round by
round:

- ``no triggers``: the table without dlqd's triggers: the plain-SQL limit;
- ``installed, no worker listening``: the inbox entry of every insert (which
  counts its row: migration 023), no NOTIFY (no daemon, or every worker
  draining a backlog);
- ``installed, a worker listening``: the same plus one NOTIFY per insert (a
  worker's fresh row in ``dlqd_wake``, as an idle daemon has);
- ``installed, dlqd run replaying``: a real daemon replaying every row into a
  sink table as it comes (it competes for the same CPUs).

Prints each setup's median transactions per second and its ratio to the
limit. ``--durable``: commits wait for the disk (fsync and synchronous_commit
on, as in production); without it the cluster runs as the tests' do, and the
inserts are bound by CPU instead. ``--system-server``: a database of its own
on the machine's server (127.0.0.1:5432, whose commits wait for its disk)
instead of a throwaway cluster. Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import migrated_cluster  # type: ignore[import-not-found]

from dlqd.db.connector import connect
from dlqd.db.migrations import migrate
from tests.pgcluster import find_bindir

INSERT = (
    "INSERT INTO job_dlq (original_job_id, app_id, type, payload, error_reason, attempts)"
    " VALUES ('job-' || :client_id || '-' || random(), 'app-' || (:client_id % 7),"
    " 'type.' || (:client_id % 5), '{\"n\": 1}', 'timeout', 3);\n"
)
SINK = "INSERT INTO sink (dlq_id) SELECT id FROM replayed"


def pgbench(url: str, script: Path, clients: int, seconds: int) -> float:
    out = subprocess.run(
        [
            str(find_bindir() / "pgbench"),
            "-n",
            "-c",
            str(clients),
            "-j",
            str(min(clients, os.cpu_count() or 1)),
            "-T",
            str(seconds),
            "-f",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = re.search(r"tps = ([0-9.]+) \(without initial connection", out)
    if found is None:
        raise RuntimeError(f"no tps in pgbench's output: {out}")
    return float(found.group(1))


class Daemon:
    """``dlqd run`` replaying every row into the sink."""

    def __init__(self, url: str, folder: Path) -> None:
        self.config = folder / "dlqd.toml"
        self.config.write_text(
            f"""
[listen]
poll_interval = "30s"

[[policies]]
name = "all"
target = {{ kind = "sql", statement = "{SINK}" }}
"""
        )
        self.url = url
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Daemon:
        env = {
            **os.environ,
            "DLQD_DATABASE_URL": self.url,
            "DLQD_METRICS_HOST": "127.0.0.1",
            "DLQD_METRICS_PORT": "0",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dlqd", "run", "--config", str(self.config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.terminate()
        self.process.wait(timeout=30)


async def wait_for_worker(url: str) -> None:
    with anyio.fail_after(30):
        while True:
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                cur = await conn.execute("SELECT count(*) FROM dlqd_wake")
                row = await cur.fetchone()
                if row and row[0]:
                    return
            await anyio.sleep(0.1)


async def setup(url: str, name: str) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("DELETE FROM dlqd_wake")
        trigger = "DISABLE" if name == "no triggers" else "ENABLE"
        await conn.execute(f"ALTER TABLE job_dlq {trigger} TRIGGER USER")
        if name == "installed, a worker listening":
            # a listening worker's row, kept fresh for the run's length
            await conn.execute(
                "INSERT INTO dlqd_wake (worker, beat) VALUES ('bench', now() + interval '1 hour')"
            )


@asynccontextmanager
async def system_database() -> AsyncIterator[str]:
    """A migrated database of its own on the machine's server, dropped afterwards."""
    admin = "postgresql://postgres@127.0.0.1:5432/postgres"
    name = f"dlqd_insert_bench_{uuid.uuid4().hex[:8]}"
    async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
        await conn.execute(f"CREATE DATABASE {name}".encode())
    url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    try:
        conn = await connect(url, autocommit=True)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        yield url
    finally:
        async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)".encode())


async def main(clients: int, seconds: int, rounds: int, durable: bool, system: bool) -> None:
    setups = [
        "no triggers",
        "installed, no worker listening",
        "installed, a worker listening",
        "installed, dlqd run replaying",
    ]
    results: dict[str, list[float]] = {name: [] for name in setups}
    database = system_database() if system else migrated_cluster(durable=durable)
    async with database as url:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute("CREATE TABLE sink (dlq_id uuid PRIMARY KEY)")
        # one LISTEN session that consumes, as a daemon's listener does
        listener = await psycopg.AsyncConnection.connect(url, autocommit=True)
        await listener.execute("LISTEN dlqd_job_dlq")
        with tempfile.TemporaryDirectory() as folder:
            script = Path(folder) / "insert.sql"
            script.write_text(INSERT)
            for round_ in range(1, rounds + 1):
                for name in setups:
                    await setup(url, name)
                    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                        await conn.execute("CHECKPOINT")
                    if name == "installed, dlqd run replaying":
                        with Daemon(url, Path(folder)):
                            await wait_for_worker(url)
                            tps = await anyio.to_thread.run_sync(
                                pgbench, url, script, clients, seconds
                            )
                    else:
                        tps = await anyio.to_thread.run_sync(pgbench, url, script, clients, seconds)
                    results[name].append(tps)
                    print(f"round {round_}: {name:<32} {tps:8.0f} tps", flush=True)
                    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                        # the next setup starts from a table of the same shape
                        await conn.execute("TRUNCATE job_dlq CASCADE")
                        await conn.execute("TRUNCATE sink")
                        await conn.execute("VACUUM ANALYZE job_dlq")
                        # every setup starts right after a checkpoint: the same
                        # full-page writes for each (a checkpoint in the middle of
                        # one run halves it)
                        await conn.execute("CHECKPOINT")
                    await anyio.sleep(1)  # checkpoint and autovacuum settle
        await listener.close()
    limit = statistics.median(results["no triggers"])
    commits = "the machine's server" if system else "durable" if durable else "fsync off"
    print(f"\n{clients} sessions, one row per transaction, {seconds} s x {rounds}, {commits}")
    for name in setups:
        median = statistics.median(results[name])
        spread = f"min {min(results[name]):.0f}, max {max(results[name]):.0f}"
        print(f"{name:<32} median {median:8.0f} tps ({spread}); {median / limit:.2f}x the limit")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--durable", action="store_true")
    parser.add_argument("--system-server", action="store_true")
    args = parser.parse_args()
    anyio.run(main, args.clients, args.seconds, args.rounds, args.durable, args.system_server)
