"""The job systems dlqd captures dead jobs from and replays them into.

Pure data: what each adapter captures, from which table, what its schema must
have for the capture to be correct (checked before anything is installed),
the versions tested, and which overrides its replay preset takes. The SQL is
in ``sql/adapters/<name>.sql``, composed by :mod:`dlqd.db.compose`; installing
is :mod:`dlqd.operator.adapters`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from dlqd.errors import UsageError
from dlqd.statements import StatementError, tokens

#: what a preset target may override, beyond the adapter's schema
OVERRIDES = ("queue", "priority", "max_attempts", "run_at_delay")


@dataclass(frozen=True)
class Adapter:
    name: str
    title: str
    #: versions whose own tooling installed the schema the tests ran against
    tested: tuple[str, ...]
    #: the table the capture trigger is on (in the adapter's schema)
    table: str
    #: tables the capture or the replay reads or writes besides it: role -> name
    related: dict[str, str]
    #: per table, the columns (and their types, as format_type spells them
    #: unqualified; "a | b": either) the capture and the replay rely on
    columns: dict[str, dict[str, str]]
    #: functions the replay calls, unqualified signatures
    functions: tuple[str, ...]
    #: (enum type, labels it must have); ("", ()) for a system without one
    statuses: tuple[str, tuple[str, ...]]
    captures: str
    caveat: str
    overrides: tuple[str, ...]
    default_schema: str = "public"
    docs: str = field(default="")

    def function_name(self, schema: str) -> str:
        """The capture function's name in dlqd's schema (one per system and schema)."""
        return f"dlqd_capture_{self.name}_{re.sub(r'[^a-z0-9_]', '_', schema.lower())}"[:63]


PROCRASTINATE = Adapter(
    name="procrastinate",
    title="Procrastinate",
    tested=("3.10.0",),
    table="procrastinate_jobs",
    related={"events": "procrastinate_events"},
    columns={
        "procrastinate_jobs": {
            "id": "bigint",
            "queue_name": "character varying(128)",
            "task_name": "character varying(128)",
            "priority": "integer",
            "lock": "text",
            "queueing_lock": "text",
            "args": "jsonb",
            "status": "procrastinate_job_status",
            "attempts": "integer",
        },
        "procrastinate_events": {
            "job_id": "bigint",
            "type": "procrastinate_job_event_type",
            "at": "timestamp with time zone",
        },
    },
    functions=("procrastinate_defer_jobs_v1(procrastinate_job_to_defer_v1[])",),
    statuses=("procrastinate_job_status", ("todo", "failed")),
    captures=(
        "procrastinate_jobs rows whose status becomes 'failed' (their retries exhausted); "
        "type = task_name, payload = args, error_reason = 'failed' (Procrastinate keeps no "
        "error text), error_history = the failed attempts in procrastinate_events; the queue, "
        "priority, lock and queueing lock are kept for the replay"
    ),
    caveat=(
        "a worker run with delete_jobs='always' deletes a failed job without setting 'failed': "
        "nothing is captured from it"
    ),
    overrides=("queue", "priority", "run_at_delay"),
    docs="docs/adapters/procrastinate.md",
)

PGQUEUER = Adapter(
    name="pgqueuer",
    title="PgQueuer",
    tested=("1.6.0",),
    table="pgqueuer",
    related={"log": "pgqueuer_log"},
    columns={
        "pgqueuer": {
            "id": "bigint",
            "priority": "integer",
            "status": "pgqueuer_status",
            "entrypoint": "text",
            "dedupe_key": "text",
            "payload": "bytea",
            "headers": "jsonb",
            "attempts": "integer",
            "execute_after": "timestamp with time zone",
        },
        "pgqueuer_log": {
            "id": "bigint",
            "created": "timestamp with time zone",
            "job_id": "bigint",
            "status": "pgqueuer_status",
            "traceback": "jsonb",
        },
    },
    functions=(),
    statuses=("pgqueuer_status", ("queued", "failed")),
    captures=(
        "pgqueuer rows whose status becomes 'failed' (entrypoints with on_failure='hold'); "
        "type = entrypoint, payload = the payload as JSON (the exact bytes are kept for the "
        "replay), error_reason = the exception's class from pgqueuer_log, error_history = "
        "the job's logged tracebacks; priority, headers and dedupe key are kept"
    ),
    caveat=(
        "only on_failure='hold' keeps a failed job: the default ('delete') deletes it and its "
        "payload, and nothing can be captured"
    ),
    overrides=("priority", "run_at_delay"),
    docs="docs/adapters/pgqueuer.md",
)

RIVER = Adapter(
    name="river",
    title="River",
    # River's migrations need the Go toolchain: tested against a river_job
    # table made from River's documented columns, not by River itself
    tested=("river_job as River documents it (River itself not run)",),
    table="river_job",
    related={},
    columns={
        "river_job": {
            "id": "bigint",
            "state": "river_job_state",
            "attempt": "smallint",
            "max_attempts": "smallint",
            "priority": "smallint",
            "args": "jsonb",
            "errors": "jsonb[]",
            "kind": "text",
            "metadata": "jsonb",
            "queue": "text",
            "tags": "character varying(255)[]",
            "scheduled_at": "timestamp with time zone",
        },
    },
    functions=(),
    statuses=("river_job_state", ("available", "scheduled", "discarded")),
    captures=(
        "river_job rows whose state becomes 'discarded' (attempts used up; not the unique-job "
        "scheduler's discards); type = kind, payload = args, error_reason = the first line of "
        "the last error, error_history = errors; queue, priority, max attempts, metadata and "
        "tags are kept"
    ),
    caveat=(
        "tested against a river_job table made from River's documented columns, not against "
        "River itself (its migrations need the Go toolchain); a replayed unique job is not "
        "unique any more"
    ),
    overrides=("queue", "priority", "max_attempts", "run_at_delay"),
    docs="docs/adapters/river.md",
)

GRAPHILE_WORKER = Adapter(
    name="graphile_worker",
    title="Graphile Worker",
    tested=("0.18.0",),
    table="_private_jobs",
    related={"tasks": "_private_tasks", "queues": "_private_job_queues"},
    columns={
        "_private_jobs": {
            "id": "bigint",
            "job_queue_id": "integer",
            "task_id": "integer",
            "payload": "json",
            "priority": "smallint",
            "attempts": "smallint",
            "max_attempts": "smallint",
            "last_error": "text",
            "key": "text",
            "locked_at": "timestamp with time zone",
            "flags": "jsonb",
            "updated_at": "timestamp with time zone",
        },
        "_private_tasks": {"id": "integer", "identifier": "text"},
        "_private_job_queues": {"id": "integer", "queue_name": "text"},
    },
    functions=("add_jobs(job_spec[], boolean)",),
    statuses=("", ()),
    captures=(
        "_private_jobs rows left unlocked with their attempts used up and a last error "
        "(or permanently failed); type = the task identifier, payload = the payload (exact "
        "JSON text kept for the replay), error_reason = the first line of the last error; "
        "queue, priority, max attempts, job key and flags are kept"
    ),
    caveat=(
        "its tables are private (not a public interface): the install checks each column it "
        "relies on, and a Graphile Worker upgrade may need `dlqd adapters install` again"
    ),
    overrides=("queue", "priority", "max_attempts", "run_at_delay"),
    default_schema="graphile_worker",
    docs="docs/adapters/graphile_worker.md",
)

OBAN = Adapter(
    name="oban",
    title="Oban",
    tested=("oban 0.7.0 (the Python port)",),
    table="oban_jobs",
    related={},
    columns={
        "oban_jobs": {
            "id": "bigint",
            "state": "oban_job_state",
            "queue": "text",
            "worker": "text",
            "attempt": "smallint",
            "max_attempts": "smallint",
            "priority": "smallint",
            "args": "jsonb",
            "meta": "jsonb",
            "tags": "text[] | character varying(255)[]",
            # jsonb[] in Oban for Elixir, jsonb in its Python port
            "errors": "jsonb[] | jsonb",
            "scheduled_at": "timestamp without time zone",
        },
    },
    functions=(),
    statuses=("oban_job_state", ("available", "scheduled", "discarded")),
    captures=(
        "oban_jobs rows whose state becomes 'discarded' (attempts used up, or discarded by "
        "the worker); type = worker, payload = args, error_reason = the last error's class "
        "where its text names one, error_history = errors; queue, priority, max attempts, "
        "meta and tags are kept"
    ),
    caveat=(
        "tested with Oban's Python port (oban 0.7.0); Oban for Elixir's oban_jobs differs in "
        "errors (jsonb[]), which the capture reads too, but no Elixir ran here"
    ),
    overrides=("queue", "priority", "max_attempts", "run_at_delay"),
    docs="docs/adapters/oban.md",
)

PGBOSS = Adapter(
    name="pgboss",
    title="pg-boss",
    tested=("12.38.0",),
    table="job",
    related={"queues": "queue"},
    columns={
        "job": {
            "id": "uuid",
            "name": "text",
            "priority": "integer",
            "data": "jsonb",
            "state": "job_state",
            "retry_limit": "integer",
            "retry_count": "integer",
            "output": "jsonb",
            "singleton_key": "text",
            "group_id": "text",
            "group_tier": "text",
            "start_after": "timestamp with time zone",
            "completed_on": "timestamp with time zone",
            "keep_until": "timestamp with time zone",
        },
        "queue": {
            "name": "text",
            "policy": "text",
            "retry_limit": "integer",
            "retry_delay": "integer",
            "retry_backoff": "boolean",
            "retry_delay_max": "integer",
            "expire_seconds": "integer",
            "retention_seconds": "integer",
            "deletion_seconds": "integer",
            "dead_letter": "text",
            "heartbeat_seconds": "integer",
        },
    },
    functions=("job_now()",),
    statuses=("job_state", ("created", "retry", "failed")),
    captures=(
        "pgboss.job rows inserted (or set) as 'failed', their retries used up, on every "
        "partition; type = the queue's name, payload = data, error_reason = the error's name "
        "(its class) from output, error_history = the last error; priority, singleton key "
        "and group are kept"
    ),
    caveat=(
        "a replay is a raw insert that applies the queue's settings from pgboss.queue as "
        "pg-boss's send does; pg-boss's own dead-letter copy is not captured"
    ),
    overrides=("queue", "priority", "max_attempts", "run_at_delay"),
    default_schema="pgboss",
    docs="docs/adapters/pgboss.md",
)

ADAPTERS: dict[str, Adapter] = {
    a.name: a for a in (PROCRASTINATE, PGQUEUER, PGBOSS, RIVER, GRAPHILE_WORKER, OBAN)
}


_CONSTANT = re.compile(r"[A-Za-z0-9_:@-]+(\.[A-Za-z0-9_:@-]+)*")
#: the dollar-quote tag of the capture functions' bodies
BODY_TAG = "$dlqd_capture$"


def app_id_expression(value: str | None, adapter: Adapter) -> tuple[str, bool]:
    """``--app-id`` as (text, is_constant): a plain word (``billing``,
    ``shop.eu``) is a constant; anything else, or a word starting ``job.``,
    an SQL expression over the job's row ``job`` (``job.queue_name``,
    ``job.args->>'tenant'``). None: the adapter's name."""
    if value is None:
        return adapter.name, True
    text = value.strip()
    if not text:
        raise UsageError("--app-id: is empty")
    if _CONSTANT.fullmatch(text) and not text.lower().startswith("job."):
        return text, True
    if BODY_TAG in text:
        raise UsageError(f"--app-id: must not contain {BODY_TAG}")
    try:
        found = tokens(text)
    except StatementError as exc:
        raise UsageError(f"--app-id: {exc}") from None
    if any(t.text == ";" for t in found):
        raise UsageError("--app-id: is one SQL expression, without ';'")
    return text, False
