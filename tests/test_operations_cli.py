"""Operator commands: manual replay, purge, status, explain, exit codes of `run`."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import as_role, dlqd_cli, refusing_port
from tests.daemon_helpers import SINK_DDL, SINK_STATEMENT, write_config
from tests.factories import INSERT_MANY, row_json


def seed(db_url: str, rows: list[dict[str, object]]) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(SINK_DDL)
        conn.execute("GRANT SELECT, INSERT ON sink TO dlqd")
        conn.execute(INSERT_MANY, {"rows": Jsonb(rows)})


def without_ages(document: dict[str, Any]) -> dict[str, Any]:
    """A status document without its ages (they grow between two calls)."""
    age = "oldest_pending_age_seconds"
    return {
        **{k: v for k, v in document.items() if k != age},
        "groups": [{k: v for k, v in g.items() if k != age} for g in document["groups"]],
    }


def one_pass(db_url: str, cfg: Path) -> None:
    """One replayer pass in-process, as the daemon would make it."""
    import anyio
    from psycopg.rows import dict_row
    from psycopg_pool import AsyncConnectionPool

    from dlqd.config import load_settings
    from dlqd.metrics import Metrics
    from dlqd.replay.worker import Replayer
    from dlqd.throttle import Throttle

    settings = load_settings(cfg, database_url=db_url)

    async def run() -> None:
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            db_url, min_size=1, max_size=2, open=False,
            kwargs={"autocommit": True, "row_factory": dict_row},
        )  # fmt: skip
        await pool.open()
        try:
            replayer = Replayer(pool, lambda: settings, Metrics(), Throttle(), anyio.Event())
            await replayer.run_once(full=True)
        finally:
            await pool.close()

    anyio.run(run)


def config(tmp_path: Path, body: str) -> Path:
    return write_config(tmp_path / "dlqd.toml", body)


SINK_POLICY = f"""
[[policies]]
name = "mail"
match = {{ type = ["email.*"] }}
target = {{ kind = "sql", statement = "{SINK_STATEMENT}" }}
"""


def replay_json(
    *,
    replayed: int = 0,
    failed: int = 0,
    already_replayed: int = 0,
    not_found: int = 0,
    no_target: int = 0,
    dry_run: bool = False,
) -> dict[str, Any]:
    """The `replay --json` document (DESIGN section 6)."""
    reasons = {"already_replayed": already_replayed, "not_found": not_found, "no_target": no_target}
    return {
        "replayed": replayed,
        "failed": failed,
        "skipped": sum(reasons.values()),
        "skipped_by_reason": reasons,
        "dry_run": dry_run,
    }


def test_manual_replay_by_filter_dry_run_then_real(db_url: str, tmp_path: Path) -> None:
    seed(
        db_url,
        [row_json(original_job_id=f"a{i}", app_id="a") for i in range(5)]
        + [row_json(original_job_id=f"b{i}", app_id="b") for i in range(3)],
    )
    env = {"DLQD_DATABASE_URL": as_role(db_url, "dlqd")}  # the operator runs as dlqd
    cfg = str(config(tmp_path, SINK_POLICY))
    dry = dlqd_cli("replay", "--app-id", "a", "--dry-run", "--json", "--config", cfg, env=env)
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout) == replay_json(replayed=5, dry_run=True)
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM sink").fetchone() == (0,)

    real = dlqd_cli("replay", "--app-id", "a", "--json", "--rate", "100", "--config", cfg, env=env)
    assert real.returncode == 0, real.stderr
    assert json.loads(real.stdout) == replay_json(replayed=5)
    refused = dlqd_cli("replay", "--all", "--json", "--config", cfg, env=env)
    assert refused.returncode == 2  # every pending row: only with --yes
    assert "add --yes" in refused.stderr
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM sink").fetchone() == (5,)  # nothing more
    rest = dlqd_cli("replay", "--all", "--yes", "--json", "--config", cfg, env=env)
    assert json.loads(rest.stdout)["replayed"] == 3
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT dlq_id) FROM sink").fetchone() == (
            8,
            8,
        )
        manual = conn.execute(
            "SELECT count(*) FROM dlqd_replay_log WHERE manual AND outcome = 'replayed'"
        ).fetchone()
        assert manual == (8,)


def test_manual_replay_by_id_counts_skipped_and_failed(db_url: str, tmp_path: Path) -> None:
    seed(db_url, [row_json(original_job_id=n) for n in ("ok", "bad", "done")])
    with psycopg.connect(db_url, autocommit=True) as conn:
        ids = dict(conn.execute("SELECT original_job_id, id::text FROM job_dlq").fetchall())
        conn.execute("UPDATE job_dlq SET replayed_at = now() WHERE original_job_id = 'done'")
    statement = (
        "INSERT INTO sink (dlq_id, type, payload) VALUES (%(id)s, %(type)s, "
        "CASE WHEN %(original_job_id)s = 'bad' THEN (1/0)::text::jsonb ELSE %(payload)s END)"
    )
    cfg = config(
        tmp_path,
        f'[replay]\ndefault_target = {{ kind = "sql", statement = "{statement}" }}\n',
    )
    missing = "00000000-0000-0000-0000-000000000001"
    result = dlqd_cli(
        "replay",
        ids["ok"],
        ids["bad"],
        ids["done"],
        missing,
        "--json",
        "--config",
        str(cfg),
        env={"DLQD_DATABASE_URL": as_role(db_url, "dlqd")},
    )
    assert result.returncode == 1  # failed > 0
    assert json.loads(result.stdout) == replay_json(
        replayed=1, failed=1, already_replayed=1, not_found=1
    )
    with psycopg.connect(db_url) as conn:
        error = conn.execute(
            "SELECT error FROM dlqd_replay_log WHERE outcome = 'failed'"
        ).fetchone()
        assert error is not None
        assert "division by zero" in error[0]


@pytest.mark.parametrize(
    "flags",
    [["--all", "--yes"], ["--all", "--yes", "--dry-run"], ["--type", "*", "--rate", "50"]],
)
def test_rows_without_a_target_are_skipped_and_the_others_replay(
    db_url: str, tmp_path: Path, flags: list[str]
) -> None:
    """Issue 18 finding 1: a bulk replay aborted on the first row without a target
    (a parked or unmatched row no policy with a target matches), replaying
    nothing. The others replay; the rest are skipped as no_target, and the
    summary says how to send them."""
    seed(
        db_url,
        [row_json(original_job_id="x", type="sms.send")]
        + [row_json(original_job_id=f"m{i}", type="email.send") for i in range(3)],
    )
    cfg = config(tmp_path, SINK_POLICY)  # only email.* has a target
    env = {"DLQD_DATABASE_URL": as_role(db_url, "dlqd")}
    dry = "--dry-run" in flags
    result = dlqd_cli("replay", *flags, "--json", "--config", str(cfg), env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == replay_json(replayed=3, no_target=1, dry_run=dry)
    with psycopg.connect(db_url) as conn:
        sunk = conn.execute("SELECT count(*) FROM sink").fetchone()
        assert sunk == (0 if dry else 3,)
    if not dry:
        human = dlqd_cli("replay", *flags, "--config", str(cfg), env=env)
        assert human.returncode == 0, human.stderr
        lines = human.stdout.splitlines()
        assert lines[0] == "replayed 0, failed 0, skipped 1 (1 no target)"
        assert "--via POLICY" in lines[-1]
    usage = dlqd_cli("replay", "--config", str(cfg), env={"DLQD_DATABASE_URL": db_url})
    assert usage.returncode == 2


def test_purge_json_and_dry_run(db_url: str, tmp_path: Path) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO job_dlq (original_job_id, app_id, type, payload, error_reason,
                                    attempts, dlq_at, replayed_at)
               SELECT 'o' || g, 'a', 't', '{}', 'r', 1, now() - interval '9 days',
                      CASE WHEN g <= 7 THEN now() - interval '8 days' END
                 FROM generate_series(1, 10) g"""
        )
    env = {"DLQD_DATABASE_URL": as_role(db_url, "dlqd"), "DLQD_PURGE__BATCH_SIZE": "3"}
    dry = dlqd_cli("purge", "--dry-run", "--json", env=env)
    assert json.loads(dry.stdout) == {"deleted": 7, "dry_run": True}
    real = dlqd_cli("purge", "--json", env=env)
    assert json.loads(real.stdout) == {"deleted": 7, "dry_run": False}
    pending_too = dlqd_cli("purge", "--json", env={**env, "DLQD_PURGE__PENDING_RETENTION": "8d"})
    assert json.loads(pending_too.stdout) == {"deleted": 3, "dry_run": False}


