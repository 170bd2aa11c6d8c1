"""Express pages: new rows replayed by one statement, with the ordinary path's outcomes."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple
from uuid import UUID, uuid4

import anyio
import psycopg
import pytest
from prometheus_client import generate_latest
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool
from structlog.testing import capture_logs

from dlqd.config import Match, Policy, Settings, load_settings
from dlqd.db.compose import first_policy, like_pattern
from dlqd.metrics import AGE_BUCKETS, Metrics
from dlqd.policy import JITTER_SCALE, Replay, decide, first_match, jittered_micros
from dlqd.replay.express import plan, sink_kind
from dlqd.replay.worker import Replayer
from dlqd.throttle import Throttle
from tests.factories import INSERT_MANY, row_json

pytestmark = pytest.mark.anyio

SINK = "INSERT INTO sink (dlq_id, type, payload) SELECT id, type, payload FROM replayed"
# one policy replaying every row into the sink at once, parking a row at its first failure
NOW_ONCE = {"name": "now", "max_failures": 1, "target": {"kind": "sql", "statement": SINK}}


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[AsyncConnectionPool[Any]]:
    p: AsyncConnectionPool[Any] = AsyncConnectionPool(
        db_url,
        min_size=1,
        max_size=3,  # three replayers at once in the replicas test
        kwargs={"autocommit": True, "row_factory": dict_row, "prepare_threshold": 0},
        open=False,
    )
    await p.open()
    yield p
    await p.close()


@pytest.fixture
async def sink(db_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute(
            """CREATE TABLE sink (dlq_id uuid PRIMARY KEY, type text NOT NULL
                   CHECK (type <> 'bad.one'), payload jsonb NOT NULL)"""
        )


async def insert(db_url: str, rows: list[dict[str, Any]]) -> None:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute(INSERT_MANY, {"rows": Jsonb(rows)})


async def fetch(db_url: str, query: str) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        cur = await conn.execute(query)
        return await cur.fetchall()


def replayer_for(
    pool: AsyncConnectionPool[Any],
    settings: Settings,
    metrics: Metrics | None = None,
    *,
    throttle: Throttle | None = None,
) -> Replayer:
    return Replayer(
        pool, lambda: settings, metrics or Metrics(), throttle or Throttle(), anyio.Event()
    )


def express_batches(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == "batch" and e.get("express")]


# ---------------------------------------------------------------- matching in SQL

_ALPHABET = ["a", "b", "%", "_", "\\", "é", "\n", ".", "*", "?"]


def _random_glob(rng: random.Random, classes: bool) -> str:
    parts = rng.choices([*_ALPHABET, "*", "?", *(["[ab]", "[!a]", "["] if classes else [])], k=3)
    return "".join(parts)


def _random_policies(rng: random.Random, classes: bool) -> list[Policy]:
    policies = []
    for n in range(4):
        fields: dict[str, Any] = {}
        for column in ("app_id", "type", "error_reason"):
            if rng.random() < 0.6:
                fields[column] = [_random_glob(rng, classes) for _ in range(rng.randint(0, 2))]
        if rng.random() < 0.3:
            fields["min_attempts"] = rng.randint(0, 3)
        if rng.random() < 0.3:
            fields["max_attempts"] = rng.randint(3, 6)
        policies.append(Policy(name=f"p{n}", match=Match(**fields)))
    return policies


@pytest.mark.parametrize("classes", [False, True])
async def test_the_sql_match_picks_the_policy_that_python_picks(db_url: str, classes: bool) -> None:
    """Random globs with LIKE's own metacharacters (%, _, backslash), newlines
    and accents: where SQL names a policy it is the one fnmatch picks, and
    without character classes SQL always decides (-1 exactly when none match)."""
    rng = random.Random(11 if classes else 7)
    values = ["".join(rng.choices(_ALPHABET[:8], k=rng.randint(0, 3))) for _ in range(40)]
    decided = 0
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        for _ in range(60):
            policies = _random_policies(rng, classes)
            rows = [
                {"app_id": rng.choice(values), "type": rng.choice(values),
                 "error_reason": rng.choice(values), "attempts": rng.randint(0, 7)}
                for _ in range(25)
            ]  # fmt: skip
            params: dict[str, Any] = {"rows": Jsonb(rows)}
            case = first_policy(policies, len(policies) - 1, params)
            cur = await conn.execute(
                sql.SQL(
                    """SELECT {}
                      FROM ROWS FROM (jsonb_to_recordset(%(rows)s)
                           AS (app_id text, type text, error_reason text, attempts int))
                           WITH ORDINALITY AS j(app_id, type, error_reason, attempts, n)
                     ORDER BY n"""
                ).format(case),
                params,
            )
            for row, (index,) in zip(rows, await cur.fetchall(), strict=True):
                python = first_match(_Row(**row), policies)
                expected = -1 if python is None else policies.index(python)
                if index >= 0:
                    decided += 1
                    assert index == expected, (row, policies)
                elif not classes:
                    assert expected == -1, (row, policies)
    assert decided > 100  # the comparison was not vacuous


class _Entry(NamedTuple):
    """The columns decide() reads, in the order the queries below select them."""

    id: Any
    app_id: str
    type: str
    error_reason: str
    attempts: int
    dlq_at: Any


class _Row(NamedTuple):
    app_id: str
    type: str
    error_reason: str
    attempts: int


def test_like_patterns_and_sink_kinds() -> None:
    assert like_pattern("a*b?c%d_e\\f") == "a%b_c\\%d\\_e\\\\f"
    assert like_pattern("a[bc]") is None
    assert sink_kind(SINK) == "dml"
    assert sink_kind(f"  -- note\n/* a\n comment */ {SINK.lower()};") == "dml"
    assert sink_kind("SELECT pg_notify('c', id::text) FROM replayed") == "select"
    assert sink_kind(f"WITH r AS (SELECT * FROM replayed) {SINK}") is None
    assert sink_kind("INSERT INTO sink (dlq_id) VALUES (%(id)s)") is None  # per row
    assert sink_kind("MERGE INTO sink USING replayed ON true WHEN MATCHED THEN DO NOTHING") is None


def _settings(db_url: str, policies: list[dict[str, Any]], **kw: Any) -> Settings:
    return load_settings(database_url=db_url, policies=policies, **kw)


def test_which_policies_go_express(db_url: str) -> None:
    sql = {"kind": "sql", "statement": SINK}
    other = {"kind": "sql", "statement": "INSERT INTO other SELECT id FROM replayed"}
    settings = _settings(
        db_url,
        [
            {"name": "delayed", "delay": "1m", "target": sql},
            {"name": "fixed", "delay": "1m", "backoff": "fixed", "target": sql},
            {"name": "jittery", "delay": "1m", "jitter": 0.1, "target": sql},
            {"name": "jitter-now", "jitter": 0.1, "target": sql},
            {"name": "capped", "max_replays": 3, "target": sql},
            {"name": "limited", "rate_limit": "5/s", "target": sql},
            {"name": "dry", "dry_run": True, "target": sql},
            {"name": "per-row", "target": {"kind": "sql", "statement": "SELECT %(id)s"}},
            {"name": "http", "target": {"kind": "http", "url": "http://127.0.0.1:9/"}},
            {"name": "held", "action": "park"},
            {"name": "fast", "match": {"type": ["a.*"]}, "target": sql},
            {"name": "elsewhere", "target": other},
        ],
    )
    express = plan(settings, AGE_BUCKETS)
    assert express is not None
    # kinds: what an express page may do (park, schedule) for each policy's rows
    assert express.params["kinds"] == [
        "exp", "fixed", "exp", "fixed", "fixed", "fixed", None, "fixed", "fixed", "park", "fixed",
        "fixed",
    ]  # fmt: skip
    # due rows replay at once for these (capped: counted in the statement, under
    # the job's lock slot; limited: tokens taken in the statement); the others'
    # go the ordinary way
    assert {p.name for p in express.policies.values()} == {
        "delayed", "fixed", "jittery", "jitter-now", "capped", "limited", "fast", "elsewhere",
    }  # fmt: skip
    assert express.params["rates"][5] == 5.0
    assert express.params["max_replays"][4] == 3
    # two targets, each a CTE over its own policies' rows
    text = express.text.as_string()
    assert '"target_0" AS' in text
    assert '"target_1" AS' in text
    assert "target_2" not in text
    # capped and limited: the page reads the lock slots and the buckets; a plan
    # without such a policy reads neither (the hot path stays as it was)
    assert "dlqd_lock_slots" in text
    assert "dlqd_rate_buckets" in text
    plain = plan(_settings(db_url, [{"name": "f", "target": sql}]), AGE_BUCKETS)
    assert plain is not None
    assert "dlqd_lock_slots" not in plain.text.as_string()
    assert "dlqd_rate_buckets" not in plain.text.as_string()
    dry = _settings(db_url, [{"name": "f", "target": sql}], dry_run=True)
    assert plan(dry, AGE_BUCKETS) is None


# ---------------------------------------------------------------- replaying


async def test_an_express_page_replays_like_the_ordinary_path(
    db_url: str, pool: AsyncConnectionPool[Any], sink: None
) -> None:
    """Express rows go in one statement per page; parked, delayed, unmatched,
    invalid and future rows of the same inbox take the ordinary path in the
    same pass. Log, schedule, inbox and metrics end as the ordinary path leaves them."""
    policies = [
        {"name": "hold", "match": {"type": ["held.*"]}, "action": "park"},
        {"name": "later", "match": {"type": ["later.*"]}, "delay": "1h",
         "target": {"kind": "sql", "statement": SINK}},
        {"name": "now", "match": {"type": ["email.*", "sms.*"]},
         "target": {"kind": "sql", "statement": f"-- the sink\n{SINK};"}},
    ]  # fmt: skip
    current = _settings(db_url, policies, replay={"batch_size": 4})
    metrics = Metrics()
    replayer = replayer_for(pool, current, metrics)
    rows = [row_json(original_job_id=f"e{i}", type="email.send") for i in range(9)]
    rows += [row_json(original_job_id="h", type="held.x")]
    rows += [row_json(original_job_id="l", type="later.x")]
    rows += [row_json(original_job_id="u", type="unknown")]
    rows += [row_json(original_job_id="x" * 3000, type="sms.send")]  # invalid: too long
    await insert(db_url, rows)
    with capture_logs() as logs:
        result = await replayer.run_once(full=False)
    assert (result.replayed, result.parked, result.scheduled, result.unmatched) == (9, 2, 1, 1)
    # 13 inbox entries in pages of 4: the 9 express rows in 3 or 4 statements
    pages = [e["replayed"] for e in express_batches(logs)]
    assert sum(pages) == 9
    assert len(pages) in (3, 4)
    assert max(pages) <= 4
    assert await fetch(
        db_url,
        "SELECT count(*) FROM sink s JOIN job_dlq j ON j.id = s.dlq_id"
        " AND j.payload = s.payload AND j.replayed_at IS NOT NULL",
    ) == [(9,)]
    assert await fetch(
        db_url,
        "SELECT policy, outcome, manual, count(*) FROM dlqd_replay_log GROUP BY 1, 2, 3 ORDER BY 1",
    ) == [("hold", "parked", False, 1), ("now", "replayed", False, 9), (None, "parked", False, 1)]
    assert await fetch(db_url, "SELECT state, policy FROM dlqd_entry_state ORDER BY state") == [
        ("parked", None),
        ("parked_policy", "hold"),
        ("unmatched", None),
        ("waiting", "later"),
    ]
    assert await fetch(db_url, "SELECT count(*) FROM dlqd_inbox") == [(0,)]
    # the schedule written in SQL is the one Python decides, to the microsecond
    (row,) = await fetch(
        db_url,
        """SELECT j.id, j.app_id, j.type, j.error_reason, j.attempts, j.dlq_at, s.due_at
             FROM dlqd_entry_state s JOIN job_dlq j ON j.id = s.dlq_id
            WHERE s.state = 'waiting'""",
    )
    decision = decide(_Entry(*row[:6]), current.policies, 0, row[5])
    assert isinstance(decision, Replay)
    assert decision.due_at == row[6]
    assert metrics.replays_total.labels("now", "replayed")._value.get() == 9
    assert metrics.parked_total.labels("hold", "policy")._value.get() == 1
    ages = metrics.dlq_to_replay_seconds.labels("now")
    ((total,),) = await fetch(
        db_url,
        """SELECT sum(extract(epoch FROM replayed_at - dlq_at))::float8 FROM job_dlq
            WHERE replayed_at IS NOT NULL""",
    )
    assert abs(ages._sum.get() - total) < 1e-6  # the ages Postgres recorded, summed
    assert sum(b.get() for b in ages._buckets) == 9
    durations = metrics.replay_duration_seconds.labels("now")
    assert sum(b.get() for b in durations._buckets) == 9


async def test_a_failing_express_page_falls_back_and_isolates_the_bad_row(
    db_url: str, pool: AsyncConnectionPool[Any], sink: None
) -> None:
    """One bad row fails the express statement: nothing of it happened, and
    the ordinary path replays the good rows and records the bad row's failure."""
    current = _settings(db_url, [NOW_ONCE])
    replayer = replayer_for(pool, current)
    rows = [row_json(original_job_id=f"g{i}") for i in range(5)]
    rows.append(row_json(original_job_id="bad", type="bad.one"))
    await insert(db_url, rows)
    with capture_logs() as logs:
        result = await replayer.run_once(full=False)
    assert (result.replayed, result.failed, result.parked) == (5, 1, 1)
    assert next(e["event"] for e in logs if e["log_level"] == "warning") == (
        "express page failed: the ordinary path takes it"
    )
    assert express_batches(logs) == []
    assert await fetch(db_url, "SELECT count(*) FROM sink") == [(5,)]
    assert await fetch(
        db_url, "SELECT outcome, count(*) FROM dlqd_replay_log GROUP BY 1 ORDER BY 1"
    ) == [("failed", 1), ("parked", 1), ("replayed", 5)]

    # the bad row now has a schedule row: the next rows go express again
    await insert(db_url, [row_json(original_job_id="g9")])
    with capture_logs() as logs:
        assert (await replayer.run_once(full=False)).replayed == 1
    assert [e["replayed"] for e in express_batches(logs)] == [1], logs


