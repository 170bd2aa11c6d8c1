"""The counts (migration 012): exact after every kind of change, whoever makes it.

Each test takes the baseline (the first reconciliation), changes the table
the way the daemon, an operator or someone else would, folds, and holds the
counts to the table twice: status from the counts equals status counted from
the table itself (an independent query), and a reconciliation finds nothing
to correct.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from dlqd import status as status_module
from dlqd.config import load_settings
from dlqd.db import counts
from dlqd.metrics import Metrics
from dlqd.replay.worker import Replayer
from dlqd.status import collect_status
from dlqd.throttle import Throttle
from tests.conftest import as_role, dlqd_cli
from tests.daemon_helpers import write_config
from tests.factories import INSERT_MANY, row_json

pytestmark = pytest.mark.anyio

SINK = "INSERT INTO sink (dlq_id) SELECT id FROM replayed"
POLICIES: list[dict[str, Any]] = [
    # set-based and immediate: the express path
    {"name": "fast", "match": {"type": ["a.*"]}, "target": {"kind": "sql", "statement": SINK}},
    # jitter: the ordinary path
    {
        "name": "slow",
        "match": {"type": ["b.*"]},
        "jitter": 0.1,
        "target": {"kind": "sql", "statement": SINK},
    },
    {"name": "hold", "match": {"type": ["c.*"]}, "action": "park"},
    {
        "name": "later",
        "match": {"type": ["d.*"]},
        "delay": "1h",
        "target": {"kind": "sql", "statement": SINK},
    },
    # the sink refuses these: parked at the first failure (max_failures)
    {
        "name": "broken",
        "match": {"type": ["f.*"]},
        "max_failures": 1,
        "target": {
            "kind": "sql",
            "statement": "INSERT INTO sink (dlq_id) SELECT NULL FROM replayed",
        },
    },
    # e.* matches nothing: unmatched
]


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[AsyncConnectionPool[Any]]:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute("CREATE TABLE sink (dlq_id uuid PRIMARY KEY)")
        await conn.execute("GRANT INSERT ON sink TO dlqd")
    p: AsyncConnectionPool[Any] = AsyncConnectionPool(
        db_url,
        min_size=1,
        max_size=3,
        kwargs={"autocommit": True, "row_factory": dict_row, "prepare_threshold": 0},
        open=False,
    )
    await p.open()
    yield p
    await p.close()


def rows(prefix: str, n: int, **kw: Any) -> list[dict[str, Any]]:
    return [row_json(original_job_id=f"{prefix}{i}", **kw) for i in range(n)]


#: whether insert() files each row by a statement of its own, as job systems
#: do (its inbox entry then counts it: migration 023), or all in one
MODE = {"row_by_row": False}


@pytest.fixture(params=["one statement", "a statement per row"])
def inserts(request: pytest.FixtureRequest) -> Iterator[str]:
    MODE["row_by_row"] = request.param == "a statement per row"
    yield str(request.param)
    MODE["row_by_row"] = False


async def insert(pool: AsyncConnectionPool[Any], batch: list[dict[str, Any]]) -> None:
    async with pool.connection() as conn:
        for part in [[r] for r in batch] if MODE["row_by_row"] else [batch]:
            await conn.execute(INSERT_MANY, {"rows": Jsonb(part)})


def shape(groups: list[status_module.Group]) -> list[tuple[Any, ...]]:
    return sorted(
        (g.app_id, g.type, g.error_reason, g.pending, g.parked, g.unmatched) for g in groups
    )


async def assert_exact(pool: AsyncConnectionPool[Any]) -> dict[str, int]:
    """Counts equal the table; returns the held counts (by kind) for the caller's checks."""
    async with pool.connection() as conn:
        await counts.fold(conn)
        assert await counts.ready(conn)
        from_counts = await collect_status(conn)
        from_table = await status_module._counted_from_the_table(conn)
        assert shape(from_counts.groups) == shape(from_table.groups)
        assert await counts.reconcile(conn) == {}  # nothing to correct
        # the oldest age per group: the table's oldest pending row
        cur = await conn.execute(
            """SELECT app_id, type, error_reason,
                      extract(epoch FROM now() - min(dlq_at))::float8 AS age
                 FROM job_dlq WHERE replayed_at IS NULL GROUP BY 1, 2, 3"""
        )
        ages = {(r["app_id"], r["type"], r["error_reason"]): r["age"] for r in await cur.fetchall()}
        for g in from_counts.groups:
            assert g.oldest_pending_age_seconds == pytest.approx(
                ages[(g.app_id, g.type, g.error_reason)], abs=5
            )
        return await counts.held(conn)