def test_status_json_shape_and_explain(db_url: str, tmp_path: Path) -> None:
    seed(
        db_url,
        [
            row_json(original_job_id="1", type="email.send"),
            row_json(original_job_id="2", type="email.send", error_reason="poison"),
            row_json(original_job_id="3", type="sms.send"),
        ],
    )
    cfg = config(
        tmp_path,
        '[[policies]]\nname = "q"\nmatch = { error_reason = ["poison"] }\naction = "park"\n'
        + SINK_POLICY.replace('name = "mail"', 'name = "mail"\ndelay = "10m"'),
    )
    env = {"DLQD_DATABASE_URL": db_url}
    # before any daemon looked: pending, nothing recorded as parked or unmatched
    fresh = json.loads(dlqd_cli("status", "--json", "--config", str(cfg), env=env).stdout)
    assert (fresh["pending"], fresh["parked"], fresh["unmatched"]) == (3, 0, 0)
    one_pass(db_url, cfg)  # the daemon decides and records
    status = json.loads(dlqd_cli("status", "--json", "--config", str(cfg), env=env).stdout)
    # the same answer without the config: read commands report recorded state
    bare = json.loads(dlqd_cli("status", "--json", env=env).stdout)
    assert without_ages(bare) == without_ages(status)
    assert set(status) == {"pending", "parked", "unmatched", "oldest_pending_age_seconds", "groups"}
    assert (status["pending"], status["parked"], status["unmatched"]) == (3, 1, 1)
    assert status["oldest_pending_age_seconds"] >= 0
    for group in status["groups"]:
        assert set(group) == {
            "app_id",
            "type",
            "error_reason",
            "pending",
            "parked",
            "oldest_pending_age_seconds",
        }
    table = dlqd_cli("status", "--config", str(cfg), env=env).stdout
    assert table.startswith("pending 3 (of which parked 1, unmatched 1)  oldest ")

    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT id::text FROM job_dlq WHERE original_job_id = '1'").fetchone()
        assert row is not None
    explain = dlqd_cli("explain", row[0], "--config", str(cfg), env=env)
    assert explain.returncode == 0, explain.stderr
    assert "policy #0 'q': no match: error_reason 'timeout' matches none of ['poison']" in (
        explain.stdout
    )
    assert "policy #1 'mail': matches (action replay)" in explain.stdout
    assert "verdict: replay through policy 'mail'" in explain.stdout
    assert "replays of job 1 (app app-a): 0" in explain.stdout


