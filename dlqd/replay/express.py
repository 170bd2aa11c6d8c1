"""Express pages: new rows decided and replayed inside Postgres, one statement per page.

A new row (an inbox entry with no schedule row, valid) goes express when the
first policy that matches it can be applied without Python:

- a park policy: the row gets its ``parked_policy`` schedule row;
- a replay policy that is not a dry run, whose delay is known in SQL (none,
  fixed, or exponential for a job never replayed; its jitter by
  ``dlqd_jittered_us``, the integers ``policy.jittered_micros`` computes): a
  row not due yet gets its ``waiting`` schedule row at ``dlq_at + delay``; a
  due row is replayed at once when its circuit is closed, a token of its
  rate limit is left in the bucket (taken in the statement; rows beyond the
  bucket's tokens are left to the ordinary path, which schedules them for
  the next token), and its target runs over a set (a ``sql`` statement over
  ``replayed``, a per-row ``sql`` statement whose in-server form plans, run
  once per row as the session's function ``pg_temp.dlqd_row_<hash>``, or a
  ``notify`` channel). With ``max_replays``, the job's
  replays within the log's retention are counted in the statement: a job at
  its limit is parked (``max_replays``), one below it replays under its lock
  slot, and one whose slot another replica holds, or whose slot a
  transaction the statement cannot see has written (a replay committed
  meanwhile), is left to the ordinary path, which recounts it under the lock.

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

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import anyio

from dlqd.config import NotifyTarget, Policy, Settings, SqlTarget
from dlqd.db import replays
from dlqd.db.compose import (
    ExpressSink,
    Positional,
    Prepared,
    Statement,
    express_page,
    positional,
    prepared,
)
from dlqd.db.connector import Connection
from dlqd.errors import DatabaseError
from dlqd.logs import get_logger
from dlqd.metrics import AGE_BUCKETS
from dlqd.policy import JITTER_SCALE, base_delay
from dlqd.replay.report import Reporter, report_express
from dlqd.replay.result import ExpressPage, PassResult
from dlqd.replay.targets import (
    is_set_based,
    per_row_statements,
    runs_in_server,
)
from dlqd.statements import first_keyword, target_problem

ExpressTarget = SqlTarget | NotifyTarget
log = get_logger("dlqd.replayer")

_KEY_COLUMNS = ("app_id", "type", "error_reason")
# the parameters that change from page to page (ExpressPlan.bind), and their types
PER_PAGE = {"after_seq": "bigint", "limit": "bigint", "replayable": "int[]", "max_bytes": "bigint"}


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
    (dry runs). ``max_replays`` is counted in the statement, under the job's
    lock slot (migration 016)."""
    if policy.dry_run or settings.dry_run:
        return None
    if policy.action == "park":
        return "park"
    if settings.target_for(policy) is None:
        return None
    if policy.delay.total_seconds() == 0:
        return "fixed"  # no delay: neither the backoff nor the jitter matters
    # the jitter is computed in SQL too (dlqd_jittered_us, as policy.jittered_micros)
    return "fixed" if policy.backoff == "fixed" else "exp"


def express_target(
    policy: Policy, settings: Settings, in_server: Collection[str] = ()
) -> ExpressTarget | None:
    """The target an express page replays ``policy``'s due rows into, or None
    when they take the ordinary path (an http target cannot share the
    transaction; a per-row statement not in ``in_server``, those whose
    in-server form plans, runs from the daemon). A rate limit's tokens are
    taken in the statement, from the deployment-wide bucket."""
    if express_kind(policy, settings) not in ("fixed", "exp"):
        return None
    target = settings.target_for(policy)
    if isinstance(target, NotifyTarget):
        return target
    if isinstance(target, SqlTarget) and (
        sink_kind(target.statement) is not None or target.statement in in_server
    ):
        return target
    return None


@dataclass(frozen=True)
class ExpressPlan:
    """The express statement for one settings object, and what it binds."""

    text: Statement
    params: dict[str, Any]
    # policies whose due rows an express page replays, by index in settings.policies
    policies: dict[int, Policy]
    # per-row statements the page calls as session functions (defined first)
    row_statements: tuple[str, ...] = ()

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


