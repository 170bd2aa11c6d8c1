"""dlqd's exceptions: one root, a few leaves, each with its CLI exit code."""

from __future__ import annotations


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


class NotFound(DlqdError, LookupError):
    """The requested row does not exist."""


class SchemaOutdated(DlqdError):
    """The database lacks migrations this release needs: run ``dlqd migrate``."""

    exit_code = 78