def test_run_and_check_refuse_an_unmigrated_database(empty_db_url: str) -> None:
    from dlqd.db.migrations import available_migrations

    env = {"DLQD_DATABASE_URL": empty_db_url}
    names = ", ".join(f"{m.version:03d}_{m.name}" for m in available_migrations())
    assert names.startswith("001_job_dlq, 002_replay_state, 003_poison_proof, ")
    for command in ("run", "check"):
        result = dlqd_cli(command, env=env)
        assert result.returncode == 78
        assert result.stderr.strip() == (
            f"dlqd: error: database schema is not up to date (missing {names}): run `dlqd migrate`"
        )
    for command in (["status"], ["list"], ["show", "00000000-0000-0000-0000-000000000000"]):
        result = dlqd_cli(*command, env=env)
        assert result.returncode == 78, (command, result.stderr)
        assert result.stderr.strip() == (
            "dlqd: error: database schema is not up to date: run `dlqd migrate`"
        )
    assert dlqd_cli("migrate", env=env).returncode == 0
    assert "schema: up to date" in dlqd_cli("check", env=env).stdout


def test_run_exit_codes(tmp_path: Path, db_url: str) -> None:
    with refusing_port() as port:
        unreachable = dlqd_cli(
            "run", env={"DLQD_DATABASE_URL": f"postgresql://u:pw-secret@127.0.0.1:{port}/x"}
        )
    assert unreachable.returncode == 69
    assert "pw-secret" not in unreachable.stderr
    assert unreachable.stderr.startswith("dlqd: error: database unreachable")

    bad = config(tmp_path, '[replay]\nbatch_size = "many"\n')
    invalid = dlqd_cli("run", "--config", str(bad), env={"DLQD_DATABASE_URL": db_url})
    assert invalid.returncode == 78
    assert "replay.batch_size" in invalid.stderr

    http = config(
        tmp_path,
        '[[policies]]\nname = "h"\n'
        'target = { kind = "http", url = "http://x/", headers = { X = "env:NOPE" } }\n',
    )
    unsupported = dlqd_cli("run", "--config", str(http), env={"DLQD_DATABASE_URL": db_url})
    assert unsupported.returncode == 78
    assert "policies[0].target: http target header X: environment variable NOPE is not set" in (
        unsupported.stderr
    )

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        taken = dlqd_cli(
            "run",
            env={
                "DLQD_DATABASE_URL": db_url,
                "DLQD_METRICS_HOST": "127.0.0.1",
                "DLQD_METRICS_PORT": str(port),
            },
        )
    assert taken.returncode == 1
    assert taken.stderr.strip().endswith(
        f"dlqd: error: cannot serve metrics on 127.0.0.1:{port}: Address already in use "
        "(set metrics_host / metrics_port)"
    )

    placeholder = config(
        tmp_path,
        '[[policies]]\nname = "s"\ntarget = { kind = "sql", statement = "SELECT %(nope)s" }\n',
    )
    wrong = dlqd_cli("check", "--config", str(placeholder), env={"DLQD_DATABASE_URL": db_url})
    assert wrong.returncode == 78
    assert "unknown placeholder(s) nope" in wrong.stderr


