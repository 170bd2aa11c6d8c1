"""Express pages: new rows decided and replayed inside Postgres, one statement per page.

A new row (an inbox entry with no schedule row, valid) goes express when the
first policy that matches it can be applied without Python:

- a park policy: the row gets its ``parked_policy`` schedule row;
- a replay policy without ``max_replays`` or dry run, whose delay is known in
  SQL (none, fixed, or exponential for a job never replayed; no jitter on a
  delay): a row not due yet gets its ``waiting`` schedule row at
  ``dlq_at + delay``; a due row is replayed at once when the policy has no
  rate limit, its circuit is closed, and its target runs over a set (a ``sql``
  statement over ``replayed``, or a ``notify`` channel).

The policies' matches are compiled to SQL (``LIKE`` for globs without a
character class). One statement claims the page ``FOR UPDATE SKIP LOCKED``,
writes the schedule rows, runs the target over the due rows, sets their
``replayed_at``, writes the replay log and drops the inbox entries. What comes
back is a summary: rows per policy and outcome, with the replayed rows' ages
already bucketed for the histogram.

Every other row, and every row of an express page whose transaction fails,
takes the ordinary path (``dlqd.replay.worker``), which decides row by row and
isolates a failing row. An express page changes how fast an outcome is
reached, never the outcome: the ordinary path would write the same schedule
rows, replay the same rows through the same target, and log the same replays.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal
from uuid import UUID

import psycopg
from psycopg.pq import TransactionStatus

from dlqd.config import Match, NotifyTarget, Policy, Settings, SqlTarget
from dlqd.db.queries import q
from dlqd.policy import replay_delay
from dlqd.replay.batch import set_replay_timeouts
from dlqd.replay.targets import is_set_based
from dlqd.statements import first_keyword, statement_body, target_problem

Connection = psycopg.AsyncConnection[dict[str, Any]]
ExpressTarget = SqlTarget | NotifyTarget

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
    if not is_set_based(statement) or target_problem(statement) is not None:
        return None
    keyword = first_keyword(statement)
    if keyword in ("INSERT", "UPDATE", "DELETE"):
        return "dml"
    if keyword == "SELECT":
        return "select"
    return None


Kind = Literal["park", "fixed", "exp"]


def express_kind(policy: Policy, settings: Settings) -> Kind | None:
    """What an express page may do for the rows ``policy`` is the first to match:
    ``park`` them (a park policy), or schedule them at ``dlq_at`` plus a delay
    known without Python (``fixed``; ``exp``: exponential, known for a job never
    replayed, the only case it is taken), replaying the due ones at once when
    the policy is also :func:`express_target`. None: the ordinary path decides
    (dry runs; ``max_replays``, which counts; jitter on a delay, computed in
    Python from the row id)."""
    if policy.dry_run or settings.dry_run:
        return None
    if policy.action == "park":
        return "park"
    if policy.max_replays is not None or settings.target_for(policy) is None:
        return None
    if policy.delay.total_seconds() == 0:
        return "fixed"  # no delay: neither the backoff nor the jitter matters
    if policy.jitter > 0:
        return None
    return "fixed" if policy.backoff == "fixed" else "exp"


def express_target(policy: Policy, settings: Settings) -> ExpressTarget | None:
    """The target an express page replays ``policy``'s due rows into, or None
    when they take the ordinary path (rate limits are taken there; an http
    target cannot share the transaction; a per-row statement runs per row)."""
    if express_kind(policy, settings) not in ("fixed", "exp") or policy.rate_limit is not None:
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
    # policies whose due rows an express page replays, by index in settings.policies
    policies: dict[int, Policy]

    def bind(
        self, after_seq: int, limit: int, replayable: Iterable[int], max_bytes: int
    ) -> dict[str, Any]:
        return {
            **self.params,
            "after_seq": after_seq,
            "limit": limit,
            "replayable": list(replayable),
            "max_bytes": max_bytes,
        }


def plan(settings: Settings, age_buckets: Sequence[float]) -> ExpressPlan | None:
    """The express plan for ``settings``, or None when no policy qualifies.

    Each target that due rows go to runs once per page, over its own policies'
    rows (a ``replayed`` of its own).
    """
    kinds = [express_kind(p, settings) for p in settings.policies]
    if not any(kinds):
        return None
    targets: dict[str, tuple[ExpressTarget, list[int]]] = {}
    replaying: dict[int, Policy] = {}
    for index, policy in enumerate(settings.policies):
        target = express_target(policy, settings)
        if target is not None:
            targets.setdefault(target.model_dump_json(), (target, []))[1].append(index)
            replaying[index] = policy
    delays = [
        # microseconds, added as such: an interval's days would follow DST
        _micros(replay_delay(p, 0, _NIL)) if kind in ("fixed", "exp") else None
        for p, kind in zip(settings.policies, kinds, strict=True)
    ]
    params: dict[str, Any] = {
        "names": [p.name for p in settings.policies],
        "kinds": kinds,
        "delays": delays,
        "fingerprint": settings.policies_fingerprint,
        "retention": settings.purge.log_retention,
        # width_bucket counts the bounds <= its operand: over the negated bounds,
        # those >= the age, so that an age equal to a bound falls in its bucket
        "negated_bounds": sorted(-b for b in age_buckets),
        "bucket_count": len(age_buckets),
    }
    last = max(i for i, kind in enumerate(kinds) if kind is not None)
    sinks: list[str] = []
    read: list[str] = []
    for number, (target, indexes) in enumerate(targets.values()):
        own = ", ".join(str(i) for i in indexes)
        if isinstance(target, NotifyTarget):
            params[f"channel_{number}"] = target.channel
            params[f"only_id_{number}"] = target.message == "id"
            sink = _NOTIFY_SINK.format(channel=f"channel_{number}", only_id=f"only_id_{number}")
            reads = True
        else:
            sink = statement_body(target.statement)
            reads = sink_kind(target.statement) == "select"
        sinks.append(
            f", target_{number} AS (\nWITH replayed AS (SELECT j.* FROM job_dlq j\n"
            f"    WHERE j.id = ANY (ARRAY(SELECT p.id FROM chosen p\n"
            f"                             WHERE p.action = 'replay' AND p.policy IN ({own}))))"
            f"\n{sink}\n)"
        )
        if reads:  # a SELECT runs only when read
            read.append(f"(SELECT count(*) FROM target_{number})")
    text = _STATEMENT.format(
        case=first_policy_sql(settings.policies, last, params),
        targets="".join(sinks),
        sink_rows=" + ".join(read) or "NULL::bigint",
    )
    return ExpressPlan(text.encode(), params, replaying)


def _micros(delay: timedelta) -> int:
    return (delay.days * 86_400 + delay.seconds) * 1_000_000 + delay.microseconds


_NIL = UUID(int=0)


# The notify target's messages, in inbox order (as notify_rows sends them).
_NOTIFY_SINK = """SELECT count(pg_notify(%({channel})s, m.message))
  FROM (SELECT dlqd_notify_message(r.id, r.original_job_id, r.app_id, r.type,
                                   %({only_id})s) AS message,
               p.seq
          FROM replayed r JOIN chosen p ON p.id = r.id
         ORDER BY p.seq) AS m"""

# {case}: the first matching policy (first_policy_sql); {targets}: one CTE per
# target, each with its own ``replayed``: the rows of its policies as they were
# claimed (replayed_at still NULL), as in the ordinary path, where the target
# runs before the rows are marked.
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
    -- clause is never flattened into a join: no plan scans job_dlq whole),
    -- with what to do: park, wait (a schedule row) or replay; rows with none
    -- are left to the ordinary path. Never the payload: only its stored size.
    SELECT c.seq, c.dlq_id AS id, e.original_job_id, e.app_id, e.type, e.row_bytes,
           e.policy, e.action, e.due_at
      FROM candidates c
     CROSS JOIN LATERAL (
            SELECT j.original_job_id, j.app_id, j.type,
                   pg_column_size(j.payload) + pg_column_size(j.error_history) AS row_bytes,
                   m.policy, d.action, k.due_at
              FROM job_dlq j
             -- OFFSET 0: each computed once per row, not inlined wherever it is used
             CROSS JOIN LATERAL (SELECT {case} AS policy OFFSET 0) m
             CROSS JOIN LATERAL (
                    SELECT (%(kinds)s::text[])[m.policy + 1] AS kind,
                           j.dlq_at + (%(delays)s::bigint[])[m.policy + 1]
                                      * interval '1 microsecond' AS due_at
                    OFFSET 0) k
             CROSS JOIN LATERAL (
                    SELECT CASE
                           WHEN k.kind = 'park' THEN 'park'
                           -- exponential: known here for a job never replayed
                           WHEN k.kind = 'exp' AND EXISTS (
                                SELECT FROM dlqd_replay_log l
                                 WHERE l.app_id = j.app_id
                                   AND l.original_job_id = j.original_job_id
                                   AND l.outcome = 'replayed'
                                   AND l.at > now() - %(retention)s::interval) THEN NULL
                           WHEN k.due_at > now() THEN 'wait'
                           WHEN m.policy = ANY (%(replayable)s::int[]) THEN 'replay'
                           END AS action
                    OFFSET 0) d
             WHERE j.id = c.dlq_id
               AND m.policy >= 0
               AND d.action IS NOT NULL
               AND j.replayed_at IS NULL
               AND dlqd_row_problem(j.dlq_at, j.app_id, j.type, j.error_reason,
                                    j.original_job_id) IS NULL
               AND NOT EXISTS (SELECT FROM dlqd_entry_state s WHERE s.dlq_id = j.id)
               FOR UPDATE OF j SKIP LOCKED
           ) e
), chosen AS MATERIALIZED (
    -- rows to replay up to the page's byte budget (the first always): the
    -- rest stay in the inbox, for the ordinary path's smaller statements
    SELECT * FROM (
        SELECT p.*, sum(p.row_bytes) FILTER (WHERE p.action = 'replay')
                        OVER (ORDER BY p.seq) AS running_bytes
          FROM picked p) r
     WHERE r.action <> 'replay' OR r.running_bytes - r.row_bytes < %(max_bytes)s
), inbox AS (
    DELETE FROM dlqd_inbox WHERE seq IN (SELECT seq FROM chosen)
), states AS (
    INSERT INTO dlqd_entry_state (dlq_id, state, policy, fingerprint, due_at, failures)
    SELECT p.id, CASE p.action WHEN 'park' THEN 'parked_policy' ELSE 'waiting' END,
           (%(names)s::text[])[p.policy + 1], %(fingerprint)s,
           CASE WHEN p.action = 'wait' THEN p.due_at END, 0
      FROM chosen p
     WHERE p.action <> 'replay'
), marked AS (
    -- by primary key, whatever the planner thinks of a join with chosen
    UPDATE job_dlq j SET replayed_at = now()
     WHERE j.id = ANY (ARRAY(SELECT id FROM chosen WHERE action = 'replay'))
    RETURNING j.id, j.original_job_id, j.app_id,
              extract(epoch FROM j.replayed_at - j.dlq_at)::float8 AS lag
), logged AS (
    INSERT INTO dlqd_replay_log (dlq_id, original_job_id, app_id, policy, outcome, manual)
    SELECT m.id, m.original_job_id, m.app_id, (%(names)s::text[])[p.policy + 1], 'replayed',
           false
      FROM marked m
      JOIN chosen p ON p.id = m.id
     ORDER BY p.seq
)
{targets}
SELECT (SELECT count(*) FROM candidates) AS scanned,
       (SELECT max(seq) FROM candidates) AS last_seq,
       (SELECT count(*) FROM chosen) AS claimed,
       {sink_rows} AS sink_rows,  -- read: a SELECT target runs only when read
       (SELECT coalesce(json_agg(json_build_array(g.policy, g.action, g.bucket, g.n, g.lag_sum)),
                        '[]')
          FROM (SELECT p.policy, p.action,
                       -- bounds below the age: its bucket (lowest first, +Inf last)
                       coalesce(%(bucket_count)s
                                - width_bucket(-m.lag, %(negated_bounds)s::float8[]), 0)
                           AS bucket,
                       count(*) AS n, coalesce(sum(m.lag), 0) AS lag_sum
                  FROM chosen p
                  LEFT JOIN marked m ON m.id = p.id
                 GROUP BY 1, 2, 3) g) AS outcomes"""


