"""Real `dlqd run` processes for end-to-end tests."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import psycopg
from psycopg.rows import dict_row

ROOT = Path(__file__).resolve().parent.parent

SINK_DDL = """
CREATE TABLE IF NOT EXISTS sink (
    dlq_id  uuid        NOT NULL,
    type    text        NOT NULL,
    payload jsonb       NOT NULL,
    at      timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""
SINK_STATEMENT = "INSERT INTO sink (dlq_id, type, payload) VALUES (%(id)s, %(type)s, %(payload)s)"
#: whether some worker listens (inserters notify only then: migration 012)
FRESH_WORKERS = "SELECT count(*) FROM dlqd_wake WHERE beat > now() - interval '30 seconds'"


_serial = itertools.count(1)


def write_config(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


class DaemonProcess:
    """``python -m dlqd run`` with its own config, port and log file."""

    def __init__(
        self,
        db_url: str,
        config: Path,
        log_dir: Path,
        command: list[str] | None = None,
        **env: str,
    ) -> None:
        self.command = command or [sys.executable, "-m", "dlqd"]
        # port 0: the daemon binds a free port itself and logs it ("http listening"),
        # so no other process can take it between a pick and the bind
        self._port: int | None = None
        self.log_path = log_dir / f"dlqd-{next(_serial)}.log"
        base = {k: v for k, v in os.environ.items() if not k.startswith("DLQD_")}
        self.env = {
            **base,
            "DLQD_DATABASE_URL": db_url,
            "DLQD_METRICS_HOST": "127.0.0.1",
            "DLQD_METRICS_PORT": "0",
            "DLQD_LOG_FORMAT": "json",
            **env,
        }
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [*self.command, "run", "--config", str(self.config)],
            env=self.env,
            stdout=log,
            stderr=log,
            cwd=ROOT,
        )
        log.close()
        return self

    @property
    def port(self) -> int:
        """The metrics port the daemon bound (0 until it logged it)."""
        if self._port is None:
            for event in self.events():
                if event.get("event") == "http listening":
                    self._port = int(event["port"])
                    break
        return self._port or 0

    @property
    def console_port(self) -> int:
        """The console's port (0 until the daemon logged it)."""
        for event in self.events():
            if event.get("event") == "console listening":
                return int(event["port"])
        return 0

    def http(self, path: str) -> tuple[int, str]:
        if not self.port:
            return 0, ""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.port}{path}", timeout=10
            ) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return 0, ""

    async def wait_ready(self, within: float = 30) -> None:
        async def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"dlqd exited {self.process.returncode}:\n{self.logs()}")
            status, _ = await anyio.to_thread.run_sync(self.http, "/readyz")
            return status == 200

        await wait_until(ready, within)

    def metric(self, name: str) -> float:
        """A metric's value; NaN when the scrape itself failed (a slow scrape inside
        wait_until then just means "not yet"); an error when it is not exported."""
        status, text = self.http("/metrics")
        if status != 200:
            return float("nan")
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"metric {name} not exported")

    def pending_metric(self, name: str) -> float | None:
        """A metric's value, None while it is not exported (or the scrape fails):
        for waiting on a series to appear, never for an assertion."""
        status, text = self.http("/metrics")
        if status != 200:
            return None
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return None

    def send_signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def wait_exit(self, within: float = 30) -> int:
        assert self.process is not None
        process = self.process
        with anyio.fail_after(within):
            return await anyio.to_thread.run_sync(process.wait)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self) -> list[dict[str, Any]]:
        found = []
        for line in self.logs().splitlines():
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return found


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], within: float, interval: float = 0.02
) -> None:
    """Poll ``predicate`` until true; fail the test after ``within`` seconds.

    For state held by another process (a database row, a metric), where no
    in-process event exists to wait on.
    """
    with anyio.fail_after(within):
        while not await predicate():  # noqa: ASYNC110 - the state lives in another process
            await anyio.sleep(interval)


async def scalar(db_url: str, query: str, params: Any = None) -> Any:
    async with await psycopg.AsyncConnection.connect(
        db_url, autocommit=True, row_factory=dict_row
    ) as conn:
        cur = await conn.execute(query.encode(), params)
        row = await cur.fetchone()
        return next(iter(row.values())) if row else None