def plan(
    settings: Settings, age_buckets: Sequence[float], in_server: Collection[str] = ()
) -> ExpressPlan | None:
    """The express plan for ``settings``, or None when no policy qualifies;
    ``in_server``: the per-row statements whose in-server form plans.

    Each target that due rows go to runs once per page, over its own policies'
    rows (a ``replayed`` of its own).
    """
    if not settings.replay.express:
        return None
    kinds = [express_kind(p, settings) for p in settings.policies]
    if not any(kinds):
        return None
    targets: dict[str, tuple[ExpressTarget, list[int]]] = {}
    replaying: dict[int, Policy] = {}
    for index, policy in enumerate(settings.policies):
        target = express_target(policy, settings, in_server)
        if target is not None:
            targets.setdefault(target.model_dump_json(), (target, []))[1].append(index)
            replaying[index] = policy
    delays = [
        # microseconds, added as such: an interval's days would follow DST
        _micros(base_delay(p, 0)) if kind in ("fixed", "exp") else None
        for p, kind in zip(settings.policies, kinds, strict=True)
    ]
    params: dict[str, Any] = {
        "names": [p.name for p in settings.policies],
        "kinds": kinds,
        "delays": delays,
        "jitters": [round(p.jitter * JITTER_SCALE) for p in settings.policies],
        "max_replays": [p.max_replays for p in settings.policies],
        # rate limits: the deployment-wide buckets, taken in the statement
        "rates": [p.rate_limit.per_second if p.rate_limit else None for p in settings.policies],
        "bursts": [p.rate_limit.burst if p.rate_limit else None for p in settings.policies],
        "rate_per_app": [p.rate_limit_per == "app_id" for p in settings.policies],
        "fingerprint": settings.policies_fingerprint,
        "retention": settings.purge.log_retention,
        # width_bucket counts the bounds <= its operand: over the negated bounds,
        # those >= the age, so that an age equal to a bound falls in its bucket
        "negated_bounds": sorted(-b for b in age_buckets),
        "bucket_count": len(age_buckets),
    }
    last = max(i for i, kind in enumerate(kinds) if kind is not None)
    sinks = [
        ExpressSink(tuple(indexes), channel=target.channel, only_id=target.message == "id")
        if isinstance(target, NotifyTarget)
        else ExpressSink(tuple(indexes), statement=target.statement, per_row=True)
        if not is_set_based(target.statement)
        else ExpressSink(
            tuple(indexes),
            statement=target.statement,
            reads=sink_kind(target.statement) == "select",
        )
        for target, indexes in targets.values()
    ]
    gated = any(
        kind is not None and (p.max_replays is not None or p.rate_limit is not None)
        for p, kind in zip(settings.policies, kinds, strict=True)
    )
    text = express_page(settings.policies, last, sinks, params, gated=gated)
    row_statements = tuple(s.statement for s in sinks if s.per_row and s.statement is not None)
    return ExpressPlan(text, params, replaying, row_statements)


def _micros(delay: timedelta) -> int:
    return (delay.days * 86_400 + delay.seconds) * 1_000_000 + delay.microseconds


def parse_page(row: dict[str, Any], after_seq: int, names: Sequence[str]) -> ExpressPage:
    """What a committed express page did, from the summary its statement returns."""
    page = ExpressPage(
        scanned=int(row["scanned"]),
        last_seq=int(row["last_seq"] or after_seq),
        claimed=int(row["claimed"]),
    )
    for index, action, bucket, n, lag_sum in row["outcomes"]:
        name = names[index]
        if action == "replay":
            rows, buckets, total = page.replayed.get(name, (0, {}, 0.0))
            buckets[int(bucket)] = buckets.get(int(bucket), 0) + int(n)
            page.replayed[name] = (rows + int(n), buckets, total + float(lag_sum))
        elif action in ("park", "park_max"):
            page.parked[name] = page.parked.get(name, 0) + int(n)
        else:
            page.scheduled += int(n)
    return page


