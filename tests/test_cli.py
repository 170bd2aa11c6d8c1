"""The operator's CLI, run as a subprocess: JSON shapes, paging, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

from tests.conftest import dlqd_cli, refusing_port
from tests.factories import INSERT_MANY, row_json

SECRET = "s3cret-pass-word"
COLUMNS = {
    "id",
    "original_job_id",
    "app_id",
    "type",
    "payload",
    "error_reason",
    "attempts",
    "error_history",
    "dlq_at",
    "replayed_at",
    "request_id",
    "user_id",
}


def test_migrate_twice_on_an_empty_database(empty_db_url: str) -> None:
    first = dlqd_cli("migrate", env={"DLQD_DATABASE_URL": empty_db_url})
    assert first.returncode == 0, first.stderr
    assert "applied 001_job_dlq" in first.stdout
    second = dlqd_cli("migrate", env={"DLQD_DATABASE_URL": empty_db_url})
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "database is up to date"


def test_list_json_pages_through_every_pending_row(db_url: str) -> None:
    rows = [row_json(original_job_id=f"j{i}", app_id=f"app-{i % 2}") for i in range(25)]
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(INSERT_MANY, {"rows": Jsonb(rows)})
        conn.execute("UPDATE job_dlq SET replayed_at = now() WHERE original_job_id = 'j0'")
    env = {"DLQD_DATABASE_URL": db_url}
    seen: list[str] = []
    cursor: str | None = None
    while True:
        args = ["list", "--limit", "10", "--json"] + (["--cursor", cursor] if cursor else [])
        result = dlqd_cli(*args, env=env)
        assert result.returncode == 0, result.stderr
        document = json.loads(result.stdout)
        assert set(document) == {"entries", "next_cursor"}
        for entry in document["entries"]:
            # every column, and the state the daemon recorded (DESIGN section 6)
            assert set(entry) == COLUMNS | {
                "state", "policy", "due_at", "failures", "last_error", "parked_reason"
            }  # fmt: skip
            assert entry["state"] == "new"
            assert entry["replayed_at"] is None
            seen.append(entry["original_job_id"])
        cursor = document["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(f"j{i}" for i in range(1, 25))
    assert len(seen) == len(set(seen))

    filtered = dlqd_cli("list", "--app-id", "app-1", "--json", env=env)
    assert {e["app_id"] for e in json.loads(filtered.stdout)["entries"]} == {"app-1"}


def test_list_filters_are_globs_that_repeat_and_states(db_url: str) -> None:
    rows = [
        row_json(original_job_id="e1", app_id="shop", type="email.send"),
        row_json(original_job_id="e2", app_id="crm", type="email.bounce"),
        row_json(original_job_id="s1", app_id="shop", type="sms.send"),
        row_json(original_job_id="w1", app_id="billing", type="webhook.deliver"),
    ]
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(INSERT_MANY, {"rows": Jsonb(rows)})
        conn.execute(
            """INSERT INTO dlqd_entry_state (dlq_id, state, policy, fingerprint, parked_reason)
               SELECT id, 'parked', 'hooks', 'f', 'max_failures' FROM job_dlq
                WHERE original_job_id = 'w1'"""
        )
    env = {"DLQD_DATABASE_URL": db_url}

    def listed(*args: str) -> set[str]:
        result = dlqd_cli("list", "--json", *args, env=env)
        assert result.returncode == 0, result.stderr
        return {e["original_job_id"] for e in json.loads(result.stdout)["entries"]}

    assert listed("--type", "email.*") == {"e1", "e2"}
    assert listed("--app-id", "shop", "--app-id", "crm") == {"e1", "e2", "s1"}  # OR
    assert listed("--app-id", "shop", "--type", "*.send") == {"e1", "s1"}  # AND
    assert listed("--type", "[ew]*") == {"e1", "e2", "w1"}
    assert listed("--state", "parked") == {"w1"}
    assert listed("--state", "new") == {"e1", "e2", "s1"}
    assert listed("--policy", "hooks") == {"w1"}
    # searches: a document the payload contains, text of the last error
    assert listed("--payload", '{"job": "s1"}') == {"s1"}
    assert listed("--payload", '{"job": "s1"}', "--app-id", "crm") == set()
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            """UPDATE job_dlq SET error_history = '[{"error": "old"}, {"error": "SMTP 550"}]'
                WHERE original_job_id = 'e2'"""
        )
        conn.execute(
            "UPDATE dlqd_entry_state SET last_error = 'HTTP 503 from hooks' WHERE policy = 'hooks'"
        )
    assert listed("--error", "smtp 550") == {"e2"}
    assert listed("--error", "old") == set()  # the last entry only
    assert listed("--error", "503") == {"w1"}  # or the last failed replay's
    bad = dlqd_cli("list", "--payload", "{nope", env=env)
    assert bad.returncode == 2
    assert "payload search: not valid JSON" in bad.stderr
    table = dlqd_cli("list", "--state", "parked", env=env).stdout
    assert "parked" in table
    assert "hooks" in table

    table = dlqd_cli("list", "--limit", "3", env=env)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["ID", "DLQ_AT", "APP_ID"]
    assert len(lines) == 5
    assert lines[-1].startswith("next cursor: ")


def test_show_json_and_table(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(INSERT_MANY, {"rows": Jsonb([row_json(original_job_id="only")])})
        row = conn.execute("SELECT id FROM job_dlq").fetchone()
        assert row is not None
        entry_id = str(row[0])
        conn.execute(
            """INSERT INTO dlqd_replay_log (dlq_id, original_job_id, app_id, policy, outcome, error)
               VALUES (%s, 'only', 'app-a', 'transient', 'failed', 'boom')""",
            [entry_id],
        )
    env = {"DLQD_DATABASE_URL": db_url}
    result = dlqd_cli("show", entry_id, "--json", env=env)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert set(document) == COLUMNS | {"replays"}
    assert document["id"] == entry_id
    assert document["payload"] == {"job": "only"}
    [replay] = document["replays"]
    assert set(replay) == {"at", "policy", "outcome", "error", "actor", "reason"}
    assert (replay["policy"], replay["outcome"], replay["error"]) == ("transient", "failed", "boom")

    table = dlqd_cli("show", entry_id, env=env)
    assert "original_job_id  only" in table.stdout
    assert "transient" in table.stdout

    missing = dlqd_cli("show", "00000000-0000-0000-0000-000000000000", env=env)
    assert missing.returncode == 1
    assert missing.stderr.strip() == (
        "dlqd: error: no job_dlq row with id 00000000-0000-0000-0000-000000000000"
    )
    bad = dlqd_cli("show", "nope", env=env)
    assert bad.returncode == 2
    assert "invalid id 'nope'" in bad.stderr


def test_check_ok(db_url: str, tmp_path: Path) -> None:
    result = dlqd_cli("check", env={"DLQD_DATABASE_URL": db_url})
    assert result.returncode == 0, result.stderr
    assert "reachable" in result.stdout
    # issue 18 finding 3: without a config, check says none was read
    assert result.stdout.splitlines()[-1] == (
        "config: no config file read (--config or DLQD_CONFIG), 0 policies from the environment"
    )
    cfg = tmp_path / "dlqd.toml"
    cfg.write_text('[[policies]]\nname = "hold"\naction = "park"\n')
    named = dlqd_cli("check", "--config", str(cfg), env={"DLQD_DATABASE_URL": db_url})
    assert named.returncode == 0, named.stderr
    assert named.stdout.splitlines()[-1] == f"config: ok ({cfg}: 1 policies)"


def test_invalid_config_exits_78_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "dlqd.toml"
    config.write_text('database_url = "postgresql://x/y"\n[listen]\npoll_interval = "often"\n')
    result = dlqd_cli("check", "--config", str(config))
    assert result.returncode == 78
    assert result.stderr.count("\n") == 1
    assert "listen.poll_interval" in result.stderr
    assert "Traceback" not in result.stderr

    missing = dlqd_cli("check")
    assert missing.returncode == 78
    assert "database_url: is required" in missing.stderr


def test_unreachable_database_exits_69_in_one_line_without_password() -> None:
    with refusing_port() as port:
        url = f"postgresql://dlqd:{SECRET}@127.0.0.1:{port}/dlq"
        for args in (["check"], ["list"], ["migrate"]):
            result = dlqd_cli(*args, env={"DLQD_DATABASE_URL": url})
            assert result.returncode == 69, (args, result.stderr)
            assert result.stderr.count("\n") == 1
            assert result.stderr.startswith("dlqd: error: database unreachable at 127.0.0.1:")
            assert SECRET not in result.stderr + result.stdout
            assert "Traceback" not in result.stderr


def test_usage_errors_exit_2(db_url: str) -> None:
    env = {"DLQD_DATABASE_URL": db_url}
    assert dlqd_cli("list", "--limit", "0", env=env).returncode == 2
    bad_cursor = dlqd_cli("list", "--cursor", "garbage", env=env)
    assert bad_cursor.returncode == 2
    assert "invalid cursor" in bad_cursor.stderr
    assert dlqd_cli("frobnicate", env=env).returncode == 2


def test_sql_roles_prints_the_role_script_without_config() -> None:
    result = dlqd_cli("sql", "roles")
    assert result.returncode == 0, result.stderr
    assert "CREATE ROLE dlqd LOGIN" in result.stdout
    assert "GRANT UPDATE (replayed_at) ON job_dlq TO dlqd" in result.stdout


def test_a_role_without_grants_gets_a_hint(db_url: str) -> None:
    from tests.conftest import as_role

    result = dlqd_cli("status", env={"DLQD_DATABASE_URL": as_role(db_url, "dlqd_app")})
    assert result.returncode == 1
    assert "dlqd sql roles" in result.stderr
    assert result.stderr.count("\n") == 1


def test_help_lists_exit_codes_environment_and_examples() -> None:
    top = dlqd_cli("--help")
    assert top.returncode == 0
    for text in ("DLQD_DATABASE_URL", "DLQD_ACTOR", "78 invalid configuration", "exit codes"):
        assert text in top.stdout
    for command in ("run", "migrate", "check", "status", "list", "show", "replay", "purge",
                    "explain", "sql", "completion"):  # fmt: skip
        page = dlqd_cli(command, "--help")
        assert page.returncode == 0, command
        assert "examples:\n  dlqd " + command in page.stdout, command
    listing = dlqd_cli("list", "--help").stdout
    assert "(default: 50)" in listing
    assert "(default: None)" not in listing


def test_completion_scripts() -> None:
    for shell, marker in (("bash", "complete"), ("zsh", "compdef"), ("fish", "complete")):
        result = dlqd_cli("completion", shell)
        assert result.returncode == 0, (shell, result.stderr)
        assert marker in result.stdout, shell
        assert "dlqd" in result.stdout
    assert dlqd_cli("completion", "tcsh").returncode == 2


def test_console_token_prints_a_token_once_and_its_entry() -> None:
    import hashlib
    import re
    import tomllib

    result = dlqd_cli("console", "token", "shop-support", "--role", "viewer", "--app-id", "shop")
    assert result.returncode == 0, result.stderr
    token = result.stdout.splitlines()[1].strip()
    entry = tomllib.loads(result.stdout.split("never the token):\n", 1)[1])
    [made] = entry["console"]["tokens"]
    assert made == {
        "name": "shop-support", "role": "viewer", "app_id": "shop",
        "sha256": hashlib.sha256(token.encode()).hexdigest(),
    }  # fmt: skip
    assert len(token) >= 43
    assert re.fullmatch(r"[A-Za-z0-9_-]+", token)
    again = json.loads(dlqd_cli("console", "token", "x", "--role", "operator", "--json").stdout)
    assert again["token"] != token
    assert again["app_id"] is None
    bad = dlqd_cli("console", "token", "no spaces", "--role", "viewer")
    assert bad.returncode == 2
    assert "name: letters, digits" in bad.stderr
