"""The replayer in-process, one pass at a time, against a real database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import anyio
import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from dlqd.config import load_settings
from dlqd.metrics import Metrics
from dlqd.replay.worker import Replayer
from dlqd.throttle import Throttle
from dlqd.wake import WakeFlag
from tests.daemon_helpers import wait_until
from tests.factories import INSERT_MANY, row_json

pytestmark = pytest.mark.anyio

HOLD_A = [{"name": "hold-a", "action": "park"}]
HOLD_B = [{"name": "hold-b", "action": "park"}]
NOTIFY_ALL = [{"name": "go", "target": {"kind": "notify", "channel": "replayed"}}]


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[AsyncConnectionPool[Any]]:
    p: AsyncConnectionPool[Any] = AsyncConnectionPool(
        db_url,
        min_size=1,
        max_size=2,
        kwargs={"autocommit": True, "row_factory": dict_row},
        open=False,
    )
    await p.open()
    yield p
    await p.close()


async def states(db_url: str) -> dict[str, int]:
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        cur = await conn.execute(
            "SELECT state, count(*) FROM dlqd_entry_state GROUP BY state ORDER BY state"
        )
        return {state: int(n) for state, n in await cur.fetchall()}


async def insert(db_url: str, prefix: str, n: int) -> None:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        rows = [row_json(original_job_id=f"{prefix}{i}") for i in range(n)]
        await conn.execute(INSERT_MANY, {"rows": Jsonb(rows)})


async def fingerprints(db_url: str) -> set[str]:
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        cur = await conn.execute("SELECT DISTINCT fingerprint FROM dlqd_entry_state")
        return {row[0] for row in await cur.fetchall()}


@pytest.mark.parametrize(("old", "new"), [(HOLD_A, HOLD_B), (HOLD_B, HOLD_A)])
async def test_a_policy_change_re_evaluates_rows_of_the_old_policies(
    db_url: str, pool: AsyncConnectionPool[Any], old: Any, new: Any
) -> None:
    """Whether the new fingerprint sorts below or above the old one, the full
    pass finds every row the old policies scheduled, across several pages."""
    current = load_settings(database_url=db_url, policies=old, replay={"batch_size": 3})
    replayer = Replayer(pool, lambda: current, Metrics(), Throttle(), anyio.Event())
    await insert(db_url, "x", 7)
    assert (await replayer.run_once(full=True)).parked == 7
    assert await fingerprints(db_url) == {current.policies_fingerprint}

    current = load_settings(database_url=db_url, policies=new, replay={"batch_size": 3})
    assert (await replayer.run_once(full=False)).parked == 0  # only full passes look back
    assert (await replayer.run_once(full=True)).parked == 7
    assert await fingerprints(db_url) == {current.policies_fingerprint}

    current = load_settings(database_url=db_url, policies=NOTIFY_ALL)
    assert (await replayer.run_once(full=True)).replayed == 7
    assert await states(db_url) == {}


FAILING = [
    {
        "name": "broken",
        "retry_delay": "1h",
        "target": {"kind": "sql", "statement": "SELECT 1/(%(attempts)s - %(attempts)s)"},
    }
]


async def test_a_lone_row_replays_without_a_savepoint_and_its_failure_counts_once(
    db_url: str, pool: AsyncConnectionPool[Any]
) -> None:
    """A page of one row runs its target optimistically (no savepoint); when it
    fails, the page is done again isolated: one failed attempt is recorded,
    not two, and the transaction's other effects happen once."""
    current = load_settings(database_url=db_url, policies=FAILING)
    metrics = Metrics()
    replayer = Replayer(pool, lambda: current, metrics, Throttle(), anyio.Event())
    await insert(db_url, "lone", 1)
    result = await replayer.run_once(full=False)
    assert (result.claimed, result.failed, result.replayed) == (1, 1, 0)
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        cur = await conn.execute(
            "SELECT outcome, error FROM dlqd_replay_log WHERE policy = 'broken'"
        )
        logged = await cur.fetchall()
        cur = await conn.execute("SELECT state, failures FROM dlqd_entry_state")
        state = await cur.fetchall()
        cur = await conn.execute("SELECT count(*) FROM dlqd_inbox")
        inbox = await cur.fetchone()
    assert logged == [("failed", "division by zero")]
    assert state == [("waiting", 1)]
    assert inbox == (0,)
    assert metrics.replays_total.labels("broken", "failed")._value.get() == 1

    current = load_settings(database_url=db_url, policies=NOTIFY_ALL)
    await insert(db_url, "fine", 1)
    result = await replayer.run_once(full=False)
    assert (result.claimed, result.replayed) == (1, 1)  # a lone row that succeeds
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        cur = await conn.execute(
            "SELECT original_job_id FROM job_dlq WHERE replayed_at IS NOT NULL"
        )
        assert await cur.fetchall() == [("fine0",)]
        cur = await conn.execute("SELECT count(*) FROM dlqd_inbox")
        assert await cur.fetchone() == (0,)


