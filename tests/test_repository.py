"""The typed repository, and keyset pagination covering every pending row once, in order."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from dlqd.db.entries import Repository
from dlqd.errors import UsageError
from dlqd.filters import PendingFilter, decode_cursor, encode_cursor
from tests.factories import INSERT_MANY, new_entry, row_json

Conn = psycopg.AsyncConnection[dict[str, Any]]


@pytest.mark.anyio
async def test_insert_get_mark_replayed(conn: Conn) -> None:
    repo = Repository(conn)
    created = await repo.insert(new_entry(payload={"nested": [1, {"a": None}]}, request_id="r1"))
    fetched = await repo.get(created.id)
    assert fetched == created
    assert fetched.pending
    assert fetched.payload == {"nested": [1, {"a": None}]}
    assert fetched.request_id == "r1"
    assert await repo.mark_replayed(created.id) is True
    assert await repo.mark_replayed(created.id) is False  # already replayed: no second time
    replayed = await repo.get(created.id)
    assert replayed is not None
    assert replayed.replayed_at is not None
    assert await repo.get(uuid.uuid4()) is None


@pytest.mark.anyio
async def test_list_pending_filters_and_skips_replayed(conn: Conn) -> None:
    repo = Repository(conn)
    a = await repo.insert(new_entry(app_id="a", type="email.send", error_reason="timeout"))
    await repo.insert(new_entry(app_id="b", type="email.send", error_reason="timeout"))
    c = await repo.insert(new_entry(app_id="a", type="sms.send", error_reason="poison"))
    done = await repo.insert(new_entry(app_id="a", type="email.send"))
    await repo.mark_replayed(done.id)

    everything = await repo.list_pending(10)
    assert len(everything.rows) == 3
    assert everything.next_cursor is None
    only_a = await repo.list_pending(10, where=PendingFilter(app_id=("a",)))
    assert [r["id"] for r in only_a.rows] == [a.id, c.id]
    poison = await repo.list_pending(
        10, where=PendingFilter(app_id=("a",), error_reason=("poison",))
    )
    assert [r["id"] for r in poison.rows] == [c.id]
    sms = await repo.list_pending(10, where=PendingFilter(type=("sms.send",)))
    assert [r["id"] for r in sms.rows] == [c.id]


def test_cursor_round_trip_and_garbage() -> None:
    at = "2026-01-02T03:04:05.678901+00:00"
    entry_id = uuid.uuid4()
    assert decode_cursor(encode_cursor(at, entry_id)) == (at, entry_id)
    for garbage in ["", "not-a-cursor", "e30", encode_cursor(at, entry_id)[:-3]]:
        with pytest.raises(UsageError, match="invalid cursor"):
            decode_cursor(garbage)


BASE = datetime(2026, 1, 1, tzinfo=UTC)


@given(
    offsets=st.lists(st.integers(min_value=0, max_value=4), min_size=0, max_size=40),
    replayed=st.sets(st.integers(min_value=0, max_value=39)),
    page_size=st.integers(min_value=1, max_value=7),
)
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
def test_pages_cover_every_pending_row_once_in_order(
    db_url: str, offsets: list[int], replayed: set[int], page_size: int
) -> None:
    """Random dlq_at with many ties: the pages partition the pending set in (dlq_at, id) order."""

    async def scenario() -> None:
        conn = await psycopg.AsyncConnection.connect(db_url, autocommit=True, row_factory=dict_row)
        try:
            await conn.execute("TRUNCATE job_dlq CASCADE")
            rows = [
                row_json(
                    original_job_id=f"j{i}",
                    id=uuid.uuid4(),
                    dlq_at=BASE + timedelta(seconds=offset),
                )
                for i, offset in enumerate(offsets)
            ]
            await conn.execute(INSERT_MANY, {"rows": Jsonb(rows)})
            done = [rows[i]["id"] for i in replayed if i < len(rows)]
            await conn.execute(
                "UPDATE job_dlq SET replayed_at = now() WHERE id = ANY(%s::uuid[])", [done]
            )
            expected = sorted(
                (
                    (datetime.fromisoformat(r["dlq_at"]), uuid.UUID(r["id"]))
                    for r in rows
                    if r["id"] not in done
                ),
            )
            repo = Repository(conn)
            seen: list[tuple[datetime, uuid.UUID]] = []
            cursor = None
            pages = 0
            while True:
                page = await repo.list_pending(page_size, cursor)
                pages += 1
                assert len(page.rows) <= page_size
                seen.extend((datetime.fromisoformat(r["dlq_at"]), r["id"]) for r in page.rows)
                cursor = page.next_cursor
                if cursor is None:
                    break
                assert len(page.rows) == page_size  # only full pages promise more
            assert seen == expected
            assert pages == max(1, -(-len(expected) // page_size))
        finally:
            await conn.close()

    anyio.run(scenario)
