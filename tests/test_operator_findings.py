"""Issue 18: main tried as a new operator would; each finding as a test.

Findings 1 (a bulk replay aborting on a row without a target) and 3's `check`
half are in test_operations_cli and test_cli; the deployment findings in
test_deploy and test_demo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests.conftest import ROOT, as_role
from tests.factories import row_json
from tests.test_operations_cli import SINK_POLICY, config, one_pass, seed

MISSING = "00000000-0000-0000-0000-000000000000"


def cli(*args: str | bytes, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m dlqd`` with arguments that may be raw bytes (invalid UTF-8)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("DLQD_")}
    return subprocess.run(
        [sys.executable, "-m", "dlqd", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        errors="replace",
        timeout=60,
        check=False,
        cwd=ROOT,
    )


def test_explain_without_a_config_tells_what_the_daemon_recorded(
    db_url: str, tmp_path: Path
) -> None:
    """Finding 3: without --config, explain said `no policies configured /
    verdict: unmatched` for a parked row, or one waiting to be retried."""
    seed(
        db_url,
        [
            row_json(original_job_id="held", type="email.send", error_reason="poison"),
            row_json(original_job_id="later", type="email.send"),
        ],
    )
    cfg = config(
        tmp_path,
        '[[policies]]\nname = "quarantine"\nmatch = { error_reason = ["poison"] }\n'
        'action = "park"\n' + SINK_POLICY.replace('name = "mail"', 'name = "mail"\ndelay = "1h"'),
    )
    one_pass(db_url, cfg)
    with psycopg.connect(db_url) as conn:
        ids = dict(conn.execute("SELECT original_job_id, id::text FROM job_dlq").fetchall())
    env = {"DLQD_DATABASE_URL": as_role(db_url, "dlqd")}
    held = json.loads(cli("explain", ids["held"], "--json", env=env).stdout)
    assert (held["state"], held["policy"], held["verdict"]) == ("parked", "quarantine", "park")
    later = json.loads(cli("explain", ids["later"], "--json", env=env).stdout)
    assert (later["state"], later["policy"], later["verdict"]) == ("waiting", "mail", "replay")
    assert later["due_at"] is not None
    human = cli("explain", ids["held"], env=env).stdout
    assert "no policies loaded (pass --config): the verdict is what the daemon recorded" in human
    assert "verdict: parked by policy 'quarantine'" in human
    assert "unmatched" not in human
    # show names the recorded state too (finding 13)
    shown = cli("show", ids["held"], env=env).stdout
    assert "state            parked, policy quarantine, reason policy" in shown
    # and list --state parked says why each row is parked (finding 13)
    table = cli("list", "--state", "parked", env=env).stdout.splitlines()
    assert table[0].split()[5:8] == ["STATE", "REASON", "POLICY"]
    assert table[1].split()[5:8] == ["parked", "policy", "quarantine"]
    # a policy's park is in the replay log too (finding 13)
    assert "parked by policy" in shown


def test_replaying_ids_that_do_not_exist_names_them_and_fails(db_url: str, tmp_path: Path) -> None:
    """Finding 4: `dlqd replay <mistyped id>` printed `replayed 0, failed 0,
    skipped 1` and exited 0."""
    seed(db_url, [row_json(original_job_id="real", type="email.send")])
    cfg = str(config(tmp_path, SINK_POLICY))
    env = {"DLQD_DATABASE_URL": as_role(db_url, "dlqd")}
    result = cli("replay", MISSING, "--config", cfg, env=env)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "replayed 0, failed 0, skipped 1 (1 not found)",
        f"  no job_dlq row with id {MISSING}",
    ]
    with psycopg.connect(db_url) as conn:
        (real,) = conn.execute("SELECT id::text FROM job_dlq").fetchone() or ("",)
    mixed = cli("replay", real, MISSING, "--json", "--config", cfg, env=env)
    assert mixed.returncode == 0  # one of them existed and replayed
    assert json.loads(mixed.stdout)["skipped_by_reason"]["not_found"] == 1


def test_a_failed_manual_replay_says_why_and_keeps_logs_off_the_terminal(
    db_url: str, tmp_path: Path
) -> None:
    """Finding 5: a failed replay printed `replayed 0, failed 1, skipped 0`; the
    reason was only in JSON log lines on stderr, and every replay wrote one."""
    seed(db_url, [row_json(original_job_id=f"r{i}", type="email.send") for i in range(2)])
    statement = "INSERT INTO sink (dlq_id, type, payload) VALUES (%(id)s, %(type)s, '{'::jsonb)"
    target = f'{{ kind = "sql", statement = "{statement}" }}'
    cfg = str(config(tmp_path, f'[[policies]]\nname = "broken"\ntarget = {target}\n'))
    env = {"DLQD_DATABASE_URL": as_role(db_url, "dlqd")}
    result = cli("replay", "--all", "--yes", "--config", cfg, env=env)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[0] == "replayed 0, failed 2, skipped 0"
    assert len(lines) == 3
    assert all(" invalid input syntax for type json" in line for line in lines[1:])
    assert result.stderr == ""  # no log stream in a human's terminal
    asked = cli("replay", "--all", "--yes", "--config", cfg, env={**env, "DLQD_LOG_LEVEL": "info"})
    assert '"event": "batch"' in asked.stderr  # unless asked for


def test_migrate_as_the_daemon_role_says_it_needs_the_owner(empty_db_url: str) -> None:
    """Finding 12: `migrate` as `dlqd` said to apply the role script and connect
    as dlqd, while connected as dlqd with the script applied."""
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    result = cli("migrate", env={"DLQD_DATABASE_URL": as_role(empty_db_url, "dlqd")})
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "migrations need the rights of the schema's owner" in result.stderr
    assert "connect as role dlqd" not in result.stderr


def test_a_human_list_never_reads_payloads(db_url: str) -> None:
    """Finding 16: the human table fetched every payload (50 rows of 10 MB: 1 GB
    of memory). Its statement reads none: planned for a table, the payload is
    not in it; planned for --json, it is."""
    from dlqd.db.entries import list_params
    from dlqd.db.queries import q

    seed(db_url, [row_json(original_job_id=f"r{i}") for i in range(3)])
    params = list_params(None, (None, None), 51)
    with psycopg.connect(db_url) as conn:
        plans = {}
        for documents in (False, True):
            rows = conn.execute(
                b"EXPLAIN (VERBOSE) " + q("list_pending").encode(),
                {**params, "documents": documents},
            ).fetchall()
            plans[documents] = "\n".join(r[0] for r in rows)
    assert "to_jsonb" not in plans[False]  # rendering a row is what reads its payload
    assert "to_jsonb" in plans[True]
    env = {"DLQD_DATABASE_URL": as_role(db_url, "dlqd")}
    table = cli("list", env=env)
    assert table.returncode == 0, table.stderr
    assert len(table.stdout.splitlines()) == 4


@pytest.mark.parametrize(
    "args",
    [
        ["list", "--type", b"\xff\xfe"],
        ["replay", "--type", b"bad\xff", "--dry-run"],
        ["replay", MISSING, "--reason", b"\xc3("],
    ],
)
def test_invalid_utf8_is_a_usage_error(db_url: str, args: list[str | bytes]) -> None:
    """Finding 17: invalid UTF-8 in an argument said `unexpected UnicodeEncodeError`."""
    result = cli(*args, env={"DLQD_DATABASE_URL": db_url})
    assert result.returncode == 2, result.stderr
    assert "is not valid UTF-8" in result.stderr
    assert result.stderr.count("\n") == 1


def test_invalid_utf8_in_the_actor_is_a_usage_error(db_url: str) -> None:
    env = {"DLQD_DATABASE_URL": db_url}
    result = subprocess.run(
        [sys.executable, "-m", "dlqd", "replay", MISSING],
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("DLQD_")},
            **env,
            "DLQD_ACTOR": "x",
        },
        capture_output=True,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 1  # the id does not exist: the actor was fine
    environ = {os.fsencode(k): os.fsencode(v) for k, v in os.environ.items()}
    environ = {k: v for k, v in environ.items() if not k.startswith(b"DLQD_")}
    environ[b"DLQD_DATABASE_URL"] = db_url.encode()
    environ[b"DLQD_ACTOR"] = b"al\xffice"
    bad = subprocess.run(
        [sys.executable, "-m", "dlqd", "replay", MISSING],
        env=environ,  # type: ignore[arg-type]
        capture_output=True,
        check=False,
        cwd=ROOT,
    )
    assert bad.returncode == 2
    assert b"DLQD_ACTOR is not valid UTF-8" in bad.stderr


@pytest.mark.parametrize("command", [["list"], ["replay", "--dry-run"]])
def test_a_huge_glob_is_a_usage_error(db_url: str, command: list[str]) -> None:
    """Finding 17: a 100,000-character glob made `list` say "invalid cursor" and
    `replay --type` fail with InvalidRegularExpression."""
    result = cli(*command, "--type", "x" * 100_000, env={"DLQD_DATABASE_URL": db_url})
    assert result.returncode == 2, result.stderr
    assert "--type: a glob is at most 1000 characters" in result.stderr


def test_a_vanishing_rate_is_refused(db_url: str) -> None:
    """Finding 17: `--rate 1e-300` replayed one row and then slept for ever."""
    result = cli("replay", "--all", "--yes", "--rate", "1e-300", env={"DLQD_DATABASE_URL": db_url})
    assert result.returncode == 2
    assert "at least 0.01" in result.stderr


def test_bidi_controls_are_escaped_in_human_output(db_url: str) -> None:
    """Finding 17: U+202E and U+2066 printed raw in show, list and explain."""
    sneaky = "ok\u202etxt.exe\u2066x"
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO job_dlq (original_job_id, app_id, type, payload, error_reason, attempts)
               VALUES ('j', 'a', %s, '{}', 'r', 1)""",
            [sneaky],
        )
        (entry_id,) = conn.execute("SELECT id::text FROM job_dlq").fetchone() or ("",)
    env = {"DLQD_DATABASE_URL": db_url}
    for args in (["show", entry_id], ["list"], ["explain", entry_id]):
        out = cli(*args, env=env).stdout
        assert "\u202e" not in out, args
        assert "\u2066" not in out, args
        assert "\\u202e" in out, args


