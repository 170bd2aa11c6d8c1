"""Tenant isolation as non-superuser roles, purge batches, one NOTIFY per statement."""

from __future__ import annotations

from typing import Any

import anyio
import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from tests.factories import INSERT_MANY, row_json

pytestmark = pytest.mark.anyio

Conn = psycopg.AsyncConnection[dict[str, Any]]


async def _seed_tenants(conn: Conn) -> None:
    rows = [row_json(original_job_id=f"a{i}", app_id="tenant-a") for i in range(3)]
    rows += [row_json(original_job_id=f"b{i}", app_id="tenant-b") for i in range(2)]
    await conn.execute(INSERT_MANY, {"rows": Jsonb(rows)})


async def _as_role(db_url: str, role: str, app_id: str | None) -> Conn:
    conn = await psycopg.AsyncConnection.connect(db_url, autocommit=True, row_factory=dict_row)
    await conn.execute(f"SET ROLE {role}".encode())
    if app_id is not None:
        await conn.execute("SELECT set_config('app.current_app_id', %s, false)", [app_id])
    return conn


async def _app_ids(conn: Conn) -> list[str]:
    cur = await conn.execute("SELECT app_id FROM job_dlq ORDER BY app_id")
    return [r["app_id"] for r in await cur.fetchall()]


async def test_tenant_reads_only_its_rows(conn: Conn, db_url: str) -> None:
    await _seed_tenants(conn)
    tenant_a = await _as_role(db_url, "dlqd_app", "tenant-a")
    nobody = await _as_role(db_url, "dlqd_app", None)
    try:
        assert await _app_ids(tenant_a) == ["tenant-a"] * 3
        assert await _app_ids(nobody) == []  # no tenant chosen: nothing visible
    finally:
        await tenant_a.close()
        await nobody.close()


async def test_tenant_cannot_write_another_tenants_row(conn: Conn, db_url: str) -> None:
    tenant_a = await _as_role(db_url, "dlqd_app", "tenant-a")
    try:
        await tenant_a.execute(
            """INSERT INTO job_dlq (original_job_id, app_id, type, payload, error_reason, attempts)
               VALUES ('mine', 'tenant-a', 't', '{}', 'timeout', 1)"""
        )
        with pytest.raises(
            psycopg.errors.InsufficientPrivilege, match="violates row-level security policy"
        ):
            await tenant_a.execute(
                """INSERT INTO job_dlq (original_job_id, app_id, type, payload, error_reason,
                                        attempts)
                   VALUES ('theirs', 'tenant-b', 't', '{}', 'timeout', 1)"""
            )
    finally:
        await tenant_a.close()
    assert await _app_ids(conn) == ["tenant-a"]


async def test_tenant_cannot_touch_other_rows_or_purge(conn: Conn, db_url: str) -> None:
    await _seed_tenants(conn)
    tenant_a = await _as_role(db_url, "dlqd_app", "tenant-a")
    try:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await tenant_a.execute("UPDATE job_dlq SET replayed_at = now()")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await tenant_a.execute("DELETE FROM job_dlq")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await tenant_a.execute("SELECT job_dlq_purge('0s')")
    finally:
        await tenant_a.close()


async def test_daemon_role_sees_every_tenant_and_marks_replayed(conn: Conn, db_url: str) -> None:
    await _seed_tenants(conn)
    daemon = await _as_role(db_url, "dlqd", None)
    try:
        assert await _app_ids(daemon) == ["tenant-a"] * 3 + ["tenant-b"] * 2
        cur = await daemon.execute(
            "UPDATE job_dlq SET replayed_at = now() WHERE app_id = 'tenant-b'"
        )
        assert cur.rowcount == 2
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await daemon.execute("UPDATE job_dlq SET payload = '{}'")  # only replayed_at
    finally:
        await daemon.close()


async def _purge(conn: Conn, *args: Any) -> int:
    placeholders = ", ".join(["%s"] * len(args))
    cur = await conn.execute(f"SELECT job_dlq_purge({placeholders}) AS n".encode(), list(args))
    row = await cur.fetchone()
    assert row is not None
    return int(row["n"])


