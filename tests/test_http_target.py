"""The http target against a real HTTP server on 127.0.0.1 (started by the test)."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tests.conftest import as_role, dlqd_cli
from tests.daemon_helpers import DaemonProcess, scalar, wait_until, write_config
from tests.factories import INSERT_MANY, row_json

pytestmark = pytest.mark.anyio

Reply = tuple[int, dict[str, str]]


@dataclass
class Receiver:
    """Answers each request with the next scripted reply (the last one repeats)."""

    replies: list[Reply | Callable[[], Reply]]
    requests: list[dict[str, Any]] = field(default_factory=list)
    received: threading.Event = field(default_factory=threading.Event)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/replay"

    def answer(self) -> Reply:
        step = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        return step() if callable(step) else step


@pytest.fixture
def receiver() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(*replies: Reply | Callable[[], Reply]) -> Receiver:
        state = Receiver(list(replies))

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                state.requests.append(
                    {"headers": dict(self.headers), "body": json.loads(body), "path": self.path}
                )
                state.received.set()
                status, headers = state.answer()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        state.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=state.server.serve_forever, daemon=True).start()
        made.append(state)
        return state

    yield make
    for state in made:
        assert state.server is not None
        state.server.shutdown()


def config(tmp_path: Path, url: str, extra: str = "", timeout: str = "2s") -> Path:
    return write_config(
        tmp_path / "dlqd.toml",
        f"""