async def _page_statements(conn: psycopg.AsyncConnection[Any]) -> list[str]:
    cur = await conn.execute(
        "SELECT name FROM pg_prepared_statements WHERE name LIKE 'dlqd_page_%%'"
    )
    return [row["name"] for row in await cur.fetchall()]


async def test_the_page_statement_is_prepared_once_per_session_and_again_when_gone(
    db_url: str, sink: None
) -> None:
    """On a connection of its own, the express page is one simple query that
    EXECUTEs the page statement, prepared once per session. psycopg
    deallocates every prepared statement of the session when one of its
    transactions rolls back: the next page prepares it again and still goes
    express. A reloaded plan's statement replaces the old one."""
    async with AsyncConnectionPool(
        db_url,
        min_size=1,
        max_size=1,  # one session: the replayer's and this test's
        kwargs={"autocommit": True, "row_factory": dict_row, "prepare_threshold": 0},
    ) as one:
        current = _settings(db_url, [NOW_ONCE])
        replayer = replayer_for(one, current)
        await insert(db_url, [row_json(original_job_id=f"p{i}") for i in range(2)])
        with capture_logs() as logs:
            assert (await replayer.run_once(full=False)).replayed == 2
        assert [e["replayed"] for e in express_batches(logs)] == [2]
        async with one.connection() as conn:
            (first,) = await _page_statements(conn)
            # a transaction of the connection rolls back: psycopg says DEALLOCATE ALL
            async with conn.transaction(force_rollback=True):
                await conn.execute("SELECT 1", prepare=True)
            assert await _page_statements(conn) == []

        await insert(db_url, [row_json(original_job_id="p2")])
        with capture_logs() as logs:
            assert (await replayer.run_once(full=False)).replayed == 1
        assert [e["replayed"] for e in express_batches(logs)] == [1], logs
        assert not [e for e in logs if e["log_level"] == "warning"]
        async with one.connection() as conn:
            assert await _page_statements(conn) == [first]

        # settings reloaded: another page statement, and only it
        parked = {"name": "hold", "match": {"type": ["hold.*"]}, "action": "park"}
        reloaded = _settings(db_url, [parked, NOW_ONCE])
        replayer.settings = lambda: reloaded
        await insert(db_url, [row_json(original_job_id="p3")])
        with capture_logs() as logs:
            assert (await replayer.run_once(full=False)).replayed == 1
        assert [e["replayed"] for e in express_batches(logs)] == [1]
        async with one.connection() as conn:
            (second,) = await _page_statements(conn)
        assert second != first
    assert await fetch(db_url, "SELECT count(*) FROM sink") == [(4,)]


