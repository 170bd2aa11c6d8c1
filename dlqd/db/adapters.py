"""What an adapter reads of a job system's schema, and the scripts that
install and remove its capture (composed by :mod:`dlqd.db.compose`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from psycopg import sql

from dlqd.adapters import Adapter
from dlqd.db.connector import Connection, required, transaction, translated
from dlqd.db.queries import q


@dataclass
class Inspection:
    """A job system's schema as an adapter's checks see it."""

    dlqd_schema: str
    may_capture: bool
    may_trigger: bool | None
    #: table -> column -> type (unqualified); a missing table has no entry
    columns: dict[str, dict[str, str]] = field(default_factory=dict)
    statuses: list[str] = field(default_factory=list)
    missing_functions: list[str] = field(default_factory=list)
    #: the installed capture's function comment, or None when not installed
    installed_by: str | None = None
    installed: bool = False


def _qualified(schema: str, name: str) -> str:
    return sql.Identifier(schema, name).as_string()


@translated
async def inspect(conn: Connection, adapter: Adapter, schema: str) -> Inspection:
    table = _qualified(schema, adapter.table)
    cur = await conn.execute(q("adapter_capture_rights"), {"table": table})
    rights = required(await cur.fetchone(), "capture rights")
    may_trigger = rights["may_trigger"]
    found = Inspection(
        str(rights["dlqd_schema"]),
        bool(rights["may_capture"]),
        None if may_trigger is None else bool(may_trigger),
    )
    for name in adapter.columns:
        cur = await conn.execute(q("adapter_columns"), {"table": _qualified(schema, name)})
        rows = await cur.fetchall()
        if rows:
            found.columns[name] = {str(r["name"]): str(r["type"]) for r in rows}
    if adapter.statuses[0]:
        cur = await conn.execute(
            q("adapter_enum_labels"), {"type": _qualified(schema, adapter.statuses[0])}
        )
        found.statuses = list(required(await cur.fetchone(), "enum labels")["labels"])
    for signature in adapter.functions:
        name, _, args = signature.partition("(")
        types = [t.strip() for t in args.rstrip(")").split(",") if t.strip()]
        qualified = ", ".join(_argument_type(schema, t) for t in types)
        cur = await conn.execute(
            q("adapter_function_found"), {"signature": f"{_qualified(schema, name)}({qualified})"}
        )
        if not required(await cur.fetchone(), "function")["found"]:
            found.missing_functions.append(signature)
    if adapter.table in found.columns:
        cur = await conn.execute(q("adapter_installed"), {"table": table})
        row = await cur.fetchone()
        if row is not None:
            found.installed = True
            found.installed_by = row["installed_by"]
    return found


#: argument types of the system's functions that are PostgreSQL's own
_BUILTIN_TYPES = {"boolean", "integer", "text", "bigint", "jsonb", "json"}


def _argument_type(schema: str, name: str) -> str:
    array = name.endswith("[]")
    base = name.removesuffix("[]")
    text = base if base in _BUILTIN_TYPES else _qualified(schema, base)
    return text + ("[]" if array else "")


@translated
async def plan_app_id(conn: Connection, check: sql.Composed) -> None:
    """Plan an ``--app-id`` expression over the job's row (raises when it is not one)."""
    async with transaction(conn, force_rollback=True):
        await conn.execute(check)


@translated
async def apply(conn: Connection, script: sql.Composed) -> None:
    """Run an install or uninstall script, all of it or nothing."""
    async with transaction(conn):
        await conn.execute(script)
