"""``dlqd migrate``: apply ``sql/NNN_name.sql`` in order, once, under an advisory lock."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import psycopg

from dlqd.db.connector import Connection, translated
from dlqd.db.queries import q, sql_dir
from dlqd.errors import MigrationError, SchemaOutdated

_FILE_RE = re.compile(r"^(\d{3})_(\w+)\.sql$")
#: the first line of a migration that runs outside a transaction, one
#: statement at a time (CREATE INDEX CONCURRENTLY cannot run inside one)
NO_TRANSACTION = "-- dlqd: no-transaction"
_CONCURRENT_INDEX = re.compile(
    r"^CREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\s+IF\s+NOT\s+EXISTS\s+(\w+)\s", re.IGNORECASE
)


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def transactional(self) -> bool:
        return not self.sql.startswith(NO_TRANSACTION)


def available_migrations(directory: Path | None = None) -> list[Migration]:
    directory = directory or sql_dir()
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_RE.match(path.name)
        if match:
            found.append(
                Migration(int(match.group(1)), match.group(2), path.read_text(encoding="utf-8"))
            )
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"{directory}: two migrations share a version number")
    return found


#: a migration's statements wait at most this long for a lock (a table in use)
MIGRATION_LOCK_TIMEOUT = "30s"
#: how often a migrate waiting for the migration lock says so
WAIT_REPORT_SECONDS = 10.0


def _holder_line(row: dict[str, Any] | None) -> str:
    if row is None:
        return "its holder has just let go"
    since = f"{row['backend_start']:%Y-%m-%d %H:%M:%S%z}"
    return (
        f"held by pid {row['pid']} (role {row['usename']}, "
        f"application {row['application_name'] or '-'!r}, connected {since})"
    )


async def _take_migration_lock(
    conn: Connection,
    wait: float,
    on_wait: Callable[[str], object] | None,
) -> None:
    """The migration lock, waited for at most ``wait`` seconds, saying who holds it.

    It is an advisory lock (the table it would guard may not exist yet), which
    any role may take: a session holding it is named, never waited on for ever.
    """
    deadline = anyio.current_time() + wait
    reported = -WAIT_REPORT_SECONDS
    while True:
        cur = await conn.execute(q("migrations_try_lock"))
        row = await cur.fetchone()
        if row is not None and row["locked"]:
            return
        cur = await conn.execute(q("migrations_lock_holder"))
        holder = _holder_line(await cur.fetchone())
        now = anyio.current_time()
        if now >= deadline:
            raise MigrationError(
                f"the migration lock is still taken after {wait:g}s, {holder}: another "
                "`dlqd migrate` may still run; otherwise end that session and migrate again"
            )
        if on_wait is not None and now - reported >= WAIT_REPORT_SECONDS:
            reported = now
            on_wait(f"waiting for the migration lock, {holder}")
        await anyio.sleep(min(0.5, max(0.0, deadline - now)))


@translated
async def migrate(
    conn: Connection,
    *,
    wait: float = 300.0,
    on_wait: Callable[[str], object] | None = None,
) -> list[Migration]:
    """Apply what is missing; return the migrations applied now (empty: a no-op).

    A session-level advisory lock serialises replicas that start at once; the
    second one waits (at most ``wait`` seconds, ``on_wait`` hearing who holds
    the lock), then finds everything applied.
    """
    if conn.autocommit is False:
        await conn.set_autocommit(True)
    await _take_migration_lock(conn, wait, on_wait)
    try:
        await conn.execute(q("migrations_create_table"))
        cur = await conn.execute(q("migrations_applied"))
        applied = {row["version"]: row for row in await cur.fetchall()}
        done: list[Migration] = []
        for migration in available_migrations():
            record = applied.get(migration.version)
            if record is not None:
                if record["checksum"] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version:03d}_{migration.name} changed after it "
                        "was applied; restore the original file and add a new migration instead"
                    )
                continue
            try:
                if migration.transactional:
                    async with conn.transaction():
                        await conn.execute(
                            q("migration_timeouts"), {"lock_timeout": MIGRATION_LOCK_TIMEOUT}
                        )
                        await conn.execute(migration.sql.encode())
                        await _record(conn, migration)
                else:
                    await _run_statements(conn, migration)
            except psycopg.Error as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                if isinstance(exc, psycopg.errors.LockNotAvailable):
                    first += (
                        f" (a table it changes stayed locked for {MIGRATION_LOCK_TIMEOUT} by "
                        "another session: see pg_locks, then migrate again)"
                    )
                elif isinstance(exc, psycopg.errors.InsufficientPrivilege):
                    first += (
                        " (migrations need the rights of the schema's owner: the role that "
                        "migrated it first, or an administrator; not the daemon's role)"
                    )
                raise MigrationError(
                    f"migration {migration.version:03d}_{migration.name} failed: {first}"
                ) from None
            done.append(migration)
        return done
    finally:
        if not conn.closed:
            await conn.execute(q("migrations_unlock"))


async def _record(conn: Connection, migration: Migration) -> None:
    await conn.execute(
        q("migrations_record"),
        {"version": migration.version, "name": migration.name, "checksum": migration.checksum},
    )


async def _run_statements(conn: Connection, migration: Migration) -> None:
    """A no-transaction migration: each statement on its own (autocommit), under
    the migration lock timeout; an index that an interrupted run left invalid
    is dropped first, so that IF NOT EXISTS builds it again. Recorded once all
    statements ran: a failed run is simply run again."""
    from dlqd.db.compose import drop_index_concurrently
    from dlqd.statements import split_statements

    await conn.execute(q("migration_session_timeouts"), {"lock_timeout": MIGRATION_LOCK_TIMEOUT})
    try:
        for statement in split_statements(migration.sql):
            if index := _CONCURRENT_INDEX.match(statement):
                cur = await conn.execute(q("index_invalid"), {"name": index.group(1)})
                row = await cur.fetchone()
                if row is not None and row["invalid"]:
                    await conn.execute(drop_index_concurrently(index.group(1)))
            await conn.execute(statement.encode())
        await _record(conn, migration)
    finally:
        await conn.execute(q("migration_session_timeouts"), {"lock_timeout": "0"})


@translated
async def missing_migrations(conn: Connection) -> list[Migration]:
    """Migrations not applied yet (all of them on a database never migrated)."""
    cur = await conn.execute(q("migrations_table_exists"))
    row = await cur.fetchone()
    applied: set[int] = set()
    if row and row["present"]:
        cur = await conn.execute(q("migrations_applied"))
        applied = {r["version"] for r in await cur.fetchall()}
    return [m for m in available_migrations() if m.version not in applied]


async def require_current_schema(conn: Connection) -> None:
    missing = await missing_migrations(conn)
    if missing:
        names = ", ".join(f"{m.version:03d}_{m.name}" for m in missing)
        raise SchemaOutdated(
            f"database schema is not up to date (missing {names}): run `dlqd migrate`"
        )
