"""Benchmark: insert-to-replay latency and backlog drain rate, against the plain-SQL limit.

    .venv/bin/python bench/replay_bench.py [--latency-rows 1000] [--backlog 50000]

Uses $DLQD_BENCH_DATABASE_URL (a server where it may create databases), else
a throwaway cluster with autovacuum on (--system-server: 127.0.0.1:5432).
Runs real `dlqd run` processes.
Prints its figures; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.pgcluster import Cluster, free_port

INSERT_ONE = """INSERT INTO job_dlq (original_job_id, app_id, type, payload, error_reason, attempts)
                VALUES (%s, 'bench', 'email.send', '{"to": "x@example.com"}', 'timeout', 3)"""
SINK = "CREATE TABLE sink (dlq_id uuid, type text, payload jsonb, app_id text)"
SINK_STATEMENT = (
    "INSERT INTO sink (dlq_id, type, payload, app_id) "
    "VALUES (%(id)s, %(type)s, %(payload)s, %(app_id)s)"
)
SINK_NOTIFIES = """CREATE FUNCTION sink_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN PERFORM pg_notify('replayed', ''); RETURN NULL; END $$;
    CREATE TRIGGER sink_notify AFTER INSERT ON sink
        FOR EACH STATEMENT EXECUTE FUNCTION sink_notify();"""
# the same, once per batch over the relation `replayed`
SINK_SET_STATEMENT = (
    "INSERT INTO sink (dlq_id, type, payload, app_id) "
    "SELECT id, type, payload, app_id FROM replayed"
)


def server_url(stack: ExitStack, *, system: bool = False) -> str:
    """$DLQD_BENCH_DATABASE_URL; else, with ``system``, the machine's server on
    127.0.0.1:5432; else a throwaway cluster with autovacuum on, as operators
    run PostgreSQL (the machine's server runs without it, and a queue table's
    dead tuples then pile up through the whole run)."""
    if url := os.environ.get("DLQD_BENCH_DATABASE_URL"):
        return url
    if system:
        return "postgresql://postgres@127.0.0.1:5432/postgres"
    url = stack.enter_context(Cluster.create()).url()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET autovacuum = on")
        conn.execute("SELECT pg_reload_conf()")
    return url


def dlqd_env(url: str, **settings: str) -> dict[str, str]:
    """The environment of a dlqd process of the benchmark's: ours without its
    DLQD_ variables (dlqd refuses one it does not know, such as
    DLQD_BENCH_DATABASE_URL), then ``url`` and ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLQD_")}
    return {**env, "DLQD_DATABASE_URL": url, **settings}


