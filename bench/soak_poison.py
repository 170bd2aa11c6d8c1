"""Soak: a steady stream with poison rows and a listener killed every minute.

    .venv/bin/python bench/soak_poison.py --minutes 30 [--rate 100] [--failing 0.02]

Starts its own throwaway cluster (autovacuum on, as operators run it), one
`dlqd run` (default policy settings: retry_delay 1s, max_failures 10, the
default circuit breaker), and inserts ``--rate`` single-row statements a
second, of which ``--failing`` always fail in the target (a function that
raises). Every minute it terminates the daemon's LISTEN backend and prints:
the good rows' backlog, their insert-to-replay latency p50/p99 over the
minute, rows parked, whether the circuit was open, the daemon's RSS and open
file descriptors. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.pgcluster import Cluster, free_port

SETUP = """
CREATE TABLE sink (dlq_id uuid PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE FUNCTION soak_enqueue(id uuid, reason text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF reason = 'poison' THEN
        RAISE EXCEPTION 'soak: this job always fails';
    END IF;
    INSERT INTO sink (dlq_id) VALUES (id);
END $$;
"""
CONFIG = """
[listen]
poll_interval = "30s"
probe_interval = "10s"

[[policies]]
name = "all"
target = { kind = "sql", statement = "SELECT soak_enqueue(%(id)s, %(error_reason)s)" }
"""
INSERT = """INSERT INTO job_dlq (original_job_id, app_id, type, payload, error_reason, attempts)
            VALUES (%s, 'soak', 'email.send', '{"n": 1}', %s, 3)"""
MINUTE_FIGURES = """
SELECT (SELECT count(*) FROM job_dlq WHERE replayed_at IS NULL AND error_reason <> 'poison')
           AS good_backlog,
       (SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY
               extract(epoch FROM s.at - j.dlq_at))
          FROM sink s JOIN job_dlq j ON j.id = s.dlq_id
         WHERE s.at >= now() - interval '60 seconds') AS latency,
       (SELECT count(*) FROM dlqd_entry_state WHERE state = 'parked') AS parked,
       (SELECT count(*) FROM sink) AS replayed
"""


def metric(port: int, name: str) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name):
                    return float(line.rsplit(" ", 1)[1])
    except OSError:
        pass
    return float("nan")


def proc_figures(pid: int) -> tuple[float, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(next(x for x in status.splitlines() if x.startswith("VmRSS")).split()[1]) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def wait_ready(port: int, daemon: subprocess.Popen[bytes]) -> None:
    """Until /readyz says 200 (the daemon is listening), or the daemon exited."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise SystemExit(f"dlqd exited {daemon.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)  # another process's readiness: nothing to wait on but its answer
    raise SystemExit("dlqd not ready within 60 s")


def writer(url: str, rate: float, failing: float, stop: threading.Event) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        n = 0
        next_at = time.monotonic()
        while not stop.is_set():
            reason = "poison" if random.random() < failing else "timeout"
            conn.execute(INSERT, [f"soak-{n}", reason])
            n += 1
            next_at += 1 / rate
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--rate", type=float, default=100, help="inserts a second")
    parser.add_argument("--failing", type=float, default=0.02, help="ratio of poison rows")
    args = parser.parse_args()

    with Cluster.create() as cluster, tempfile.TemporaryDirectory() as tmp:
        url = cluster.url()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET autovacuum = on")
            conn.execute("SELECT pg_reload_conf()")
        env = {k: v for k, v in os.environ.items() if not k.startswith("DLQD_")}
        env["DLQD_DATABASE_URL"] = url
        subprocess.run([sys.executable, "-m", "dlqd", "migrate"], env=env, check=True, cwd=ROOT)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(SETUP.encode())
        config = Path(tmp) / "dlqd.toml"
        config.write_text(CONFIG)
        port = free_port()
        log = (Path(tmp) / "dlqd.log").open("wb")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "dlqd", "run", "--config", str(config)],
            env={**env, "DLQD_METRICS_HOST": "127.0.0.1", "DLQD_METRICS_PORT": str(port)},
            stdout=log,
            stderr=log,
            cwd=ROOT,
        )
        stop = threading.Event()
        thread = threading.Thread(
            target=writer, args=(url, args.rate, args.failing, stop), daemon=True
        )
        try:
            wait_ready(port, daemon)
            thread.start()
            print(
                "minute  good_backlog  p50_ms  p99_ms  replayed  parked  circuit  rss_mb  fds",
                flush=True,
            )
            worst = 0
            for minute in range(1, int(args.minutes) + 1):
                time.sleep(60)
                with psycopg.connect(url, autocommit=True) as conn:
                    conn.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE application_name = 'dlqd listener'"
                    )
                    row = conn.execute(MINUTE_FIGURES).fetchone()
                assert row is not None
                backlog, latency, parked, replayed = row
                worst = max(worst, int(backlog))
                p50, p99 = (latency or [float("nan")] * 2)[:2]
                rss, fds = proc_figures(daemon.pid)
                circuit = metric(port, 'dlqd_circuit_open{policy="all"}')
                print(
                    f"{minute:6d}  {backlog:12d}  {p50 * 1000:6.1f}  {p99 * 1000:6.1f}  "
                    f"{replayed:8d}  {parked:6d}  {circuit:7.0f}  {rss:6.1f}  {fds:3d}",
                    flush=True,
                )
            print(
                f"worst good-row backlog at a minute mark: {worst} "
                f"(one second of inserts: {args.rate:.0f})"
            )
        finally:
            stop.set()
            thread.join(timeout=5)
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)
            log.close()


if __name__ == "__main__":
    main()
