"""Migrations yield exactly the schema of DESIGN section 1, and apply once."""

from __future__ import annotations

from typing import Any

import anyio
import psycopg
import pytest
from psycopg.types.json import Jsonb

from dlqd.db.connector import connect
from dlqd.db.migrations import available_migrations, migrate
from dlqd.db.queries import q
from dlqd.errors import MigrationError

pytestmark = pytest.mark.anyio

Conn = psycopg.AsyncConnection[dict[str, Any]]


async def _rows(conn: Conn, query: str, **params: Any) -> list[dict[str, Any]]:
    cur = await conn.execute(query.encode(), params or None)
    return await cur.fetchall()


async def test_job_dlq_columns(conn: Conn) -> None:
    rows = await _rows(
        conn,
        """SELECT column_name, data_type, is_nullable, column_default
             FROM information_schema.columns
            WHERE table_name = 'job_dlq' ORDER BY ordinal_position""",
    )
    columns = [tuple(r.values()) for r in rows]
    assert columns == [
        ("id", "uuid", "NO", "gen_random_uuid()"),
        ("original_job_id", "text", "NO", None),
        ("app_id", "text", "NO", None),
        ("type", "text", "NO", None),
        ("payload", "jsonb", "NO", None),
        ("error_reason", "text", "NO", None),
        ("attempts", "integer", "NO", None),
        ("error_history", "jsonb", "NO", "'[]'::jsonb"),
        ("dlq_at", "timestamp with time zone", "NO", "now()"),
        ("replayed_at", "timestamp with time zone", "YES", None),
        ("request_id", "text", "YES", None),
        ("user_id", "text", "YES", None),
    ]


async def test_job_dlq_constraints_and_indexes(conn: Conn) -> None:
    constraints = await _rows(
        conn,
        # NOT NULL is a column property (a pg_constraint row only from PostgreSQL 18 on)
        """SELECT conname, pg_get_constraintdef(oid) AS def FROM pg_constraint
            WHERE conrelid = 'job_dlq'::regclass AND contype <> 'n' ORDER BY conname""",
    )
    assert {(c["conname"], c["def"]) for c in constraints} == {
        ("job_dlq_pkey", "PRIMARY KEY (id)"),
        ("job_dlq_attempts_check", "CHECK ((attempts >= 0))"),
        ("job_dlq_error_history_check", "CHECK ((jsonb_typeof(error_history) = 'array'::text))"),
    }
    indexes = await _rows(
        conn,
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'job_dlq'",
    )
    defs = {i["indexname"]: i["indexdef"].split(" USING ", 1)[1] for i in indexes}
    assert defs == {
        "job_dlq_pkey": "btree (id)",
        "job_dlq_pending_dlq_at_id_idx": "btree (dlq_at, id) WHERE (replayed_at IS NULL)",
        "job_dlq_pending_group_idx": (
            "btree (app_id, type, error_reason, dlq_at) WHERE (replayed_at IS NULL)"
        ),
        "job_dlq_original_job_id_idx": "btree (original_job_id)",
        "job_dlq_replayed_at_idx": "btree (replayed_at) WHERE (replayed_at IS NOT NULL)",
        "job_dlq_pending_payload_idx": ("gin (payload jsonb_path_ops) WHERE (replayed_at IS NULL)"),
    }


async def test_rls_enabled_forced_with_tenant_policy(conn: Conn) -> None:
    [table] = await _rows(
        conn,
        "SELECT relrowsecurity, relforcerowsecurity FROM pg_class WHERE oid = 'job_dlq'::regclass",
    )
    assert table == {"relrowsecurity": True, "relforcerowsecurity": True}
    policies = await _rows(
        conn,
        """SELECT policyname, permissive, cmd, qual, with_check FROM pg_policies
            WHERE tablename = 'job_dlq' AND policyname = 'tenant_isolation'""",
    )
    assert policies == [
        {
            "policyname": "tenant_isolation",
            "permissive": "PERMISSIVE",
            "cmd": "ALL",
            "qual": "(app_id = current_setting('app.current_app_id'::text, true))",
            "with_check": "(app_id = current_setting('app.current_app_id'::text, true))",
        }
    ]