def test_check_plans_sql_targets_without_running_them(db_url: str, tmp_path: Path) -> None:
    env = {"DLQD_DATABASE_URL": db_url}
    seed(db_url, [])
    good = config(tmp_path, SINK_POLICY)
    result = dlqd_cli("check", "--config", str(good), env=env)
    assert result.returncode == 0, result.stderr
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM sink").fetchone() == (0,)  # planned, not run

    broken = config(
        tmp_path,
        '[[policies]]\nname = "typo"\n'
        'target = { kind = "sql", statement = "INSERT INTO snik (dlq_id) VALUES (%(id)s)" }\n',
    )
    result = dlqd_cli("check", "--config", str(broken), env=env)
    assert result.returncode == 78
    assert 'policies[0].target.statement: relation "snik" does not exist' in result.stderr


def test_replay_via_a_policy_with_a_reason_and_an_actor(db_url: str, tmp_path: Path) -> None:
    """A row parked by a park policy goes out through another policy's target,
    without editing the config; who and why stay in the replay log."""
    seed(db_url, [row_json(original_job_id="held", type="sms.send", error_reason="poison")])
    cfg = str(
        config(
            tmp_path,
            '[[policies]]\nname = "quarantine"\nmatch = { error_reason = ["poison"] }\n'
            'action = "park"\n' + SINK_POLICY,
        )
    )
    env = {"DLQD_DATABASE_URL": as_role(db_url, "dlqd"), "DLQD_ACTOR": "alice"}
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT id::text FROM job_dlq").fetchone()
        assert row is not None
    entry_id = row[0]
    plain = dlqd_cli("replay", entry_id, "--json", "--config", cfg, env=env)
    # no matching policy has a target (quarantine parks; mail is for email.*): skipped
    assert plain.returncode == 0, plain.stderr
    assert json.loads(plain.stdout) == replay_json(no_target=1)
    unknown = dlqd_cli("replay", entry_id, "--via", "nope", "--config", cfg, env=env)
    assert unknown.returncode == 2
    assert "--via nope: no such policy (policies: quarantine, mail)" in unknown.stderr
    targetless = dlqd_cli("replay", entry_id, "--via", "quarantine", "--config", cfg, env=env)
    assert targetless.returncode == 2
    via = dlqd_cli(
        "replay", entry_id, "--via", "mail", "--reason", "fixed upstream", "--json",
        "--config", cfg, env=env,
    )  # fmt: skip
    assert via.returncode == 0, via.stderr
    assert json.loads(via.stdout)["replayed"] == 1
    shown = json.loads(dlqd_cli("show", entry_id, "--json", env=env).stdout)
    last = shown["replays"][-1]
    assert (last["policy"], last["outcome"], last["actor"], last["reason"]) == (
        "mail",
        "replayed",
        "alice",
        "fixed upstream",
    )
    table = dlqd_cli("show", entry_id, env=env).stdout
    assert "alice" in table
    assert "fixed upstream" in table
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM sink").fetchone() == (1,)