def test_typos_in_top_level_variables_are_refused(db_url: str) -> None:
    """Finding 13: DLQD_METRICS_PROT and DLQD_LOGLEVEL passed silently."""
    for name, suggestion in (
        ("DLQD_METRICS_PROT", "DLQD_METRICS_PORT"),
        ("DLQD_LOGLEVEL", "DLQD_LOG_LEVEL"),
    ):
        result = cli("check", env={"DLQD_DATABASE_URL": db_url, name: "1"})
        assert result.returncode == 78, (name, result.stderr)
        assert f"{name}: is not a known setting (did you mean {suggestion}?)" in result.stderr


def test_a_config_path_that_is_a_directory_says_so(tmp_path: Path) -> None:
    """Finding 13: `--config` naming a directory said `not found`."""
    result = cli("check", "--config", str(tmp_path), env={"DLQD_DATABASE_URL": "postgresql://x"})
    assert result.returncode == 78
    assert result.stderr.strip() == f"dlqd: error: config file {tmp_path}: is a directory"


def _complete(line: str, tmp_path: Path) -> list[str]:
    """What the shell's completion asks argcomplete for ``line``, answered."""
    out = tmp_path / "completion"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DLQD_", "_ARGCOMPLETE"))}
    env.update(
        _ARGCOMPLETE="1",
        _ARGCOMPLETE_IFS="\v",
        COMP_LINE=line,
        COMP_POINT=str(len(line)),
        _ARGCOMPLETE_STDOUT_FILENAME=str(out),
    )
    subprocess.run(
        [sys.executable, "-m", "dlqd"], env=env, cwd=ROOT, check=False, capture_output=True
    )
    return sorted(w.strip() for w in out.read_text().split("\v") if w.strip())


def test_completion_offers_policy_names_not_file_names(tmp_path: Path) -> None:
    """Finding 13: completion for --via and --policy offered file names."""
    cfg = tmp_path / "dlqd.toml"
    cfg.write_text(
        '[[policies]]\nname = "transient"\naction = "park"\n'
        '[[policies]]\nname = "tardy"\naction = "park"\n'
        '[[policies]]\nname = "quarantine"\naction = "park"\n'
    )
    (tmp_path / "transcript.txt").write_text("a file the shell would have offered")
    assert _complete(f"dlqd replay --config {cfg} --via t", tmp_path) == ["tardy", "transient"]
    assert _complete(f"dlqd list --config {cfg} --policy q", tmp_path) == ["quarantine"]
    shown = _complete("dlqd show t", tmp_path)
    assert "transcript.txt" not in " ".join(shown)