[listen]
poll_interval = "1h"
probe_interval = "1h"
[[policies]]
name = "hook"
retry_delay = "100ms"
factor = 1.0
{extra}
[policies.target]
kind = "http"
url = "{url}"
timeout = "{timeout}"
headers = {{ Authorization = "env:HOOK_TOKEN" }}
""",
    )


TOKEN = "Bearer s3cret-token-value"


async def start(daemons: list[DaemonProcess], db: str, cfg: Path, tmp: Path) -> DaemonProcess:
    daemon = DaemonProcess(as_role(db, "dlqd"), cfg, tmp, HOOK_TOKEN=TOKEN).start()
    daemons.append(daemon)
    await daemon.wait_ready()
    return daemon


async def insert(db_url: str, *names: str) -> None:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        rows = [row_json(original_job_id=n, payload={"deep": {"n": [1, 2]}}) for n in names]
        await conn.execute(INSERT_MANY, {"rows": Jsonb(rows)})


async def outcomes(db_url: str) -> list[str]:
    found = await scalar(db_url, "SELECT array_agg(outcome ORDER BY id) FROM dlqd_replay_log")
    return list(found or [])


async def test_503_503_200_is_three_requests_with_one_key_and_one_replay(
    db_url: str, tmp_path: Path, daemons: list[DaemonProcess], receiver: Callable[..., Receiver]
) -> None:
    server = receiver((503, {}), (503, {}), (200, {}))
    daemon = await start(daemons, db_url, config(tmp_path, server.url), tmp_path)
    await insert(db_url, "job-1")

    async def replayed() -> bool:
        return await outcomes(db_url) == ["failed", "failed", "replayed"]

    await wait_until(replayed, within=30)
    assert len(server.requests) == 3
    keys = {r["headers"]["Idempotency-Key"] for r in server.requests}
    row_id = await scalar(db_url, "SELECT id::text FROM job_dlq")
    assert keys == {row_id}
    body = server.requests[0]["body"]
    assert body["payload"] == {"deep": {"n": [1, 2]}}  # every column, payload as an object
    assert {"id", "original_job_id", "app_id", "type", "error_history", "dlq_at"} <= set(body)
    assert server.requests[0]["headers"]["Authorization"] == TOKEN
    assert server.requests[0]["headers"]["Content-Type"] == "application/json"
    assert TOKEN not in daemon.logs()
    assert await scalar(db_url, "SELECT count(*) FROM job_dlq WHERE replayed_at IS NULL") == 0


async def test_a_422_parks_the_row_with_the_status(
    db_url: str, tmp_path: Path, daemons: list[DaemonProcess], receiver: Callable[..., Receiver]
) -> None:
    server = receiver((422, {}))
    await start(daemons, db_url, config(tmp_path, server.url), tmp_path)
    await insert(db_url, "bad-request")

    async def parked() -> bool:
        return await outcomes(db_url) == ["parked"]

    await wait_until(parked, within=30)
    reason = await scalar(db_url, "SELECT parked_reason FROM dlqd_entry_state")
    assert reason == "http_4xx"
    error = await scalar(db_url, "SELECT error FROM dlqd_replay_log")
    assert error.startswith("HTTP 422 from http://127.0.0.1:")
    assert len(server.requests) == 1


async def test_a_hanging_server_times_out_and_the_row_is_retried(
    db_url: str, tmp_path: Path, daemons: list[DaemonProcess], receiver: Callable[..., Receiver]
) -> None:
    release = threading.Event()

    def hang() -> Reply:
        release.wait(10)
        return (200, {})

    server = receiver(hang, hang, (200, {}))
    await start(daemons, db_url, config(tmp_path, server.url, timeout="300ms"), tmp_path)
    await insert(db_url, "slow")

    async def timed_out_twice() -> bool:
        return (await outcomes(db_url))[:2] == ["failed", "failed"]

    await wait_until(timed_out_twice, within=30)
    release.set()
    errors = await scalar(db_url, "SELECT array_agg(error) FROM dlqd_replay_log")
    assert all(e == "HTTP timeout after 0.3s" for e in errors[:2])

    async def replayed() -> bool:
        return (await outcomes(db_url))[-1:] == ["replayed"]

    await wait_until(replayed, within=30)


async def test_retry_after_sets_the_next_attempt(
    db_url: str, tmp_path: Path, daemons: list[DaemonProcess], receiver: Callable[..., Receiver]
) -> None:
    server = receiver((429, {"Retry-After": "7"}))
    await start(daemons, db_url, config(tmp_path, server.url), tmp_path)
    await insert(db_url, "busy")
    await wait_until(lambda: _failed(db_url), within=30)
    wait = await scalar(
        db_url, "SELECT extract(epoch FROM due_at - last_failure_at) FROM dlqd_entry_state"
    )
    assert float(wait) == 7.0  # not retry_delay (100ms): the server said when
    assert len(server.requests) == 1


async def _failed(db_url: str) -> bool:
    return "failed" in await outcomes(db_url)


async def test_a_crash_between_the_call_and_the_mark_resends_the_same_key(
    db_url: str, tmp_path: Path, daemons: list[DaemonProcess], receiver: Callable[..., Receiver]
) -> None:
    killed = threading.Event()

    def answer_after_the_crash() -> Reply:
        killed.wait(10)
        return (200, {})

    server = receiver(answer_after_the_crash, (200, {}))
    # the kill must come while the call waits for its answer: a timeout a
    # loaded machine cannot run out before it (the lease is 5 s longer)
    cfg = config(tmp_path, server.url, timeout="5s")
    first = await start(daemons, db_url, cfg, tmp_path)
    await insert(db_url, "once")
    await wait_until(lambda: _received(server), within=30)
    assert first.process is not None
    first.process.send_signal(signal.SIGKILL)  # the call is in flight, nothing marked
    first.process.wait()
    killed.set()
    await start(daemons, db_url, cfg, tmp_path)  # the lease runs out, then a resend

    async def replayed() -> bool:
        return await outcomes(db_url) == ["replayed"]

    await wait_until(replayed, within=60)
    assert len(server.requests) == 2
    assert len({r["headers"]["Idempotency-Key"] for r in server.requests}) == 1


async def _received(server: Receiver) -> bool:
    return server.received.is_set()


def test_manual_replay_through_http_and_a_missing_header_variable(
    db_url: str, tmp_path: Path, receiver: Callable[..., Receiver]
) -> None:
    server = receiver((200, {}))
    cfg = str(config(tmp_path, server.url))
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(INSERT_MANY, {"rows": Jsonb([row_json(original_job_id="by-hand")])})
    env = {"DLQD_DATABASE_URL": as_role(db_url, "dlqd")}
    missing = dlqd_cli("check", "--config", cfg, env=env)
    assert missing.returncode == 78
    assert "environment variable HOOK_TOKEN is not set" in missing.stderr
    result = dlqd_cli(
        "replay", "--all", "--yes", "--json", "--config", cfg, env={**env, "HOOK_TOKEN": "t"}
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["replayed"] == 1
    assert server.requests[0]["headers"]["Authorization"] == "t"
