"""The ``dlqd`` command line (DESIGN section 6).

Every error is one line on stderr with the contract's exit code: 1 runtime
error, 2 usage, 69 database unreachable, 78 invalid configuration. ``--debug``
adds the traceback.
"""

from __future__ import annotations

import argparse
import math
import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from dlqd import __version__
from dlqd.config import Settings, load_settings
from dlqd.errors import DlqdError, NotFound, SchemaOutdated
from dlqd.filters import PendingFilter
from dlqd.logs import configure_logging
from dlqd.output import print_json, print_raw_json, print_table, safe

Handler = Callable[[argparse.Namespace, Settings], Awaitable[int]]
_HANDLERS: dict[str, Handler] = {}


def command(name: str) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        _HANDLERS[name] = handler
        return handler

    return register


TOP_EPILOG = """\
environment:
  DLQD_DATABASE_URL         the database (required)
  DLQD_LISTEN_DATABASE_URL  a direct connection for LISTEN and the leader lock
                            (when DLQD_DATABASE_URL goes through a transaction pooler)
  DLQD_CONFIG               the TOML config file (or --config)
  DLQD_<KEY>, DLQD_<SECTION>__<KEY>
                            any setting, e.g. DLQD_LISTEN__POLL_INTERVAL=5s
  DLQD_ACTOR                your name in the replay log (default: the login name)

exit codes:
  0 ok   1 runtime error   2 usage   69 database unreachable
  78 invalid configuration (or a database that needs `dlqd migrate`)

Run `dlqd COMMAND --help` for a command's flags and examples.
"""