async def test_purge_function_and_trigger_exist(conn: Conn) -> None:
    [fn] = await _rows(
        conn,
        """SELECT pg_get_function_arguments(p.oid) AS args,
                  pg_get_function_result(p.oid) AS result
             FROM pg_proc p WHERE p.proname = 'job_dlq_purge'""",
    )
    assert fn == {
        "args": (
            "replayed_before interval, pending_before interval DEFAULT NULL::interval, "
            "batch_size integer DEFAULT 10000"
        ),
        "result": "bigint",
    }
    triggers = {
        t["tgname"]: t["def"]
        for t in await _rows(
            conn,
            """SELECT tgname, pg_get_triggerdef(oid) AS def FROM pg_trigger
                WHERE tgrelid = 'job_dlq'::regclass AND NOT tgisinternal""",
        )
    }
    # the insert trigger; the counts' own (migration 012): deletes of pending rows, truncates
    assert set(triggers) == {
        "job_dlq_notify_insert", "job_dlq_count_deleted", "job_dlq_count_truncated",
    }  # fmt: skip
    assert "BEFORE DELETE" in triggers["job_dlq_count_deleted"]
    assert "WHEN ((old.replayed_at IS NULL))" in triggers["job_dlq_count_deleted"]
    trigger = {"def": triggers["job_dlq_notify_insert"]}
    [definer] = await _rows(
        conn, "SELECT prosecdef FROM pg_proc WHERE proname = 'job_dlq_notify_insert'"
    )
    assert definer == {"prosecdef": True}  # tenants need no grant on dlqd_inbox
    assert "AFTER INSERT ON public.job_dlq REFERENCING NEW TABLE AS new_rows" in trigger["def"]
    assert "FOR EACH STATEMENT" in trigger["def"]


async def test_migrations_recorded_in_order(conn: Conn) -> None:
    rows = await _rows(conn, "SELECT version, name FROM dlqd_schema_migrations ORDER BY version")
    assert [(r["version"], r["name"]) for r in rows] == [
        (m.version, m.name) for m in available_migrations()
    ]


async def test_migrate_twice_is_a_noop(empty_db_url: str) -> None:
    conn = await connect(empty_db_url, autocommit=True)
    try:
        first = await migrate(conn)
        second = await migrate(conn)
    finally:
        await conn.close()
    assert [m.version for m in first] == [m.version for m in available_migrations()]
    assert second == []


async def test_an_index_an_interrupted_migration_left_invalid_is_built_again(
    conn: Conn, db_url: str
) -> None:
    """Migration 011 builds its index CONCURRENTLY (no lock on the job systems'
    inserts); a run cut short leaves it invalid, and the next run rebuilds it."""
    [payload] = [m for m in available_migrations() if m.name == "console_indexes"]
    assert not payload.transactional
    [before] = await _rows(conn, "SELECT 'job_dlq_pending_payload_idx'::regclass::oid AS oid")
    await conn.execute(
        b"""UPDATE pg_index SET indisvalid = false
             WHERE indexrelid = 'job_dlq_pending_payload_idx'::regclass"""
    )
    await conn.execute(b"DELETE FROM dlqd_schema_migrations WHERE version = 11")
    again = await connect(db_url, autocommit=True)
    try:
        assert [m.version for m in await migrate(again)] == [11]
    finally:
        await again.close()
    [index] = await _rows(
        conn,
        """SELECT i.indisvalid, i.indexrelid AS oid FROM pg_index i
            WHERE i.indexrelid = 'job_dlq_pending_payload_idx'::regclass""",
    )
    assert index["indisvalid"] is True
    assert index["oid"] != before["oid"]  # dropped and built again


async def test_replicas_migrating_at_once_apply_each_migration_once(empty_db_url: str) -> None:
    applied: list[list[int]] = []

    async def one_replica() -> None:
        conn = await connect(empty_db_url, autocommit=True)
        try:
            applied.append([m.version for m in await migrate(conn)])
        finally:
            await conn.close()

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(one_replica)
    everything = [m.version for m in available_migrations()]
    assert sorted(applied, key=len) == [[], [], [], everything]


async def test_changed_migration_is_refused(conn: Conn) -> None:
    await conn.execute("UPDATE dlqd_schema_migrations SET checksum = 'edited' WHERE version = 1")
    with pytest.raises(MigrationError, match="001_job_dlq changed after it was applied"):
        await migrate(conn)


@pytest.mark.parametrize(
    ("column", "value", "constraint"),
    [
        ("attempts", -1, "job_dlq_attempts_check"),
        ("error_history", Jsonb({"not": "an array"}), "job_dlq_error_history_check"),
    ],
)
async def test_check_constraints_refuse_bad_rows(
    conn: Conn, column: str, value: object, constraint: str
) -> None:
    params: dict[str, object] = {"attempts": 1, "error_history": Jsonb([])}
    params[column] = value
    with pytest.raises(psycopg.errors.CheckViolation, match=constraint):
        await conn.execute(
            """INSERT INTO job_dlq (original_job_id, app_id, type, payload, error_reason,
                                    attempts, error_history)
               VALUES ('j', 'a', 't', '{}', 'timeout', %(attempts)s, %(error_history)s)""",
            params,
        )