def test_progress_is_shown_on_a_terminal_only(db_url: str, tmp_path: Path) -> None:
    """Under a pseudo-terminal: a progress bar (rows, rate) on stderr; piped: none."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    from tests.conftest import ROOT

    seed(db_url, [row_json(original_job_id=f"p{i}") for i in range(30)])
    cfg = str(config(tmp_path, SINK_POLICY))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DLQD_")},
        "DLQD_DATABASE_URL": as_role(db_url, "dlqd"),
        "COLUMNS": "120",
    }
    args = [sys.executable, "-m", "dlqd", "replay", "--type", "email.send", "--dry-run"]
    piped = subprocess.run(
        [*args, "--config", cfg], env=env, capture_output=True, text=True, check=False, cwd=ROOT
    )
    assert piped.returncode == 0, piped.stderr
    assert "rows/s" not in piped.stderr
    assert piped.stdout.strip() == "would replay 30, failed 0, skipped 0"

    leader, follower = pty.openpty()
    # a terminal of 120 columns (a fresh pseudo-terminal has none)
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    try:
        tty = subprocess.run(
            [*args, "--config", cfg],
            env=env,
            stdin=follower,
            stdout=subprocess.PIPE,
            stderr=follower,
            check=False,
            cwd=ROOT,
            timeout=60,
        )
        os.close(follower)
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(leader)
    assert tty.returncode == 0
    text = shown.decode(errors="replace")
    assert "would replay" in text
    assert "30/30" in text  # rows done of the total
    assert "rows/s" in text or "s/rows" in text  # and the rate


def test_explain_json_for_each_state(db_url: str, tmp_path: Path) -> None:
    seed(
        db_url,
        [
            row_json(original_job_id="new-one", type="email.send"),
            row_json(original_job_id="held", type="email.send", error_reason="poison"),
            row_json(original_job_id="lost", type="sms.send"),
            row_json(original_job_id="later", type="email.send"),
            row_json(original_job_id="done", type="email.send"),
        ],
    )
    cfg = config(
        tmp_path,
        '[[policies]]\nname = "q"\nmatch = { error_reason = ["poison"] }\naction = "park"\n'
        + SINK_POLICY.replace('name = "mail"', 'name = "mail"\ndelay = "1h"'),
    )
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("UPDATE job_dlq SET replayed_at = now() WHERE original_job_id = 'done'")
        ids = dict(conn.execute("SELECT original_job_id, id::text FROM job_dlq").fetchall())
    env = {"DLQD_DATABASE_URL": as_role(db_url, "dlqd")}
    fresh = json.loads(
        dlqd_cli("explain", ids["new-one"], "--json", "--config", str(cfg), env=env).stdout
    )
    assert (fresh["state"], fresh["verdict"], fresh["policy"]) == ("new", "replay", "mail")
    one_pass(db_url, cfg)
    expected = {
        "held": ("parked", "park", "q"),
        "lost": ("unmatched", "unmatched", None),
        "later": ("waiting", "replay", "mail"),
        "done": ("replayed", "replayed", None),
    }
    for name, (state, verdict, policy) in expected.items():
        result = dlqd_cli("explain", ids[name], "--json", "--config", str(cfg), env=env)
        assert result.returncode == 0, result.stderr
        document = json.loads(result.stdout)
        assert set(document) == {
            "id", "state", "policy", "reason", "replay_count", "due_at", "verdict"
        }  # fmt: skip
        assert (document["state"], document["verdict"], document["policy"]) == (
            state,
            verdict,
            policy,
        ), name
    waiting = json.loads(
        dlqd_cli("explain", ids["later"], "--json", "--config", str(cfg), env=env).stdout
    )
    assert waiting["due_at"] is not None
    replayed = dlqd_cli("explain", ids["done"], "--config", str(cfg), env=env).stdout
    assert "verdict: replayed at" in replayed
    assert "replay through" not in replayed  # no "replay at ... (now)" for a replayed row


def test_check_finds_a_target_the_role_may_not_run(db_url: str, tmp_path: Path) -> None:
    """The statement parses, but the dlqd role lacks INSERT on its table, or EXECUTE
    on its function: check says so (78) without running it, since EXPLAIN starts
    the executor, which checks privileges, and stops there. With the grants it passes."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE private_sink (dlq_id uuid)")
        conn.execute(
            "CREATE FUNCTION private_enqueue(id uuid) RETURNS void LANGUAGE sql "
            "AS 'INSERT INTO private_sink VALUES (id)'"
        )
        conn.execute("REVOKE EXECUTE ON FUNCTION private_enqueue(uuid) FROM PUBLIC")
    env = {"DLQD_DATABASE_URL": as_role(db_url, "dlqd")}
    cases = [
        ("INSERT INTO private_sink (dlq_id) VALUES (%(id)s)", "permission denied for table "
         "private_sink", "GRANT INSERT ON private_sink TO dlqd"),
        ("SELECT private_enqueue(%(id)s)", "permission denied for function private_enqueue",
         "GRANT EXECUTE ON FUNCTION private_enqueue(uuid) TO dlqd"),
    ]  # fmt: skip
    for statement, message, grant in cases:
        target = f'{{ kind = "sql", statement = "{statement}" }}'
        cfg = str(config(tmp_path, f'[[policies]]\nname = "p"\ntarget = {target}\n'))
        refused = dlqd_cli("check", "--config", cfg, env=env)
        assert refused.returncode == 78, refused.stderr
        assert message in refused.stderr
        assert "[policy 'p']" in refused.stderr
        with psycopg.connect(db_url, autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM private_sink").fetchone() == (0,)
            conn.execute(grant.encode())
        allowed = dlqd_cli("check", "--config", cfg, env=env)
        assert allowed.returncode == 0, allowed.stderr
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT count(*) FROM private_sink").fetchone() == (0,)  # never run
