"""The README's run command: the demo replays a stream of failing jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent


def test_demo_replays_a_stream_of_failing_jobs(empty_db_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLQD_")}
    env["DLQD_DATABASE_URL"] = empty_db_url
    env["DLQD_METRICS_PORT"] = "0"  # any free port
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples/demo.py"), "--duration", "4", "--rate", "20"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["inserted"] > 20
    replayed = [m for m in summary["metrics"] if 'outcome="replayed"' in m]
    assert replayed, summary
    with psycopg.connect(empty_db_url) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM demo_jobs), count(replayed_at) FROM job_dlq "
            "WHERE replayed_at IS NOT NULL AND type <> 'invoice.generate'"
        ).fetchone()
    assert row is not None
    assert row[0] == row[1] > 0  # every sql-target replay landed in demo_jobs once


def test_demo_stops_cleanly_on_sigterm_in_the_background(empty_db_url: str) -> None:
    """Started as `scripts/demo &` would be (SIGINT ignored), SIGTERM ends it with 0,
    the daemon stops first, and the summary is the last line."""
    import signal

    env = {k: v for k, v in os.environ.items() if not k.startswith("DLQD_")}
    env["DLQD_DATABASE_URL"] = empty_db_url
    env["DLQD_METRICS_PORT"] = "0"
    demo = subprocess.Popen(
        [sys.executable, str(ROOT / "examples/demo.py"), "--rate", "20"],
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