def fresh_db(admin: str, stack: ExitStack) -> str:
    name = f"dlqd_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}".encode())

    def drop() -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)".encode())

    stack.callback(drop)
    url = make_conninfo(admin, dbname=name)
    subprocess.run(
        [sys.executable, "-m", "dlqd", "migrate"],
        env=dlqd_env(url),
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    return url


def start_daemon(
    url: str, config: str, workdir: Path, concurrency: int = 1
) -> tuple[subprocess.Popen[bytes], int]:
    path = workdir / f"dlqd-{uuid.uuid4().hex[:6]}.toml"
    path.write_text(config)
    port = free_port()
    env = dlqd_env(
        url,
        DLQD_METRICS_HOST="127.0.0.1",
        DLQD_METRICS_PORT=str(port),
        DLQD_REPLAY__CONCURRENCY=str(concurrency),
    )
    log = (workdir / f"{path.stem}.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "dlqd", "run", "--config", str(path)],
        env=env,
        stdout=log,
        stderr=log,
        cwd=ROOT,
    )
    return process, port


def wait_ready(port: int, timeout: float = 30) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("daemon not ready")


def stop(process: subprocess.Popen[bytes]) -> int:
    process.terminate()
    return process.wait(timeout=60)


def wait_drained(url: str) -> None:
    """Poll until the inbox is empty: every row decided. A cheap query (the
    first inbox entry), every 0.2 s: a count over a million pending rows
    would take a core of this 2-CPU machine from the daemon's backend."""
    with psycopg.connect(url, autocommit=True) as conn:
        while conn.execute("SELECT EXISTS (SELECT FROM dlqd_inbox)").fetchone() != (False,):
            time.sleep(0.2)


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentiles(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    q = statistics.quantiles(ms, n=100)
    return f"p50 {q[49]:.2f} ms  p90 {q[89]:.2f} ms  p99 {q[98]:.2f} ms  max {ms[-1]:.2f} ms"


WARM_UP = 100  # round trips before measuring, on the daemon and on the plain trigger alike


def measure_round_trips(url: str, rows: int) -> list[float]:
    """Insert one row, wait for the 'replayed' notification, repeat."""
    samples = []
    with (
        psycopg.connect(url, autocommit=True) as listener,
        psycopg.connect(url, autocommit=True) as writer,
    ):
        listener.execute("LISTEN replayed")
        for i in range(rows):
            started = time.perf_counter()
            writer.execute(INSERT_ONE, [f"lat-{i}"])
            got = next(listener.notifies(timeout=30, stop_after=1), None)
            if got is None:
                raise RuntimeError(f"row {i} was not replayed within 30 s")
            samples.append(time.perf_counter() - started)
    return samples


def latency(admin: str, rows: int, workdir: Path, stack: ExitStack) -> None:
    # plain-SQL limit: a trigger that NOTIFYs 'replayed' itself, no daemon in between
    url = fresh_db(admin, stack)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            """CREATE FUNCTION bench_direct() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN PERFORM pg_notify('replayed', NEW.id::text); RETURN NULL; END $$;
               CREATE TRIGGER bench_direct AFTER INSERT ON job_dlq
                   FOR EACH ROW EXECUTE FUNCTION bench_direct();"""
        )
    measure_round_trips(url, WARM_UP)
    floor = measure_round_trips(url, rows)
    print(f"insert->notify, plain SQL trigger (limit): {percentiles(floor)}")

    url = fresh_db(admin, stack)
    config = """
[listen]
poll_interval = "1h"
[[policies]]
name = "ping"
target = { kind = "notify", channel = "replayed" }
"""
    samples = daemon_round_trips(url, config, rows, workdir)
    print(f"insert->replay via dlqd (notify target):   {percentiles(samples)}")

    # a sql target whose sink tells the bench, by its own trigger, that the
    # replay committed (a notification is delivered at COMMIT)
    url = fresh_db(admin, stack)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SINK.encode())
        conn.execute(SINK_NOTIFIES.encode())
    config = f"""
[listen]
poll_interval = "1h"
[[policies]]
name = "ping"
target = {{ kind = "sql", statement = "{SINK_SET_STATEMENT}" }}
"""
    samples = daemon_round_trips(url, config, rows, workdir)
    print(f"insert->replay via dlqd (sql target):      {percentiles(samples)}")


def daemon_round_trips(
    url: str, config: str, rows: int, workdir: Path, waiting: int | None = None
) -> list[float]:
    """Start a daemon, wait until ``waiting`` rows are scheduled (if given), measure."""
    launched = time.perf_counter()
    process, port = start_daemon(url, config, workdir)
    try:
        wait_ready(port)
        if waiting is not None:
            wait_drained(url)
            wall = time.perf_counter() - launched
            with psycopg.connect(url, autocommit=True) as conn:
                row = conn.execute(
                    """SELECT count(*), extract(epoch FROM max(updated_at) - min(updated_at))
                         FROM dlqd_entry_state WHERE state = 'waiting'"""
                ).fetchone()
            assert row is not None
            assert row[0] == waiting, row
            span = float(row[1])
            print(
                f"scheduling {waiting} delayed rows: first->last page {span:.2f} s = "
                f"{waiting / span:,.0f} rows/s (wall incl. start-up {wall:.2f} s)"
            )
            # the steady state with that many rows waiting: what autovacuum
            # leaves within a minute of the burst (the inbox's dead entries gone)
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("VACUUM ANALYZE dlqd_inbox, dlqd_entry_state, job_dlq")
        measure_round_trips(url, WARM_UP)  # steady state: statements prepared, caches warm
        return measure_round_trips(url, rows)
    finally:
        stop(process)


def latency_with_waiting(
    admin: str, rows: int, waiting: int, workdir: Path, stack: ExitStack, *, jitter: float = 0.0
) -> None:
    """The same round trip while many rows wait for a later due time (the
    delay ± ``jitter``: computed in SQL, as in Python, for express pages)."""
    url = fresh_db(admin, stack)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO job_dlq (original_job_id, app_id, type, payload, error_reason, attempts)
               SELECT 'w' || g, 'app', 'slow', '{}', 'timeout', 3 FROM generate_series(1, %s) g""",
            [waiting],
        )
    # the limit: their schedule rows inserted by one statement (rolled back)
    with psycopg.connect(url) as conn:
        started = time.perf_counter()
        conn.execute(
            """INSERT INTO dlqd_entry_state (dlq_id, state, policy, fingerprint, due_at)
               SELECT id, 'waiting', 'slow', 'bench', dlq_at + interval '1 day' FROM job_dlq"""
        )
        elapsed = time.perf_counter() - started
        conn.rollback()
    print(
        f"scheduling {waiting} delayed rows, one plain SQL statement (limit): "
        f"{elapsed:.2f} s = {waiting / elapsed:,.0f} rows/s"
    )
    config = f"""