async def baseline(pool: AsyncConnectionPool[Any]) -> None:
    async with pool.connection() as conn:
        assert not await counts.ready(conn)  # before: readers count the table
        await counts.reconcile(conn)


async def one_pass(pool: AsyncConnectionPool[Any], db_url: str) -> None:
    settings = load_settings(database_url=db_url, policies=POLICIES)
    replayer = Replayer(pool, lambda: settings, Metrics(), Throttle(), anyio.Event())
    await replayer.run_once(full=True)


async def test_counts_follow_inserts_and_every_kind_of_replay(
    pool: AsyncConnectionPool[Any], db_url: str, inserts: str
) -> None:
    old = datetime.now(UTC) - timedelta(days=2)
    await insert(pool, rows("before", 3, type="a.x", dlq_at=old))  # there before the counts
    await baseline(pool)
    await insert(pool, rows("a", 40, type="a.x") + rows("b", 7, type="b.y", app_id="t2"))
    await insert(pool, rows("c", 5, type="c.z") + rows("d", 4, type="d.w"))
    await insert(pool, rows("e", 6, type="e.v", error_reason="boom") + rows("f", 2, type="f.u"))
    assert await assert_exact(pool) == {}  # nothing held yet: no pass ran

    await one_pass(pool, db_url)
    held = await assert_exact(pool)
    assert held == {"parked:policy": 5, "waiting": 4, "unmatched": 6, "parked:max_failures": 2}
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) AS n FROM sink")
        assert await cur.fetchone() == {"n": 43 + 7}  # express and ordinary replays

    # a second pass changes nothing, and the counts stay exact
    await one_pass(pool, db_url)
    assert await assert_exact(pool) == held


async def test_counts_follow_manual_replays_parks_purges_and_deletes_by_others(
    pool: AsyncConnectionPool[Any], db_url: str, tmp_path: Path, inserts: str
) -> None:
    await baseline(pool)
    await insert(pool, rows("e", 6, type="e.v") + rows("c", 5, type="c.z"))
    await insert(pool, rows("old", 4, type="g.h", dlq_at=datetime.now(UTC) - timedelta(days=40)))
    await one_pass(pool, db_url)
    assert await assert_exact(pool) == {"unmatched": 6 + 4, "parked:policy": 5}

    cfg = write_config(
        tmp_path / "dlqd.toml",
        f"""
[purge]
pending_retention = "30d"

[[policies]]
name = "fast"
target = {{ kind = "sql", statement = "{SINK}" }}
""",
    )
    env = {"DLQD_DATABASE_URL": as_role(db_url, "dlqd")}
    # an operator parks two unmatched rows, then replays every e.* row by a policy
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT id FROM job_dlq WHERE type = 'e.v' ORDER BY id LIMIT 2")
        ids = [str(r["id"]) for r in await cur.fetchall()]
    parked = dlqd_cli("park", *ids, "--config", str(cfg), env=env)
    assert parked.returncode == 0, parked.stderr
    held = {"unmatched": 4 + 4, "parked:manual": 2, "parked:policy": 5}
    assert await assert_exact(pool) == held
    replayed = dlqd_cli("replay", "--type", "e.*", "--yes", "--config", str(cfg), env=env)
    assert replayed.returncode == 0, replayed.stderr
    assert await assert_exact(pool) == {"unmatched": 4, "parked:policy": 5}

    # the purge deletes pending rows past pending_retention (the old g.h ones)
    purged = dlqd_cli("purge", "--config", str(cfg), env=env)
    assert purged.returncode == 0, purged.stderr
    assert await assert_exact(pool) == {"parked:policy": 5}
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) AS n FROM job_dlq WHERE type = 'g.h'")
        assert await cur.fetchone() == {"n": 0}

    # someone else deletes a parked row, and replays one by hand in SQL
    async with pool.connection() as conn:
        await conn.execute(
            "DELETE FROM job_dlq WHERE id = (SELECT min(id::text)::uuid FROM job_dlq"
            " WHERE type = 'c.z' AND replayed_at IS NULL)"
        )
    assert await assert_exact(pool) == {"parked:policy": 4}

    # and empties the table
    async with pool.connection() as conn:
        await conn.execute("TRUNCATE job_dlq CASCADE")
    assert await assert_exact(pool) == {}
    await insert(pool, rows("again", 3, type="e.v"))
    assert await assert_exact(pool) == {}