async def test_a_constraint_failing_at_commit_falls_back(
    db_url: str, pool: AsyncConnectionPool[Any]
) -> None:
    """A deferred constraint fails the express page at COMMIT: the ordinary
    path then checks it inside its savepoint and isolates the row."""
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute(
            """CREATE TABLE kinds (kind text PRIMARY KEY);
               INSERT INTO kinds VALUES ('email.send');
               CREATE TABLE sink (dlq_id uuid PRIMARY KEY, type text NOT NULL
                   REFERENCES kinds DEFERRABLE INITIALLY DEFERRED, payload jsonb)"""
        )
    current = _settings(db_url, [NOW_ONCE])
    replayer = replayer_for(pool, current)
    rows = [row_json(original_job_id=f"k{i}") for i in range(3)]
    rows.append(row_json(original_job_id="nokind", type="no.such.kind"))
    await insert(db_url, rows)
    result = await replayer.run_once(full=False)
    assert (result.replayed, result.failed) == (3, 1)
    assert await fetch(db_url, "SELECT count(*) FROM sink") == [(3,)]


async def test_a_blocked_target_times_out_and_the_ordinary_path_records_it(
    db_url: str, pool: AsyncConnectionPool[Any], sink: None
) -> None:
    """The sink is locked: the express page fails on replay.lock_timeout, its
    transaction is rolled back on the same connection, and the ordinary path
    records a failed attempt that says the target is blocked."""
    current = _settings(
        db_url,
        [{"name": "now", "retry_delay": "1h", "target": {"kind": "sql", "statement": SINK}}],
        replay={"lock_timeout": "50ms"},
    )
    replayer = replayer_for(pool, current)
    await insert(db_url, [row_json(original_job_id="blocked")])
    async with await psycopg.AsyncConnection.connect(db_url) as holder:
        await holder.execute("LOCK TABLE sink IN ACCESS EXCLUSIVE MODE")
        with capture_logs() as logs:
            result = await replayer.run_once(full=False)
        await holder.rollback()
    assert (result.replayed, result.failed) == (0, 1)
    warning = next(e for e in logs if e["event"].startswith("express page failed"))
    assert "lock timeout" in warning["error"]
    assert await fetch(db_url, "SELECT state, failures FROM dlqd_entry_state") == [("waiting", 1)]
    # the pass's connection came back clean: the next row goes express
    await insert(db_url, [row_json(original_job_id="free")])
    with capture_logs() as logs:
        assert (await replayer.run_once(full=False)).replayed == 1
    assert [e["replayed"] for e in express_batches(logs)] == [1], logs


async def test_an_open_circuit_keeps_its_rows_off_the_express_path(
    db_url: str, pool: AsyncConnectionPool[Any], sink: None
) -> None:
    current = _settings(db_url, [{"name": "now", "target": {"kind": "sql", "statement": SINK}}])
    throttle = Throttle()
    replayer = replayer_for(pool, current, throttle=throttle)
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO dlqd_circuits (policy, open_until) VALUES ('now', now() + interval '1h')"
        )
    await insert(db_url, [row_json(original_job_id="c1")])
    with capture_logs() as logs:
        result = await replayer.run_once(full=False)
    assert (result.replayed, result.claimed) == (0, 1)  # deferred by the ordinary path
    assert express_batches(logs) == []
    assert await fetch(db_url, "SELECT state FROM dlqd_entry_state") == [("waiting",)]


async def test_express_notify_sends_the_ordinary_messages_in_order(
    db_url: str, pool: AsyncConnectionPool[Any]
) -> None:
    current = _settings(
        db_url, [{"name": "n", "target": {"kind": "notify", "channel": "replayed_jobs"}}]
    )
    replayer = replayer_for(pool, current)
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as listener:
        await listener.execute("LISTEN replayed_jobs")
        await insert(db_url, [row_json(original_job_id=f"n{i}", app_id="t") for i in range(5)])
        with capture_logs() as logs:
            assert (await replayer.run_once(full=False)).replayed == 5
        assert [e["replayed"] for e in express_batches(logs)] == [5]
        got: list[str] = []
        with anyio.fail_after(10):
            async for note in listener.notifies():
                got.append(note.payload)
                if len(got) == 5:
                    break
    messages = [json.loads(m) for m in got]
    # the inbox's order: dlq_at, then id (the insert trigger's)
    inbox_order = await fetch(db_url, "SELECT original_job_id FROM job_dlq ORDER BY dlq_at, id")
    assert [m["original_job_id"] for m in messages] == [r[0] for r in inbox_order]
    assert set(messages[0]) == {"id", "original_job_id", "app_id", "type"}