[listen]
poll_interval = "1h"
[[policies]]
name = "slow"
match = {{ type = ["slow"] }}
delay = "1d"
jitter = {jitter}
target = {{ kind = "notify", channel = "never" }}
[[policies]]
name = "ping"
target = {{ kind = "notify", channel = "replayed" }}
"""
    if jitter:
        print(f"(the delayed policy has jitter = {jitter})")
    samples = daemon_round_trips(url, config, rows, workdir, waiting)
    print(f"insert->replay with {waiting} rows waiting:  {percentiles(samples)}")


_SEEDS: dict[tuple[int, int], str] = {}  # (backlog, types) -> a template database
_COPIES: list[str] = []  # the copy the last run used


def seeded(admin: str, stack: ExitStack, backlog: int, types: int = 1) -> str:
    """A fresh database with a sink and ``backlog`` pending rows, vacuumed. One
    type (``email.send``), or ``types`` of them in turn (``t00.event``, …).
    Seeded once per (backlog, types) into a template, then copied: 10,000,000
    rows take minutes to insert and vacuum, and seconds to copy."""
    template = _SEEDS.get((backlog, types))
    if template is None:
        template = make_seed(admin, stack, backlog, types)
        _SEEDS[(backlog, types)] = template
    name = f"dlqd_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        for previous in _COPIES:  # runs go one after another: the last one's copy is done
            conn.execute(f"DROP DATABASE IF EXISTS {previous} WITH (FORCE)".encode())
        _COPIES[:] = [name]
        copy = " STRATEGY FILE_COPY" if conn.info.server_version >= 150000 else ""
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {template}{copy}".encode())

    def drop() -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)".encode())

    stack.callback(drop)
    return make_conninfo(admin, dbname=name)


def make_seed(admin: str, stack: ExitStack, backlog: int, types: int) -> str:
    url = fresh_db(admin, stack)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SINK.encode())
        conn.execute(
            """INSERT INTO job_dlq (original_job_id, app_id, type, payload, error_reason,
                                    attempts, dlq_at)
               SELECT 'b' || g, 'app-' || (g %% 20),
                      CASE WHEN %(types)s = 1 THEN 'email.send'
                           ELSE 't' || lpad((g %% %(types)s)::text, 2, '0') || '.event' END,
                      jsonb_build_object('to', 'u' || g || '@example.com', 'n', g),
                      -- a millisecond apart, the last an hour ago: every dlq_at in
                      -- the past (10,000,000 rows span 2.8 hours; from an hour ago
                      -- on, most would lie in the future and be parked as bad rows)
                      'timeout', 3,
                      now() - interval '1 hour' - (%(backlog)s - g) * interval '1 ms'
                 FROM generate_series(1, %(backlog)s) g""",
            {"types": types, "backlog": backlog},
        )
        conn.execute("VACUUM ANALYZE job_dlq")
        name = conn.info.dbname
    return name


def drain(
    admin: str,
    backlog: int,
    workdir: Path,
    stack: ExitStack,
    forms: list[str],
    *,
    max_replays: int | None = None,
    daemon_counts: list[int] | None = None,
) -> None:

    # plain-SQL limits: everything in one statement; then batches of BATCH rows
    # claimed with SKIP LOCKED, marked and sunk, one statement per batch, on 1
    # and 2 connections (the limit the daemon is held to)
    url = seeded(admin, stack, backlog)
    with psycopg.connect(url, autocommit=True) as conn:
        started = time.perf_counter()
        conn.execute(
            """WITH due AS (UPDATE job_dlq SET replayed_at = now() WHERE replayed_at IS NULL
                            RETURNING id, type, payload, app_id)
               INSERT INTO sink SELECT id, type, payload, app_id FROM due"""
        )
        elapsed = time.perf_counter() - started
    print(
        f"drain {backlog} rows, one plain SQL statement: "
        f"{elapsed:.2f} s = {backlog / elapsed:,.0f} rows/s"
    )
    limits: dict[int, float] = {}
    for connections in (1, 2):
        url = seeded(admin, stack, backlog)
        elapsed = batched_limit(url, connections, BATCH_STATEMENT)
        limits[connections] = backlog / elapsed
        print(
            f"drain {backlog} rows, plain SQL batches of {BATCH} x {connections} connection(s) "
            f"(limit): {elapsed:.2f} s = {limits[connections]:,.0f} rows/s"
        )
    # the same, also doing the writes dlqd must do: its inbox entries deleted
    # and a replay log row per replay
    for connections in (1, 2):
        url = seeded(admin, stack, backlog)
        elapsed = batched_limit(url, connections, BATCH_WITH_LOG_STATEMENT)
        print(
            f"drain {backlog} rows, plain SQL batches of {BATCH} x {connections} connection(s) "
            f"with dlqd's inbox and replay log writes: {elapsed:.2f} s = "
            f"{backlog / elapsed:,.0f} rows/s"
        )

    runs = [
        ("per-row", SINK_STATEMENT, 1, 1),
        ("per-row", SINK_STATEMENT, 1, 4),
        ("set-based", SINK_SET_STATEMENT, 1, 1),
        ("set-based", SINK_SET_STATEMENT, 2, 1),
        ("set-based", SINK_SET_STATEMENT, 1, 2),
        ("set-based", SINK_SET_STATEMENT, 1, 4),
    ]
    if daemon_counts:  # replicas of one worker each, for each form
        statements = {"per-row": SINK_STATEMENT, "set-based": SINK_SET_STATEMENT}
        runs = [(form, statements[form], 1, n) for form in forms for n in daemon_counts]
    for form, statement, concurrency, daemons in (r for r in runs if r[0] in forms):
        capped = "" if max_replays is None else f"max_replays = {max_replays}\n"
        config = f"""