EXAMPLES = {
    "run": "  dlqd run --config /etc/dlqd/dlqd.toml",
    "migrate": "  dlqd migrate\n  dlqd migrate --wait 30s",
    "check": "  dlqd check --config /etc/dlqd/dlqd.toml",
    "status": "  dlqd status\n  dlqd status --json | jq .parked",
    "list": (
        "  dlqd list --state parked\n"
        "  dlqd list --type 'email.*' --app-id shop --app-id crm --json\n"
        "  dlqd list --cursor <next cursor of the previous page>"
    ),
    "show": "  dlqd show 0f8fad5b-d9cb-469f-a165-70867728950e",
    "replay": (
        "  dlqd replay 0f8fad5b-d9cb-469f-a165-70867728950e\n"
        "  dlqd replay --type 'email.*' --error-reason timeout --dry-run\n"
        "  dlqd replay ID --via transient --reason 'mail relay fixed'\n"
        "  dlqd replay --all --yes --rate 50"
    ),
    "purge": "  dlqd purge --dry-run\n  dlqd purge --json",
    "park": "  dlqd park 0f8fad5b-d9cb-469f-a165-70867728950e --reason 'customer asked to wait'",
    "unpark": "  dlqd unpark 0f8fad5b-d9cb-469f-a165-70867728950e --reason 'receiver fixed'",
    "explain": "  dlqd explain 0f8fad5b-d9cb-469f-a165-70867728950e --config /etc/dlqd/dlqd.toml",
    "sql": '  dlqd sql roles | psql "$ADMIN_DATABASE_URL"',
    "redrive": (
        "  dlqd redrive start --type 'email.*' --error-reason timeout --rate 50 --dry-run\n"
        "  dlqd redrive start --app-id shop --via transient --reason 'relay fixed' --rate 50\n"
        "  dlqd redrive list\n"
        "  dlqd redrive cancel 1b4e28ba-2fa1-11d2-883f-0016d3cca427"
    ),
    "adapters": (
        "  dlqd adapters list\n"
        "  dlqd adapters install procrastinate --app-id 'job.queue_name'\n"
        "  dlqd adapters install pgqueuer --schema jobs --app-id billing --print\n"
        "  dlqd adapters uninstall procrastinate"
    ),
    "console": (
        "  dlqd console token alice --role operator\n"
        "  dlqd console token shop-support --role viewer --app-id shop"
    ),
    "completion": (
        "  dlqd completion bash > /etc/bash_completion.d/dlqd\n"
        "  dlqd completion zsh > ~/.zfunc/_dlqd\n"
        "  dlqd completion fish > ~/.config/fish/completions/dlqd.fish"
    ),
}


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written; a flag's default shown when it has a real one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return f"{text} (default: {default})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dlqd",
        description="Dead-letter-queue daemon for Postgres-backed job systems.",
        epilog=TOP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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

    def add(name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            parents=[common],
            help=help,
            description=description or help[0].upper() + help[1:] + ".",
            epilog="examples:\n" + EXAMPLES[name],
            formatter_class=_Formatter,
        )

    add(
        "run",
        "run the daemon",
        "Run the daemon: listen, decide, replay, purge (on the leader), serve /metrics, "
        "/healthz and /readyz. SIGHUP reloads the config; SIGTERM finishes the batch in "
        "flight and exits 0.",
    )
    migrate = add(
        "migrate",
        "apply sql/ migrations; idempotent and safe from many replicas at once",
        "Apply sql/ migrations in order, each once. Runs at the same time wait for each "
        "other (a lock); a session holding that lock is named while waiting, for at most "
        "--wait. Needs the rights of the schema's owner (the role that migrated it first).",
    )
    migrate.add_argument(
        "--wait",
        type=_duration,
        default="5m",
        metavar="DURATION",
        help="how long to wait for another migration to finish",
    )
    add(
        "check",
        "validate config and policies, and reach the database",
        "Validate the config, reach the database, check the schema is migrated, and plan "
        "every sql target (never running it).",
    )

    status = add(
        "status",
        "pending, parked, unmatched and oldest age by group",
        "Pending rows by app_id, type and error_reason, with what the daemon recorded "
        "(parked, unmatched) and the oldest age; the same answer with or without --config.",
    )
    status.add_argument("--json", action="store_true", help="one JSON document on stdout")

    list_ = add(
        "list",
        "pending rows with their recorded state, keyset-paginated",
        "Pending rows in dlq_at order, with state (new, waiting, parked, unmatched), policy, "
        "due time, failures and last error. Filters are globs as in policy matches: a flag "
        "may repeat (any of them), different flags must all match.",
    )
    _add_filters(list_)
    list_.add_argument("--limit", type=_page_size, default=50, help="rows per page, 1 to 10000")
    list_.add_argument(
        "--cursor", help="the next cursor printed by the previous page (default: the first)"
    )
    list_.add_argument(
        "--state",
        action="append",
        choices=["new", "waiting", "parked", "unmatched"],
        help="rows in this recorded state; repeat for several",
    )
    list_.add_argument(
        "--policy", action="append", metavar="NAME", help="rows scheduled or parked by this policy"
    ).completer = _policy_names  # type: ignore[attr-defined]
    _add_searches(list_)
    list_.add_argument("--json", action="store_true", help="one JSON document on stdout")

    show = add("show", "one row with its replay history")
    show.add_argument("id", help="the row's id (a UUID)").completer = _nothing  # type: ignore[attr-defined]
    show.add_argument("--json", action="store_true", help="one JSON document on stdout")

    replay = add(
        "replay",
        "manual replay, parked rows included",
        "Replay rows now, parked ones included, ignoring delays and max_replays: through the "
        "target of --via POLICY, else of the first matching policy that has one, else "
        "replay.default_target. Each chunk is one transaction; a progress bar shows on a "
        "terminal. Exit 1 when a row failed.",
    )
    replay.add_argument(
        "ids", nargs="*", metavar="ID", help="rows to replay, by id"
    ).completer = _nothing  # type: ignore[attr-defined]
    _add_filters(replay)
    replay.add_argument("--all", action="store_true", help="every pending row (needs --yes)")
    replay.add_argument(
        "--yes", action="store_true", help="confirm --all (asked on a terminal otherwise)"
    )
    replay.add_argument(
        "--dry-run", action="store_true", help="count what would be replayed, change nothing"
    )
    replay.add_argument("--rate", type=_positive_float, help="at most N rows a second")
    replay.add_argument(
        "--via",
        metavar="POLICY",
        help="replay through this policy's target, whatever policy matches the rows",
    ).completer = _policy_names  # type: ignore[attr-defined]
    replay.add_argument(
        "--reason",
        metavar="TEXT",
        help="why, kept in the replay log with your name ($DLQD_ACTOR, else the login name)",
    )
    replay.add_argument("--json", action="store_true", help="one JSON document on stdout")

    purge = add(
        "purge",
        "one purge pass now",
        "Delete replayed rows older than purge.replayed_retention (and pending rows older "
        "than purge.pending_retention, when set), in batches of purge.batch_size.",
    )
    purge.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    purge.add_argument("--json", action="store_true", help="one JSON document on stdout")

    for name, verb, what in (
        ("park", "park", "Park pending rows by hand: the daemon leaves them alone until `dlqd "
         "replay` or `dlqd unpark`. Recorded in the replay log with your name and --reason."),
        ("unpark", "unpark", "Unpark rows parked by hand or by an event (max_failures, "
         "max_replays, http_4xx, invalid_row): the daemon decides them again by policy. "
         "Recorded in the replay log with your name and --reason."),
    ):  # fmt: skip
        cmd = add(name, f"{verb} rows by hand", what)
        cmd.add_argument("ids", nargs="+", metavar="ID", help="rows, by id").completer = _nothing  # type: ignore[attr-defined]
        cmd.add_argument("--reason", metavar="TEXT", help="why, kept in the replay log")
        cmd.add_argument("--json", action="store_true", help="one JSON document on stdout")

    sql_ = add("sql", "print SQL an administrator runs (the role script)")
    sql_.add_argument("what", choices=["roles"], help="roles: the role script (sql/roles.sql)")

    explain = add(
        "explain",
        "which policy matches a row, why, and when it is due",
        "Which policy matches the row and why the others do not, its replay count, its "
        "recorded state, and the verdict under the given config.",
    )
    explain.add_argument("id", help="the row's id (a UUID)").completer = _nothing  # type: ignore[attr-defined]
    explain.add_argument("--json", action="store_true", help="one JSON document on stdout")

    redrive = add(
        "redrive",
        "replay everything a filter matches, as a durable task a daemon runs",
        "A redrive replays every pending row a filter matches now (parked ones included), "
        "through --via POLICY's target or the matching policy's, at --rate for the whole "
        "deployment, on one daemon replica at a time (another resumes it after a crash). "
        "Every replay is logged with your name and --reason. `dlqd replay` is the synchronous "
        "form.",
    )
    actions = redrive.add_subparsers(dest="action", required=True, metavar="ACTION")
    start = actions.add_parser(
        "start",
        parents=[common],
        help="create a redrive (--dry-run: count what it would replay)",
        description="Create a redrive of the pending rows the filters match (none: all).",
        formatter_class=_Formatter,
    )
    _add_filters(start)
    start.add_argument(
        "--state",
        action="append",
        choices=["new", "waiting", "parked", "unmatched"],
        help="rows in this recorded state; repeat for several",
    )
    start.add_argument(
        "--policy", action="append", metavar="NAME", help="rows scheduled or parked by this policy"
    ).completer = _policy_names  # type: ignore[attr-defined]
    _add_searches(start)
    start.add_argument(
        "--via",
        metavar="POLICY",
        help="replay through this policy's target, whatever policy matches the rows",
    ).completer = _policy_names  # type: ignore[attr-defined]
    start.add_argument("--reason", metavar="TEXT", help="why, kept in the replay log")
    start.add_argument(
        "--rate", type=_positive_float, help="at most N rows a second, for the whole deployment"
    )
    start.add_argument(
        "--dry-run", action="store_true", help="count what it would replay, create nothing"
    )
    start.add_argument("--json", action="store_true", help="one JSON document on stdout")
    listing = actions.add_parser(
        "list",
        parents=[common],
        help="redrives, newest first, with their progress",
        formatter_class=_Formatter,
    )
    listing.add_argument("--json", action="store_true", help="a JSON array on stdout")
    stop = actions.add_parser(
        "cancel",
        parents=[common],
        help="stop a redrive after the chunk in flight",
        description="Stop a redrive after the chunk in flight; waits (up to 30s) until it has.",
        formatter_class=_Formatter,
    )
    stop.add_argument("id", help="the redrive's id").completer = _nothing  # type: ignore[attr-defined]
    stop.add_argument("--json", action="store_true", help="one JSON document on stdout")

    adapters = add(
        "adapters",
        "capture a job system's dead jobs into job_dlq (and replay into it by preset)",
        "Capture the jobs of an existing job system that fail for good into job_dlq, by a "
        "trigger on its job table; replay them into it with a target of kind NAME. "
        "docs/adapters/ has a page per system.",
    )
    adapter_actions = adapters.add_subparsers(dest="action", required=True, metavar="ACTION")
    adapter_list = adapter_actions.add_parser(
        "list",
        parents=[common],
        help="supported systems, the versions tested, what each captures",
        formatter_class=_Formatter,
    )
    adapter_list.add_argument("--json", action="store_true", help="a JSON array on stdout")
    for verb, what in (
        ("install", "install the capture trigger on the system's job table (idempotent)"),
        ("uninstall", "remove the capture, leaving the system's schema as it was"),
    ):
        action = adapter_actions.add_parser(
            verb,
            parents=[common],
            help=what,
            description=what[0].upper() + what[1:] + "; needs the table owner's rights.",
            formatter_class=_Formatter,
        )
        action.add_argument("name", choices=sorted(_adapter_names()), help="the job system")
        action.add_argument(
            "--schema", metavar="S", help="the schema of its tables (default: public)"
        )
        if verb == "install":
            action.add_argument(
                "--app-id",
                metavar="EXPR",
                help="the rows' tenant: a constant (billing), or an SQL expression over the "
                "job's row named job (job.queue_name, job.args->>'tenant'); default: NAME",
            )
        action.add_argument(
            "--print", action="store_true", help="print the SQL, change nothing (for a DBA)"
        )
        action.add_argument("--json", action="store_true", help="one JSON document on stdout")

    console = add("console", "make console tokens")
    tokens = console.add_subparsers(dest="action", required=True, metavar="ACTION")
    token = tokens.add_parser(
        "token",
        help="print a new random token and its [[console.tokens]] entry",
        description="Print a new random console token (once: it is kept nowhere) and the "
        "[[console.tokens]] entry, with the token's SHA-256, to add to the config.",
        formatter_class=_Formatter,
    )
    token.add_argument("name", help="who uses it: the actor of what it does")
    token.add_argument(
        "--role",
        choices=["viewer", "operator"],
        required=True,
        help="viewer: reads only; operator: may replay, park and redrive",
    )
    token.add_argument("--app-id", metavar="APP_ID", help="bind the token to one tenant")
    token.add_argument("--json", action="store_true", help="one JSON document on stdout")

    completion = add("completion", "print a shell completion script")
    completion.add_argument("shell", choices=["bash", "zsh", "fish"], help="your shell")
    return parser