async def test_purge_deletes_old_replayed_rows_in_batches(conn: Conn) -> None:
    await conn.execute(
        """INSERT INTO job_dlq (original_job_id, app_id, type, payload, error_reason, attempts,
                                dlq_at, replayed_at)
           SELECT 'old' || g, 'a', 't', '{}', 'timeout', 1, now() - interval '30 days',
                  now() - interval '10 days'
             FROM generate_series(1, 25) g"""
    )
    await conn.execute(
        """INSERT INTO job_dlq (original_job_id, app_id, type, payload, error_reason, attempts,
                                dlq_at, replayed_at)
           SELECT 'recent' || g, 'a', 't', '{}', 'timeout', 1, now() - interval '30 days',
                  now() - interval '1 day'
             FROM generate_series(1, 5) g"""
    )
    await conn.execute(
        """INSERT INTO job_dlq (original_job_id, app_id, type, payload, error_reason, attempts,
                                dlq_at)
           SELECT 'pending' || g, 'a', 't', '{}', 'timeout', 1, now() - interval '30 days'
             FROM generate_series(1, 4) g"""
    )
    batches = []
    while True:
        deleted = await _purge(conn, "7 days", None, 10)
        batches.append(deleted)
        if deleted < 10:
            break
    assert batches == [10, 10, 5]
    cur = await conn.execute(
        "SELECT count(*) FILTER (WHERE replayed_at IS NULL) AS pending, count(*) AS total "
        "FROM job_dlq"
    )
    assert await cur.fetchone() == {"pending": 4, "total": 9}
    # pending rows go only when pending_before says so
    assert await _purge(conn, "7 days", "20 days", 100) == 4
    assert await _purge(conn, "7 days", "20 days", 100) == 0


async def test_purge_refuses_a_bad_batch_size(conn: Conn) -> None:
    with pytest.raises(psycopg.errors.RaiseException, match="batch_size must be at least 1"):
        await _purge(conn, "7 days", None, 0)


async def _listener(db_url: str, *, beat: str = "now()") -> psycopg.AsyncConnection[Any]:
    """A LISTEN connection with its worker's row in dlqd_wake, as a replayer
    that listens has (inserters notify only while some row is fresh)."""
    listener = await psycopg.AsyncConnection.connect(db_url, autocommit=True)
    await listener.execute("LISTEN dlqd_job_dlq")
    await listener.execute(
        sql.SQL("INSERT INTO dlqd_wake (worker, beat) VALUES ('test', {})").format(sql.SQL(beat))
    )
    return listener


@pytest.mark.parametrize(
    "worker",
    ["none", "stale", "draining"],
)
async def test_no_notification_while_no_worker_listens(
    conn: Conn, db_url: str, worker: str
) -> None:
    """No worker's row (no daemon), a stale one (a daemon gone for 30 s), or
    its row taken away (a worker draining a backlog looks again by itself):
    inserters send no NOTIFY, whose commit-time lock serialises them."""
    listener = await _listener(db_url, beat="now() - interval '31 seconds'")
    try:
        if worker in {"none", "draining"}:
            await conn.execute("DELETE FROM dlqd_wake")
        if worker == "draining":
            await conn.execute("INSERT INTO dlqd_wake (worker, beat) VALUES ('w', now())")
            await conn.execute("DELETE FROM dlqd_wake WHERE worker = 'w'")
        await conn.execute(INSERT_MANY, {"rows": Jsonb([row_json(original_job_id="q")])})
        await conn.execute("NOTIFY dlqd_job_dlq, 'end'")
        with anyio.fail_after(10):
            got = [n.payload async for n in listener.notifies(stop_after=1)]
    finally:
        await listener.close()
    assert got == ["end"]
    # the row is still in the inbox: a worker that starts scans it first
    assert await (await conn.execute("SELECT count(*) AS n FROM dlqd_inbox")).fetchone() == {"n": 1}


async def test_one_notification_per_insert_statement(conn: Conn, db_url: str) -> None:
    listener = await _listener(db_url)
    try:
        rows = [row_json(original_job_id=f"j{i}", payload={"big": "x" * 500}) for i in range(5000)]
        await conn.execute(INSERT_MANY, {"rows": Jsonb(rows)})
        await conn.execute(INSERT_MANY, {"rows": Jsonb(rows[:1])})
        await conn.execute(INSERT_MANY, {"rows": Jsonb([])})  # no row: no wake-up
        with anyio.fail_after(10):
            got = [n.payload async for n in listener.notifies(stop_after=2)]
        # nothing else arrives: a NOTIFY from ourselves marks the end of the stream
        await conn.execute("NOTIFY dlqd_job_dlq, 'end'")
        with anyio.fail_after(10):
            rest = [n.payload async for n in listener.notifies(stop_after=1)]
    finally:
        await listener.close()
    assert rest == ["end"]
    assert len(got) == 2
    # a wake-up, the same whatever the rows: any role may LISTEN on the channel
    assert got == ['{"op":"insert"}', '{"op":"insert"}']


async def test_notification_only_after_commit(conn: Conn, db_url: str) -> None:
    listener = await _listener(db_url)
    try:
        async with conn.transaction(force_rollback=True):
            await conn.execute(INSERT_MANY, {"rows": Jsonb([row_json(original_job_id="x")])})
        await conn.execute("NOTIFY dlqd_job_dlq, 'end'")
        with anyio.fail_after(10):
            got = [n.payload async for n in listener.notifies(stop_after=1)]
    finally:
        await listener.close()
    assert got == ["end"]  # the rolled-back insert woke nobody
