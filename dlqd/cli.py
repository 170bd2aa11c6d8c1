"""The ``dlqd`` command line (DESIGN section 6).

Every error is one line on stderr with the contract's exit code: 1 runtime
error, 2 usage, 69 database unreachable, 78 invalid configuration. ``--debug``
adds the traceback.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from dlqd import __version__
from dlqd.config import Settings, load_settings
from dlqd.errors import ConfigError, DlqdError, NotFound, SchemaOutdated
from dlqd.logs import configure_logging
from dlqd.output import print_json, print_raw_json, print_table, safe
from dlqd.repository import PendingFilter

Handler = Callable[[argparse.Namespace, Settings], Awaitable[int]]
_HANDLERS: dict[str, Handler] = {}


def command(name: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        _HANDLERS[name] = handler
        return handler

    return register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dlqd", description="Dead-letter-queue daemon for Postgres-backed job systems."
    )
    parser.add_argument("--version", action="version", version=f"dlqd {__version__}")
    # --config and --debug work before or after the command name.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="TOML config file (default $DLQD_CONFIG)",
    )
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="print tracebacks"
    )
    parser.add_argument("--config", metavar="FILE", help="TOML config file (default $DLQD_CONFIG)")
    parser.add_argument("--debug", action="store_true", help="print tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = functools.partial(sub.add_parser, parents=[common])

    add("run", help="run the daemon")
    add("migrate", help="apply sql/ migrations; idempotent")
    add("check", help="validate config and policies, and reach the database")

    status = add("status", help="pending, parked and oldest age by group")
    status.add_argument("--json", action="store_true")

    list_ = add("list", help="pending rows, keyset-paginated")
    _add_filters(list_)
    list_.add_argument(
        "--limit", type=_page_size, default=50, help="rows per page, 1 to 10000 (default 50)"
    )
    list_.add_argument("--cursor", help="next_cursor printed by the previous page")
    list_.add_argument("--json", action="store_true")

    show = add("show", help="one row with its replay history")
    show.add_argument("id")
    show.add_argument("--json", action="store_true")

    replay = add("replay", help="manual replay, parked rows included")
    replay.add_argument("ids", nargs="*", metavar="ID")
    _add_filters(replay)
    replay.add_argument("--all", action="store_true", help="every pending row")
    replay.add_argument("--dry-run", action="store_true")
    replay.add_argument("--rate", type=_positive_float, help="at most N rows a second")
    replay.add_argument(
        "--via",
        metavar="POLICY",
        help="replay through this policy's target, whatever policy matches the rows",
    )
    replay.add_argument(
        "--reason",
        metavar="TEXT",
        help="why, kept in the replay log with your name ($DLQD_ACTOR, else the login name)",
    )
    replay.add_argument("--json", action="store_true")

    purge = add("purge", help="one purge pass now")
    purge.add_argument("--dry-run", action="store_true")
    purge.add_argument("--json", action="store_true")

    sql_ = add("sql", help="print SQL an administrator runs (roles)")
    sql_.add_argument("what", choices=["roles"], help="roles: the role script (sql/roles.sql)")

    explain = add("explain", help="which policy matches a row, and when it is due")
    explain.add_argument("id")
    explain.add_argument("--json", action="store_true")
    return parser


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--app-id")
    parser.add_argument("--type")
    parser.add_argument("--error-reason")


MAX_PAGE = 10_000


def _page_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text[:40]!r}") from None
    if not 1 <= value <= MAX_PAGE:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_PAGE}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text[:40]!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError("must be a finite number greater than 0")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "sql":
        # needs no configuration: an administrator runs it before dlqd has any
        from dlqd.queries import sql_dir

        sys.stdout.write((sql_dir() / f"{args.what}.sql").read_text(encoding="utf-8"))
        return 0
    handler = _HANDLERS[args.command]
    try:
        settings = load_settings(args.config)
        # logs go to stderr, so --json output on stdout stays one document
        configure_logging(settings.log_format, settings.log_level)
        return anyio.run(_unwrapping_groups, handler, args, settings)
    except DlqdError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"dlqd: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        if args.debug:
            traceback.print_exc()
        print(
            f"dlqd: error: unexpected {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''} (rerun with --debug for details)",
            file=sys.stderr,
        )
        return 1


async def _unwrapping_groups(handler: Handler, args: argparse.Namespace, settings: Settings) -> int:
    """Task groups wrap errors in exception groups; the operator wants the error."""
    import psycopg

    try:
        return await handler(args, settings)
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        chosen = next((e for e in leaves if isinstance(e, DlqdError)), leaves[0])
        raise chosen from group
    except (
        psycopg.errors.UndefinedTable,
        psycopg.errors.UndefinedFunction,
        psycopg.errors.UndefinedColumn,
    ):
        raise SchemaOutdated("database schema is not up to date: run `dlqd migrate`") from None
    except psycopg.errors.InsufficientPrivilege as exc:
        from dlqd.replay.targets import error_line

        raise DlqdError(
            f"{error_line(exc)}: this role lacks a grant dlqd needs; as an administrator, "
            "apply the role script (`dlqd sql roles`) and connect as role dlqd"
        ) from None


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


# --------------------------------------------------------------------------- commands


@command("migrate")
async def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from dlqd.db import connection
    from dlqd.migrations import migrate

    async with connection(settings.dsn, autocommit=True, application_name="dlqd migrate") as conn:
        applied = await migrate(conn)
    if applied:
        for migration in applied:
            print(f"applied {migration.version:03d}_{migration.name}")
    else:
        print("database is up to date")
    return 0


@command("check")
async def _check(args: argparse.Namespace, settings: Settings) -> int:
    from dlqd.db import connection
    from dlqd.migrations import require_current_schema
    from dlqd.replay.checks import check_targets, sql_target_problems

    check_targets(settings)
    if settings.listen_dsn != settings.dsn:
        async with connection(settings.listen_dsn, application_name="dlqd check") as conn:
            await _print_reachable(conn, settings.listen_dsn)
    async with connection(settings.dsn, autocommit=True, application_name="dlqd check") as conn:
        await _print_reachable(conn, settings.dsn)
        await require_current_schema(conn)
        print("schema: up to date")
        problems = await sql_target_problems(conn, settings)
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(text for text, _ in problems))
    print(f"config: ok ({len(settings.policies)} policies)")
    return 0


async def _print_reachable(conn: Any, dsn: str) -> None:
    from dlqd.db import describe_dsn
    from dlqd.queries import q

    cur = await conn.execute(q("ping"))
    row = await cur.fetchone()
    version = row["server_version_num"] if row else "?"
    print(f"database {describe_dsn(dsn)}: reachable (server_version_num {version})")


def _filter(args: argparse.Namespace) -> PendingFilter:
    return PendingFilter(app_id=args.app_id, type=args.type, error_reason=args.error_reason)


@command("list")
async def _list(args: argparse.Namespace, settings: Settings) -> int:
    from dlqd.db import connection
    from dlqd.repository import Repository

    async with connection(settings.dsn, application_name="dlqd list") as conn:
        page = await Repository(conn).list_pending(args.limit, args.cursor, _filter(args))
    if args.json:
        import json

        documents = ",".join(row["document"] for row in page.rows)
        print_raw_json(
            ['{"entries":[', documents, '],"next_cursor":', json.dumps(page.next_cursor), "}"]
        )
        return 0
    print_table(
        ["id", "dlq_at", "app_id", "type", "error_reason", "attempts", "original_job_id"],
        [
            [
                r["id"],
                r["dlq_at"],
                r["app_id"],
                r["type"],
                r["error_reason"],
                r["attempts"],
                r["original_job_id"],
            ]
            for r in page.rows
        ],
    )
    if page.next_cursor:
        print(f"next cursor: {page.next_cursor}")
    return 0


_SHOWN_JSON_CHARS = 2000  # a payload on a terminal: its start, then --json for the rest


@command("show")
async def _show(args: argparse.Namespace, settings: Settings) -> int:
    import json

    from dlqd.db import connection
    from dlqd.queries import q
    from dlqd.repository import parse_entry_id

    entry_id = parse_entry_id(args.id)
    async with connection(settings.dsn, application_name="dlqd show") as conn:
        cur = await conn.execute(q("entry_document"), {"id": entry_id})
        row = await cur.fetchone()
        if row is None:
            raise NotFound(f"no job_dlq row with id {entry_id}")
        cur = await conn.execute(q("replay_history"), {"id": entry_id})
        history = await cur.fetchall()
    replays = [
        {
            "at": h["at"],
            "policy": h["policy"],
            "outcome": h["outcome"],
            "error": h["error"],
            "actor": h["actor"],
            "reason": h["reason"],
        }
        for h in history
    ]
    if args.json:
        from dlqd.output import _default

        document = str(row["document"])
        tail = json.dumps(replays, default=_default, ensure_ascii=False)
        print_raw_json([document[:-1], ',"replays":', tail, "}"])
        return 0
    fields = [
        "id", "original_job_id", "app_id", "type", "payload", "error_reason", "attempts",
        "error_history", "dlq_at", "replayed_at", "request_id", "user_id",
    ]  # fmt: skip
    width = max(len(k) for k in fields)
    for key in fields:
        value = row[key]
        text = "-" if value is None else str(value)
        if key in ("payload", "error_history") and len(text) > _SHOWN_JSON_CHARS:
            text = f"{text[:_SHOWN_JSON_CHARS]}… ({len(text)} characters; --json shows all)"
        print(f"{key.ljust(width)}  {safe(text)}")
    print()
    if replays:
        print_table(
            ["at", "policy", "outcome", "error", "actor", "reason"],
            [list(r.values()) for r in replays],
        )
    else:
        print("no replays yet")
    return 0


@command("run")
async def _run(args: argparse.Namespace, settings: Settings) -> int:
    from dlqd.daemon import run_daemon

    return await run_daemon(settings, args.config)


@command("status")
async def _status(args: argparse.Namespace, settings: Settings) -> int:
    from dlqd.db import connection
    from dlqd.status import collect_status

    async with connection(settings.dsn, autocommit=True, application_name="dlqd status") as conn:
        status = await collect_status(conn, settings.policies)
    if args.json:
        print_json(status.to_json())
        return 0
    oldest = status.oldest_pending_age_seconds
    print(
        f"pending {status.pending}  parked {status.parked}  unmatched {status.unmatched}  "
        f"oldest {'-' if oldest is None else _age(oldest)}"
    )
    if status.groups:
        print()
        print_table(
            ["app_id", "type", "error_reason", "pending", "parked", "oldest"],
            [
                [
                    g.app_id,
                    g.type,
                    g.error_reason,
                    g.pending,
                    g.parked,
                    _age(g.oldest_pending_age_seconds),
                ]
                for g in status.groups
            ],
        )
    return 0


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


@command("explain")
async def _explain(args: argparse.Namespace, settings: Settings) -> int:
    from dlqd.db import connection
    from dlqd.operations import explain
    from dlqd.repository import parse_entry_id

    entry_id = parse_entry_id(args.id)
    async with connection(settings.dsn, autocommit=True, application_name="dlqd explain") as conn:
        explanation = await explain(conn, settings, entry_id)
    if explanation is None:
        raise NotFound(f"no job_dlq row with id {entry_id}")
    if args.json:
        print_json(explanation.to_json())
    else:
        print("\n".join(safe(line) for line in explanation.lines))
    return 0


@command("replay")
async def _replay(args: argparse.Namespace, settings: Settings) -> int:
    from dlqd.db import connection
    from dlqd.errors import UsageError
    from dlqd.operations import manual_replay
    from dlqd.replay.checks import check_targets
    from dlqd.repository import parse_entry_id

    filters = args.app_id is not None or args.type is not None or args.error_reason is not None
    chosen = sum([bool(args.ids), filters, args.all])
    if chosen != 1:
        raise UsageError("replay takes IDs, or --app-id/--type/--error-reason, or --all (one)")
    check_targets(settings)
    ids = [parse_entry_id(text) for text in args.ids]
    where = _filter(args) if filters else PendingFilter() if args.all else None
    async with connection(settings.dsn, autocommit=True, application_name="dlqd replay") as conn:
        result = await manual_replay(
            conn,
            settings,
            ids=ids,
            where=where,
            dry_run=args.dry_run,
            rate=args.rate,
            via=args.via,
            actor=_actor(),
            reason=args.reason,
        )
    if args.json:
        print_json(result.to_json())
    else:
        verb = "would replay" if args.dry_run else "replayed"
        print(f"{verb} {result.replayed}, failed {result.failed}, skipped {result.skipped}")
    return 1 if result.failed else 0


def _actor() -> str:
    """Who runs a manual replay: $DLQD_ACTOR, else the login name."""
    import getpass
    import os

    if actor := os.environ.get("DLQD_ACTOR"):
        return actor
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


@command("purge")
async def _purge(args: argparse.Namespace, settings: Settings) -> int:
    from dlqd.db import connection
    from dlqd.operations import purge

    async with connection(settings.dsn, autocommit=True, application_name="dlqd purge") as conn:
        deleted = await purge(conn, settings, dry_run=args.dry_run)
    if args.json:
        print_json({"deleted": deleted, "dry_run": args.dry_run})
    else:
        print(f"{'would delete' if args.dry_run else 'deleted'} {deleted} rows")
    return 0