@pytest.mark.parametrize("express", [True, False])
async def test_a_notify_target_with_message_id_sends_the_id_alone(
    db_url: str, pool: AsyncConnectionPool[Any], express: bool
) -> None:
    """Security finding 2: any role may LISTEN on a target's channel; with
    message = "id" it hears only ids, which it cannot read without access to
    the row (express and ordinary paths alike)."""
    policy: dict[str, Any] = {
        "name": "n",
        "target": {"kind": "notify", "channel": "replayed_ids", "message": "id"},
    }
    if not express:
        policy["rate_limit"] = "1000/s"  # never express
    current = _settings(db_url, [policy])
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as listener:
        await listener.execute("LISTEN replayed_ids")
        await insert(db_url, [row_json(original_job_id=f"i{i}", app_id="t") for i in range(3)])
        with capture_logs() as logs:
            assert (await replayer_for(pool, current).run_once(full=False)).replayed == 3
        assert bool(express_batches(logs)) is express
        got: list[str] = []
        with anyio.fail_after(10):
            async for note in listener.notifies():
                got.append(note.payload)
                if len(got) == 3:
                    break
    ids = {str(r[0]) for r in await fetch(db_url, "SELECT id FROM job_dlq")}
    assert [set(json.loads(m)) for m in got] == [{"id"}] * 3
    assert {json.loads(m)["id"] for m in got} == ids


async def test_replicas_on_express_pages_replay_each_row_once(
    db_url: str, pool: AsyncConnectionPool[Any], sink: None
) -> None:
    """Three replayers, each with a connection of its own, on 600 rows in pages
    of 25: every row replayed and logged once."""
    current = _settings(
        db_url,
        [{"name": "now", "target": {"kind": "sql", "statement": SINK}}],
        replay={"batch_size": 25},
    )
    await insert(db_url, [row_json(original_job_id=f"r{i}") for i in range(600)])
    replayers = [replayer_for(pool, current) for _ in range(3)]
    totals: list[int] = []

    async def drain(replayer: Replayer) -> None:
        total = 0
        while True:
            result = await replayer.run_once(full=False)
            total += result.replayed
            if result.claimed == 0:
                break
        totals.append(total)

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for replayer in replayers:
                tg.start_soon(drain, replayer)
    assert sum(totals) == 600
    assert await fetch(db_url, "SELECT count(*), count(DISTINCT dlq_id) FROM sink") == [(600, 600)]
    assert await fetch(
        db_url, "SELECT count(*) FROM dlqd_replay_log WHERE outcome = 'replayed'"
    ) == [(600,)]


def test_bulk_observations_expose_what_one_observe_per_value_does() -> None:
    """``observe_counts`` writes prometheus-client's internals: held here to the
    exposition of one ``observe()`` per value, bounds included."""
    from dlqd.metrics import bucket_index, observe_counts

    values = [0.0, 0.01, 0.0100001, 0.3, 5.0, 7 * 86400.0, 1e9, 42.0, 42.0]
    one, many = Metrics(), Metrics()
    for v in values:
        one.dlq_to_replay_seconds.labels("p").observe(v)
    counts: dict[int, int] = {}
    for v in values:
        counts[bucket_index(AGE_BUCKETS, v)] = counts.get(bucket_index(AGE_BUCKETS, v), 0) + 1
    observe_counts(many.dlq_to_replay_seconds.labels("p"), counts, sum(values))

    def histogram(m: Metrics) -> list[str]:
        text = generate_latest(m.registry).decode()
        return [line for line in text.splitlines() if "dlqd_dlq_to_replay_seconds" in line]

    assert histogram(one) == histogram(many)
    assert any('le="0.01",policy="p"} 2.0' in line for line in histogram(one))


async def test_express_schedules_in_sql_what_python_would(
    db_url: str, pool: AsyncConnectionPool[Any], sink: None
) -> None:
    """Due times written by express pages equal decide()'s to the microsecond:
    a fixed delay, an exponential one (a job never replayed), each also with
    jitter, a future dlq_at; a job replayed before takes the ordinary path,
    which counts its replays."""
    policies = [
        {"name": "fixed-jitter", "match": {"type": ["fj.*"]}, "delay": "90m",
         "backoff": "fixed", "jitter": 0.3, "target": {"kind": "sql", "statement": SINK}},
        {"name": "exp-jitter", "match": {"type": ["ej.*"]}, "delay": "70s", "factor": 3.0,
         "jitter": 0.1, "target": {"kind": "sql", "statement": SINK}},
        {"name": "fixed", "match": {"type": ["f.*"]}, "delay": "90m", "backoff": "fixed",
         "target": {"kind": "sql", "statement": SINK}},
        {"name": "exp", "match": {"type": ["e.*"]}, "delay": "70s", "factor": 3.0,
         "target": {"kind": "sql", "statement": SINK}},
        {"name": "now", "target": {"kind": "sql", "statement": SINK}},
    ]  # fmt: skip
    current = _settings(db_url, policies)
    replayer = replayer_for(pool, current)
    # a job replayed once already: its next return waits 70s x 3
    await insert(db_url, [row_json(original_job_id="back", type="x")])
    assert (await replayer.run_once(full=False)).replayed == 1
    future = datetime.now(UTC) + timedelta(hours=2)
    await insert(
        db_url,
        [
            row_json(original_job_id="f1", type="f.x"),
            row_json(original_job_id="e1", type="e.x"),
            row_json(original_job_id="back", type="e.x"),
            row_json(original_job_id="later", type="x", dlq_at=future),
            *[row_json(original_job_id=f"fj{i}", type="fj.x") for i in range(20)],
            *[row_json(original_job_id=f"ej{i}", type="ej.x") for i in range(20)],
        ],
    )
    with capture_logs() as logs:
        result = await replayer.run_once(full=False)
    assert result.scheduled == 44
    express = [e for e in logs if e["event"] == "batch" and e.get("express")]
    assert express == []  # schedule rows only: nothing replayed or parked
    rows = await fetch(
        db_url,
        """SELECT j.id, j.app_id, j.type, j.error_reason, j.attempts, j.dlq_at, s.due_at,
                  j.original_job_id, s.policy
             FROM dlqd_entry_state s JOIN job_dlq j ON j.id = s.dlq_id
            WHERE s.state = 'waiting'""",
    )
    assert len(rows) == 44
    assert len({row[6] - row[5] for row in rows if row[8] == "fixed-jitter"}) == 20  # jittered
    for row in rows:
        count = 1 if row[7] == "back" else 0
        decision = decide(_Entry(*row[:6]), current.policies, count, row[5])
        assert isinstance(decision, Replay)
        assert (decision.policy.name, decision.due_at) == (row[8], row[6]), row


