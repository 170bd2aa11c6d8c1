"""The one module that composes SQL at run time, with ``psycopg.sql``.

Three things cannot be named queries: an operator's target statement (it
comes from the config), the policies' matches (compiled to SQL for express
pages), and an adapter's capture and replay (the job system's schema and
table names, and the operator's ``--app-id``, are known only when
installed). Everything else is text of ``sql/``: the templates used here are
named queries of ``sql/express.sql``, ``sql/queries.sql`` and
``sql/adapters/``, their fields filled with composables (identifiers,
literals, placeholders, other templates). Values are bound parameters,
except an adapter's, which become part of a function's body or of a target
statement and are quoted as literals.

The target statement is used as the operator wrote it, minus the comments,
whitespace and semicolons around it (``dlqd.statements.statement_body``):
every path that runs it, and ``dlqd check`` that plans it, use what this
module returns, so what is checked is what runs.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from psycopg import sql
from psycopg.abc import AdaptContext

from dlqd.adapters import Adapter
from dlqd.config import Match, Policy
from dlqd.db.queries import adapter_q, q
from dlqd.statements import statement_body

# Columns a per-row statement binds from the narrow row; every other column is
# read in Postgres, from the row itself.
BOUND_COLUMNS = ("id", "original_job_id", "app_id", "type", "error_reason", "attempts")
PLACEHOLDER = re.compile(r"%%|%\((\w+)\)s")
_LEADING_WITH = re.compile(r"^\s*WITH(\s+RECURSIVE)?\s+", re.IGNORECASE)
_KEY_COLUMNS = ("app_id", "type", "error_reason")
#: a statement composed here, ready to run
Statement = sql.Composed


def _operator_text(text: str) -> sql.SQL:
    """An operator's statement (from the config) as SQL: the one place such
    text becomes a statement (``dlqd check`` plans it first)."""
    return sql.SQL(text)


@functools.lru_cache(maxsize=256)
def set_statement(statement: str) -> sql.Composed:
    """A set-based target as run: ``replayed`` defined first (joined to the
    statement's own WITH list when it has one); binds ``ids``."""
    body = statement_body(statement)
    replayed = sql.SQL(q("replayed_relation"))
    leading = _LEADING_WITH.match(body)
    if leading:
        head, rest = body[: leading.end()], body[leading.end() :]
        return sql.Composed([_operator_text(head), replayed, sql.SQL(", "), _operator_text(rest)])
    return sql.Composed([sql.SQL("WITH "), replayed, sql.SQL(" "), _operator_text(body)])


@functools.lru_cache(maxsize=256)
def row_statement(
    statement: str, *, all_in_db: bool = False
) -> tuple[sql.Composed, tuple[str, ...]]:
    """A per-row target as run, and the names it binds.

    Placeholders of columns the daemon does not hold become scalar subqueries
    on the row's primary key (no payload crosses into the daemon).
    ``all_in_db`` reads every column that way (a manual replay of an invalid
    row, whose key columns the daemon holds only shortened).
    """
    bound = ("id",) if all_in_db else BOUND_COLUMNS
    names: set[str] = set()

    def value(name: str) -> sql.Composable:
        if name in bound:
            names.add(name)
            return sql.Placeholder(name)
        names.add("id")
        return sql.SQL("(SELECT {} FROM job_dlq WHERE id = {})").format(
            sql.Identifier(name), sql.Placeholder("id")
        )

    composed = _with_placeholders(statement, value, sql.SQL("%%"))
    return composed, tuple(sorted(names))


def _with_placeholders(
    statement: str, value: Callable[[str], sql.Composable], percent: sql.Composable
) -> sql.Composed:
    """``statement``'s body with each ``%(name)s`` as ``value(name)`` and each
    literal ``%%`` as ``percent``: the one walk of an operator's placeholders."""
    body = statement_body(statement)
    parts: list[sql.Composable] = []
    at = 0
    for match in PLACEHOLDER.finditer(body):
        parts.append(_operator_text(body[at : match.start()]))
        at = match.end()
        name = match.group(1)
        parts.append(percent if name is None else value(name))
    parts.append(_operator_text(body[at:]))
    return sql.Composed(parts)


#: the row a per-row statement's in-server form reads: its session function's
#: parameter as run; a row of the same type (no value) when it is planned
SERVER_ROW = "$1"
PLANNED_ROW = "(NULL::job_dlq)"


@functools.lru_cache(maxsize=256)
def server_row_statement(statement: str, row: str = SERVER_ROW) -> str:
    """A per-row target's in-server form (migration 017): every placeholder read
    from ``row``, the row as claimed (``%(payload)s`` as ``($1)."payload"``,
    typed as job_dlq's column), a literal ``%%`` as ``%``. Text, not a
    statement: the body of the session's function (:func:`row_function_name`)."""

    def value(name: str) -> sql.Composable:
        return sql.SQL("({}).{}").format(sql.SQL(row), sql.Identifier(name))

    return _with_placeholders(statement, value, sql.SQL("%")).as_string(None)


@functools.lru_cache(maxsize=256)
def row_function_name(statement: str) -> str:
    """The name of the session function that runs ``statement``'s in-server
    form (``pg_temp.dlqd_row_<md5 of that form>``): a changed statement is
    another function."""
    digest = hashlib.md5(server_row_statement(statement).encode(), usedforsecurity=False)
    return f"dlqd_row_{digest.hexdigest()}"


def row_function(statement: str) -> sql.Identifier:
    """That function, qualified: only the session's own temporary schema."""
    return sql.Identifier("pg_temp", row_function_name(statement))


def replay_rows(statement: str) -> sql.Composed:
    """The ordinary path's call of ``statement``'s session function, once per
    row of ``ids`` in order."""
    return sql.SQL(q("replay_rows")).format(function=row_function(statement))


def planned_server_statement(statement: str) -> sql.Composed:
    """The in-server form as ``dlqd check`` plans it: for a row of job_dlq's type."""
    return sql.Composed([_operator_text(server_row_statement(statement, PLANNED_ROW))])


def explained(statement: sql.Composable) -> sql.Composed:
    """``EXPLAIN (COSTS OFF)`` of ``statement``: options in parentheses, so that a
    statement written ``ANALYZE SELECT ...`` is a syntax error, never an
    EXPLAIN ANALYZE that would run it."""
    return sql.Composed([sql.SQL(q("explain_prefix")), sql.SQL(" "), statement])


# --------------------------------------------------------------------------- matches


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


def match_condition(
    index: int, match: Match, params: dict[str, Any]
) -> tuple[sql.Composable, bool]:
    """``match`` as SQL over ``j`` (job_dlq), and whether it is exact. An inexact
    condition (a glob with a character class left out) holds for every row the
    match holds for, and maybe more. Patterns and bounds go to ``params``."""
    parts: list[sql.Composable] = []
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
        parts.append(
            sql.SQL("j.{} LIKE ANY ({}::text[])").format(
                sql.Identifier(column), sql.Placeholder(key)
            )
        )
    for bound, op in (("min_attempts", ">="), ("max_attempts", "<=")):
        value = getattr(match, bound)
        if value is not None:
            key = f"m{index}_{bound}"
            params[key] = value
            parts.append(sql.SQL("j.attempts " + op + " {}::int").format(sql.Placeholder(key)))
    if not parts:
        return sql.SQL("true"), exact
    return sql.SQL(" AND ").join(parts), exact


def first_policy(policies: Sequence[Policy], upto: int, params: dict[str, Any]) -> sql.Composed:
    """The index of the first policy matching ``j`` among ``policies[:upto + 1]``;
    -1 when none does, or when an inexact match stands in the way."""
    branches: list[sql.Composable] = []
    for index, policy in enumerate(policies[: upto + 1]):
        condition, exact = match_condition(index, policy.match, params)
        branches.append(
            sql.SQL("WHEN {} THEN {}").format(condition, sql.Literal(index if exact else -1))
        )
    return sql.Composed([sql.SQL("CASE "), sql.SQL(" ").join(branches), sql.SQL(" ELSE -1 END")])


# --------------------------------------------------------------------------- express pages


@dataclass(frozen=True, slots=True)
class ExpressSink:
    """One target of an express page: a notify channel or a set-based statement,
    over the rows of the policies at ``indexes``; ``reads``: a SELECT, which runs
    only when read."""

    indexes: tuple[int, ...]
    statement: str | None = None  # sql
    per_row: bool = False  # the statement's session function, once per row (017)
    channel: str | None = None  # notify
    only_id: bool = False
    reads: bool = True


def express_page(
    policies: Sequence[Policy],
    upto: int,
    sinks: Sequence[ExpressSink],
    params: dict[str, Any],
    *,
    gated: bool,
) -> sql.Composed:
    """The express page statement (sql/express.sql) for ``policies`` (matches up
    to ``upto``) feeding ``sinks``; its parameters go to ``params``. ``gated``:
    some policy counts replays or takes tokens (the lock slots and buckets
    are read in the statement only then)."""
    targets: list[sql.Composable] = []
    read: list[sql.Composable] = []
    for number, sink in enumerate(sinks):
        name = sql.Identifier(f"target_{number}")
        params[f"policies_{number}"] = list(sink.indexes)
        if sink.channel is not None:
            params[f"channel_{number}"] = sink.channel
            params[f"only_id_{number}"] = sink.only_id
            body: sql.Composable = sql.SQL(q("express_notify_sink")).format(
                channel=sql.Placeholder(f"channel_{number}"),
                only_id=sql.Placeholder(f"only_id_{number}"),
            )
        elif sink.per_row:
            assert sink.statement is not None  # noqa: S101 - a sink is one or the other
            body = sql.SQL(q("express_row_sink")).format(function=row_function(sink.statement))
        else:
            assert sink.statement is not None  # noqa: S101 - a sink is one or the other
            body = _operator_text(statement_body(sink.statement))
        targets.append(
            sql.SQL(q("express_target")).format(
                name=name, policies=sql.Placeholder(f"policies_{number}"), sink=body
            )
        )
        if sink.reads:
            read.append(sql.SQL(q("express_sink_rows")).format(name=name))
    return sql.SQL(q("express_page")).format(
        case=first_policy(policies, upto, params),
        gates=sql.SQL(q("express_gates" if gated else "express_no_gates")),
        targets=sql.SQL("\n").join(targets),
        sink_rows=sql.SQL(" + ").join(read) if read else sql.SQL("NULL::bigint"),
    )


@dataclass(frozen=True, slots=True)
class Positional:
    """A statement rendered once with PostgreSQL's own placeholders ($1, $2,
    ...), run by a raw cursor: psycopg converts a statement's named
    placeholders on every execution, and caches the conversion only for
    statements under 4 KiB (the express page is about 8 KiB)."""

    text: bytes
    names: tuple[str, ...]  # the parameter of $1, $2, ...

    def values(self, params: dict[str, Any]) -> list[Any]:
        return [params[name] for name in self.names]


def _numbered(
    statement: sql.Composed, conn: AdaptContext, literal: Callable[[str], str | None]
) -> tuple[str, tuple[str, ...]]:
    """``statement``'s text with its named placeholders numbered ($1, $2, ...,
    each name once, as psycopg itself binds a name used twice), except those
    ``literal`` writes in; a literal ``%%`` becomes ``%``. The text and the
    names of $1, $2, ..."""
    names: dict[str, int] = {}

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return "%"
        written = literal(name)
        return written if written is not None else f"${names.setdefault(name, len(names) + 1)}"

    return PLACEHOLDER.sub(number, statement.as_string(conn)), tuple(names)


def positional(statement: sql.Composed, conn: AdaptContext) -> Positional:
    """``statement`` as :class:`Positional`, every parameter numbered."""
    text, names = _numbered(statement, conn, lambda _: None)
    return Positional(text.encode(), names)


# the types a prepared statement's per-run parameters may have, and how a value
# of each is written as a literal (integers only: int() leaves nothing to quote)
_RUN_LITERALS: dict[str, Callable[[Any], str]] = {
    "bigint": lambda value: str(int(value)),
    "int[]": lambda values: "'{" + ",".join(str(int(v)) for v in values) + "}'",
}


@dataclass(frozen=True, slots=True)
class Prepared:
    """A statement prepared by name in the session (SQL ``PREPARE``): what
    stays the same from run to run written into it as literals, what changes
    as ``$n`` of declared types (integers, or arrays of them), so that a run
    is ``EXECUTE`` with a few numbers, one statement of a simple query that
    holds its whole transaction (``dlqd.db.replays.express_page`` says why)."""

    name: str
    prepare: bytes  # PREPARE name (types) AS ...
    names: tuple[str, ...]  # the parameter of $1, $2, ...
    types: tuple[str, ...]  # their types, keys of _RUN_LITERALS

    def execute(self, params: dict[str, Any]) -> bytes:
        """``EXECUTE`` of this statement with ``params`` written in (a page runs
        one: written directly, not composed, for a trickle's sake)."""
        pairs = zip(self.names, self.types, strict=True)
        values = ", ".join(_RUN_LITERALS[kind](params[name]) for name, kind in pairs)
        return f'EXECUTE "{self.name}"({values})'.encode()


def prepared(
    statement: sql.Composed,
    params: dict[str, Any],
    per_run: dict[str, str],
    conn: AdaptContext,
) -> Prepared:
    """``statement`` as :class:`Prepared`: the parameters named in ``per_run``
    (name to type: ``bigint`` or ``int[]``) stay parameters, every other one
    of ``params`` becomes a literal. Named after its text
    (``dlqd_page_<md5>``): another text is another statement."""

    def literal(name: str) -> str | None:
        return None if name in per_run else sql.Literal(params[name]).as_string(conn)

    text, names = _numbered(statement, conn, literal)
    digest = hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()
    name = f"dlqd_page_{digest}"
    types = tuple(per_run[n] for n in names)
    unknown = set(types) - _RUN_LITERALS.keys()
    if unknown:
        raise ValueError(f"per-run parameters of types {sorted(unknown)}: integers only")
    declared = sql.SQL(", ").join(sql.SQL(t) for t in types)
    prepare = sql.SQL("PREPARE {} ({}) AS ").format(sql.Identifier(name), declared)
    return Prepared(name, prepare.as_bytes(conn) + text.encode(), names, types)


def deallocate(name: str) -> sql.Composed:
    """``DEALLOCATE`` of a statement prepared by name (:class:`Prepared`)."""
    return sql.SQL("DEALLOCATE {}").format(sql.Identifier(name))


def listen_statement(channel: str) -> sql.Composed:
    """``LISTEN`` on a channel, quoted as an identifier."""
    return sql.SQL("LISTEN {}").format(sql.Identifier(channel))


def drop_index_concurrently(name: str) -> sql.Composed:
    """``DROP INDEX CONCURRENTLY`` of an index a migration names (an invalid one
    that an interrupted CREATE INDEX CONCURRENTLY left behind)."""
    return sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(sql.Identifier(name))


# --------------------------------------------------------------------------- adapters


def _qualified(schema: str, name: str) -> sql.Identifier:
    return sql.Identifier(schema, name)


def adapter_install(
    adapter: Adapter,
    *,
    schema: str,
    dlqd_schema: str,
    app_id: str,
    constant: bool,
    comment: str,
) -> sql.Composed:
    """The script that installs ``adapter``'s capture on ``schema``'s tables:
    the function in dlqd's schema, the trigger on the job table. ``app_id``
    is a constant, or an expression over ``job`` (planned first:
    :func:`adapter_app_id_check`)."""
    names = _adapter_names(adapter, schema, dlqd_schema)
    pieces = {
        piece: sql.SQL(adapter_q(adapter.name, piece)).format(
            **names, schema_text=sql.Literal(schema)
        )
        for piece in ("declare", "capture", "triggers")
    }
    return sql.SQL(q("adapter_capture")).format(
        **names,
        **pieces,
        dlqd_schema=sql.Identifier(dlqd_schema),
        app_id=sql.Literal(app_id) if constant else _operator_text(app_id),
        comment=sql.Literal(comment),
    )


def adapter_uninstall(adapter: Adapter, *, schema: str, dlqd_schema: str) -> sql.Composed:
    return sql.SQL(q("adapter_uninstall")).format(**_adapter_names(adapter, schema, dlqd_schema))


def adapter_app_id_check(adapter: Adapter, *, schema: str, app_id: str) -> sql.Composed:
    return sql.SQL(q("adapter_app_id_check")).format(
        jobs=_qualified(schema, adapter.table), app_id=_operator_text(app_id)
    )


def _adapter_names(
    adapter: Adapter, schema: str, dlqd_schema: str | None = None
) -> dict[str, sql.Composable]:
    """The job system's tables (``jobs`` and the adapter's others), qualified;
    with ``dlqd_schema``, the capture function's name too."""
    names: dict[str, sql.Composable] = {"jobs": _qualified(schema, adapter.table)}
    for role, table in adapter.related.items():
        names[role] = _qualified(schema, table)
    if dlqd_schema is not None:
        names["function"] = _qualified(dlqd_schema, adapter.function_name(schema))
    return names


def adapter_replay(
    adapter: Adapter,
    *,
    schema: str,
    queue: str | None = None,
    priority: int | None = None,
    max_attempts: int | None = None,
    run_at_delay: timedelta | None = None,
) -> str:
    """The set-based statement a preset target runs (over ``replayed``):
    plain text, as an operator's ``sql`` target would be, so that every path
    (express pages included) and ``dlqd check`` treat it alike."""
    run_at: sql.Composable = sql.SQL("NULL::timestamptz")
    if run_at_delay is not None:
        run_at = sql.SQL("now() + {}::interval").format(
            sql.Literal(f"{run_at_delay.total_seconds()} seconds")
        )
    statement = sql.SQL(adapter_q(adapter.name, "replay")).format(
        **_adapter_names(adapter, schema),
        schema=sql.Identifier(schema),
        status_type=_qualified(schema, adapter.statuses[0]),
        queue=sql.SQL("NULL::text") if queue is None else sql.Literal(queue),
        priority=sql.SQL("NULL::integer") if priority is None else sql.Literal(priority),
        max_attempts=(
            sql.SQL("NULL::integer") if max_attempts is None else sql.Literal(max_attempts)
        ),
        run_at=run_at,
    )
    lines = statement.as_string().splitlines()
    while lines and lines[0].lstrip().startswith("--"):
        lines.pop(0)  # the template's own comment, not the target's
    return "\n".join(lines)
