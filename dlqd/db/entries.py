"""Reading and writing ``job_dlq`` rows for operators: the typed repository
(DESIGN section 2), the documents ``show`` and ``list`` print, status, and
parking by hand.

Rows for operators are rendered by Postgres (``document``: the row as JSON
text): the daemon never decodes a payload, nor a timestamp Python cannot hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal
from uuid import UUID

from psycopg.types.json import Jsonb

from dlqd.db.connector import Connection, translated
from dlqd.db.queries import q
from dlqd.errors import DatabaseError, UsageError
from dlqd.filters import PendingFilter, decode_cursor, encode_cursor
from dlqd.models import DlqEntry, NewEntry

Row = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Page:
    """One page of pending rows, each rendered by Postgres as JSON text."""

    rows: list[Row]
    next_cursor: str | None


class Repository:
    """Typed calls over one connection; the caller owns the transaction."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    async def get(self, entry_id: UUID) -> DlqEntry | None:
        row = await _one(self.conn, "get_entry", {"id": entry_id})
        return DlqEntry.model_validate(row) if row else None

    async def insert(self, entry: NewEntry) -> DlqEntry:
        params = entry.model_dump()
        params["payload"] = Jsonb(entry.payload)
        params["error_history"] = Jsonb(entry.error_history)
        row = await _one(self.conn, "insert_entry", params)
        return DlqEntry.model_validate(row)  # INSERT ... RETURNING always returns the row

    async def mark_replayed(self, entry_id: UUID) -> bool:
        """Set ``replayed_at``; False when the row is gone or was replayed already."""
        return await _one(self.conn, "mark_replayed", {"id": entry_id}) is not None

    async def list_pending(
        self,
        limit: int,
        cursor: str | None = None,
        where: PendingFilter | None = None,
        *,
        documents: bool = True,
        redact: Sequence[str] | None = None,
    ) -> Page:
        """One page of pending rows in (dlq_at, id) order, never by OFFSET.

        ``documents``: each row also as JSON text (every column, the payload
        included, keys matching ``redact`` masked in Postgres); without, only
        what a table of rows shows.
        """
        if limit < 1:
            raise UsageError("limit must be at least 1")
        after = decode_cursor(cursor) if cursor else (None, None)
        # one extra row tells whether another page exists
        params = list_params(where, after, limit + 1, documents=documents, redact=redact)
        try:
            rows = await _all(self.conn, _selected("list", where), params)
        except DatabaseError as exc:
            if exc.sqlstate is not None and exc.sqlstate.startswith("22"):
                # a cursor that decodes but whose timestamp Postgres does not accept
                raise UsageError(
                    "invalid cursor: pass the next_cursor printed by a previous page"
                ) from None
            raise
        page = rows[:limit]
        next_cursor = None
        if len(rows) > limit:
            next_cursor = encode_cursor(page[-1]["dlq_at"], page[-1]["id"])
        return Page(rows=page, next_cursor=next_cursor)


def _selected(verb: Literal["list", "count"], where: PendingFilter | None) -> str:
    """The query for ``where``'s rows: a filter of parked rows alone reads the
    parked schedule rows in order (migration 018), any other the pending rows."""
    parked = where is not None and set(where.state) == {"parked"}
    return f"{verb}_{'parked' if parked else 'pending'}"


def list_params(
    where: PendingFilter | None,
    after: tuple[str | None, UUID | None],
    limit: int,
    *,
    until: str | None = None,
    documents: bool = False,
    redact: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The parameters of ``list_pending``: a filter, a keyset position, a bound."""
    return {
        "after_dlq_at": after[0],
        "after_id": after[1],
        "until": until,
        **(where or PendingFilter()).params(),
        "documents": documents,
        "redact": list(redact) if redact else None,
        "limit": limit,
    }


@translated
async def _one(conn: Connection, name: str, params: dict[str, Any] | None = None) -> Row | None:
    cur = await conn.execute(q(name), params)
    return await cur.fetchone()


@translated
async def _all(conn: Connection, name: str, params: dict[str, Any] | None = None) -> list[Row]:
    cur = await conn.execute(q(name), params)
    return await cur.fetchall()


async def document(
    conn: Connection, entry_id: UUID, redact: Sequence[str] | None = None, *, pretty: bool = False
) -> Row | None:
    """One row rendered for ``show``: ``document`` (JSON text) and columns as
    text; keys matching ``redact`` masked in Postgres, in both; ``pretty``:
    the payload and error history indented too (by Postgres)."""
    params = {"id": entry_id, "redact": list(redact) if redact else None, "pretty": pretty}
    return await _one(conn, "entry_document", params)


async def errors(
    conn: Connection, entry_id: UUID, redact: Sequence[str] | None = None
) -> list[Row]:
    """The row's error history for a timeline: newest first, at most 50 entries."""
    params = {"id": entry_id, "redact": list(redact) if redact else None}
    return await _all(conn, "entry_errors", params)


async def history(conn: Connection, entry_id: UUID) -> list[Row]:
    """The row's replay log, oldest first."""
    return await _all(conn, "replay_history", {"id": entry_id})


async def narrow(conn: Connection, entry_id: UUID) -> Row | None:
    """One row as a policy sees it, with its recorded state (``explain``)."""
    return await _one(conn, "entry_narrow", {"id": entry_id})


async def pending_ids(
    conn: Connection,
    where: PendingFilter,
    after: tuple[str | None, UUID | None],
    limit: int,
    until: str | None = None,
) -> list[Row]:
    """A keyset page of the pending rows a filter selects (``until``: dead-lettered
    by then): each with its ``id`` and ``dlq_at`` (text), no document."""
    return await _all(conn, _selected("list", where), list_params(where, after, limit, until=until))


async def count_pending(
    conn: Connection, where: PendingFilter, cap: int | None = None, until: str | None = None
) -> int:
    """The pending rows a filter selects, counted up to ``cap`` (None: all)."""
    params = list_params(where, (None, None), 0, until=until)
    row = await _one(conn, _selected("count", where), {**params, "cap": cap})
    return int(row["n"]) if row else 0


async def status_groups(conn: Connection) -> list[Row]:
    return await _all(conn, "status_groups")


async def status_held(conn: Connection) -> list[Row]:
    return await _all(conn, "status_held")


async def park(
    conn: Connection,
    ids: Sequence[UUID],
    actor: str | None,
    reason: str | None,
    app_id: str | None = None,
) -> list[UUID]:
    """Park pending rows by hand (sticky, like a park by event), logged; the ids
    parked (``app_id``: that tenant's rows only)."""
    params = {"ids": list(ids), "actor": actor, "reason": reason, "app_id": app_id}
    return [row["id"] for row in await _all(conn, "park_entries", params)]


async def unpark(
    conn: Connection,
    ids: Sequence[UUID],
    actor: str | None,
    reason: str | None,
    app_id: str | None = None,
) -> list[UUID]:
    """Unpark rows (parked by hand or by an event): their schedule row goes, and
    they are decided again as new rows; logged. The ids unparked (``app_id``:
    that tenant's rows only)."""
    params = {"ids": list(ids), "actor": actor, "reason": reason, "app_id": app_id}
    return [row["id"] for row in await _all(conn, "unpark_entries", params)]


async def visible(conn: Connection, ids: Sequence[UUID]) -> list[UUID]:
    """Of ``ids``, those of rows this connection can read, in the order given."""
    rows = await _all(conn, "visible_entries", {"ids": list(ids)})
    found = {row["id"] for row in rows}
    return [i for i in ids if i in found]
