"""``dlqd adapters``: what each adapter captures, and installing or removing
its capture on a job system's table.

Before anything is installed the job system's schema is checked against what
the capture and the replay rely on (tables, columns and their types, status
labels, functions): a version or configuration it cannot capture from
correctly is refused with what is missing, and nothing changes. Installing
is one transaction, idempotent (the function is replaced, the trigger made
again), and stamps the function with the dlqd version that made it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dlqd import __version__
from dlqd.adapters import ADAPTERS, Adapter, app_id_expression
from dlqd.db import adapters as store
from dlqd.db.compose import (
    adapter_app_id_check,
    adapter_install,
    adapter_uninstall,
)
from dlqd.db.connector import Connection
from dlqd.errors import AdapterRefused, DatabaseError, UsageError

#: bumped when a capture function changes: a re-install replaces older ones
CAPTURE_VERSION = 1


def catalog() -> list[dict[str, Any]]:
    """Every adapter: name, versions tested, what it captures, its caveat."""
    return [
        {
            "name": a.name,
            "title": a.title,
            "versions_tested": list(a.tested),
            "table": a.table,
            "captures": a.captures,
            "caveat": a.caveat,
            "target": {"kind": a.name, "overrides": list(a.overrides)},
            "docs": a.docs,
        }
        for a in ADAPTERS.values()
    ]


def adapter_named(name: str) -> Adapter:
    try:
        return ADAPTERS[name]
    except KeyError:
        raise UsageError(f"no adapter {name!r} (adapters: {', '.join(ADAPTERS)})") from None


@dataclass(frozen=True)
class Change:
    """An install or uninstall: the script, and whether it ran."""

    adapter: str
    schema: str
    script: str
    applied: bool
    #: what the capture was before: the comment of the function installed, or None
    previous: str | None
    table: str

    def as_json(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "schema": self.schema,
            "table": self.table,
            "applied": self.applied,
            "previous": self.previous,
        }


def problems(adapter: Adapter, found: store.Inspection, schema: str) -> list[str]:
    """Why ``adapter`` cannot capture correctly from this schema (empty: it can)."""
    missing: list[str] = []
    for table, columns in adapter.columns.items():
        have = found.columns.get(table)
        if have is None:
            missing.append(f"no table {schema}.{table}")
            continue
        for column, wanted in columns.items():
            if column not in have:
                missing.append(f"{table}.{column} is missing")
            elif have[column] not in [w.strip() for w in wanted.split("|")]:
                missing.append(
                    f"{table}.{column} is {have[column]}, not {wanted.replace('|', 'or')}"
                )
    type_name, labels = adapter.statuses
    if not type_name:
        pass  # no status type: the capture reads the job's columns alone
    elif not found.statuses:
        missing.append(f"no type {schema}.{type_name}")
    else:
        missing += [
            f"{type_name} has no status {label!r}"
            for label in labels
            if label not in found.statuses
        ]
    missing += [f"no function {schema}.{f}" for f in found.missing_functions]
    return missing


async def _checked(conn: Connection, adapter: Adapter, schema: str) -> store.Inspection:
    found = await store.inspect(conn, adapter, schema)
    missing = problems(adapter, found, schema)
    if missing:
        tested = ", ".join(adapter.tested)
        raise AdapterRefused(
            f"{adapter.name}: cannot capture from schema {schema!r}: {'; '.join(missing)} "
            f"(tested with {adapter.title} {tested}, installed by its own tooling)"
        )
    return found


def _rights(
    adapter: Adapter, found: store.Inspection, schema: str, *, capture: bool = True
) -> None:
    """Refuse what this role may not do: call dlqd_capture (an install's
    function does), put a trigger on the job table (both)."""
    if capture and not found.may_capture:
        raise AdapterRefused(
            f"{adapter.name}: this role may not call dlqd_capture: install as the owner of "
            f"dlqd's schema ({found.dlqd_schema}) or a superuser"
        )
    if found.may_trigger is False:
        raise AdapterRefused(
            f"{adapter.name}: this role may not put a trigger on {schema}.{adapter.table}: "
            "install as its owner (or with TRIGGER on it)"
        )


async def install(
    conn: Connection,
    name: str,
    *,
    schema: str | None = None,
    app_id: str | None = None,
    apply: bool = True,
) -> Change:
    """Install (``apply=False``: only compose) ``name``'s capture."""
    adapter = adapter_named(name)
    schema = schema or adapter.default_schema
    text, constant = app_id_expression(app_id, adapter)
    found = await _checked(conn, adapter, schema)
    if not constant:
        try:
            await store.plan_app_id(conn, adapter_app_id_check(adapter, schema=schema, app_id=text))
        except DatabaseError as exc:
            if exc.broken:
                raise
            raise UsageError(
                f"--app-id: {exc} (an SQL expression over the job's row, named job: "
                f"job.<column> of {schema}.{adapter.table})"
            ) from None
    comment = f"dlqd {__version__}: {adapter.name} capture v{CAPTURE_VERSION}"
    script = adapter_install(
        adapter,
        schema=schema,
        dlqd_schema=found.dlqd_schema,
        app_id=text,
        constant=constant,
        comment=comment,
    )
    if apply:
        _rights(adapter, found, schema)
        await store.apply(conn, script)
    return Change(
        adapter.name, schema, script.as_string(), apply, found.installed_by, adapter.table
    )


async def uninstall(
    conn: Connection, name: str, *, schema: str | None = None, apply: bool = True
) -> Change:
    """Remove ``name``'s capture (the trigger and its function): the job
    system's schema is as it was before the install."""
    adapter = adapter_named(name)
    schema = schema or adapter.default_schema
    found = await store.inspect(conn, adapter, schema)
    script = adapter_uninstall(adapter, schema=schema, dlqd_schema=found.dlqd_schema)
    if apply:
        _rights(adapter, found, schema, capture=False)  # nothing to drop without the table
        await store.apply(conn, script)
    return Change(
        adapter.name, schema, script.as_string(), apply, found.installed_by, adapter.table
    )