async def test_an_express_page_feeds_each_target_its_own_rows(
    db_url: str, pool: AsyncConnectionPool[Any], sink: None
) -> None:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute("CREATE TABLE other (dlq_id uuid PRIMARY KEY)")
    policies = [
        {"name": "a", "match": {"type": ["a.*"]}, "target": {"kind": "sql", "statement": SINK}},
        {"name": "b", "match": {"type": ["b.*"]},
         "target": {"kind": "sql", "statement": "INSERT INTO other SELECT id FROM replayed"}},
    ]  # fmt: skip
    current = _settings(db_url, policies)
    replayer = replayer_for(pool, current)
    await insert(
        db_url,
        [row_json(original_job_id=f"a{i}", type="a.x") for i in range(3)]
        + [row_json(original_job_id=f"b{i}", type="b.x") for i in range(2)],
    )
    with capture_logs() as logs:
        assert (await replayer.run_once(full=False)).replayed == 5
    assert [e["policies"] for e in express_batches(logs)] == [
        {"a": {"replayed": 3}, "b": {"replayed": 2}}
    ]
    assert await fetch(
        db_url, "SELECT j.type, count(*) FROM sink s JOIN job_dlq j ON j.id = s.dlq_id GROUP BY 1"
    ) == [("a.x", 3)]
    assert await fetch(
        db_url, "SELECT j.type, count(*) FROM other o JOIN job_dlq j ON j.id = o.dlq_id GROUP BY 1"
    ) == [("b.x", 2)]


@pytest.mark.parametrize(
    "statement",
    [
        f"{SINK}; -- note",
        f"  /* sink */ {SINK} ;; ",
        "-- leading\nWITH keep AS (SELECT 1) " + SINK.replace("replayed", "replayed, keep") + ";",
        f"{SINK} -- a comment mentioning replayed;\n",
    ],
)
async def test_comments_semicolons_and_a_leading_with_run_as_checked(
    db_url: str, sink: None, pool: AsyncConnectionPool[Any], statement: str
) -> None:
    """A statement with a trailing semicolon and comment passed `check`, then
    every express page failed on it. Every path runs, and check plans, the
    statement's body: the same text."""
    from dlqd.db.compose import set_statement
    from dlqd.replay.checks import sql_target_problems
    from dlqd.statements import statement_body

    policy = {**NOW_ONCE, "target": {"kind": "sql", "statement": statement}}
    settings = load_settings(database_url=db_url, policies=[policy])
    async with pool.connection() as conn:
        assert await sql_target_problems(conn, settings) == []
    express = plan(settings, AGE_BUCKETS)
    body = statement_body(statement)
    if sink_kind(statement) is not None:
        assert express is not None
        async with pool.connection() as conn:
            assert body in express.text.as_string(conn)
    # the ordinary path joins its own WITH list to the statement's
    async with pool.connection() as conn:
        assert body.removeprefix("WITH ") in set_statement(statement).as_string(conn)
    await insert(db_url, [row_json(original_job_id=f"s{i}") for i in range(3)])
    with capture_logs() as logs:
        result = await replayer_for(pool, settings).run_once()
    assert result.replayed == 3
    assert [e for e in logs if e["log_level"] == "warning"] == []
    assert len(await fetch(db_url, "SELECT * FROM sink")) == 3


async def test_express_and_the_ordinary_path_leave_the_same_state(
    admin_url: str, template_db: str
) -> None:
    """The same mixed rows (parks, delays, replays into set-based, per-row and
    notify targets, a row the sink refuses, an invalid row, unmatched rows)
    through express pages and with them off: the same job_dlq, schedule,
    replay log, sink and metrics."""
    from tests.conftest import _admin_execute, with_dbname

    sink_ddl = """CREATE TABLE sink (dlq_id uuid PRIMARY KEY, type text NOT NULL
                      CHECK (type NOT IN ('bad.one', 'row.bad')), payload jsonb NOT NULL)"""
    per_row = "INSERT INTO sink (dlq_id, type, payload) VALUES (%(id)s, %(type)s, %(payload)s)"
    policies = [
        {"name": "hold", "match": {"type": ["hold.*"]}, "action": "park"},
        {"name": "later", "match": {"type": ["later.*"]}, "delay": "1d",
         "backoff": "fixed", "target": {"kind": "sql", "statement": SINK}},
        {"name": "soon", "match": {"type": ["soon.*"]}, "delay": "1h",
         "target": {"kind": "sql", "statement": SINK}},
        {"name": "rowwise", "match": {"type": ["row.*"]}, "max_failures": 1,
         "target": {"kind": "sql", "statement": per_row}},
        {"name": "note", "match": {"type": ["note.*"]},
         "target": {"kind": "notify", "channel": "compare"}},
        {"name": "now", "match": {"type": ["email.*", "bad.*", "weird.*"]}, "max_failures": 1,
         "target": {"kind": "sql", "statement": SINK}},
    ]  # fmt: skip
    base = datetime(2026, 11, 1, tzinfo=UTC)
    rows: list[dict[str, Any]] = []
    kinds = ["hold.x", "later.x", "soon.x", "row.x", "note.x", "email.x", "nomatch"]
    for n in range(40):
        # rows the sink refuses: their express pages fail and fall back (the
        # per-row one's group is bisected by calling the in-server form again)
        kind = {33: "bad.one", 24: "row.bad"}.get(n, kinds[n % len(kinds)])
        rows.append(
            row_json(
                original_job_id=f"j{n}",
                app_id=f"t{n % 3}",
                type=kind,
                id=UUID(int=n + 1),
                dlq_at=base + timedelta(minutes=n),
            )
        )
    states: list[dict[str, Any]] = []
    for express in (True, False):
        name = f"dlqd_cmp_{uuid4().hex[:10]}"
        _admin_execute(
            admin_url,
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template_db)
            ),
        )
        url = with_dbname(admin_url, name)
        try:
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                await conn.execute(sink_ddl)
                await conn.execute(INSERT_MANY, {"rows": Jsonb(rows)})
                # an invalid row: no policy can decide an infinite dlq_at
                await conn.execute(
                    """INSERT INTO job_dlq (id, original_job_id, app_id, type, payload,
                                            error_reason, attempts, dlq_at)
                       VALUES (%s, 'inf', 't0', 'email.x', '{}', 'timeout', 1, 'infinity')""",
                    [UUID(int=999)],
                )
            current = _settings(url, policies, replay={"batch_size": 7, "express": express})
            metrics = Metrics()
            pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
                url, min_size=1, max_size=2,
                kwargs={"autocommit": True, "row_factory": dict_row}, open=False,
            )  # fmt: skip
            await pool.open()
            try:
                replayer = replayer_for(pool, current, metrics)
                with capture_logs() as logs:
                    for _ in range(6):  # until nothing is left that can move now
                        await replayer.run_once(full=True)
                assert bool(express_batches(logs)) is express
            finally:
                await pool.close()
            states.append(await _full_state(url, metrics))
        finally:
            _admin_execute(
                admin_url,
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)),
            )
    with_express, ordinary = states
    for part in with_express:
        assert with_express[part] == ordinary[part], part
    # and the mix did what it says: every kind of outcome is there
    outcomes = {(policy, outcome) for _, policy, outcome, _, _ in with_express["log"]}
    assert {("now", "replayed"), ("now", "failed"), ("now", "parked"), ("note", "replayed"),
            ("rowwise", "replayed"), ("rowwise", "parked"),
            ("soon", "replayed")} <= outcomes  # fmt: skip


