"""sql/roles.sql where no superuser is at hand (a managed platform).

On its own throwaway cluster: roles are cluster-wide, and the machine's
server already has a `dlqd` role with BYPASSRLS from the other tests. Here a
CREATEROLE administrator who owns the database migrates and runs the role
script; BYPASSRLS is refused, so the script's fallback policy must carry the
daemon, and purge (a SECURITY DEFINER function of a non-superuser owner,
under FORCE ROW LEVEL SECURITY) must still see every tenant.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from psycopg.types.json import Jsonb

from dlqd.db.queries import sql_dir
from tests.conftest import dlqd_cli
from tests.daemon_helpers import SINK_DDL, SINK_STATEMENT, DaemonProcess, scalar, wait_until
from tests.factories import INSERT_MANY, row_json
from tests.pgcluster import Cluster

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster.create() as c:
        yield c


async def test_fallback_policy_carries_the_daemon_without_bypassrls(
    cluster: Cluster, tmp_path: Path
) -> None:
    with psycopg.connect(cluster.url(), autocommit=True) as conn:
        conn.execute("CREATE ROLE platform_admin LOGIN CREATEROLE")
        conn.execute("CREATE DATABASE app OWNER platform_admin")
    owner = make_conninfo(cluster.url("app"), user="platform_admin")
    migrated = dlqd_cli("migrate", env={"DLQD_DATABASE_URL": owner})
    assert migrated.returncode == 0, migrated.stderr
    with psycopg.connect(owner, autocommit=True) as conn:
        conn.execute((sql_dir() / "roles.sql").read_text().encode())
        conn.execute(SINK_DDL)
        conn.execute("GRANT SELECT, INSERT ON sink TO dlqd")
        bypass = conn.execute("SELECT rolbypassrls FROM pg_roles WHERE rolname = 'dlqd'")
        assert bypass.fetchone() == (False,)  # refused: not a superuser
        policies = conn.execute("SELECT policyname FROM pg_policies WHERE tablename = 'job_dlq'")
        assert {r[0] for r in policies.fetchall()} == {
            "tenant_isolation",
            "dlqd_all_rows",
            "dlqd_maintenance",
        }

    daemon_url = make_conninfo(cluster.url("app"), user="dlqd")
    config = tmp_path / "dlqd.toml"
    config.write_text(
        '[listen]\npoll_interval = "1h"\nprobe_interval = "1h"\n'
        f'[[policies]]\nname = "all"\ntarget = {{ kind = "sql", statement = "{SINK_STATEMENT}" }}\n'
    )
    daemon = DaemonProcess(daemon_url, config, tmp_path).start()
    try:
        await daemon.wait_ready()
        for tenant in ("tenant-a", "tenant-b"):
            with psycopg.connect(make_conninfo(owner, user="dlqd_app"), autocommit=True) as app:
                app.execute("SELECT set_config('app.current_app_id', %s, false)", [tenant])
                rows = [row_json(original_job_id=f"{tenant}-{i}", app_id=tenant) for i in range(3)]
                app.execute(INSERT_MANY, {"rows": Jsonb(rows)})

        async def replayed() -> bool:
            return int(await scalar(cluster.url("app"), "SELECT count(*) FROM sink")) == 6

        await wait_until(replayed, within=30)
    finally:
        daemon.stop()

    superuser = cluster.url("app")
    with psycopg.connect(superuser, autocommit=True) as conn:
        conn.execute("UPDATE job_dlq SET replayed_at = now() - interval '8 days'")
    purged = dlqd_cli("purge", "--json", env={"DLQD_DATABASE_URL": daemon_url})
    assert purged.returncode == 0, purged.stderr
    assert json.loads(purged.stdout) == {"deleted": 6, "dry_run": False}
    with psycopg.connect(superuser, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM job_dlq").fetchone() == (0,)
    # the owner's maintenance policy is closed outside the purge function: the
    # owner (FORCE ROW LEVEL SECURITY) sees no tenant's row, the daemon sees it
    with psycopg.connect(make_conninfo(owner, user="dlqd_app"), autocommit=True) as app:
        app.execute("SELECT set_config('app.current_app_id', 'tenant-a', false)")
        app.execute(
            INSERT_MANY, {"rows": Jsonb([row_json(original_job_id="late", app_id="tenant-a")])}
        )
    with psycopg.connect(owner, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM job_dlq").fetchone() == (0,)
    with psycopg.connect(daemon_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM job_dlq").fetchone() == (1,)