class ExpressPages:
    """The express pages of one pass: the inbox's express rows, page by page.

    ``run`` says whether the ordinary inbox pages have work: entries an express
    page locked but left (rows express does not take), a page that failed, or
    a full page with no row of express's. Entries another replica held locked
    are that replica's to do.
    """

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.throttle = reporter.throttle
        # the express plan of the settings object (and the per-row statements
        # known to run in the server) it was made for
        self._plan: tuple[Settings, frozenset[str], ExpressPlan | None] | None = None
        self._rendered_plan: tuple[ExpressPlan, Positional, Prepared] | None = None
        # the last page was full: a backlog, the next one will be too
        self._backlog = False

    def _rendered(self, conn: Connection, express: ExpressPlan) -> tuple[Positional, Prepared]:
        """The plan's statement rendered once per plan: with $n placeholders
        for all its parameters, and as a statement to prepare, with only the
        page's own as parameters."""
        if self._rendered_plan is None or self._rendered_plan[0] is not express:
            self._rendered_plan = (
                express,
                positional(express.text, conn),
                prepared(express.text, express.params, PER_PAGE, conn),
            )
        return self._rendered_plan[1:]

    def plan_for(self, conn: Connection, settings: Settings) -> ExpressPlan | None:
        """The express plan for ``settings``, made once per settings object
        (and again when a per-row statement's in-server form is learned)."""
        in_server = frozenset(s for s in per_row_statements(settings) if runs_in_server(conn, s))
        if self._plan is None or self._plan[0] is not settings or self._plan[1] != in_server:
            self._plan = (settings, in_server, plan(settings, AGE_BUCKETS, in_server))
        return self._plan[2]

    async def run(
        self, conn: Connection, settings: Settings, result: PassResult, stopping: anyio.Event
    ) -> bool:
        express = self.plan_for(conn, settings)
        if express is None:
            return True
        by_name = {p.name: p for p in express.policies.values()}
        names = express.params["names"]
        after_seq = 0
        rest = False
        while not stopping.is_set():
            closed = await self.throttle.closed_circuits(conn, list(by_name), anyio.current_time())
            # an open circuit: its due rows take the ordinary path, which defers them
            replayable = [i for i, p in express.policies.items() if p.name in closed]
            started = anyio.current_time()
            params = express.bind(
                after_seq, settings.replay.batch_size, replayable, settings.replay.batch_bytes
            )
            try:
                row = await replays.express_page(
                    conn,
                    *self._rendered(conn, express),
                    params,
                    statement_timeout=settings.replay.statement_timeout,
                    lock_timeout=settings.replay.lock_timeout,
                    custom_plan=self._backlog,
                    row_statements=express.row_statements,
                )
            except DatabaseError as exc:
                if exc.broken:
                    raise
                # nothing of it happened (whatever the error: a bad row, a
                # timeout, a resource limit): the ordinary path does these rows
                # again, in smaller statements, and isolates the one that failed
                log.warning("express page failed: the ordinary path takes it", error=str(exc))
                return True
            page = parse_page(row, after_seq, names)
            page.seconds = anyio.current_time() - started
            self._backlog = page.scanned >= settings.replay.batch_size
            result.claimed += page.claimed
            result.replayed += sum(rows for rows, _, _ in page.replayed.values())
            result.parked += sum(page.parked.values())
            result.scheduled += page.scheduled
            result.wrote_waiting = result.wrote_waiting or page.scheduled > 0
            rest = rest or page.scanned > page.claimed
            report_express(page, self.reporter.metrics, duration=page.seconds)
            await self.reporter.learn(conn, [(by_name[n], True, True) for n in page.replayed])
            if page.scanned < settings.replay.batch_size:
                return rest
            if page.claimed == 0:
                # none of a full page was express's: the ordinary pages take
                # the inbox from here, in insertion order
                return True
            if result.out_of_time():
                # the pass's time is up (a backlog): the next pass goes on with
                # express pages. The ordinary pages only for what express
                # left: they would take express's own rows the slow way
                # (a page of them a second, a third of a drain's rows)
                return rest
            after_seq = page.last_seq
        return True
