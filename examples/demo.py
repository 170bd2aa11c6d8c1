"""The demo behind scripts/demo: a throwaway Postgres, the daemon, a stream of failing jobs.

scripts/demo                 # until Ctrl-C
scripts/demo --duration 20   # stop by itself

With DLQD_DATABASE_URL set, the demo runs on that server in a database of its
own (``dlqd_demo``, or ``--database NAME``), created at the start and dropped
at the end (``--keep`` keeps it): it never writes into the database the URL
names.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dlqd.db.connector import connect
from dlqd.db.migrations import migrate
from tests.pgcluster import Cluster, free_port

DEMO_TABLE = """
CREATE TABLE IF NOT EXISTS demo_jobs (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    type      text NOT NULL,
    payload   jsonb NOT NULL,
    app_id    text NOT NULL,
    replay_of uuid NOT NULL,
    at        timestamptz NOT NULL DEFAULT now()
)
"""

JOBS = [
    ("shop", "email.send", "timeout"),
    ("shop", "webhook.deliver", "network"),
    ("shop", "email.send", "poison"),
    ("billing", "invoice.generate", "max_attempts"),
    ("crm", "sync.contacts", "timeout"),  # matches no policy: stays pending, unmatched
]


def say(message: str) -> None:
    print(f"demo | {message}", file=sys.stderr, flush=True)


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except (urllib.error.URLError, OSError):
        return 0, ""


def replay_lines(port: int) -> list[str]:
    _, text = http_get(port, "/metrics")
    return [line for line in text.splitlines() if line.startswith("dlqd_replays_total{")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument("--rate", type=float, default=4.0, help="failing jobs per second")
    parser.add_argument(
        "--database", default="dlqd_demo", help="with DLQD_DATABASE_URL: the demo's own database"
    )
    parser.add_argument("--keep", action="store_true", help="keep the demo's database at the end")
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        url = os.environ.get("DLQD_DATABASE_URL")
        if url:
            url = own_database(url, args.database, keep=args.keep, stack=stack)
            if url is None:
                return 1
        else:
            say("no DLQD_DATABASE_URL: starting a throwaway PostgreSQL")
            cluster = stack.enter_context(Cluster.create())
            url = cluster.url()
            say(f"throwaway PostgreSQL on 127.0.0.1:{cluster.port} in {cluster.root}")
            # a throwaway cluster has no password: safe to print, ready to paste
            say(f"try the CLI against it (in another terminal):  export DLQD_DATABASE_URL='{url}'")

        import anyio

        async def prepare() -> None:
            conn = await connect(url, autocommit=True)
            try:
                for migration in await migrate(conn):
                    say(f"applied migration {migration.version:03d}_{migration.name}")
                await conn.execute(DEMO_TABLE)
            finally:
                await conn.close()

        anyio.run(prepare)

        # the contract's default port when free; 0 (or a busy port) picks a free one
        wanted = int(os.environ.get("DLQD_METRICS_PORT") or 9464)
        port = wanted
        if port == 0 or not _port_free(port):
            port = free_port()
            if wanted:
                say(f"port {wanted} is in use: serving the metrics on {port} instead")
        env = {
            **os.environ,
            "DLQD_DATABASE_URL": url,
            "DLQD_METRICS_HOST": "127.0.0.1",
            "DLQD_METRICS_PORT": str(port),
        }
        # From here on a stop signal stops everything in order, also while the
        # daemon starts. Both are set explicitly: a shell starting us in the
        # background ignores SIGINT.
        stop = Stop()
        signal.signal(signal.SIGTERM, stop.set)
        signal.signal(signal.SIGINT, stop.set)
        daemon = subprocess.Popen(
            [sys.executable, "-m", "dlqd", "run", "--config", str(ROOT / "examples/dlqd.toml")],
            env=env,
            cwd=ROOT,
        )
        stopped = False

        def stop_daemon() -> None:
            nonlocal stopped
            if not stopped:
                stopped = True
                _stop(daemon)

        stack.callback(stop_daemon)
        deadline = time.monotonic() + 30
        while http_get(port, "/readyz")[0] != 200 and not stop.requested:
            if daemon.poll() is not None or time.monotonic() > deadline:
                say("the daemon did not become ready")
                return 1
            time.sleep(0.1)
        if not stop.requested:
            say(f"dlqd is ready: http://127.0.0.1:{port}/metrics  /readyz  /healthz")

        stop_at = time.monotonic() + args.duration if args.duration else None
        rng = random.Random()
        returning: list[str] = []  # jobs that fail again after a replay
        n = 0
        next_report = time.monotonic() + 5
        with psycopg.connect(url, autocommit=True) as conn:
            try:
                while not stop.requested and (stop_at is None or time.monotonic() < stop_at):
                    app_id, type_, reason = rng.choice(JOBS)
                    if returning and rng.random() < 0.3:
                        job_id = returning.pop(0)  # the same job dead-letters again
                    else:
                        job_id = f"job-{uuid.uuid4().hex[:8]}"
                        returning.append(job_id)
                    conn.execute(
                        """INSERT INTO job_dlq (original_job_id, app_id, type, payload,
                                                error_reason, attempts, error_history)
                           VALUES (%s, %s, %s, %s, %s, %s, %s)""",
                        [
                            job_id,
                            app_id,
                            type_,
                            Jsonb({"n": n}),
                            reason,
                            rng.randint(1, 12),
                            Jsonb([{"error": reason}]),
                        ],
                    )
                    n += 1
                    if time.monotonic() >= next_report:
                        next_report += 5
                        row = conn.execute(
                            "SELECT count(*) FILTER (WHERE replayed_at IS NULL), "
                            "count(replayed_at), (SELECT count(*) FROM demo_jobs) FROM job_dlq"
                        ).fetchone()
                        pending, replayed, jobs = row if row else (0, 0, 0)
                        say(
                            f"inserted {n}  pending {pending}  replayed {replayed}  "
                            f"demo_jobs {jobs}"
                        )
                        for line in replay_lines(port):
                            say(f"  {line}")
                    time.sleep(1 / args.rate)
            except KeyboardInterrupt:
                pass
        metrics = replay_lines(port)
        say("stopping the daemon")
        stop_daemon()  # its last lines come before the summary
        print(json.dumps({"inserted": n, "metrics": metrics}), flush=True)
    return 0


class Stop:
    """Set by SIGINT or SIGTERM: the stream ends and everything stops in order."""

    def __init__(self) -> None:
        self.requested = False

    def set(self, *_: object) -> None:
        self.requested = True


def own_database(url: str, name: str, *, keep: bool, stack: contextlib.ExitStack) -> str | None:
    """A database of the demo's own on the server ``url`` names (created anew),
    dropped at the end unless ``keep``; None (said why) when it cannot be made."""
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from dlqd.db.connector import describe_dsn

    statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
    server = describe_dsn(url).rsplit("/", 1)[0]
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(drop)
            conn.execute(statement)
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        say(
            f"the demo runs in a database of its own ({name}), which the role of "
            f"DLQD_DATABASE_URL cannot create on {server}: {reason}; unset DLQD_DATABASE_URL "
            "for a throwaway PostgreSQL"
        )
        return None
    if not keep:

        def dropped() -> None:
            with contextlib.suppress(psycopg.Error), psycopg.connect(url, autocommit=True) as conn:
                conn.execute(drop)

        stack.callback(dropped)
    own = make_conninfo(url, dbname=name)
    say(
        f"DLQD_DATABASE_URL: the demo's own database {name} on {server}"
        f" ({'kept' if keep else 'dropped'} at the end); nothing is written to "
        f"{conninfo_to_dict(url).get('dbname') or 'the database the URL names'}"
    )
    return own


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        # as the daemon binds: a port in TIME-WAIT after a previous run is free
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _stop(daemon: subprocess.Popen[bytes]) -> None:
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()


if __name__ == "__main__":
    raise SystemExit(main())