async def _full_state(url: str, metrics: Metrics) -> dict[str, Any]:
    """What both paths must agree on, without the times they ran at."""
    queries = {
        "job_dlq": "SELECT id, replayed_at IS NOT NULL FROM job_dlq ORDER BY id",
        "schedule": """SELECT dlq_id, state, policy, due_at, failures, last_error, parked_reason
                         FROM dlqd_entry_state ORDER BY dlq_id""",
        "log": """SELECT dlq_id, policy, outcome, error, manual FROM dlqd_replay_log
                   ORDER BY dlq_id, id""",
        "sink": "SELECT dlq_id, type, payload FROM sink ORDER BY dlq_id",
        "inbox": "SELECT dlq_id FROM dlqd_inbox ORDER BY dlq_id",
    }
    state: dict[str, Any] = {name: await fetch(url, text) for name, text in queries.items()}
    exposition = generate_latest(metrics.registry).decode()
    state["metrics"] = sorted(
        line
        for line in exposition.splitlines()
        if line.startswith(("dlqd_replays_total{", "dlqd_parked_total{"))
    )
    return state


async def test_the_jitter_in_sql_is_the_jitter_in_python(db_url: str) -> None:
    """One definition of the jitter: dlqd_jittered_us equals
    policy.jittered_micros on 100,000 random ids, delays and jitters."""
    rng = random.Random(20261201)
    ids = [uuid4() for _ in range(100_000)]
    delays = [rng.choice([1, 999, 10**6, rng.randrange(1, 10**13)]) for _ in ids]
    jitters = [rng.choice([0.0, 0.1, 0.5, 0.999999, rng.random()]) for _ in ids]
    ppms = [round(j * JITTER_SCALE) for j in jitters]  # the jitter in millionths
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        cur = await conn.execute(
            """SELECT dlqd_jittered_us(i, d, p)
                 FROM unnest(%s::uuid[], %s::bigint[], %s::bigint[])
                      WITH ORDINALITY AS t(i, d, p, n)
                ORDER BY n""",
            (ids, delays, ppms),
        )
        in_sql = [row[0] for row in await cur.fetchall()]
    in_python = [jittered_micros(i, d, j) for i, d, j in zip(ids, delays, jitters, strict=True)]
    assert in_sql == in_python
    # and it is a jitter: within its bounds, and not the same for every id
    assert all(
        abs(got - d) * JITTER_SCALE <= d * ppm
        for got, d, ppm in zip(in_python, delays, ppms, strict=True)
    )
    assert len({got for got, d in zip(in_python, delays, strict=True) if d == 10**6}) > 100


# ---------------------------------------------------------------- max_replays

PENDING_UNPARKED = """SELECT count(*) FROM job_dlq j WHERE j.replayed_at IS NULL
    AND NOT EXISTS (SELECT FROM dlqd_entry_state s
                     WHERE s.dlq_id = j.id AND s.state = 'parked')"""


async def until_replayed(replayer: Replayer, rows: int) -> None:
    """Passes until ``rows`` rows have been replayed in all (deferred rows are
    due again after a moment: no in-process event says when)."""
    done = 0
    with anyio.fail_after(20):
        while done < rows:
            done += (await replayer.run_once(full=False)).replayed
            if done < rows:
                await anyio.sleep(0.05)


async def until_settled(db_url: str, replayers: list[Replayer]) -> None:
    """Passes of every replayer until no row is pending but the parked."""
    with anyio.fail_after(30):
        while (await fetch(db_url, PENDING_UNPARKED))[0][0]:
            for replayer in replayers:
                await replayer.run_once(full=False)
            await anyio.sleep(0.05)


async def test_express_counts_max_replays_in_the_statement(
    db_url: str, pool: AsyncConnectionPool[Any], sink: None
) -> None:
    """Three returns of one job in one page, max_replays 2: two replay and the
    third is parked max_replays, by the express page alone; a fourth return,
    later, is parked as it arrives (the job is at its limit). Another
    tenant's job of the same id counts apart."""
    capped = [{"name": "capped", "max_replays": 2, "target": {"kind": "sql", "statement": SINK}}]
    current = _settings(db_url, capped)
    replayer = replayer_for(pool, current)
    rows = [row_json(original_job_id="j1", app_id="a") for _ in range(3)]
    rows += [row_json(original_job_id="j1", app_id="b")]
    await insert(db_url, rows)
    with capture_logs() as logs:
        result = await replayer.run_once(full=False)
    assert (result.replayed, result.parked) == (3, 1)
    assert sum(e["replayed"] for e in express_batches(logs)) == 3  # all of it express
    assert await fetch(
        db_url,
        """SELECT j.app_id, s.state, s.parked_reason, s.last_error FROM dlqd_entry_state s
             JOIN job_dlq j ON j.id = s.dlq_id""",
    ) == [("a", "parked", "max_replays", "max_replays (2) reached for job j1")]
    assert sorted(await fetch(db_url, "SELECT app_id, outcome, error FROM dlqd_replay_log")) == [
        ("a", "parked", "max_replays (2) reached for job j1"),
        ("a", "replayed", None),
        ("a", "replayed", None),
        ("b", "replayed", None),
    ]
    await insert(db_url, [row_json(original_job_id="j1", app_id="a")])
    with capture_logs() as logs:
        result = await replayer.run_once(full=False)
    assert (result.replayed, result.parked) == (0, 1)
    assert sum(e["parked"] for e in express_batches(logs)) == 1
    assert await fetch(
        db_url,
        "SELECT count(*) FROM dlqd_entry_state WHERE parked_reason = 'max_replays'",
    ) == [(2,)]


async def test_express_defers_a_job_whose_slot_it_cannot_trust(
    db_url: str, pool: AsyncConnectionPool[Any], sink: None
) -> None:
    """A slot another transaction holds, or stamped by a transaction this
    statement's snapshot cannot see (a replay of the job committed after the
    statement began): the express page leaves the job to the ordinary path,
    which recounts it under the lock."""
    capped = [{"name": "capped", "max_replays": 1, "target": {"kind": "sql", "statement": SINK}}]
    replayer = replayer_for(pool, _settings(db_url, capped))
    slot_of = "SELECT dlqd_slot(json_build_array('job', 'a', %s::text)::text)"
    async with await psycopg.AsyncConnection.connect(db_url) as holder:
        # held: neither path takes it (SKIP LOCKED), the row waits
        cur = await holder.execute(
            f"SELECT slot FROM dlqd_lock_slots WHERE slot = ({slot_of}) FOR UPDATE", ["held"]
        )
        assert await cur.fetchone() is not None
        await insert(db_url, [row_json(original_job_id="held", app_id="a")])
        result = await replayer.run_once(full=False)
        assert result.replayed == 0
        await holder.rollback()
    # the ordinary path deferred it a moment (due again shortly): then it replays
    await until_replayed(replayer, 1)
    # stamped by a transaction no snapshot of now can see: express defers, the
    # ordinary path (a statement of its own, under the lock) replays it
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute(
            f"""UPDATE dlqd_lock_slots
                   SET writer = (pg_current_xact_id()::text::bigint + 1000000)::text::xid8
                 WHERE slot = ({slot_of})""",
            ["late"],
        )
    await insert(db_url, [row_json(original_job_id="late", app_id="a")])
    with capture_logs() as logs:
        result = await replayer.run_once(full=False)
    assert result.replayed == 1
    assert sum(e["replayed"] for e in express_batches(logs)) == 0
    assert [e for e in logs if e["event"] == "batch" and not e.get("express")]