@dataclass
class ExpressPage:
    """What one committed express page did."""

    scanned: int  # inbox entries this page locked
    last_seq: int
    claimed: int  # of those, rows done here (the others are the ordinary path's)
    # policy name -> (rows, {age bucket index: rows}, sum of ages in seconds)
    replayed: dict[str, tuple[int, dict[int, int], float]] = field(default_factory=dict)
    parked: dict[str, int] = field(default_factory=dict)  # by a park policy
    scheduled: int = 0  # waiting schedule rows written
    seconds: float = 0.0


async def run_page(
    conn: Connection,
    express: ExpressPlan,
    settings: Settings,
    *,
    after_seq: int,
    replayable: Iterable[int],
    custom_plan: bool = False,
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

    ``custom_plan``: plan the statement for these parameters rather than take
    the prepared statement's generic plan, which Postgres may settle on after
    a few small pages: planned for nothing in particular, a full page took 5x
    longer with it (724 ms against 134 ms for 5000 rows). Worth its planning
    time (under a millisecond) for a full page, not for a trickle's one row.
    """
    params = express.bind(
        after_seq, settings.replay.batch_size, replayable, settings.replay.batch_bytes
    )
    try:
        async with conn.pipeline():
            await conn.execute(b"BEGIN")
            await set_replay_timeouts(conn, settings)
            if custom_plan:
                await conn.execute(q("custom_plans"))
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
    names = express.params["names"]
    for index, action, bucket, n, lag_sum in row["outcomes"]:
        name = names[index]
        if action == "replay":
            rows, buckets, total = page.replayed.get(name, (0, {}, 0.0))
            buckets[int(bucket)] = buckets.get(int(bucket), 0) + int(n)
            page.replayed[name] = (rows + int(n), buckets, total + float(lag_sum))
        elif action == "park":
            page.parked[name] = page.parked.get(name, 0) + int(n)
        else:
            page.scheduled += int(n)
    return page
