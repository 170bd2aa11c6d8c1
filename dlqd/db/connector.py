"""The connection boundary: every psycopg connection, pool, transaction and
error goes through here.

Connection failures become :class:`DatabaseUnavailable` with one line that
names the server but never the password. Errors of statements become dlqd's
own (:func:`translate`): :class:`ConnectionLost` when the connection is gone,
:class:`StatementTimeout` / :class:`LockTimeout`, :class:`PermissionDenied`,
:class:`StatementRejected`, else :class:`DatabaseError`; each knows whether the
connection still works (``broken``). The stores of this package translate
every call; :func:`transaction`, :func:`savepoint` and :func:`pooled` translate
what happens at their edges (a COMMIT that fails, a pool that has no
connection to give).
"""

from __future__ import annotations

import functools
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, ParamSpec, TypeVar

import anyio
import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from dlqd.db.queries import q
from dlqd.errors import (
    ConfigError,
    ConnectionLost,
    DatabaseError,
    DatabaseUnavailable,
    LockTimeout,
    PermissionDenied,
    StatementRejected,
    StatementTimeout,
    error_line,
)

#: the one connection type of dlqd: rows as dicts
Connection = psycopg.AsyncConnection[dict[str, Any]]
Pool = AsyncConnectionPool[Any]

CONNECT_TIMEOUT_SECONDS = 5


def describe_dsn(dsn: str) -> str:
    """``host:port/dbname`` for messages; never the user's password."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<invalid connection string>"
    host = str(params.get("host") or "localhost")
    port = str(params.get("port") or "5432")
    dbname = str(params.get("dbname") or params.get("user") or "")
    return f"{host}:{port}/{dbname}"


def password_of(dsn: str) -> str | None:
    """The password a connection string carries, if any (to keep it out of output)."""
    try:
        value = conninfo_to_dict(dsn).get("password")
    except psycopg.ProgrammingError:
        return None
    return str(value) if value else None


def scrub(message: str, dsn: str) -> str:
    """Remove the DSN and its password from ``message``, wherever they appear."""
    password = password_of(dsn)
    message = message.replace(dsn, describe_dsn(dsn))
    if password:
        message = message.replace(password, "***")
    return message


def _first_line(exc: BaseException) -> str:
    """The reason of a libpq connection error, e.g. ``Connection refused``."""
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # libpq writes 'connection to server at "h", port p failed: <reason>' per
    # address tried, then hints; the last such reason is the one that counts.
    reasons = [line.rsplit(" failed: ", 1)[1] for line in lines if " failed: " in line]
    if reasons:
        return reasons[-1]
    return lines[0] if lines else exc.__class__.__name__


# libpq options whose values must be whole numbers (checked here so that a
# typo is a config error at once, not a connection failure after a timeout)
_INT_OPTIONS = (
    "connect_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
)
_SSLMODES = {"disable", "allow", "prefer", "require", "verify-ca", "verify-full"}


def dsn_problem(dsn: str) -> str | None:
    """Why libpq would refuse this connection string, without echoing it; None if fine."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "is not a valid PostgreSQL connection string"
    for key in _INT_OPTIONS:
        value = params.get(key)
        if value is not None and not str(value).strip().lstrip("-").isdigit():
            return f"option {key} must be a whole number"
    port = params.get("port")
    if port is not None:
        for part in str(port).split(","):
            if part.strip() and not (part.strip().isdigit() and 0 < int(part) < 65536):
                return "option port must be a number from 1 to 65535"
    sslmode = params.get("sslmode")
    if sslmode is not None and str(sslmode) not in _SSLMODES:
        return "option sslmode must be one of " + ", ".join(sorted(_SSLMODES))
    return None


def check_dsn(dsn: str) -> None:
    try:
        conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        raise ConfigError("database_url: is not a valid PostgreSQL connection string") from None


async def connect(
    dsn: str, *, autocommit: bool = False, application_name: str = "dlqd", **params: Any
) -> psycopg.AsyncConnection[dict[str, object]]:
    """Open a connection returning rows as dicts; raise DatabaseUnavailable on failure.

    No prepared statements unless asked for (``prepare_threshold``): a
    one-off connection gains little from them, and a pooler may not keep them."""
    check_dsn(dsn)
    params.setdefault("prepare_threshold", None)
    try:
        return await psycopg.AsyncConnection.connect(
            dsn,
            autocommit=autocommit,
            row_factory=dict_row,
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
            application_name=application_name,
            **params,
        )
    except psycopg.OperationalError as exc:
        reason = scrub(_first_line(exc), dsn)
        raise DatabaseUnavailable(
            f"database unreachable at {describe_dsn(dsn)}: {reason}"
        ) from None