async def test_replicas_replaying_returns_of_one_job_at_once_stay_within_max_replays(
    db_url: str, pool: AsyncConnectionPool[Any], sink: None
) -> None:
    """Three replayers on one inbox of many returns of a few jobs, round after
    round: no job is replayed more than max_replays times, whichever path,
    replica or moment took its returns."""
    capped = [{"name": "capped", "max_replays": 3, "target": {"kind": "sql", "statement": SINK}}]
    current = _settings(db_url, capped, replay={"batch_size": 7})
    replayers = [replayer_for(pool, current) for _ in range(3)]
    for round_ in range(4):
        await insert(
            db_url,
            [row_json(original_job_id=f"j{i % 5}", app_id="a") for i in range(40)],
        )
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for replayer in replayers:
                    tg.start_soon(replayer.run_once)
        # whatever a replica deferred (due again shortly), later passes finish
        await until_settled(db_url, replayers)
        counts = dict(
            await fetch(
                db_url,
                "SELECT original_job_id, count(*) FROM dlqd_replay_log"
                " WHERE outcome = 'replayed' GROUP BY 1",
            )
        )
        assert counts == {f"j{i}": 3 for i in range(5)}, (round_, counts)
    parked = await fetch(
        db_url,
        "SELECT count(*) FROM dlqd_entry_state WHERE parked_reason = 'max_replays'",
    )
    assert parked == [(4 * 40 - 5 * 3,)]  # every other return parked max_replays


# ---------------------------------------------------------------- rate limits


async def test_express_takes_a_rate_limits_tokens_in_the_statement(
    db_url: str, pool: AsyncConnectionPool[Any], sink: None
) -> None:
    """A policy limited to 5/s (a bucket of 5), per tenant: an express page
    replays as many rows of each tenant as its bucket has whole tokens, in
    inbox order, and takes them; the rest go the ordinary way, which finds
    the buckets empty and schedules them for the next token."""
    limited = [
        {"name": "limited", "rate_limit": "5/s", "rate_limit_per": "app_id",
         "target": {"kind": "sql", "statement": SINK}},
    ]  # fmt: skip
    replayer = replayer_for(pool, _settings(db_url, limited))
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        # the buckets exist (the ordinary path makes them): full, and one
        # another replica holds (no tokens to be had from it now)
        cur = await conn.execute(
            """INSERT INTO dlqd_rate_buckets (policy, scope, tokens, updated_at)
               VALUES ('limited', 'a', 5, now()), ('limited', 'b', 3, now()),
                      ('limited', 'held', 5, now())
               RETURNING updated_at"""
        )
        row = await cur.fetchone()
        assert row is not None
        filled = row[0]
    rows = [row_json(original_job_id=f"a{i}", app_id="a") for i in range(8)]
    rows += [row_json(original_job_id=f"b{i}", app_id="b") for i in range(8)]
    rows += [row_json(original_job_id=f"h{i}", app_id="held") for i in range(2)]
    await insert(db_url, rows)
    async with await psycopg.AsyncConnection.connect(db_url) as holder:
        await holder.execute("SELECT FROM dlqd_rate_buckets WHERE scope = 'held' FOR UPDATE")
        with capture_logs() as logs:
            await replayer.run_once(full=False)
        await holder.rollback()
    # the buckets refill at 5/s from the moment they were filled (on the
    # database's clock): by the time the pass ran, b may have had a token more,
    # and the ordinary path after it one, or as many as the time since gave
    [(since,)] = await fetch(db_url, "SELECT now()")
    refilled = max(1, int((since - filled).total_seconds() * 5))
    express_replayed = sum(e["replayed"] for e in express_batches(logs))
    # 5 of a (its bucket is full: no more), 3 of b and what it refilled, none of held
    assert 8 <= express_replayed <= 8 + min(2, refilled)
    by_app = dict(
        await fetch(
            db_url,
            "SELECT app_id, count(*) FROM job_dlq WHERE replayed_at IS NOT NULL GROUP BY 1",
        )
    )
    assert 5 <= by_app.get("a", 0) <= 5 + refilled
    assert 3 <= by_app.get("b", 0) <= 3 + refilled
    assert by_app.get("held", 0) <= refilled
    # in inbox order (the insert trigger's: dlq_at, id): each tenant's first rows went
    order = await fetch(
        db_url,
        "SELECT app_id, replayed_at IS NOT NULL FROM job_dlq ORDER BY app_id, dlq_at, id",
    )
    for app in ("a", "b"):
        done = [replayed for tenant, replayed in order if tenant == app]
        assert done == sorted(done, reverse=True), (app, done)  # a prefix, then none
    tokens = dict(await fetch(db_url, "SELECT scope, tokens FROM dlqd_rate_buckets"))
    assert tokens["a"] < 1.5
    assert tokens["b"] < 1.5


# ---------------------------------------------------------------- per-row statements in the server

PER_ROW = "INSERT INTO ordered (dlq_id, type, payload) VALUES (%(id)s, %(type)s, %(payload)s)"


def test_the_in_server_form_reads_every_placeholder_from_the_row() -> None:
    from dlqd.db.compose import PLANNED_ROW, server_row_statement

    text = server_row_statement(
        "INSERT INTO t (a, b, c) VALUES (%(id)s, %(payload)s, '100%%'); -- done"
    )
    assert text == """INSERT INTO t (a, b, c) VALUES (($1)."id", ($1)."payload", '100%')"""
    planned = server_row_statement("SELECT %(error_history)s", PLANNED_ROW)
    assert planned == 'SELECT ((NULL::job_dlq))."error_history"'


async def test_a_per_row_target_runs_in_the_server_on_express_pages(
    db_url: str, pool: AsyncConnectionPool[Any]
) -> None:
    """A per-row statement whose in-server form plans goes express: each page's
    rows run through its session function, called by one query, once each, in inbox
    order, with the row's own values (the payload never leaves Postgres)."""
    from dlqd.replay.targets import runs_in_server

    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute(
            """CREATE TABLE ordered (n bigserial PRIMARY KEY, dlq_id uuid UNIQUE NOT NULL,
                                     type text NOT NULL, payload jsonb NOT NULL)"""
        )
    policy = {"name": "rows", "target": {"kind": "sql", "statement": PER_ROW}}
    current = _settings(db_url, [policy], replay={"batch_size": 8})
    replayer = replayer_for(pool, current)
    await insert(
        db_url,
        [row_json(original_job_id=f"o{i}", type=f"t.{i}", payload={"i": i}) for i in range(20)],
    )
    with capture_logs() as logs:
        result = await replayer.run_once(full=False)
    assert result.replayed == 20
    async with pool.connection() as conn:
        assert runs_in_server(conn, PER_ROW)
    pages = [e["policies"] for e in express_batches(logs)]
    assert pages == [{"rows": {"replayed": n}} for n in (8, 8, 4)]
    # in the order the rows came in, each with its own values, each once
    assert (
        await fetch(
            db_url,
            """SELECT o.type = j.type AND o.payload = j.payload AND j.replayed_at IS NOT NULL
             FROM ordered o JOIN dlqd_replay_log l ON l.dlq_id = o.dlq_id
             JOIN job_dlq j ON j.id = o.dlq_id
            ORDER BY o.n""",
        )
        == [(True,)] * 20
    )
    # the statement ran row after row in inbox order, as the log records them
    assert await fetch(db_url, "SELECT dlq_id FROM ordered ORDER BY n") == await fetch(
        db_url, "SELECT dlq_id FROM dlqd_replay_log ORDER BY id"
    )