def _adapter_names() -> list[str]:
    from dlqd.adapters import ADAPTERS

    return list(ADAPTERS)


def _policy_names(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
    """Completion for --via and --policy: the policies of the config in use."""
    import os

    try:
        settings = load_settings(
            getattr(parsed_args, "config", None),
            database_url=os.environ.get("DLQD_DATABASE_URL") or "postgresql://completion",
        )
    except DlqdError:
        return []
    return [p.name for p in settings.policies if p.name.startswith(prefix)]


def _nothing(**_: Any) -> list[str]:
    """Completion for row ids: none to offer (and no file names)."""
    return []


def _add_filters(parser: argparse.ArgumentParser) -> None:
    # globs, as in policy matches; a flag may repeat (OR), flags combine (AND)
    flags = (
        ("--app-id", "tenant", "shop-*"),
        ("--type", "job type", "email.*"),
        ("--error-reason", "error reason", "timeout"),
    )
    for flag, what, example in flags:
        parser.add_argument(
            flag,
            action="append",
            metavar="GLOB",
            help=f"{what} matching this glob (e.g. '{example}'); repeat for any of several",
        )


def _add_searches(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--payload",
        metavar="JSON",
        help='rows whose payload contains this JSON document (e.g. \'{"to": "x@example.com"}\')',
    )
    parser.add_argument(
        "--error", metavar="TEXT", help="rows whose last error contains this text (any case)"
    )


MAX_PAGE = 10_000


def _page_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text[:40]!r}") from None
    if not 1 <= value <= MAX_PAGE:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_PAGE}")
    return value