@asynccontextmanager
async def connection(
    dsn: str, *, autocommit: bool = False, application_name: str = "dlqd"
) -> AsyncIterator[psycopg.AsyncConnection[dict[str, object]]]:
    conn = await connect(dsn, autocommit=autocommit, application_name=application_name)
    try:
        yield conn
    finally:
        await conn.close()


def translate(exc: BaseException, conn: Connection | None = None) -> DatabaseError:
    """psycopg's error (or the pool's) as dlqd's own, with one line that elides
    quoted values of data errors (they may be a tenant's payload)."""
    if isinstance(exc, DatabaseError):
        return exc
    line = error_line(exc)
    broken = conn is not None and conn.broken
    if isinstance(exc, PoolTimeout):
        return ConnectionLost(f"no database connection available: {line}", broken=True)
    sqlstate = getattr(exc, "sqlstate", None)
    kind: type[DatabaseError] = DatabaseError
    if broken or isinstance(
        exc,
        psycopg.errors.AdminShutdown
        | psycopg.errors.CrashShutdown
        | psycopg.errors.CannotConnectNow
        | psycopg.errors.ConnectionException,
    ):
        kind, broken = ConnectionLost, True
    elif isinstance(exc, psycopg.errors.LockNotAvailable):
        kind = LockTimeout
    elif isinstance(exc, psycopg.errors.QueryCanceled):
        kind = StatementTimeout
    elif isinstance(exc, psycopg.errors.InsufficientPrivilege):
        kind = PermissionDenied
    elif sqlstate is not None and sqlstate.startswith("42"):
        kind = StatementRejected  # syntax, or an undefined table, column or function
    elif isinstance(exc, psycopg.OperationalError) and sqlstate is None:
        kind, broken = ConnectionLost, True  # no answer from the server at all
    return kind(line, sqlstate=sqlstate, broken=broken)


P = ParamSpec("P")
R = TypeVar("R")


