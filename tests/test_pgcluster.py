"""The throwaway-cluster helper: create, stop, start, restart, remove."""

from __future__ import annotations

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
