"""The README's run command: the demo replays a stream of failing jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

ROOT = Path(__file__).resolve().parent.parent


def test_demo_replays_a_stream_of_failing_jobs(empty_db_url: str) -> None:
    """With DLQD_DATABASE_URL the demo runs in a database of its own: issue 18
    finding 6, it wrote dlqd's schema and fake dead letters into the one named."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLQD_")}
    env["DLQD_DATABASE_URL"] = empty_db_url
    env["DLQD_METRICS_PORT"] = "0"  # any free port
    own = f"dlqd_demo_{uuid.uuid4().hex[:8]}"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples/demo.py"), "--duration", "4", "--rate", "20",
         "--database", own, "--keep"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["inserted"] > 20
    replayed = [m for m in summary["metrics"] if 'outcome="replayed"' in m]
    assert replayed, summary
    with psycopg.connect(empty_db_url) as conn:  # the database named: untouched
        tables = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ).fetchone()
        assert tables == (0,)
    demo_url = make_conninfo(empty_db_url, dbname=own)
    try:
        with psycopg.connect(demo_url) as conn:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM demo_jobs), count(replayed_at) FROM job_dlq "
                "WHERE replayed_at IS NOT NULL AND type <> 'invoice.generate'"
            ).fetchone()
        assert row is not None
        assert row[0] == row[1] > 0  # every sql-target replay landed in demo_jobs once
    finally:
        with psycopg.connect(empty_db_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(own))
            )


def test_demo_stops_cleanly_on_sigterm_in_the_background(empty_db_url: str) -> None:
    """Started as `scripts/demo &` would be (SIGINT ignored), SIGTERM ends it with 0,
    the daemon stops first, and the summary is the last line."""
    import signal

    env = {k: v for k, v in os.environ.items() if not k.startswith("DLQD_")}
    env["DLQD_DATABASE_URL"] = empty_db_url
    env["DLQD_METRICS_PORT"] = "0"
    own = f"dlqd_demo_{uuid.uuid4().hex[:8]}"
    demo = subprocess.Popen(
        [sys.executable, str(ROOT / "examples/demo.py"), "--rate", "20", "--database", own],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # noqa: PLW1509
    )
    assert demo.stdout is not None
    lines: list[str] = []
    for line in demo.stdout:
        lines.append(line)
        if "dlqd is ready" in line:
            break
    demo.send_signal(signal.SIGTERM)
    rest, _ = demo.communicate(timeout=60)
    lines.extend(rest.splitlines())
    assert demo.returncode == 0, "".join(lines)[-2000:]
    summary = json.loads(lines[-1])
    assert summary["inserted"] >= 0
    stopped = [i for i, line in enumerate(lines) if '"event": "stopped"' in line]
    assert stopped, "".join(lines)[-2000:]
    assert stopped[-1] < len(lines) - 1  # the daemon's last line came before the summary
    with psycopg.connect(empty_db_url) as conn:  # its own database went with it
        gone = conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s", [own])
        assert gone.fetchone() == (0,)
