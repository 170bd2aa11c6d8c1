"""Benchmark: what a steady trickle of dead letters costs the daemon in CPU.

    .venv/bin/python bench/trickle_bench.py [--rate 100] [--seconds 240]

Inserts single rows at ``--rate`` a second (each its own transaction, as a job
system does) for ``--seconds``, with one `dlqd run` replaying them into a sink
table through a ``sql`` target (``--form``: set-based, which express pages
take, or per-row, which the ordinary path takes). Prints the daemon's CPU (from
/proc/PID/stat) as a share of one core and per row, its resident memory, and
the idle CPU over the same span before the stream starts. Next to it, the
CPU of the PostgreSQL backend that inserted the rows: the job system's own
cost for the same stream. Uses the server of replay_bench.py (by default a
cluster of its own, autovacuum on). ``--unix-socket``: the daemon connects
through the server's Unix socket instead of TCP to 127.0.0.1 (on loopback
TCP, the sender's system call also runs the receiving side's network stack).
Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from replay_bench import (  # type: ignore[import-not-found]
    INSERT_ONE,
    SINK,
    SINK_SET_STATEMENT,
    SINK_STATEMENT,
    fresh_db,
    server_url,
    start_daemon,
    stop,
    wait_ready,
)

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


def main(
    rate: float, seconds: float, idle: float, form: str, cooldown: str, *, unix_socket: bool
) -> None:
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        url = fresh_db(server_url(stack), stack)
        daemon_url = url
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(SINK.encode())
            if unix_socket:
                row = conn.execute("SHOW unix_socket_directories").fetchone()
                assert row is not None
                daemon_url = make_conninfo(url, host=str(row[0]).split(",")[0].strip())
        statement = SINK_SET_STATEMENT if form == "set-based" else SINK_STATEMENT
        link = "the Unix socket" if unix_socket else "TCP"
        print(
            f"target: {form} sql statement; replay.wake_cooldown = {cooldown}; "
            f"the daemon over {link}",
            flush=True,
        )
        config = f"""
[listen]
poll_interval = "30s"
[[policies]]
name = "all"
target = {{ kind = "sql", statement = "{statement}" }}
[replay]
wake_cooldown = "{cooldown}"
"""
        process, port = start_daemon(daemon_url, config, Path(tmp))
        try:
            wait_ready(port)
            before = cpu_seconds(process.pid)
            time.sleep(idle)
            idle_share = (cpu_seconds(process.pid) - before) / idle
            print(f"idle for {idle:.0f} s: {idle_share * 100:.2f}% of a core", flush=True)

            with psycopg.connect(url, autocommit=True) as writer:
                backend = writer.info.backend_pid
                local = Path(f"/proc/{backend}").exists()  # the server runs on this host
                started = time.monotonic()
                cpu_before = cpu_seconds(process.pid)
                pg_before = cpu_seconds(backend) if local else 0.0
                sent = 0
                while (now := time.monotonic()) - started < seconds:
                    due = started + sent / rate
                    if now < due:
                        time.sleep(due - now)
                    writer.execute(INSERT_ONE, [f"t-{sent}"])
                    sent += 1
                elapsed = time.monotonic() - started
                used = cpu_seconds(process.pid) - cpu_before
                pg_used = cpu_seconds(backend) - pg_before if local else 0.0
            deadline = time.monotonic() + 30
            with psycopg.connect(url, autocommit=True) as conn:
                while time.monotonic() < deadline:
                    row = conn.execute("SELECT count(*) FROM sink").fetchone()
                    if row and row[0] >= sent:
                        break
                    time.sleep(0.1)
                replayed = conn.execute("SELECT count(*) FROM sink").fetchone()
            print(
                f"trickle {sent} rows at {sent / elapsed:.0f}/s for {elapsed:.0f} s: "
                f"dlqd {used / elapsed * 100:.1f}% of a core = {used / sent * 1000:.2f} ms CPU "
                f"per row; RSS {rss_mib(process.pid):.0f} MiB; replayed "
                f"{replayed[0] if replayed else 0}",
                flush=True,
            )
            print(
                f"the inserting backend (the job system's own cost, for comparison): "
                f"{pg_used / elapsed * 100:.1f}% of a core = {pg_used / sent * 1000:.2f} ms per row"
                if local
                else "the inserting backend runs on another host: its CPU is not measured"
            )
        finally:
            stop(process)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=240.0)
    parser.add_argument("--idle", type=float, default=30.0)
    parser.add_argument(
        "--form",
        choices=["set-based", "per-row"],
        default="set-based",
        help="set-based: a statement over `replayed` (express pages); per-row: placeholders",
    )
    parser.add_argument("--cooldown", default="0s", help="replay.wake_cooldown")
    parser.add_argument(
        "--unix-socket", action="store_true", help="the daemon connects through the Unix socket"
    )
    args = parser.parse_args()
    main(args.rate, args.seconds, args.idle, args.form, args.cooldown, unix_socket=args.unix_socket)