async def test_what_no_trigger_saw_is_corrected_and_reported(
    pool: AsyncConnectionPool[Any], db_url: str
) -> None:
    await baseline(pool)
    await insert(pool, rows("seen", 3, type="a.x"))
    async with pool.connection() as conn, conn.transaction():
        # a restore with triggers off, and an update no trigger watches
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(INSERT_MANY, {"rows": Jsonb(rows("restored", 5, type="r.s"))})
        await conn.execute(
            "UPDATE job_dlq SET replayed_at = now() WHERE id = (SELECT min(id::text)::uuid"
            " FROM job_dlq WHERE type = 'a.x')"
        )
    async with pool.connection() as conn:
        await counts.fold(conn)
        assert await counts.reconcile(conn) == {"pending": 5 + 1}  # five unseen, one gone
    await assert_exact(pool)
    status = await _status(pool)
    assert {(g.type, g.pending) for g in status.groups} == {("a.x", 2), ("r.s", 5)}


async def test_the_inbox_follows_its_rows_without_a_foreign_key(
    pool: AsyncConnectionPool[Any], inserts: str
) -> None:
    """No key checks the inbox against job_dlq on the insert path (022): each
    way a row goes takes its entry with it all the same, and the one no
    trigger sees (marked replayed by someone else, then deleted) is removed
    by the reconciliation. The inbox holds exactly the pending rows' entries
    after each."""

    async def entries_are_the_pending_rows() -> int:
        async with pool.connection() as conn:
            cur = await conn.execute(
                """SELECT (SELECT array_agg(dlq_id ORDER BY dlq_id) FROM dlqd_inbox) AS inbox,
                          (SELECT array_agg(id ORDER BY id) FROM job_dlq
                            WHERE replayed_at IS NULL) AS pending"""
            )
            row = await cur.fetchone()
        assert row is not None
        assert row["inbox"] == row["pending"]
        return len(row["inbox"] or [])

    await baseline(pool)
    await insert(pool, rows("in", 6, type="a.x"))
    assert await entries_are_the_pending_rows() == 6
    async with pool.connection() as conn:
        # another role deletes a pending row
        await conn.execute(
            "DELETE FROM job_dlq WHERE id = (SELECT min(id::text)::uuid FROM job_dlq)"
        )
    assert await entries_are_the_pending_rows() == 5
    async with pool.connection() as conn:
        # marks one replayed by hand, then deletes it: no trigger sees its entry go
        await conn.execute(
            "UPDATE job_dlq SET replayed_at = now() WHERE id = (SELECT min(id::text)::uuid"
            " FROM job_dlq)"
        )
        await conn.execute("DELETE FROM job_dlq WHERE replayed_at IS NOT NULL")
        cur = await conn.execute("SELECT count(*) AS n FROM dlqd_inbox")
        assert await cur.fetchone() == {"n": 5}  # the orphan, until the reconciliation
        await counts.fold(conn)
        await counts.reconcile(conn)
    assert await entries_are_the_pending_rows() == 4
    async with pool.connection() as conn:
        await conn.execute("TRUNCATE job_dlq CASCADE")
    assert await entries_are_the_pending_rows() == 0
    await insert(pool, rows("again", 2, type="a.x"))
    assert await entries_are_the_pending_rows() == 2
    await assert_exact(pool)


