"""Benchmark: the console's pages on an incident-size table.

    .venv/bin/python bench/console_bench.py [--rows 10000000] [--pending 1000000] [--repeat 20]

On its own throwaway cluster with autovacuum on: ``--rows`` rows, ``--pending``
of them pending (the fill of ``scrape_bench.py``, 140 groups), then a real
``dlqd run`` with the console on. Times, from a client on the same machine,
the overview, the first page of the list, a payload search (jsonb
containment) and one row's page, each as HTML and as JSON, next to the
plain-SQL floor of the same read in the same run. Prints medians and
min/max. Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import migrated_cluster  # type: ignore[import-not-found]
from scrape_bench import fill, ms  # type: ignore[import-not-found]

from dlqd.console.auth import digest

FLOORS = {
    "overview": (
        "SELECT app_id, type, error_reason, count(*), min(dlq_at) FROM job_dlq"
        " WHERE replayed_at IS NULL GROUP BY 1, 2, 3"
    ),
    "list, first page": (
        "SELECT * FROM job_dlq WHERE replayed_at IS NULL ORDER BY dlq_at, id LIMIT 51"
    ),
    "payload search": (
        "SELECT * FROM job_dlq WHERE replayed_at IS NULL AND payload @> %(q)s::jsonb"
        " ORDER BY dlq_at, id LIMIT 51"
    ),
    "row page": "SELECT * FROM job_dlq WHERE id = %(id)s",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def timed(repeat: int, step: Callable[[], Any]) -> list[float]:
    step()  # warm
    took: list[float] = []
    for _ in range(repeat):
        started = time.perf_counter()
        step()
        took.append(time.perf_counter() - started)
    return took


def pages(url: str, token: str, repeat: int, some: str, search: str) -> None:
    paths = {
        "overview": "/",
        "list, first page": "/jobs",
        "payload search": "/jobs?" + str(httpx.QueryParams({"q": search})),
        "row page": f"/jobs/{some}",
    }
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        for name, path in paths.items():
            for kind, accept in (("HTML", "text/html"), ("JSON", "application/json")):

                def get(path: str = path, accept: str = accept) -> None:
                    answer = client.get(path, headers={"Accept": accept})
                    answer.raise_for_status()

                print(f"console {name:<17} {kind}: {ms(timed(repeat, get))}", flush=True)


def floors(url: str, repeat: int, some: str, search: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for name, query in FLOORS.items():

            def run(query: str = query) -> None:
                conn.execute(query, {"q": search, "id": some}).fetchall()

            print(f"plain-SQL floor, {name:<17}: {ms(timed(repeat, run))}", flush=True)


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"dlqd run ended: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/login", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the console did not come up")


def run_console(url: str, repeat: int) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT id::text, payload::text FROM job_dlq WHERE replayed_at IS NULL"
            " ORDER BY dlq_at DESC LIMIT 1"
        ).fetchone()
        assert row is not None
        some, search = row
    token = secrets.token_urlsafe(32)
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "dlqd.toml"
        config.write_text(
            f"""
[console]
enabled = true
port = {port}

[[console.tokens]]
name = "bench"
sha256 = "{digest(token)}"
role = "operator"

[[policies]]
name = "hold"
action = "park"
match = {{ type = "never-matches" }}
"""
        )
        env = {
            **os.environ,
            "DLQD_DATABASE_URL": url,
            "DLQD_METRICS_HOST": "127.0.0.1",
            "DLQD_METRICS_PORT": "0",
        }
        log = Path(folder) / "dlqd.log"
        with log.open("wb") as sink:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "dlqd", "run", "--config", str(config)],
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        try:
            console = f"http://127.0.0.1:{port}"
            wait_ready(console, daemon, log)
            pages(console, token, repeat, some, search)
        finally:
            daemon.terminate()
            daemon.wait(timeout=30)
    floors(url, repeat, some, search)


async def main(rows: int, pending: int, repeat: int) -> None:
    async with migrated_cluster() as url:
        await fill(url, rows, pending)
        await anyio.to_thread.run_sync(run_console, url, repeat)
        print({"rows": rows, "pending": pending, "repeat": repeat})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--pending", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    anyio.run(main, args.rows, args.pending, args.repeat)