def _duration(text: str) -> float:
    from dlqd.config import parse_duration

    try:
        return parse_duration(text).total_seconds()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text[:40]!r}") from None
    if not math.isfinite(value) or value < 0.01:
        raise argparse.ArgumentTypeError("must be a finite number of at least 0.01")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    from argcomplete import autocomplete

    autocomplete(parser)  # answers the shell's completion request, if this is one
    args = parser.parse_args(argv)
    if args.command == "completion":
        from argcomplete.shell_integration import shellcode

        sys.stdout.write(shellcode(["dlqd"], shell=args.shell))
        return 0
    if args.command == "console":
        return _console_token(args)
    if args.command == "adapters" and args.action == "list":
        return _adapters_list(args)  # needs no configuration nor database
    if args.command == "sql":
        # needs no configuration: an administrator runs it before dlqd has any
        from dlqd.db.queries import sql_dir

        sys.stdout.write((sql_dir() / f"{args.what}.sql").read_text(encoding="utf-8"))
        return 0
    handler = _HANDLERS[args.command]
    try:
        _utf8_arguments(args)
        settings = load_settings(args.config)
        # logs go to stderr, so --json output on stdout stays one document; a
        # command other than `run` prints its own results: its log stream says
        # only errors, unless a level was asked for (config or DLQD_LOG_LEVEL)
        level = settings.log_level
        if args.command != "run" and "log_level" not in settings.model_fields_set:
            level = "error"
        configure_logging(settings.log_format, level)
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


