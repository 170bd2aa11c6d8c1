"""dlqd behind Debian's PgBouncer (1.18) in transaction mode: it cannot keep
prepared statements, and dlqd must notice and run without them.

PgBouncer comes from Debian's package (scripts/test installs it, as it does
Prometheus) and runs as the ``postgres`` user (it refuses to run as root).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb

from tests.conftest import as_role
from tests.daemon_helpers import SINK_STATEMENT, DaemonProcess, scalar, wait_until, write_config
from tests.factories import INSERT_MANY, row_json

pytestmark = pytest.mark.anyio

PGBOUNCER = "/usr/sbin/pgbouncer"
RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def pgbouncer(sink_db: str) -> Iterator[str]:
    """A transaction-pooling PgBouncer in front of this test's database; yields
    the daemon role's URL through it."""
    assert Path(PGBOUNCER).exists(), "pgbouncer is missing: scripts/test installs it"
    server = conninfo_to_dict(sink_db)
    # a folder the postgres user can read (pytest's own are root's alone)
    folder = Path(tempfile.mkdtemp(prefix="dlqd-pgbouncer-"))
    folder.chmod(0o755)
    (folder / "users.txt").write_text('"dlqd" ""\n')
    log_path = folder / "pgbouncer.log"
    log = log_path.open("wb")
    process, url = _start_pgbouncer(folder, server, sink_db, log)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with psycopg.connect(url, connect_timeout=2, prepare_threshold=None):
                    break
            except psycopg.OperationalError:
                log.flush()
                if process.poll() is not None and "in use" in log_path.read_text(errors="replace"):
                    # the port picked was taken before PgBouncer bound it: another one
                    process, url = _start_pgbouncer(folder, server, sink_db, log)
                    continue
                failed = process.poll() is not None or time.monotonic() > deadline
                assert not failed, log_path.read_text()
                time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


def _start_pgbouncer(
    folder: Path, server: dict[str, Any], sink_db: str, log: Any
) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    (folder / "pgbouncer.ini").write_text(
        f"""[databases]
* = host={server.get("host", "127.0.0.1")} port={server.get("port", 5432)}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {folder}/users.txt
pool_mode = transaction
default_pool_size = 4
max_client_conn = 100
ignore_startup_parameters = extra_float_digits,options
"""
    )
    process = subprocess.Popen(
        [RUNUSER, "-u", "postgres", "--", PGBOUNCER, str(folder / "pgbouncer.ini")],
        stdout=log,
        stderr=log,
    )
    return process, make_conninfo(as_role(sink_db, "dlqd"), host="127.0.0.1", port=str(port))


async def test_behind_a_pooler_that_drops_prepared_statements_dlqd_runs_without_them(
    sink_db: str, pgbouncer: str, tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    """Security finding 12: with PgBouncer 1.18 in transaction mode dlqd started,
    then logged "prepared statement already exists" and /readyz flapped. It
    now says so in one line at start and runs without prepared statements."""
    cfg = write_config(
        tmp_path / "dlqd.toml",
        f"""
[listen]
poll_interval = "1s"
[replay]
batch_size = 7
concurrency = 2
[[policies]]
name = "all"
target = {{ kind = "sql", statement = "{SINK_STATEMENT}" }}
""",
    )
    daemon = DaemonProcess(
        pgbouncer, cfg, tmp_path, DLQD_LISTEN_DATABASE_URL=as_role(sink_db, "dlqd")
    ).start()
    daemons.append(daemon)
    await daemon.wait_ready()
    warnings = [e["event"] for e in daemon.events() if e.get("level") == "warning"]
    assert any("connection pooler that does not keep prepared statements" in w for w in warnings)
    async with await psycopg.AsyncConnection.connect(sink_db, autocommit=True) as conn:
        for burst in range(10):
            rows = [row_json(original_job_id=f"{burst}-{i}") for i in range(20)]
            await conn.execute(INSERT_MANY, {"rows": Jsonb(rows)})

    async def replayed() -> bool:
        return int(await scalar(sink_db, "SELECT count(*) FROM sink")) == 200

    await wait_until(replayed, within=60)
    assert await scalar(sink_db, "SELECT count(DISTINCT dlq_id) FROM sink") == 200
    assert daemon.http("/readyz")[0] == 200
    logs = daemon.logs()
    assert "prepared statement" not in logs.replace("keep prepared statements", "")


async def test_a_direct_connection_keeps_its_prepared_statements(db_url: str) -> None:
    from dlqd.db.connector import connect, pooler_drops_prepared_statements

    conn = await connect(db_url, autocommit=True)
    try:
        assert await pooler_drops_prepared_statements(conn) is False
    finally:
        await conn.close()