[listen]
poll_interval = "1h"
[[policies]]
name = "all"
{capped}target = {{ kind = "sql", statement = "{statement}" }}
[replay]
batch_size = {BATCH}
"""
        url = seeded(admin, stack, backlog)
        processes = [start_daemon(url, config, workdir, concurrency) for _ in range(daemons)]
        started = time.perf_counter()
        wait_drained(url)
        wall = time.perf_counter() - started
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT extract(epoch FROM max(replayed_at) - min(replayed_at)), "
                "(SELECT count(*) FROM sink), (SELECT count(DISTINCT dlq_id) FROM sink) "
                "FROM job_dlq"
            ).fetchone()
        rss = [peak_rss_mib(p.pid) for p, _ in processes]
        for process, _ in processes:
            stop(process)
        assert row is not None
        span, sunk, distinct = float(row[0]), row[1], row[2]
        limit = limits[min(2, daemons * concurrency)]
        missing = "" if sunk == backlog else f" - NOT A DRAIN: {backlog - sunk} rows not replayed"
        print(
            f"drain {backlog} rows, {form} target, {daemons} daemon(s) x {concurrency} worker(s): "
            f"{span:.2f} s first->last replay = {sunk / span:,.0f} rows/s "
            f"= {sunk / span / limit:.2f}x the {min(2, daemons * concurrency)}-connection limit "
            f"(wall incl. start-up {wall:.2f} s); sink {sunk} rows, {distinct} distinct; "
            f"peak RSS {', '.join(f'{r:.0f}' for r in rss)} MiB{missing}"
        )


BATCH = 5000
BATCH_STATEMENT = f"""
WITH claimed AS (SELECT id FROM job_dlq WHERE replayed_at IS NULL
                  LIMIT {BATCH} FOR UPDATE SKIP LOCKED),
     marked AS (UPDATE job_dlq j SET replayed_at = now() FROM claimed c WHERE j.id = c.id
                RETURNING j.id, j.type, j.payload, j.app_id)
INSERT INTO sink SELECT id, type, payload, app_id FROM marked"""


BATCH_WITH_LOG_STATEMENT = f"""
WITH claimed AS (SELECT seq, dlq_id FROM dlqd_inbox ORDER BY seq
                  LIMIT {BATCH} FOR UPDATE SKIP LOCKED),
     inbox AS (DELETE FROM dlqd_inbox WHERE seq IN (SELECT seq FROM claimed)),
     marked AS (UPDATE job_dlq j SET replayed_at = now()
                 WHERE j.id = ANY (ARRAY(SELECT dlq_id FROM claimed)) AND j.replayed_at IS NULL
                RETURNING j.id, j.original_job_id, j.app_id, j.type, j.payload),
     logged AS (INSERT INTO dlqd_replay_log (dlq_id, original_job_id, app_id, policy, outcome)
                SELECT id, original_job_id, app_id, 'all', 'replayed' FROM marked)