SET_BASED = [
    {
        "name": "set",
        "max_failures": 1,
        "target": {
            "kind": "sql",
            "statement": "INSERT INTO sink_set (dlq_id, type, payload) "
            "SELECT id, type, payload FROM replayed",
        },
    }
]


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO sink_set (dlq_id, type, payload) SELECT id, type, payload FROM replayed",
        # a statement with its own WITH list: replayed joins it
        "WITH picked AS (SELECT id, type, payload FROM replayed) "
        "INSERT INTO sink_set (dlq_id, type, payload) SELECT * FROM picked",
    ],
)
async def test_a_set_based_target_runs_once_per_group_and_bisects_a_bad_row(
    db_url: str, pool: AsyncConnectionPool[Any], statement: str
) -> None:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute(
            """CREATE TABLE sink_set (dlq_id uuid PRIMARY KEY, type text NOT NULL
                   CHECK (type <> 'bad.one'), payload jsonb NOT NULL)"""
        )
        await conn.execute(
            """CREATE TABLE sink_calls (n serial);
               CREATE FUNCTION count_call() RETURNS trigger LANGUAGE plpgsql AS
               $$ BEGIN INSERT INTO sink_calls DEFAULT VALUES; RETURN NULL; END $$;
               CREATE TRIGGER counted AFTER INSERT ON sink_set
                   FOR EACH STATEMENT EXECUTE FUNCTION count_call();"""
        )
    policies = [{**SET_BASED[0], "target": {"kind": "sql", "statement": statement}}]
    current = load_settings(database_url=db_url, policies=policies)
    replayer = Replayer(pool, lambda: current, Metrics(), Throttle(), anyio.Event())
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        rows = [row_json(original_job_id=f"s{i}") for i in range(8)]
        rows.append(row_json(original_job_id="bad", type="bad.one"))
        await conn.execute(INSERT_MANY, {"rows": Jsonb(rows)})
        result = await replayer.run_once(full=False)
        assert (result.replayed, result.failed, result.parked) == (8, 1, 1)
        cur = await conn.execute(
            """SELECT count(*), count(*) FILTER (WHERE s.payload = j.payload)
                 FROM sink_set s JOIN job_dlq j ON j.id = s.dlq_id"""
        )
        assert await cur.fetchone() == (8, 8)  # the payloads, read in Postgres
        cur = await conn.execute("SELECT count(*) FROM sink_calls")
        calls = (await cur.fetchone() or (0,))[0]
        # once for the group, then halves: far fewer statements than rows
        assert 1 <= calls <= 4
        cur = await conn.execute("SELECT original_job_id FROM job_dlq WHERE replayed_at IS NULL")
        assert await cur.fetchall() == [("bad",)]