async def test_grouped_status_is_an_index_only_scan(conn: Conn) -> None:
    await conn.execute(
        """INSERT INTO job_dlq (original_job_id, app_id, type, payload, error_reason, attempts)
           SELECT 'j' || g, 'app-' || (g % 5), 't' || (g % 3), '{}', 'timeout', 1
             FROM generate_series(1, 20000) g"""
    )
    await conn.execute("VACUUM ANALYZE job_dlq")
    async with conn.transaction(force_rollback=True):
        # on a table this small any plan is cheap: rule out the heap-reading
        # ones, and the other partial indexes of the pending set (PostgreSQL 18
        # sometimes preferred one of them and a sort), so that what is checked is
        # that the covering index serves the query on its own
        others = await _rows(
            conn,
            """SELECT indexrelid::regclass::text AS name FROM pg_index
                WHERE indrelid = 'job_dlq'::regclass AND indpred IS NOT NULL
                  AND indexrelid <> 'job_dlq_pending_group_idx'::regclass""",
        )
        assert others  # the table has other partial indexes: the drop is not a no-op
        for other in others:
            await conn.execute(f"DROP INDEX {other['name']}".encode())
        await conn.execute("SET LOCAL enable_seqscan = off")
        await conn.execute("SET LOCAL enable_bitmapscan = off")
        await conn.execute("SET LOCAL enable_hashagg = off")  # the index is in group order
        rows = await _rows(conn, "EXPLAIN " + q("status_groups"))
    plan = "\n".join(r["QUERY PLAN"] for r in rows)
    assert "Index Only Scan using job_dlq_pending_group_idx" in plan


async def test_dlqd_state_tables(conn: Conn) -> None:
    columns = await _rows(
        conn,
        """SELECT table_name, string_agg(column_name, ',' ORDER BY ordinal_position) AS cols
             FROM information_schema.columns
            WHERE table_name IN ('dlqd_replay_log', 'dlqd_entry_state', 'dlqd_inbox')
            GROUP BY table_name""",
    )
    assert {r["table_name"]: r["cols"] for r in columns} == {
        "dlqd_replay_log": (
            "id,dlq_id,original_job_id,app_id,policy,outcome,error,manual,at,actor,reason,"
            "redrive_id"
        ),
        "dlqd_entry_state": (
            "dlq_id,state,policy,fingerprint,due_at,failures,last_error,last_failure_at,"
            "parked_reason,updated_at,parked_dlq_at"
        ),
        "dlqd_inbox": "seq,dlq_id,counted",
    }
    indexes = await _rows(
        conn,
        """SELECT indexname, indexdef FROM pg_indexes
            WHERE tablename IN ('dlqd_replay_log', 'dlqd_entry_state', 'dlqd_inbox')""",
    )
    defs = {i["indexname"]: i["indexdef"].split(" USING ", 1)[1] for i in indexes}
    assert defs == {
        "dlqd_replay_log_pkey": "btree (id)",
        "dlqd_replay_log_dlq_id_idx": "btree (dlq_id, at)",
        "dlqd_replay_log_job_idx": (
            "btree (app_id, original_job_id, at) WHERE (outcome = 'replayed'::text)"
        ),
        "dlqd_replay_log_at_idx": "btree (at)",
        "dlqd_entry_state_pkey": "btree (dlq_id)",
        "dlqd_entry_state_due_idx": "btree (fingerprint, due_at) WHERE (state = 'waiting'::text)",
        "dlqd_entry_state_parked_idx": "btree (dlq_id) WHERE (state = 'parked'::text)",
        "dlqd_entry_state_held_idx": "btree (dlq_id) WHERE (state <> 'waiting'::text)",
        "dlqd_entry_state_parked_at_idx": (
            "btree (parked_dlq_at, dlq_id) WHERE (state = ANY (ARRAY['parked'::text, "
            "'parked_policy'::text]))"
        ),
        "dlqd_entry_state_fingerprint_idx": (
            "btree (fingerprint, dlq_id) WHERE (state <> 'parked'::text)"
        ),
        "dlqd_inbox_pkey": "btree (seq)",
        "dlqd_inbox_dlq_id_key": "btree (dlq_id)",
        "dlqd_inbox_uncounted_idx": "btree (seq) WHERE (NOT counted)",
    }
    cascades = await _rows(
        conn,
        """SELECT conrelid::regclass::text AS child, confdeltype FROM pg_constraint
            WHERE contype = 'f' AND confrelid = 'job_dlq'::regclass ORDER BY 1""",
    )
    # purging a row takes its schedule and adapter details with it; the log
    # stays. The inbox has no key (022: its check cost every insert), its
    # entries go by trigger (test_counts)
    assert cascades == [
        {"child": "dlqd_adapter_jobs", "confdeltype": "c"},
        {"child": "dlqd_entry_state", "confdeltype": "c"},
    ]