INSERT INTO sink SELECT id, type, payload, app_id FROM marked"""


def batched_limit(url: str, connections: int, statement: str) -> float:
    """Seconds to drain the backlog in batches, on ``connections`` threads."""
    import threading

    def worker() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            while conn.execute(statement.encode()).rowcount:
                pass

    threads = [threading.Thread(target=worker) for _ in range(connections)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


MIX_TYPES = 20  # t00 .. t19: 18 replayed at once, t18 delayed, t19 parked


def _gates(i: int) -> str:
    """The issue's mix: jitter on half the policies, max_replays on a quarter,
    a rate limit high enough not to bind on one."""
    lines = []
    if i % 2 == 0:
        lines.append("jitter = 0.1")
    if i % 4 == 1:
        lines.append("max_replays = 5")
    if i == 3:
        lines.append('rate_limit = "100000/s"')
    return "".join(f"{line}\n" for line in lines)


def mix_config(gates: bool = False) -> str:
    """20 policies with globs: 18 replay at once (each its own type glob and
    an error_reason glob), one delays (5% of the rows), one parks (5%).
    ``gates``: with the jitter, max_replays and rate limit of :func:`_gates`."""
    policies = [
        f"""[[policies]]
name = "p{i:02d}"
match = {{ type = ["t{i:02d}.*"], error_reason = ["time*", "net*"] }}
{_gates(i) if gates else ""}target = {{ kind = "sql", statement = "{SINK_SET_STATEMENT}" }}
"""
        for i in range(MIX_TYPES - 2)
    ]
    policies.append(
        f"""[[policies]]
name = "later"
match = {{ type = ["t18.*"] }}
delay = "1d"
backoff = "fixed"
target = {{ kind = "sql", statement = "{SINK_SET_STATEMENT}" }}
"""
    )
    policies.append(
        """[[policies]]
name = "hold"
match = { type = ["t19.*"] }
action = "park"
"""
    )
    return f"""