def translated(call: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """A store function whose psycopg errors leave as dlqd's (its first
    argument is the connection)."""

    @functools.wraps(call)
    async def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await call(*args, **kwargs)
        except (psycopg.Error, PoolTimeout) as exc:
            conn = args[0] if args and isinstance(args[0], psycopg.AsyncConnection) else None
            raise translate(exc, conn) from exc

    return run


@asynccontextmanager
async def transaction(conn: Connection, *, force_rollback: bool = False) -> AsyncIterator[None]:
    """A transaction (a savepoint inside one); errors, at COMMIT too, as dlqd's."""
    try:
        async with conn.transaction(force_rollback=force_rollback):
            yield
    except psycopg.Error as exc:
        raise translate(exc, conn) from exc


savepoint = transaction  # inside a transaction, conn.transaction() is a savepoint


@asynccontextmanager
async def pooled(pool: Pool, wait: float | None = None) -> AsyncIterator[Connection]:
    """A connection of the pool; no connection in time, or a broken one, as dlqd's."""
    try:
        async with pool.connection(timeout=wait) as conn:
            try:
                yield conn
            except psycopg.Error as exc:
                raise translate(exc, conn) from exc
    except (psycopg.Error, PoolTimeout) as exc:
        raise translate(exc) from exc


class HeldConnection:
    """One connection of ``pool`` kept by its one user (a replay worker) from
    one use to the next, rather than taken from the pool and given back each
    time: a trickle runs a pass per row, and the pool's checkout and return
    were a tenth of its CPU.

    The pool's own care is kept: a connection unused for ``check_after``
    seconds is checked as the pool checks it (``SELECT 1``) before it is used
    again, one that broke, or that a use left in a transaction, goes back to
    the pool (which discards or rolls it back), and so does one kept for
    ``keep_for`` seconds (the pool then replaces it once it is past its
    lifetime). Held, it counts against the pool's size as in use, as it is
    during each use.
    """

    def __init__(self, pool: Pool, *, check_after: float = 1.0, keep_for: float = 300.0) -> None:
        self.pool = pool
        self.check_after = check_after
        self.keep_for = keep_for
        self._conn: Connection | None = None
        self._taken = 0.0  # when it was taken from the pool
        self._used = 0.0  # when its last use ended

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """The held connection (taken from the pool first when none is);
        errors as dlqd's. A use that fails gives the connection back."""
        conn = await self._take()
        try:
            yield conn
        except BaseException as exc:
            await self._give_back(conn)
            if isinstance(exc, psycopg.Error):
                raise translate(exc, conn) from exc
            raise
        if conn.broken or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            await self._give_back(conn)
        else:
            self._conn, self._used = conn, time.monotonic()

    async def release(self) -> None:
        """Give the held connection back to the pool (the user stops)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._give_back(conn)

    async def _give_back(self, conn: Connection) -> None:
        with anyio.CancelScope(shield=True):  # a cancelled pass gives it back too
            await self.pool.putconn(conn)

    async def _take(self) -> Connection:
        conn, self._conn = self._conn, None
        now = time.monotonic()
        if conn is not None and now - self._taken >= self.keep_for:
            await self._give_back(conn)
            conn = None
        if conn is not None and now - self._used >= self.check_after:
            try:
                await AsyncConnectionPool.check_connection(conn)
            except psycopg.Error:
                await self._give_back(conn)  # broken: the pool discards it
                conn = None
        if conn is None:
            try:
                conn = await self.pool.getconn()
            except (psycopg.Error, PoolTimeout) as exc:
                raise translate(exc) from exc
            self._taken = now
        return conn


def required(row: dict[str, Any] | None, what: str) -> dict[str, Any]:
    """The row a statement always returns (INSERT … RETURNING, a SELECT of
    functions); its absence is the server's failure, said as dlqd's."""
    if row is None:
        raise DatabaseError(f"{what}: the server returned no row")
    return row


def open_pool(dsn: str, size: int, *, prepare: bool, name: str = "dlqd") -> Pool:
    """The daemon's fixed-size pool (not opened yet): autocommit connections,
    rows as dicts, statements prepared on the server from their first run
    unless ``prepare`` is false (a pooler that cannot keep them)."""
    checkout = RecentUseCheck()
    return AsyncConnectionPool(
        dsn,
        min_size=size,
        max_size=size,
        kwargs={
            "autocommit": True,
            "row_factory": dict_row,
            "application_name": name,
            "prepare_threshold": 0 if prepare else None,
        },
        check=checkout.check,
        reset=checkout.reset,
        open=False,
        name=name,
    )


class RecentUseCheck:
    """The pool's check on checkout, without a round trip on the hot path.

    ``psycopg_pool``'s own check runs ``SELECT 1`` on every checkout: one round
    trip per replayer pass. A connection that came back to the pool healthy
    within ``fresh`` seconds is handed out unchecked (if it broke meanwhile,
    the pass fails, the pool discards it on return, and the next pass backs
    off and gets a new one); older ones are checked as before.
    """

    def __init__(self, fresh: float = 1.0) -> None:
        self.fresh = fresh
        self._returned: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], float] = (
            weakref.WeakKeyDictionary()
        )

    async def reset(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Called by the pool when a connection comes back (in the idle state)."""
        self._returned[conn] = time.monotonic()

    async def check(self, conn: psycopg.AsyncConnection[Any]) -> None:
        returned = self._returned.get(conn)
        if returned is not None and time.monotonic() - returned < self.fresh and not conn.broken:
            return
        await AsyncConnectionPool.check_connection(conn)


@translated
async def pooler_drops_prepared_statements(conn: Connection) -> bool:
    """Whether ``conn`` goes through a connection pooler that hands the server
    our own prepared statement names (PgBouncer before 1.21, or with
    ``max_prepared_statements = 0``): in transaction mode the next transaction
    may land on a server connection where the name is missing, or means
    another statement.

    A pooler answers the connection with its own cancel key, so the backend
    pid the client was told differs from the server's; one that keeps
    prepared statements itself (PgBouncer 1.21+) renames them on the server.
    """
    async with conn.transaction():
        cur = await conn.execute(q("backend_pid"))
        row = await cur.fetchone()
        if row is None or row["pid"] == conn.info.backend_pid:
            return False  # a direct connection
        threshold = conn.prepare_threshold
        conn.prepare_threshold = 0  # None would refuse even a forced prepare
        try:
            await conn.execute(q("pooler_probe"), prepare=True)
        finally:
            conn.prepare_threshold = threshold
        cur = await conn.execute(q("pooler_probe_prepared"), {"probe": q("pooler_probe")})
        row = await cur.fetchone()
    return bool(row and row["ours"])
