"""Real-Postgres test harness.

The server: ``$DLQD_TEST_DATABASE_URL``, else 127.0.0.1:5432 (started with
``pg_ctlcluster`` when installed but down), else a throwaway cluster from
:mod:`tests.pgcluster`. Each test gets its own database cloned from a template
that ``dlqd migrate`` prepared once per session, so tests never see each
other's rows or notifications.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import hypothesis
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row

from dlqd.db.connector import connect
from dlqd.db.migrations import migrate
from dlqd.db.queries import sql_dir
from tests.pgcluster import Cluster

# Correctness, not speed: a loaded CI machine must not fail an example on time.
hypothesis.settings.register_profile("dlqd", deadline=None, print_blob=True)
hypothesis.settings.load_profile("dlqd")

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
ROOT = Path(__file__).resolve().parent.parent


def _reachable(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


def _start_local_server() -> bool:
    """Start the machine's own cluster(s) when installed but down."""
    ctl = shutil.which("pg_ctlcluster")
    if ctl is None or not Path("/etc/postgresql").is_dir():
        return False
    for version in sorted(os.listdir("/etc/postgresql")):
        subprocess.run(
            [ctl, "--skip-systemctl-redirect", version, "main", "start"],
            check=False,
            capture_output=True,
        )
    return _reachable(DEFAULT_URL)


@pytest.fixture(scope="session")
def admin_url() -> Iterator[str]:
    """A superuser URL on the server the tests use."""
    if url := os.environ.get("DLQD_TEST_DATABASE_URL"):
        yield url
        return
    if _reachable(DEFAULT_URL) or _start_local_server():
        yield DEFAULT_URL
        return
    with Cluster.create() as cluster:
        yield cluster.url()


def with_dbname(url: str, dbname: str) -> str:
    return make_conninfo(url, dbname=dbname)


def _admin_execute(url: str, statement: sql.Composable) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statement)


#: roles are cluster-wide: suites running side by side (xdist workers, two
#: checkouts) would update the same catalog rows at once ("tuple concurrently
#: updated"). This lock, taken in the server's own postgres database, serialises
#: every run of sql/roles.sql on the shared server.
ROLES_LOCK = "SELECT pg_advisory_lock(hashtextextended('dlqd:roles', 0))"


def apply_roles(url: str, admin_url: str) -> None:
    """sql/roles.sql on ``url``, one run at a time on the server."""
    with psycopg.connect(admin_url, autocommit=True) as guard:
        guard.execute(ROLES_LOCK)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute((sql_dir() / "roles.sql").read_text().encode())


@pytest.fixture(scope="session")
def template_db(admin_url: str) -> Iterator[str]:
    """A database with every migration and sql/roles.sql applied; cloned per test."""
    name = f"dlqd_tmpl_{uuid.uuid4().hex[:10]}"
    _admin_execute(admin_url, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = with_dbname(admin_url, name)

    async def prepare() -> None:
        conn = await connect(url, autocommit=True)
        guard = await connect(admin_url, autocommit=True)  # see ROLES_LOCK
        try:
            await migrate(conn)
            await guard.execute(ROLES_LOCK)
            roles = (sql_dir() / "roles.sql").read_text()
            await conn.execute(roles.encode())
        finally:
            await conn.close()
            await guard.close()

    try:
        anyio.run(prepare)
        yield name
    finally:
        _admin_execute(
            admin_url,
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)),
        )


@pytest.fixture
def db_url(admin_url: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database of this test's own."""
    name = f"dlqd_test_{uuid.uuid4().hex[:12]}"
    _admin_execute(
        admin_url,
        sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(template_db)
        ),
    )
    try:
        yield with_dbname(admin_url, name)
    finally:
        _admin_execute(
            admin_url,
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)),
        )


@contextmanager
def refusing_port() -> Iterator[int]:
    """A local port that refuses connections for as long as it is held: bound,
    never listening (a port merely freed could be taken by anyone meanwhile)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield int(held.getsockname()[1])


def as_role(url: str, role: str) -> str:
    """``url`` logging in as ``role`` (the test server trusts local connections)."""
    return make_conninfo(url, user=role, password="")


@pytest.fixture
def dlqd_url(db_url: str) -> str:
    """This test's database, as the least-privileged ``dlqd`` role of sql/roles.sql."""
    return as_role(db_url, "dlqd")


@pytest.fixture
def empty_db_url(admin_url: str) -> Iterator[str]:
    """A fresh database with no migrations applied."""
    name = f"dlqd_empty_{uuid.uuid4().hex[:12]}"
    _admin_execute(admin_url, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_dbname(admin_url, name)
    finally:
        _admin_execute(
            admin_url,
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)),
        )


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def conn(db_url: str) -> AsyncIterator[psycopg.AsyncConnection[dict[str, Any]]]:
    """An autocommit connection to this test's database."""
    connection = await psycopg.AsyncConnection.connect(
        db_url, autocommit=True, row_factory=dict_row
    )
    try:
        yield connection
    finally:
        await connection.close()


def dlqd_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m dlqd`` as an operator would, in a clean environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("DLQD_")}
    return subprocess.run(
        [sys.executable, "-m", "dlqd", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )


@pytest.fixture
def sink_db(db_url: str) -> str:
    """This test's database with the sink table that test targets replay into,
    writable by the dlqd role."""
    from tests.daemon_helpers import SINK_DDL

    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(SINK_DDL)
        conn.execute("GRANT SELECT, INSERT ON sink TO dlqd")
    return db_url


@pytest.fixture
def daemons() -> Iterator[list[Any]]:
    """Daemon processes a test starts; stopped (SIGTERM, then SIGKILL) after it."""
    started: list[Any] = []
    yield started
    for daemon in started:
        daemon.stop()