[listen]
poll_interval = "1h"
[replay]
batch_size = {BATCH}
""" + "\n".join(policies)


def policy_mix(
    admin: str, backlog: int, workdir: Path, stack: ExitStack, *, gates: bool = False
) -> None:
    """The backlog over 20 policies: time until every row is decided (replayed,
    scheduled or parked), beside the 1-connection limit of the same rows."""
    url = seeded(admin, stack, backlog, MIX_TYPES)
    limit = backlog / batched_limit(url, 1, BATCH_STATEMENT)
    print(f"policy mix, {backlog} rows: plain SQL batches of {BATCH} (limit): {limit:,.0f} rows/s")
    url = seeded(admin, stack, backlog, MIX_TYPES)
    process, _ = start_daemon(url, mix_config(gates), workdir)
    replayed = backlog * (MIX_TYPES - 2) // MIX_TYPES
    wait_drained(url)
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            """SELECT extract(epoch FROM clock_timestamp() - min(replayed_at)),
                      (SELECT count(*) FROM sink), (SELECT count(DISTINCT dlq_id) FROM sink),
                      (SELECT count(*) FROM dlqd_entry_state WHERE state = 'waiting'),
                      (SELECT count(*) FROM dlqd_entry_state WHERE state = 'parked_policy')
                 FROM job_dlq"""
        ).fetchone()
    rss = peak_rss_mib(process.pid)
    stop(process)
    assert row is not None
    span = float(row[0])
    print(
        f"policy mix, {backlog} rows, 1 daemon x 1 worker: every row decided {span:.2f} s after "
        f"the first replay = {backlog / span:,.0f} rows/s = {backlog / span / limit:.2f}x the "
        f"limit; sink {row[1]} rows ({row[2]} distinct, {replayed} expected), {row[3]} "
        f"scheduled, {row[4]} parked; peak RSS {rss:.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latency-rows", type=int, default=1000)
    parser.add_argument("--backlog", type=int, default=50_000)
    parser.add_argument("--waiting", type=int, default=100_000)
    parser.add_argument("--drain-only", action="store_true", help="skip the latency runs")
    parser.add_argument("--latency-only", action="store_true", help="skip the drain runs")
    parser.add_argument("--mix", action="store_true", help="also drain over 20 policies")
    parser.add_argument(
        "--rate-limit", type=int, default=0, help="only: a rate limit of N/s held by replicas"
    )
    parser.add_argument("--rate-seconds", type=int, default=60)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument(
        "--mix-gates",
        action="store_true",
        help="the mix with jitter on half the policies, max_replays on a quarter, a rate limit",
    )
    parser.add_argument(
        "--jitter", type=float, default=0.0, help="the delayed policy's jitter (0 to 1)"
    )
    parser.add_argument(
        "--system-server",
        action="store_true",
        help="use 127.0.0.1:5432 (autovacuum off there) instead of a cluster of its own",
    )
    parser.add_argument(
        "--forms", default="per-row,set-based", help="drain target forms to run (comma-separated)"
    )
    parser.add_argument(
        "--max-replays", type=int, help="the drain's policy counts replays (max_replays = N)"
    )
    parser.add_argument(
        "--daemons",
        help="the drain's runs: these numbers of replicas (e.g. 1,2,4), one worker each",
    )
    args = parser.parse_args()
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        admin = server_url(stack, system=args.system_server)
        print(f"dlqd bench: {os.cpu_count()} cpus, PostgreSQL {_version(admin)}")
        if args.rate_limit:
            rate_limited(
                admin,
                args.rate_limit,
                seconds=args.rate_seconds,
                replicas=args.replicas,
                workdir=Path(tmp),
                stack=stack,
            )
            return
        if not args.drain_only:
            latency(admin, args.latency_rows, Path(tmp), stack)
            latency_with_waiting(
                admin, args.latency_rows, args.waiting, Path(tmp), stack, jitter=args.jitter
            )
        if not args.latency_only:
            forms = args.forms.split(",")
            counts = [int(n) for n in args.daemons.split(",")] if args.daemons else None
            drain(
                admin,
                args.backlog,
                Path(tmp),
                stack,
                forms,
                max_replays=args.max_replays,
                daemon_counts=counts,
            )
            if args.mix:
                policy_mix(admin, args.backlog, Path(tmp), stack, gates=args.mix_gates)


def rate_limited(
    admin: str, rate: int, *, seconds: int, replicas: int, workdir: Path, stack: ExitStack
) -> None:
    """A backlog under one policy with ``rate_limit = "<rate>/s"`` on
    ``replicas`` daemons: replays per second over ``seconds``, from the rows'
    own replayed_at (the first 5 s left out: the bucket starts full), and
    how many of them express pages replayed (the daemons' batch lines)."""
    backlog = rate * (seconds + 10) * 2
    url = seeded(admin, stack, backlog)
    config = f"""
[listen]
poll_interval = "1h"
[[policies]]
name = "limited"
rate_limit = "{rate}/s"
target = {{ kind = "sql", statement = "{SINK_SET_STATEMENT}" }}
"""
    processes = [start_daemon(url, config, workdir) for _ in range(replicas)]
    for _, port in processes:
        wait_ready(port)
    with psycopg.connect(url, autocommit=True) as conn:
        while conn.execute("SELECT EXISTS (SELECT FROM sink)").fetchone() != (True,):
            time.sleep(0.1)
        time.sleep(seconds + 6)
        row = conn.execute(
            """SELECT count(*) FROM job_dlq, (SELECT min(replayed_at) AS t0 FROM job_dlq) f
                WHERE replayed_at >= f.t0 + interval '5 seconds'
                  AND replayed_at < f.t0 + interval '5 seconds' + %s * interval '1 second'""",
            [seconds],
        ).fetchone()
    for process, _ in processes:
        stop(process)
    express = ordinary = 0
    for log in workdir.glob("dlqd-*.log"):
        for line in log.read_text().splitlines():
            if '"event": "batch"' in line and '"policies": {"limited"' in line:
                replayed = json.loads(line).get("replayed", 0)
                if '"express": true' in line:
                    express += replayed
                else:
                    ordinary += replayed
        log.unlink()
    assert row is not None
    got = int(row[0]) / seconds
    print(
        f"rate limit {rate}/s, {replicas} replicas, {seconds} s: {got:,.1f} replays/s "
        f"= {got / rate - 1:+.2%} off the limit; replayed by express pages {express:,}, "
        f"by the ordinary path {ordinary:,}"
    )


def _version(url: str) -> str:
    with psycopg.connect(url) as conn:
        row = conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "?"


if __name__ == "__main__":
    main()