async def test_check_plans_a_set_based_target_and_refuses_a_broken_one(db_url: str) -> None:
    from dlqd.replay.checks import sql_target_problems

    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute("CREATE TABLE sink_set (dlq_id uuid, type text, payload jsonb)")
        good = load_settings(database_url=db_url, policies=SET_BASED)
        assert await sql_target_problems(conn, good) == []  # type: ignore[arg-type]
        broken = [
            {
                **SET_BASED[0],
                "target": {
                    "kind": "sql",
                    "statement": "INSERT INTO sink_set SELECT nope FROM replayed",
                },
            }
        ]
        problems = await sql_target_problems(
            conn,  # type: ignore[arg-type]
            load_settings(database_url=db_url, policies=broken),
        )
        assert len(problems) == 1
        assert 'column "nope" does not exist' in problems[0][0]


async def test_replay_settings_stay_inside_each_transaction(
    db_url: str, pool: AsyncConnectionPool[Any]
) -> None:
    """The timeouts and JIT off (sql/queries.sql: transaction_settings) are SET
    LOCAL, never a session setting: behind a transaction pooler a session
    setting would stay on the server connection for other clients, and be
    missing from the next transaction of ours."""
    current = load_settings(database_url=db_url, policies=NOTIFY_ALL)
    replayer = Replayer(pool, lambda: current, Metrics(), Throttle(), anyio.Event())
    await insert(db_url, "t", 2)
    assert (await replayer.run_once(full=True)).replayed == 2
    # every connection of the pool at once (one after the other could be the same)
    async with AsyncExitStack() as stack:
        conns = [await stack.enter_async_context(pool.connection()) for _ in range(pool.max_size)]
        assert len({id(c) for c in conns}) == pool.max_size
        for conn in conns:
            cur = await conn.execute(
                "SELECT current_setting('statement_timeout') AS s, "
                "current_setting('lock_timeout') AS l, current_setting('jit') = reset_val"
                " AS jit FROM pg_settings WHERE name = 'jit'"
            )
            assert await cur.fetchone() == {"s": "0", "l": "0", "jit": True}


async def test_wake_cooldown_makes_wake_ups_share_a_pass(
    db_url: str, pool: AsyncConnectionPool[Any]
) -> None:
    """With replay.wake_cooldown, a row woken for right after a pass waits for
    the cooldown to end: a steady stream costs a pass per cooldown, not per row.

    Counted in passes, not read from timestamps: the cooldown spaces the starts
    of woken passes, and a pass slowed by load would shift a row's replayed_at
    by as much. Woken passes start at least a cooldown apart, so a stream
    spanning ``span`` seconds gets at most ``span / cooldown + 2`` of them;
    without the cooldown each of its rows has a pass of its own."""
    cooldown, rows = 0.8, 10
    current = load_settings(
        database_url=db_url, policies=NOTIFY_ALL, replay={"wake_cooldown": f"{cooldown}s"}
    )
    stopping = anyio.Event()
    metrics = Metrics()
    replayer = Replayer(pool, lambda: current, metrics, Throttle(), stopping)
    flag = WakeFlag()

    def passes() -> float:
        value = metrics.registry.get_sample_value("dlqd_replayer_passes_total")
        assert value is not None  # exported, not missing
        return value

    async def replayed(prefix: str) -> int:
        cur = await conn.execute(
            "SELECT count(*) FROM job_dlq WHERE original_job_id LIKE %s"
            " AND replayed_at IS NOT NULL",
            [prefix + "%"],
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(replayer.run, flag)

                async def started() -> bool:
                    return passes() >= 1  # the pass at start is behind us

                await wait_until(started, within=10)
                before = passes()
                began = anyio.current_time()
                for i in range(rows):
                    row = row_json(original_job_id=f"stream{i}")
                    await conn.execute(INSERT_MANY, {"rows": Jsonb([row])})
                    flag.set()
                    await anyio.sleep(0.06)
                span = anyio.current_time() - began

                async def all_replayed() -> bool:
                    return await replayed("stream") == rows

                await wait_until(all_replayed, within=10)
                woken = passes() - before
                stopping.set()
                flag.set()
    assert 1 <= woken <= span / cooldown + 2, (woken, span)
