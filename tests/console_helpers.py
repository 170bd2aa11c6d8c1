"""A real `dlqd run` serving the console, its tokens, and rows to look at."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg.types.json import Jsonb

from dlqd.console.auth import digest
from tests.conftest import as_role
from tests.daemon_helpers import DaemonProcess, write_config

#: the tokens the console tests sign in with: (name, role, app_id)
TOKENS = {
    "ops-token": ("alice", "operator", None),
    "view-token": ("victor", "viewer", None),
    "shop-token": ("shop-ops", "operator", "shop"),
    "shop-view-token": ("shop-viewer", "viewer", "shop"),
}
SINK = "INSERT INTO sink (dlq_id, type, payload) SELECT id, type, payload FROM replayed"


def tokens_toml(tokens: dict[str, tuple[str, str, str | None]] = TOKENS) -> str:
    entries = []
    for token, (name, role, app_id) in tokens.items():
        entry = (
            f'[[console.tokens]]\nname = "{name}"\nsha256 = "{digest(token)}"\nrole = "{role}"\n'
        )
        if app_id is not None:
            entry += f'app_id = "{app_id}"\n'
        entries.append(entry)
    return "\n".join(entries)


def console_config(path: Path, *, policies: str | None = None, extra: str = "") -> Path:
    """The console on a free port; every email parked by policy (a human decides),
    a `sink` policy with a target to replay through (`--via sink`)."""
    default_policies = f"""
[[policies]]
name = "hold-email"
match = {{ type = "email.*" }}
action = "park"

[[policies]]
name = "sink"
match = {{ type = "never-matches" }}
target = {{ kind = "sql", statement = "{SINK}" }}
"""
    return write_config(
        path / "dlqd.toml",
        f"""
{extra}
[listen]
poll_interval = "1h"
probe_interval = "1h"

[console]
enabled = true
port = 0

{tokens_toml()}

{policies if policies is not None else default_policies}
""",
    )


@dataclass
class Console:
    """A running console and who can use it."""

    daemon: DaemonProcess
    url: str

    def client(
        self, token: str | None = None, headers: dict[str, str] | None = None, **kwargs: Any
    ) -> httpx.Client:
        sent = {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}
        return httpx.Client(base_url=self.url, headers=sent, timeout=15, **kwargs)


async def start_console(
    db_url: str, tmp_path: Path, daemons: list[DaemonProcess], config: Path | None = None
) -> Console:
    """`dlqd run` as the dlqd role with the console on; ready."""
    daemon = DaemonProcess(as_role(db_url, "dlqd"), config or console_config(tmp_path), tmp_path)
    daemons.append(daemon.start())
    await daemon.wait_ready()
    return Console(daemon, f"http://127.0.0.1:{daemon.console_port}")


SEED = """
INSERT INTO job_dlq (original_job_id, app_id, type, payload, error_reason, attempts, error_history)
SELECT r.original_job_id, r.app_id, r.type, r.payload, r.error_reason, r.attempts,
       coalesce(r.error_history, '[]')
  FROM jsonb_to_recordset(%(rows)s) AS r(original_job_id text, app_id text, type text,
       payload jsonb, error_reason text, attempts int, error_history jsonb)
"""


def seed(db_url: str, rows: list[dict[str, Any]]) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(SEED, {"rows": Jsonb(rows)})


def rows_of(app_id: str, n: int, **fields: Any) -> list[dict[str, Any]]:
    return [
        {
            "id": None,
            "original_job_id": f"{app_id}-{i}",
            "app_id": app_id,
            "type": fields.get("type", "email.send"),
            "payload": fields.get(
                "payload", {"to": f"{app_id}{i}@example.com", "password": f"{app_id}-secret-{i}"}
            ),
            "error_reason": fields.get("error_reason", "timeout"),
            "attempts": 3,
            "error_history": [
                {"at": "2026-12-01T09:00:00Z", "error": "connect timeout", "attempt": 1},
                {
                    "at": "2026-12-01T09:05:00Z",
                    "error": "connect timeout",
                    "attempt": 2,
                    "token": "history-secret",
                },
            ],
        }
        for i in range(n)
    ]


def ids_of(db_url: str, app_id: str) -> list[str]:
    with psycopg.connect(db_url) as conn:
        return [
            str(r[0])
            for r in conn.execute(
                "SELECT id FROM job_dlq WHERE app_id = %s ORDER BY dlq_at, id", (app_id,)
            ).fetchall()
        ]
