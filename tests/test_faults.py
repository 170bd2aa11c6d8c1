"""Fault injection: a database that goes away, a listener that goes deaf, signals."""

from __future__ import annotations

import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import anyio
import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb

from tests.conftest import dlqd_cli
from tests.daemon_helpers import SINK_DDL, SINK_STATEMENT, DaemonProcess, scalar, wait_until
from tests.factories import INSERT_MANY, row_json
from tests.pgcluster import Cluster
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.anyio

CONFIG = f"""
[listen]
poll_interval = "1h"
probe_interval = "{{probe}}"
[[policies]]
name = "all"
target = {{{{ kind = "sql", statement = "{SINK_STATEMENT}" }}}}
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster.create() as c:
        yield c


@pytest.fixture
def cluster_db(cluster: Cluster, tmp_path: Path) -> str:
    url = cluster.url()
    name = f"faults_{tmp_path.name[-8:].replace('-', '_').lower()}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}".encode())
        conn.execute(f"CREATE DATABASE {name}".encode())
    db = cluster.url(name)
    assert dlqd_cli("migrate", env={"DLQD_DATABASE_URL": db}).returncode == 0
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute(SINK_DDL)
    return db


def config(tmp_path: Path, probe: str = "1h", extra: str = "") -> Path:
    path = tmp_path / "dlqd.toml"
    path.write_text(extra + CONFIG.format(probe=probe))
    return path


async def insert(db_url: str, prefix: str, n: int) -> None:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        rows = [row_json(original_job_id=f"{prefix}{i}") for i in range(n)]
        await conn.execute(INSERT_MANY, {"rows": Jsonb(rows)})


async def replayed(db_url: str) -> int:
    return int(await scalar(db_url, "SELECT count(*) FROM sink"))


async def test_database_restart_readiness_and_recovery(
    cluster: Cluster, cluster_db: str, tmp_path: Path
) -> None:
    daemon = DaemonProcess(cluster_db, config(tmp_path), tmp_path).start()
    try:
        await daemon.wait_ready()
        await insert(cluster_db, "before", 5)
        await wait_until(lambda: _at_least(cluster_db, 5), within=30)

        await anyio.to_thread.run_sync(cluster.stop)

        async def not_ready() -> bool:
            status, body = await anyio.to_thread.run_sync(daemon.http, "/readyz")
            return status == 503 and "listener not connected" in body

        await wait_until(not_ready, within=30)
        assert daemon.http("/healthz") == (200, "ok\n")  # alive, just not ready
        assert daemon.metric("dlqd_listener_up") == 0

        await anyio.to_thread.run_sync(cluster.start)
        await daemon.wait_ready(within=60)  # reconnected with backoff
        await insert(cluster_db, "after", 5)
        await wait_until(lambda: _at_least(cluster_db, 10), within=30)
        assert daemon.process is not None
        assert daemon.process.poll() is None  # rode out the outage
    finally:
        daemon.stop()
    assert daemon.process is not None
    assert daemon.process.returncode == 0


async def _at_least(db_url: str, n: int) -> bool:
    return await replayed(db_url) >= n


async def test_deaf_listener_is_found_by_the_self_probe(
    cluster: Cluster, cluster_db: str, tmp_path: Path
) -> None:
    """The LISTEN connection stays up but hears nothing: the probe notices and
    reconnects, and the catch-up scan replays what was missed."""
    async with anyio.create_task_group() as tg:
        proxy = TcpProxy(cluster.port)
        await proxy.run(tg)
        listen_url = make_conninfo(cluster_db, port=str(proxy.port))
        daemon = DaemonProcess(
            cluster_db,
            config(tmp_path, probe="300ms"),
            tmp_path,
            DLQD_LISTEN_DATABASE_URL=listen_url,
        ).start()
        try:
            await daemon.wait_ready()

            async def first_pass_done() -> bool:
                # the start-up scan would otherwise find the rows without any NOTIFY
                return daemon.metric("dlqd_replayer_passes_total") >= 1

            await wait_until(first_pass_done, within=30)
            proxy.deafen_all()
            await insert(cluster_db, "missed", 3)  # its NOTIFY is swallowed by the proxy
            await wait_until(lambda: _at_least(cluster_db, 3), within=30)

            async def probe_noticed() -> bool:
                # the rows may be found by a pass before the probe's deadline
                # passes: what matters is that the probe notices, not the order
                lost = [e for e in daemon.events() if e.get("event") == "listener lost"]
                return any("self-probe not heard back" in e["error"] for e in lost)

            await wait_until(probe_noticed, within=30)
            assert daemon.metric("dlqd_listener_reconnects_total") >= 1
        finally:
            daemon.stop()
            tg.cancel_scope.cancel()


async def test_sighup_reloads_policies_and_keeps_the_old_config_when_invalid(
    cluster_db: str, tmp_path: Path
) -> None:
    path = config(tmp_path)
    original = path.read_text()
    # start with a policy that parks everything
    path.write_text(original.replace('name = "all"', 'name = "all"\naction = "park"'))
    daemon = DaemonProcess(cluster_db, path, tmp_path).start()
    try:
        await daemon.wait_ready()
        await insert(cluster_db, "held", 4)

        async def parked() -> bool:
            return int(await scalar(cluster_db, "SELECT count(*) FROM dlqd_entry_state")) == 4

        await wait_until(parked, within=30)
        path.write_text("this is [not toml")
        daemon.send_signal(signal.SIGHUP)

        async def refused() -> bool:
            return any(
                e.get("event") == "config reload refused: keeping the running config"
                for e in daemon.events()
            )

        await wait_until(refused, within=30)
        assert await replayed(cluster_db) == 0
        path.write_text(original)  # now replay everything
        daemon.send_signal(signal.SIGHUP)
        await wait_until(lambda: _at_least(cluster_db, 4), within=30)
    finally:
        daemon.stop()


async def test_systemd_notifications(cluster_db: str, tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(30)
        daemon = DaemonProcess(
            cluster_db,
            config(tmp_path),
            tmp_path,
            NOTIFY_SOCKET=str(sock_path),
            WATCHDOG_USEC="2000000",
        ).start()
        try:
            messages: list[str] = []
            while "READY=1" not in messages:
                messages.append((await anyio.to_thread.run_sync(sock.recv, 256)).decode())
            assert daemon.http("/readyz")[0] == 200  # READY=1 came after the listener was up
            while "WATCHDOG=1" not in messages:
                messages.append((await anyio.to_thread.run_sync(sock.recv, 256)).decode())
            daemon.send_signal(signal.SIGTERM)
            while "STOPPING=1" not in messages:
                messages.append((await anyio.to_thread.run_sync(sock.recv, 256)).decode())
            assert await daemon.wait_exit() == 0
        finally:
            daemon.stop()


async def test_stop_signal_while_waiting_for_the_listener(cluster_db: str, tmp_path: Path) -> None:
    """The listener's direct connection goes through a proxy that, after the
    pre-flight check, hears nothing back: start-up waits (alive, not ready), and
    SIGTERM still ends it with 0."""
    async with anyio.create_task_group() as tg:
        proxy = TcpProxy(int(psycopg.conninfo.conninfo_to_dict(cluster_db)["port"]))
        await proxy.run(tg)
        proxy.deaf_after = 1  # the pre-flight connection works, the listener's does not
        daemon = DaemonProcess(
            cluster_db,
            config(tmp_path),
            tmp_path,
            DLQD_LISTEN_DATABASE_URL=make_conninfo(cluster_db, port=str(proxy.port)),
        ).start()
        try:

            async def serving() -> bool:
                status, _ = await anyio.to_thread.run_sync(daemon.http, "/healthz")
                return status == 200

            await wait_until(serving, within=30)
            assert daemon.http("/readyz")[0] == 503
            daemon.send_signal(signal.SIGTERM)
            assert await daemon.wait_exit(within=30) == 0
        finally:
            daemon.stop()
            tg.cancel_scope.cancel()