async def test_a_per_row_statement_that_needs_the_clients_binding_runs_from_the_daemon(
    db_url: str, pool: AsyncConnectionPool[Any]
) -> None:
    """A text placeholder into an enum column plans only with the client's
    untyped binding: that statement keeps the ordinary path, row by row from
    the daemon, and still replays every row (the in-server form is never
    tried on a row)."""
    from dlqd.replay.targets import runs_in_server

    statement = "INSERT INTO kinds (dlq_id, kind) VALUES (%(id)s, %(type)s)"
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute("CREATE TYPE job_kind AS ENUM ('email.send', 'sms.send')")
        await conn.execute("CREATE TABLE kinds (dlq_id uuid PRIMARY KEY, kind job_kind NOT NULL)")
    policy = {"name": "kinds", "target": {"kind": "sql", "statement": statement}}
    replayer = replayer_for(pool, _settings(db_url, [policy]))
    await insert(
        db_url,
        [
            row_json(original_job_id=f"k{i}", type=("email.send", "sms.send")[i % 2])
            for i in range(6)
        ],
    )
    with capture_logs() as logs:
        result = await replayer.run_once(full=False)
    assert result.replayed == 6
    async with pool.connection() as conn:
        assert not runs_in_server(conn, statement)
    assert express_batches(logs) == []
    (note,) = [e for e in logs if e["event"].startswith("per-row target runs row by row")]
    assert "job_kind" in note["error"]
    assert await fetch(db_url, "SELECT kind::text, count(*) FROM kinds GROUP BY 1 ORDER BY 1") == [
        ("email.send", 3),
        ("sms.send", 3),
    ]


async def test_a_role_without_the_function_keeps_the_client_form(db_url: str) -> None:
    from dlqd.db import replays

    async with await psycopg.AsyncConnection.connect(db_url, row_factory=dict_row) as conn:
        assert await replays.replay_rows_allowed(conn)
        await conn.execute("SET ROLE dlqd_tenant")  # EXECUTE revoked from PUBLIC
        assert not await replays.replay_rows_allowed(conn)


async def test_a_locked_table_puts_off_learning_the_form_without_deciding_it(
    db_url: str, pool: AsyncConnectionPool[Any]
) -> None:
    """Learning plans the in-server form at the start of a pass: a table locked
    by someone else costs it a short lock wait, and the form is learned on a
    later try, not given up for good."""
    from dlqd.replay import targets

    statement = "INSERT INTO locked (dlq_id) VALUES (%(id)s)"
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        await conn.execute("CREATE TABLE locked (dlq_id uuid PRIMARY KEY)")
    async with await psycopg.AsyncConnection.connect(db_url) as locker, pool.connection() as conn:
        await locker.execute("LOCK TABLE locked IN ACCESS EXCLUSIVE MODE")
        with anyio.fail_after(5):
            await targets.learn_server_forms(conn, [statement])
        assert not targets.runs_in_server(conn, statement)
        key = targets._form_key(conn, statement)
        assert key not in targets._SERVER_FORMS
        assert targets._LEARN_AFTER[key] > anyio.current_time()
        await locker.rollback()
        await targets.learn_server_forms(conn, [statement])  # not before its time
        assert key not in targets._SERVER_FORMS
        targets._LEARN_AFTER[key] = 0.0  # the retry's time has come
        await targets.learn_server_forms(conn, [statement])
        assert targets.runs_in_server(conn, statement)


async def test_a_pass_out_of_time_leaves_the_rest_to_the_next_express_pages(
    db_url: str, pool: AsyncConnectionPool[Any], sink: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backlog outlasts a pass's time budget: the pass ends after its express
    page, and the next pass goes on with express pages. The ordinary pages,
    which would take express's own rows the slow way, are not run for them."""
    from dlqd.replay import worker

    monkeypatch.setattr(worker, "PASS_BUDGET", 0.0)  # every pass is out of time at once
    replayer = replayer_for(pool, _settings(db_url, [NOW_ONCE], replay={"batch_size": 4}))
    await insert(db_url, [row_json(original_job_id=f"b{i}") for i in range(10)])
    with capture_logs() as logs:
        passes = 0
        with anyio.fail_after(30):
            while (await fetch(db_url, "SELECT count(*) FROM sink")) != [(10,)]:
                result = await replayer.run_once(full=False)
                passes += 1
                assert result.replayed == 4 or passes == 3
    batches = [e for e in logs if e["event"] == "batch"]
    assert [e.get("express") for e in batches] == [True, True, True]
    assert [e["replayed"] for e in batches] == [4, 4, 2]


def test_the_express_statement_is_rendered_once_with_numbered_placeholders() -> None:
    """A name used twice is one parameter (as psycopg binds it); a literal %
    stays one; the values come in the placeholders' order."""
    from dlqd.db.compose import positional

    rendered = positional(sql.SQL("SELECT %(b)s, %(a)s, %(b)s, '100%%'").format(), None)
    assert rendered.text == b"SELECT $1, $2, $1, '100%'"
    assert rendered.values({"a": 1, "b": 2, "unused": 3}) == [2, 1]


async def test_every_page_runs_without_jit_and_a_backlog_s_on_custom_plans(
    db_url: str, pool: AsyncConnectionPool[Any], sink: None
) -> None:
    """Every express page runs with JIT off, and a backlog's pages (those
    after a full page) with custom plans, in their own transaction only: the
    target sees the settings, and the session keeps its own afterwards."""
    seen = (
        "INSERT INTO sink (dlq_id, type, payload) SELECT id, current_setting('jit'),"
        " to_jsonb(current_setting('plan_cache_mode')) FROM replayed"
    )
    policy = {"name": "now", "target": {"kind": "sql", "statement": seen}}
    replayer = replayer_for(pool, _settings(db_url, [policy], replay={"batch_size": 4}))
    await insert(db_url, [row_json(original_job_id=f"b{i}") for i in range(10)])
    with anyio.fail_after(30):
        while (await fetch(db_url, "SELECT count(*) FROM sink")) != [(10,)]:
            await replayer.run_once(full=False)
    rows = await fetch(
        db_url, "SELECT type, payload #>> '{}', count(*) FROM sink GROUP BY 1, 2 ORDER BY 3"
    )
    # the first page (4 rows) planned as the session plans; the next two after a full one
    assert rows == [("off", "auto", 4), ("off", "force_custom_plan", 6)]
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT current_setting('jit') = reset_val AS jit,"
            " current_setting('plan_cache_mode') AS mode FROM pg_settings WHERE name = 'jit'"
        )
        assert await cur.fetchone() == {"jit": True, "mode": "auto"}