def _utf8_arguments(args: argparse.Namespace) -> None:
    """Arguments are decoded with surrogate escapes: one that is not valid UTF-8
    (it reaches nothing but a usage error)."""
    from dlqd.errors import UsageError

    for name, value in vars(args).items():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and not _is_utf8(text):
                flag = "--" + name.replace("_", "-") if name != "ids" else "ID"
                raise UsageError(
                    f"{flag}: {text.encode('utf-8', 'replace')[:40]!r} is not valid UTF-8"
                )


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def _unwrapping_groups(handler: Handler, args: argparse.Namespace, settings: Settings) -> int:
    """Task groups wrap errors in exception groups; the operator wants the error."""
    from dlqd.errors import PermissionDenied, StatementRejected

    try:
        return await handler(args, settings)
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        chosen = next((e for e in leaves if isinstance(e, DlqdError)), leaves[0])
        raise chosen from group
    except StatementRejected as exc:
        # undefined table, function or column: dlqd's own statements, an old schema
        if exc.sqlstate in ("42P01", "42883", "42703"):
            raise SchemaOutdated("database schema is not up to date: run `dlqd migrate`") from None
        raise
    except PermissionDenied as exc:
        if args.command == "migrate":
            raise DlqdError(
                f"{exc}: migrations need the rights of the schema's owner (the role that "
                "migrated it first, or an administrator), not the daemon's role"
            ) from None
        raise DlqdError(
            f"{exc}: this role lacks a grant dlqd needs; as an administrator, "
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
    from dlqd import operator

    def waiting(line: str) -> None:
        print(f"dlqd: {line}", file=sys.stderr)

    applied = await operator.migrate(settings, wait=args.wait, on_wait=waiting)
    if applied:
        for migration in applied:
            print(f"applied {migration.version:03d}_{migration.name}")
    else:
        print("database is up to date")
    return 0


@command("check")
async def _check(args: argparse.Namespace, settings: Settings) -> int:
    from dlqd.operator.check import check

    await check(settings, _config_source(args), print)
    return 0


def _config_source(args: argparse.Namespace) -> str | None:
    import os

    return getattr(args, "config", None) or os.environ.get("DLQD_CONFIG") or None


def _filter(args: argparse.Namespace) -> PendingFilter:
    return PendingFilter(
        app_id=tuple(args.app_id or ()),
        type=tuple(args.type or ()),
        error_reason=tuple(args.error_reason or ()),
        state=tuple(getattr(args, "state", None) or ()),
        policy=tuple(getattr(args, "policy", None) or ()),
        payload=getattr(args, "payload", None),
        error=getattr(args, "error", None),
    )


@command("list")
async def _list(args: argparse.Namespace, settings: Settings) -> int:
    from dlqd import operator
    from dlqd.operator.reads import list_rows

    async with operator.session(settings, "dlqd list") as conn:
        page = await list_rows(conn, args.limit, args.cursor, _filter(args), documents=args.json)
    if args.json:
        import json

        documents = ",".join(row["document"] for row in page.rows)
        print_raw_json(
            ['{"entries":[', documents, '],"next_cursor":', json.dumps(page.next_cursor), "}"]
        )
        return 0
    columns = ["id", "dlq_at", "app_id", "type", "error_reason", "state", "parked_reason",
               "policy", "due_at", "failures", "last_error"]  # fmt: skip
    headers = [("reason" if c == "parked_reason" else c) for c in columns]
    print_table(headers, [[r[c] for c in columns] for r in page.rows])
    if page.next_cursor:
        print(f"next cursor: {page.next_cursor}")
    return 0


_SHOWN_JSON_CHARS = 2000  # a payload on a terminal: its start, then --json for the rest


@command("show")
async def _show(args: argparse.Namespace, settings: Settings) -> int:
    import json

    from dlqd import operator
    from dlqd.filters import parse_entry_id
    from dlqd.operator.reads import show

    entry_id = parse_entry_id(args.id)
    async with operator.session(settings, "dlqd show") as conn:
        shown = await show(conn, entry_id)
        narrow = await _recorded_state(conn, entry_id) if shown is not None else None
    if shown is None:
        raise NotFound(f"no job_dlq row with id {entry_id}")
    if args.json:
        from dlqd.output import _default

        tail = json.dumps(shown.replays, default=_default, ensure_ascii=False)
        print_raw_json([shown.document[:-1], ',"replays":', tail, "}"])
        return 0
    row = shown.row
    fields = [
        "id", "original_job_id", "app_id", "type", "payload", "error_reason", "attempts",
        "error_history", "dlq_at", "replayed_at", "request_id", "user_id",
    ]  # fmt: skip
    width = max(len(k) for k in [*fields, "state"])
    for key in fields:
        value = row[key]
        text = "-" if value is None else str(value)
        if key in ("payload", "error_history") and len(text) > _SHOWN_JSON_CHARS:
            text = f"{text[:_SHOWN_JSON_CHARS]}… ({len(text)} characters; --json shows all)"
        print(f"{key.ljust(width)}  {safe(text)}")
    if narrow is not None:
        print(f"{'state'.ljust(width)}  {safe(narrow)}")
    print()
    if shown.replays:
        columns = ["at", "policy", "outcome", "error", "actor", "reason"]
        print_table(columns, [[r[c] for c in columns] for r in shown.replays])
    else:
        print("no replays yet")
    return 0


async def _recorded_state(conn: Any, entry_id: Any) -> str:
    """The state the daemon recorded, as one line for ``show``."""
    from dlqd.operator.explain import explain

    explanation = await explain(conn, None, entry_id)
    if explanation is None:
        return "-"
    parts = [explanation.state]
    if explanation.policy:
        parts.append(f"policy {explanation.policy}")
    if explanation.reason:
        parts.append(f"reason {explanation.reason}")
    if explanation.due_at:
        parts.append(f"due {explanation.due_at.isoformat()}")
    return ", ".join(parts)


@command("run")
async def _run(args: argparse.Namespace, settings: Settings) -> int:
    from dlqd.daemon import run_daemon

    return await run_daemon(settings, args.config)


@command("status")
async def _status(args: argparse.Namespace, settings: Settings) -> int:
    from dlqd import operator
    from dlqd.operator.reads import status as read_status

    async with operator.session(settings, "dlqd status") as conn:
        status = await read_status(conn)
    if args.json:
        print_json(status.to_json())
        return 0
    oldest = status.oldest_pending_age_seconds
    print(
        f"pending {status.pending} (of which parked {status.parked}, unmatched "
        f"{status.unmatched})  oldest {'-' if oldest is None else _age(oldest)}"
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
    from dlqd import operator
    from dlqd.filters import parse_entry_id
    from dlqd.operator.explain import explain

    entry_id = parse_entry_id(args.id)
    async with operator.session(settings, "dlqd explain") as conn:
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
    from dlqd import operator
    from dlqd.db import entries
    from dlqd.errors import UsageError
    from dlqd.filters import parse_entry_id
    from dlqd.operator.replay import replay
    from dlqd.replay.checks import check_targets

    filters = args.app_id is not None or args.type is not None or args.error_reason is not None
    chosen = sum([bool(args.ids), filters, args.all])
    if chosen != 1:
        raise UsageError("replay takes IDs, or --app-id/--type/--error-reason, or --all (one)")
    check_targets(settings)
    ids = [parse_entry_id(text) for text in args.ids]
    where = _filter(args) if filters else PendingFilter() if args.all else None
    async with operator.session(settings, "dlqd replay") as conn:
        total = len(ids) if ids else await entries.count_pending(conn, where or PendingFilter())
        if args.all and not args.yes and not args.dry_run:
            _confirm_all(total, args.json)
        bar = _progress(total, "would replay" if args.dry_run else "replayed", args.json)
        result = await replay(
            conn,
            settings,
            ids=ids,
            where=where,
            dry_run=args.dry_run,
            rate=args.rate,
            via=args.via,
            actor=_actor(),
            reason=args.reason,
            on_chunk=bar.update if bar else None,
        )
    if bar:
        bar.close()
    if args.json:
        print_json(result.to_json())
        return 0 if result.ok else 1
    verb = "would replay" if args.dry_run else "replayed"
    skipped = ", ".join(
        f"{n} {r.replace('_', ' ')}" for r, n in result.skipped_by_reason.items() if n
    )
    line = f"{verb} {result.replayed}, failed {result.failed}, skipped {result.skipped}"
    print(line + (f" ({skipped})" if skipped else ""))
    for row_id, error in result.failures:
        print(f"  failed {row_id}: {safe(error)}")
    if result.failed > len(result.failures):
        print(f"  … and {result.failed - len(result.failures)} more (`dlqd list` shows them)")
    for row_id in result.missing[:20]:
        print(f"  no job_dlq row with id {row_id}")
    if result.skipped_by_reason["no_target"]:
        print(
            "  rows without a target (no matching policy has one, replay.default_target is not "
            "set): send them through a policy's target with --via POLICY"
        )
    return 0 if result.ok else 1


@command("park")
async def _park(args: argparse.Namespace, settings: Settings) -> int:
    return await _park_or_unpark(args, settings, park=True)


@command("unpark")
async def _unpark(args: argparse.Namespace, settings: Settings) -> int:
    return await _park_or_unpark(args, settings, park=False)


async def _park_or_unpark(args: argparse.Namespace, settings: Settings, *, park: bool) -> int:
    from dlqd import operator
    from dlqd.filters import parse_entry_id
    from dlqd.operator import replay as actions

    ids = [parse_entry_id(text) for text in args.ids]
    do = actions.park if park else actions.unpark
    async with operator.session(settings, f"dlqd {'park' if park else 'unpark'}") as conn:
        result = await do(conn, ids, actor=_actor(), reason=args.reason)
    if args.json:
        print_json(result.to_json())
    else:
        verb = "parked" if park else "unparked"
        print(f"{verb} {len(result.changed)}, unchanged {len(result.unchanged)}")
        for row_id in result.unchanged[:20]:
            why = "not pending" if park else "not parked by hand or by an event"
            print(f"  {row_id}: {why} (or no such row)")
    return 0 if result.changed or not ids else 1


def _interactive() -> bool:
    return sys.stdin.isatty() and sys.stderr.isatty()


def _confirm_all(total: int, as_json: bool) -> None:
    """``replay --all`` replays every pending row: only with --yes, or a yes on a terminal."""
    from dlqd.errors import UsageError

    refusal = UsageError(f"replay --all would replay every pending row ({total}): add --yes")
    if as_json or not _interactive():
        raise refusal
    answer = input(f"replay every pending row ({total}) now? [y/N] ")
    if answer.strip().lower() not in ("y", "yes"):
        raise refusal


def _progress(total: int, verb: str, as_json: bool) -> Any:
    """A progress bar on stderr (rows done, rate, time left), only on a terminal."""
    if as_json or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="rows", desc=verb, file=sys.stderr, dynamic_ncols=True)


def _actor() -> str:
    """Who acts by hand: $DLQD_ACTOR, else the login name."""
    import getpass
    import os

    if actor := os.environ.get("DLQD_ACTOR"):
        if not _is_utf8(actor):
            from dlqd.errors import UsageError

            raise UsageError("DLQD_ACTOR is not valid UTF-8")
        return actor
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


@command("purge")
async def _purge(args: argparse.Namespace, settings: Settings) -> int:
    from dlqd import operator
    from dlqd.operator.purge import purge

    async with operator.session(settings, "dlqd purge") as conn:
        deleted = await purge(conn, settings, dry_run=args.dry_run)
    if args.json:
        print_json({"deleted": deleted, "dry_run": args.dry_run})
    else:
        print(f"{'would delete' if args.dry_run else 'deleted'} {deleted} rows")
    return 0


def _console_token(args: argparse.Namespace) -> int:
    """``dlqd console token``: needs no config nor database (an administrator
    makes tokens before the console runs)."""
    import json

    from pydantic import ValidationError

    from dlqd.config import ConsoleToken
    from dlqd.console.auth import new_token

    try:
        entry = ConsoleToken(name=args.name, sha256="0" * 64, role=args.role, app_id=args.app_id)
    except ValidationError as exc:
        from dlqd.config import describe_validation_error

        print(f"dlqd: error: {describe_validation_error(exc)}", file=sys.stderr)
        return 2
    token, digest = new_token()
    if args.json:
        print_json(
            {"name": entry.name, "role": entry.role, "app_id": entry.app_id, "token": token,
             "sha256": digest}
        )  # fmt: skip
        return 0
    lines = [
        f"token for {entry.name} (shown once, kept nowhere: hand it over, keep it secret):",
        f"  {token}",
        "",
        "add to the config (the token's SHA-256, never the token):",
        "[[console.tokens]]",
        f"name = {json.dumps(entry.name)}",
        f'sha256 = "{digest}"',
        f'role = "{entry.role}"',
    ]
    if entry.app_id is not None:
        lines.append(f"app_id = {json.dumps(entry.app_id, ensure_ascii=False)}")
    print("\n".join(lines))
    return 0


def _adapters_list(args: argparse.Namespace) -> int:
    from dlqd.operator.adapters import catalog

    found = catalog()
    if args.json:
        print_json(found)
        return 0
    print_table(
        ["NAME", "TESTED", "TABLE", "OVERRIDES"],
        [
            [a["name"], ", ".join(a["versions_tested"]), a["table"],
             ", ".join(a["target"]["overrides"]) or "-"]
            for a in found
        ],
    )  # fmt: skip
    for a in found:
        print(f"\n{a['name']}: captures {a['captures']}.\n  caveat: {a['caveat']}.")
    return 0


@command("adapters")
async def _adapters(args: argparse.Namespace, settings: Settings) -> int:
    from dlqd import operator
    from dlqd.operator import adapters

    async with operator.session(settings, f"dlqd adapters {args.action}") as conn:
        if args.action == "install":
            change = await adapters.install(
                conn, args.name, schema=args.schema, app_id=args.app_id, apply=not args.print
            )
        else:
            change = await adapters.uninstall(
                conn, args.name, schema=args.schema, apply=not args.print
            )
    if args.print:
        sys.stdout.write(f"BEGIN;\n{change.script.rstrip()};\nCOMMIT;\n")
        return 0
    if args.json:
        print_json(change.as_json())
        return 0
    where = f"{change.schema}.{change.table}"
    if args.action == "install":
        again = f" (replaced: {change.previous})" if change.previous else ""
        print(
            f"{change.adapter}: capture installed on {where}{again}; replay with "
            f'target = {{ kind = "{change.adapter}" }}'
        )
    else:
        print(f"{change.adapter}: capture removed from {where}")
    return 0


@command("redrive")
async def _redrive(args: argparse.Namespace, settings: Settings) -> int:
    from dlqd import operator
    from dlqd.operator import redrive

    async with operator.session(settings, f"dlqd redrive {args.action}") as conn:
        if args.action == "start":
            from dlqd.replay.checks import check_targets

            check_targets(settings)
            started = await redrive.start(
                conn,
                settings,
                _filter(args),
                actor=_actor(),
                via=args.via,
                reason=args.reason,
                rate=args.rate,
                dry_run=args.dry_run,
            )
            if args.json:
                print_json(started.to_json())
            elif args.dry_run:
                print(f"would redrive {started.matched} rows (dead-lettered until now)")
            else:
                print(
                    f"redrive {started.id} queued: {started.matched} rows; a running `dlqd run` "
                    "takes it (`dlqd redrive list` shows its progress)"
                )
            return 0
        if args.action == "list":
            listed = await redrive.listed(conn)
            if args.json:
                print_json([r.to_json() for r in listed])
                return 0
            rows = []
            for r in listed:
                state = f"{r.state} (cancelling)" if r.cancel_requested and r.active else r.state
                rate = f"{r.rows_per_second:.1f}/s" if r.rows_per_second else "-"
                rows.append(
                    [str(r.id), state, r.matched, r.replayed, r.failed, r.skipped, r.to_do, rate,
                     r.actor, r.reason, r.created_at]
                )  # fmt: skip
            print_table(
                ["id", "state", "matched", "replayed", "failed", "skipped", "to_do", "rate",
                 "actor", "reason", "created"],
                rows,
            )  # fmt: skip
            return 0
        from uuid import UUID

        from dlqd.errors import UsageError

        try:
            redrive_id = UUID(args.id)
        except ValueError:
            raise UsageError(f"invalid id {args.id[:40]!r}: expected a UUID") from None
        cancelled = await redrive.cancel(conn, redrive_id)
        if cancelled is None:
            raise NotFound(f"no redrive with id {redrive_id}")
        if cancelled.active:
            cancelled = await redrive.settled(conn, redrive_id, within=30) or cancelled
    if args.json:
        print_json(cancelled.to_json())
    elif cancelled.active:
        print(
            f"redrive {redrive_id}: cancel asked; it stops after the chunk in flight "
            f"(replayed {cancelled.replayed} so far)"
        )
    else:
        print(
            f"redrive {redrive_id}: {cancelled.state} (replayed {cancelled.replayed}, failed "
            f"{cancelled.failed}, skipped {cancelled.skipped})"
        )
    return 0
