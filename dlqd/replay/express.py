"""Express pages: new rows replayed inside Postgres, one statement per page.

A new row (an inbox entry with no schedule row, valid, ``dlq_at`` not in the
future) qualifies when the first policy that matches it replays at once (no
delay, no rate limit, no ``max_replays``, no dry run, its circuit closed) into
a target that runs over a set: a ``sql`` statement over ``replayed``, or a
``notify`` channel. For those rows nothing is decided in Python. The
policies' matches are compiled to SQL (``LIKE`` for globs without a character
class), and one statement claims the page ``FOR UPDATE SKIP LOCKED``, runs
the target over it, sets ``replayed_at``, writes the replay log and drops the
inbox entries. What comes back is a summary: rows per policy, with their
dead-letter-to-replay ages already bucketed for the histogram.

Every other row, and every row of an express page whose transaction fails,
takes the ordinary path (``dlqd.replay.worker``), which decides row by row and
isolates a failing row. An express page changes how fast an outcome is
reached, never the outcome: the ordinary path would replay the same rows, at
the same moment, through the same target, with the same replay log.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg
from psycopg.pq import TransactionStatus

from dlqd.config import Match, NotifyTarget, Policy, Settings, SqlTarget
from dlqd.replay.batch import set_replay_timeouts
from dlqd.replay.targets import is_set_based

Connection = psycopg.AsyncConnection[dict[str, Any]]
ExpressTarget = SqlTarget | NotifyTarget

_COMMENTS = re.compile(r"\A(?:\s+|--[^\n]*(?:\n|\Z)|/\*.*?\*/)*", re.DOTALL)
_FIRST_WORD = re.compile(r"[A-Za-z]+")
_KEY_COLUMNS = ("app_id", "type", "error_reason")


def like_pattern(glob: str) -> str | None:
    """An fnmatch glob as a LIKE pattern with the same matches, or None when the
    glob has a character class (``[...]``), which LIKE cannot say."""
    if "[" in glob:
        return None
    out: list[str] = []
    for char in glob:
        if char == "*":
            out.append("%")
        elif char == "?":
            out.append("_")
        elif char in "%_\\":
            out.append("\\" + char)
        else:
            out.append(char)
    return "".join(out)


def sink_kind(statement: str) -> Literal["dml", "select"] | None:
    """How a set-based statement runs as a data-modifying CTE: ``dml`` (INSERT,
    UPDATE, DELETE run whether read or not), ``select`` (read, so that it
    runs), or None (anything else, a leading WITH included: not express)."""
    if not is_set_based(statement):
        return None
    rest = statement[_COMMENTS.match(statement).end() :]  # type: ignore[union-attr]
    word = _FIRST_WORD.match(rest)
    keyword = word.group(0).upper() if word else ""
    if keyword in ("INSERT", "UPDATE", "DELETE"):
        return "dml"
    if keyword == "SELECT":
        return "select"
    return None


def express_target(policy: Policy, settings: Settings) -> ExpressTarget | None:
    """The target ``policy`` replays into at once, when its rows may go express."""
    if (
        policy.action != "replay"
        or policy.dry_run
        or settings.dry_run
        or policy.delay.total_seconds() > 0
        or policy.rate_limit is not None
        or policy.max_replays is not None
    ):
        return None
    target = settings.target_for(policy)
    if isinstance(target, NotifyTarget):
        return target
    if isinstance(target, SqlTarget) and sink_kind(target.statement) is not None:
        return target
    return None


def _condition(index: int, match: Match, params: dict[str, Any]) -> tuple[str, bool]:
    """``match`` as SQL over ``j`` (job_dlq), and whether it is exact. An inexact
    condition (a glob with a character class left out) holds for every row the
    match holds for, and maybe more."""
    parts: list[str] = []
    exact = True
    for column in _KEY_COLUMNS:
        globs = getattr(match, column)
        if globs is None:
            continue
        patterns = [like_pattern(g) for g in globs]
        if any(p is None for p in patterns):
            exact = False
            continue
        key = f"m{index}_{column}"
        params[key] = patterns
        parts.append(f"j.{column} LIKE ANY (%({key})s::text[])")
    for bound, op in (("min_attempts", ">="), ("max_attempts", "<=")):
        value = getattr(match, bound)
        if value is not None:
            key = f"m{index}_{bound}"
            params[key] = value
            parts.append(f"j.attempts {op} %({key})s::int")
    return (" AND ".join(parts) or "true"), exact


def first_policy_sql(policies: Sequence[Policy], upto: int, params: dict[str, Any]) -> str:
    """The index of the first policy matching ``j`` among ``policies[:upto + 1]``;
    -1 when none does, or when an inexact match stands in the way."""
    branches: list[str] = []
    for index, policy in enumerate(policies[: upto + 1]):
        condition, exact = _condition(index, policy.match, params)
        branches.append(f"WHEN {condition} THEN {index if exact else -1}")
    return f"CASE {' '.join(branches)} ELSE -1 END"


@dataclass(frozen=True)
class ExpressPlan:
    """The express statement for one settings object, and what it binds."""

    text: bytes
    params: dict[str, Any]
    policies: dict[int, Policy]  # the express policies, by their index in settings.policies

    def bind(self, after_seq: int, limit: int, indexes: Iterable[int]) -> dict[str, Any]:
        return {**self.params, "after_seq": after_seq, "limit": limit, "express": list(indexes)}


def plan(settings: Settings, age_buckets: Sequence[float]) -> ExpressPlan | None:
    """The express plan for ``settings``, or None when no policy qualifies.

    One target per plan: the first qualifying policy's, shared by every
    qualifying policy with the same target; other rows take the ordinary path.
    """
    chosen: ExpressTarget | None = None
    express: dict[int, Policy] = {}
    for index, policy in enumerate(settings.policies):
        target = express_target(policy, settings)
        if target is None or (chosen is not None and target != chosen):
            continue
        chosen = target
        express[index] = policy
    if chosen is None:
        return None
    params: dict[str, Any] = {
        "names": [p.name for p in settings.policies],
        # width_bucket counts the bounds <= its operand: over the negated bounds,
        # those >= the age, so that an age equal to a bound falls in its bucket
        "negated_bounds": sorted(-b for b in age_buckets),
        "bucket_count": len(age_buckets),
    }
    case = first_policy_sql(settings.policies, max(express), params)
    if isinstance(chosen, NotifyTarget):
        params["channel"] = chosen.channel
        sink = _NOTIFY_SINK
        read_sink = True
    else:
        sink = chosen.statement.strip().rstrip(";")
        read_sink = sink_kind(chosen.statement) == "select"
    text = _STATEMENT.format(
        case=case,
        sink=sink,
        sink_rows="(SELECT count(*) FROM target)" if read_sink else "NULL::bigint",
    )
    return ExpressPlan(text.encode(), params, express)


# The notify target's messages, as dlqd_inbox order gives them (as notify_rows).
_NOTIFY_SINK = """SELECT count(pg_notify(%(channel)s, m.message))
      FROM (SELECT json_build_object('id', (p.entry).id,
                                     'original_job_id', (p.entry).original_job_id,
                                     'app_id', (p.entry).app_id,
                                     'type', (p.entry).type)::text AS message
              FROM picked p ORDER BY p.seq) AS m"""

# {case}: the first matching policy (first_policy_sql); {sink}: the target.
# ``replayed`` holds the rows as they were claimed (replayed_at still NULL), as
# in the ordinary path, where the target runs before the rows are marked.
_STATEMENT = """WITH candidates AS MATERIALIZED (
    -- the next inbox entries, locked (replicas take different ones): an index
    -- range scan whatever the filters below, which the planner cannot estimate
    SELECT i.seq, i.dlq_id
      FROM dlqd_inbox i
     WHERE i.seq > %(after_seq)s
     ORDER BY i.seq
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
), picked AS MATERIALIZED (
    -- each entry's row by its primary key (a lateral subquery with a locking
    -- clause is never flattened into a join: no plan scans job_dlq whole)
    SELECT c.seq, c.dlq_id AS id, e.entry, e.policy
      FROM candidates c
     CROSS JOIN LATERAL (
            SELECT j AS entry, m.policy
              FROM job_dlq j
             CROSS JOIN LATERAL (SELECT {case} AS policy) m
             WHERE j.id = c.dlq_id
               AND m.policy = ANY (%(express)s::int[])
               AND j.replayed_at IS NULL
               AND j.dlq_at <= now()
               AND dlqd_row_problem(j.dlq_at, j.app_id, j.type, j.error_reason,
                                    j.original_job_id) IS NULL
               AND NOT EXISTS (SELECT FROM dlqd_entry_state s WHERE s.dlq_id = j.id)
               FOR UPDATE OF j SKIP LOCKED
           ) e
), inbox AS (
    DELETE FROM dlqd_inbox WHERE seq IN (SELECT seq FROM picked)
), marked AS (
    -- by primary key, whatever the planner thinks of a join with picked
    UPDATE job_dlq j SET replayed_at = now()
     WHERE j.id = ANY (ARRAY(SELECT id FROM picked))
    RETURNING j.id, j.original_job_id, j.app_id,
              extract(epoch FROM j.replayed_at - j.dlq_at)::float8 AS lag
), logged AS (
    INSERT INTO dlqd_replay_log (dlq_id, original_job_id, app_id, policy, outcome, manual)
    SELECT m.id, m.original_job_id, m.app_id, (%(names)s::text[])[p.policy + 1], 'replayed',
           false
      FROM marked m
      JOIN picked p ON p.id = m.id
     ORDER BY p.seq
), replayed AS (
    SELECT (p.entry).* FROM picked p
), target AS (
{sink}
)
SELECT (SELECT count(*) FROM candidates) AS scanned,
       (SELECT max(seq) FROM candidates) AS last_seq,
       (SELECT count(*) FROM picked) AS claimed,
       {sink_rows} AS sink_rows,
       (SELECT coalesce(json_agg(json_build_array(g.policy, g.bucket, g.n, g.lag_sum)), '[]')
          FROM (SELECT p.policy,
                       -- bounds below the age: its bucket (lowest first, +Inf last)
                       %(bucket_count)s - width_bucket(-m.lag, %(negated_bounds)s::float8[])
                           AS bucket,
                       count(*) AS n, sum(m.lag) AS lag_sum
                  FROM marked m
                  JOIN picked p ON p.id = m.id
                 GROUP BY 1, 2) g) AS replayed"""


@dataclass
class ExpressPage:
    """What one committed express page did."""

    scanned: int  # inbox entries this page locked
    last_seq: int
    claimed: int  # of those, rows replayed here (the others are the ordinary path's)
    # policy name -> (rows, {age bucket index: rows}, sum of ages in seconds)
    replayed: dict[str, tuple[int, dict[int, int], float]] = field(default_factory=dict)
    seconds: float = 0.0


async def run_page(
    conn: Connection,
    express: ExpressPlan,
    settings: Settings,
    *,
    after_seq: int,
    indexes: Iterable[int],
) -> ExpressPage:
    """One express page in its own transaction, its statements pipelined: one
    round trip for BEGIN, the timeouts, the statement and COMMIT.

    BEGIN and COMMIT are sent as statements: psycopg's ``transaction()`` syncs
    the pipeline on entry and exit, three round trips more. When a statement
    fails, the server skips the rest up to the sync and the transaction is
    left aborted: it is rolled back here, and the error raised. (An implicit
    transaction, no BEGIN and COMMIT, is cheaper still, but a deferred
    constraint then fails at the Sync itself, which psycopg reports as a
    broken pipeline rather than as the constraint's error.)
    """
    params = express.bind(after_seq, settings.replay.batch_size, indexes)
    try:
        async with conn.pipeline():
            await conn.execute(b"BEGIN")
            await set_replay_timeouts(conn, settings)
            cur = await conn.execute(express.text, params)
            await conn.execute(b"COMMIT")
    except psycopg.Error:
        # (a cancelled page leaves the connection to the pool, which resets it)
        if not conn.broken and conn.info.transaction_status != TransactionStatus.IDLE:
            await conn.rollback()
        raise
    row = await cur.fetchone()
    assert row is not None  # noqa: S101 - an aggregate row always comes back
    page = ExpressPage(
        scanned=int(row["scanned"]),
        last_seq=int(row["last_seq"] or after_seq),
        claimed=int(row["claimed"]),
    )
    names = [p.name for p in settings.policies]
    for index, bucket, n, lag_sum in row["replayed"]:
        rows, buckets, total = page.replayed.get(names[index], (0, {}, 0.0))
        buckets[int(bucket)] = buckets.get(int(bucket), 0) + int(n)
        page.replayed[names[index]] = (rows + int(n), buckets, total + float(lag_sum or 0.0))
    return page
