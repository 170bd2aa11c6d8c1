"""dlqd's exceptions: one root, a few leaves, each with its CLI exit code.

Errors of the database come out of ``dlqd.db`` as :class:`DatabaseError` and
its leaves (psycopg's own never pass that boundary): what the layers above
decide on is whether the connection is gone (``broken``: the pass ends and
backs off) or one statement failed (its rows are isolated and retried).
"""

from __future__ import annotations

import re

_QUOTED = re.compile(r'"[^"]*"')


class DlqdError(Exception):
    """Root of every error dlqd raises on purpose. ``str()`` is one clear line."""

    exit_code = 1


class ConfigError(DlqdError, ValueError):
    """The configuration (file, environment or flags) is invalid."""

    exit_code = 78  # EX_CONFIG


class DatabaseUnavailable(DlqdError, ConnectionError):
    """The database cannot be reached (refused, timed out, auth failed)."""

    exit_code = 69  # EX_UNAVAILABLE


class UsageError(DlqdError, ValueError):
    """A command was called wrongly (bad cursor, bad id, missing target)."""

    exit_code = 2


class MigrationError(DlqdError):
    """A migration failed or an applied one was changed afterwards."""


class AdapterRefused(DlqdError):
    """A job system's schema (its version, its configuration) that an adapter
    cannot capture from correctly: nothing was installed."""


class NotFound(DlqdError, LookupError):
    """The requested row does not exist."""


class SchemaOutdated(DlqdError):
    """The database lacks migrations this release needs: run ``dlqd migrate``."""

    exit_code = 78


class DatabaseError(DlqdError):
    """A statement, or the connection it ran on, failed.

    ``broken``: the connection is gone (nothing more can run on it);
    ``sqlstate``: the server's code, when it answered.
    """

    def __init__(self, message: str, *, sqlstate: str | None = None, broken: bool = False) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.broken = broken


class ConnectionLost(DatabaseError):
    """The connection broke, the server is shutting down, or none came from the pool."""


class StatementTimeout(DatabaseError):
    """``statement_timeout`` (or a cancel) ended a statement: a target that is slow."""


class LockTimeout(StatementTimeout):
    """``lock_timeout`` ended a statement: what it needs is locked by another session."""


class PermissionDenied(DatabaseError):
    """The role lacks a grant."""


class StatementRejected(DatabaseError):
    """The server refused a statement's text (syntax, an unknown name or type)."""


def error_line(exc: BaseException) -> str:
    """The first line of an error, for logs and the replay log.

    A data error quotes the offending value (``invalid input syntax for type
    json: "..."``), which may be part of a payload: quoted text is elided.
    """
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate.startswith("22"):
        first = _QUOTED.sub('"…"', first)
    return first[:500]