async def test_entries_left_in_the_inbox_are_adopted_and_the_ones_a_claim_holds_are_not(
    pool: AsyncConnectionPool[Any], db_url: str
) -> None:
    """A single-row insert's inbox entry counts its row (023) until a claim
    takes it or the leader's fold adopts it: the fold after the one that saw
    it marks it counted and writes its delta, except an entry a claim holds
    (skipped: the claim's delete counts it). Exact at every step."""
    await baseline(pool)
    MODE["row_by_row"] = True
    try:
        await insert(pool, rows("s", 5, type="a.x") + rows("t", 3, type="c.z"))
    finally:
        MODE["row_by_row"] = False

    async def uncounted() -> int:
        async with pool.connection() as conn:
            cur = await conn.execute("SELECT count(*) AS n FROM dlqd_inbox WHERE NOT counted")
            row = await cur.fetchone()
        assert row is not None
        return int(row["n"])

    assert await uncounted() == 8
    await assert_exact(pool)  # folds once: sees the entries, adopts none
    assert await uncounted() == 8
    async with pool.connection() as claim, claim.transaction():
        # a claim holds one a.x entry while the fold runs
        cur = await claim.execute(
            """SELECT i.seq FROM dlqd_inbox i JOIN job_dlq j ON j.id = i.dlq_id
                WHERE j.type = 'a.x' ORDER BY i.seq LIMIT 1 FOR UPDATE OF i"""
        )
        held = await cur.fetchone()
        assert held is not None
        async with pool.connection() as conn:
            await counts.fold(conn)
        assert await uncounted() == 1  # the held one
        await claim.execute("DELETE FROM dlqd_inbox WHERE seq = %s", [held["seq"]])
    assert await uncounted() == 0
    await assert_exact(pool)
    # the adopted entries are claimed as any others: counted once
    await one_pass(pool, db_url)
    assert await assert_exact(pool) == {"parked:policy": 3}
    async with pool.connection() as conn:
        cur = await conn.execute(
            """SELECT (SELECT count(*) FROM sink) AS sunk,
                      (SELECT count(DISTINCT dlq_id) FROM sink) AS distinct_rows,
                      (SELECT count(*) FROM job_dlq WHERE type = 'a.x'
                          AND replayed_at IS NULL) AS pending"""
        )
        # the row whose entry went by hand waits for the leader's sweep, counted
        assert await cur.fetchone() == {"sunk": 4, "distinct_rows": 4, "pending": 1}


async def _status(pool: AsyncConnectionPool[Any]) -> status_module.Status:
    async with pool.connection() as conn:
        return await collect_status(conn)


def test_scheduling_reads_each_rows_group_by_its_key_not_the_whole_table(db_url: str) -> None:
    """The schedule's count trigger looks up each changed row's group by
    job_dlq's primary key: a page of schedule rows costs index probes, never
    a scan of every dead letter (012 hashed the whole table for a page of a
    few thousand rows). A reschedule that changes no row's kind reads job_dlq
    not at all. Counted by PostgreSQL itself (pg_stat_xact_user_tables)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO job_dlq (original_job_id, app_id, type, payload, error_reason, attempts)
               SELECT 'j' || g, 'app-' || (g % 5), 't' || (g % 7), '{}', 'timeout', 1
                 FROM generate_series(1, 60000) g"""
        )
        conn.execute("DELETE FROM dlqd_inbox")
        conn.execute("VACUUM ANALYZE job_dlq")
        ids = [r[0] for r in conn.execute("SELECT id FROM job_dlq ORDER BY id LIMIT 5000")]

    def scans(conn: psycopg.Connection[Any]) -> tuple[int, int]:
        row = conn.execute(
            "SELECT seq_scan, idx_scan FROM pg_stat_xact_user_tables WHERE relname = 'job_dlq'"
        ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1] or 0)

    def scanned(
        conn: psycopg.Connection[Any], statement: str, params: Any = None
    ) -> tuple[int, int]:
        """The scans of job_dlq ``statement`` made, in a transaction of its own
        (the view's counts may include earlier transactions' not flushed yet:
        the difference is this statement's)."""
        with conn.transaction():
            seq, idx = scans(conn)
            conn.execute(statement.encode(), params)
            seq_after, idx_after = scans(conn)
        return seq_after - seq, idx_after - idx

    with psycopg.connect(db_url, autocommit=True) as conn:
        seq, idx = scanned(
            conn,
            """INSERT INTO dlqd_entry_state (dlq_id, state, due_at, fingerprint)
               SELECT id, 'waiting', now() + interval '1 hour', 'fp' FROM unnest(%s::uuid[]) id""",
            [ids],
        )
        assert seq == 0
        assert idx >= len(ids)  # one probe a row (the foreign key's too)
        # no kind changed: job_dlq not read
        assert scanned(
            conn, "UPDATE dlqd_entry_state SET due_at = due_at + interval '1 second'"
        ) == (
            0,
            0,
        )
        # the rows whose kind changed, one probe each
        assert scanned(
            conn,
            "UPDATE dlqd_entry_state SET state = 'unmatched', due_at = NULL"
            " WHERE dlq_id = ANY (%s::uuid[])",
            [ids[:100]],
        ) == (0, 100)
        moved = conn.execute(
            "SELECT kind, sum(n)::int FROM dlqd_count_deltas WHERE kind <> 'pending'"
            " GROUP BY 1 ORDER BY 1"
        ).fetchall()
        assert moved == [("unmatched", 100), ("waiting", 4900)]
