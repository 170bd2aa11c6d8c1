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


@given(
    offsets=st.lists(st.integers(min_value=0, max_value=4), min_size=0, max_size=40),
    parked=st.dictionaries(
        st.integers(min_value=0, max_value=39), st.sampled_from(["parked", "parked_policy"])
    ),
    replayed=st.sets(st.integers(min_value=0, max_value=39)),
    page_size=st.integers(min_value=1, max_value=7),
)
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
def test_parked_pages_read_the_parked_rows_alone_in_the_same_order(
    db_url: str, offsets: list[int], parked: dict[int, str], replayed: set[int], page_size: int
) -> None:
    """`--state parked` reads the parked schedule rows in (dlq_at, id) order
    (migration 018): the same rows, pages and cursors as the walk of the whole
    pending set that any other filter takes; a filter more is applied too."""

    async def scenario() -> None:
        conn = await psycopg.AsyncConnection.connect(db_url, autocommit=True, row_factory=dict_row)
        try:
            await conn.execute("TRUNCATE job_dlq CASCADE")
            rows = [
                row_json(
                    original_job_id=f"j{i}",
                    id=uuid.uuid4(),
                    app_id=f"app-{i % 2}",
                    dlq_at=BASE + timedelta(seconds=offset),
                )
                for i, offset in enumerate(offsets)
            ]
            await conn.execute(INSERT_MANY, {"rows": Jsonb(rows)})
            for i, state in parked.items():
                if i < len(rows):  # as the daemon parks them: dlq_at copied by the trigger
                    await conn.execute(
                        """INSERT INTO dlqd_entry_state (dlq_id, state, policy, fingerprint,
                                                         parked_reason)
                           VALUES (%s, %s, 'p', 'f', %s)""",
                        [rows[i]["id"], state, "manual" if state == "parked" else None],
                    )
            done = [rows[i]["id"] for i in replayed if i < len(rows)]
            await conn.execute(
                "UPDATE job_dlq SET replayed_at = now() WHERE id = ANY(%s::uuid[])", [done]
            )
            expected = sorted(
                (datetime.fromisoformat(r["dlq_at"]), uuid.UUID(r["id"]))
                for i, r in enumerate(rows)
                if i in parked and r["id"] not in done
            )
            app_of = {uuid.UUID(r["id"]): r["app_id"] for r in rows}
            repo = Repository(conn)
            for where, wanted in (
                (PendingFilter(state=("parked",)), expected),
                (
                    PendingFilter(state=("parked",), app_id=("app-1",)),
                    [e for e in expected if app_of[e[1]] == "app-1"],
                ),
            ):
                seen: list[tuple[datetime, uuid.UUID]] = []
                cursor = None
                while True:
                    page = await repo.list_pending(page_size, cursor, where)
                    seen.extend((datetime.fromisoformat(r["dlq_at"]), r["id"]) for r in page.rows)
                    assert all(r["state"] == "parked" for r in page.rows)
                    cursor = page.next_cursor
                    if cursor is None:
                        break
                    assert len(page.rows) == page_size
                assert seen == wanted
        finally:
            await conn.close()

    anyio.run(scenario)


@pytest.mark.anyio
async def test_a_parked_page_is_a_range_scan_of_the_parked_rows(conn: Conn) -> None:
    """The parked rows' own index, in page order: no walk of the pending set."""
    from dlqd.db.entries import list_params
    from dlqd.db.queries import q

    params = list_params(PendingFilter(state=("parked",)), (None, None), 51)
    async with conn.transaction(force_rollback=True):
        # on a table this small any plan is cheap: rule out the scans that read
        # every row, so that what is checked is that the index serves the order
        await conn.execute("SET LOCAL enable_seqscan = off")
        await conn.execute("SET LOCAL enable_bitmapscan = off")
        await conn.execute("SET LOCAL enable_sort = off")
        cur = await conn.execute(b"EXPLAIN " + q("list_parked").encode(), params)
        plan = "\n".join(r["QUERY PLAN"] for r in await cur.fetchall())
    assert "dlqd_entry_state_parked_at_idx" in plan
    assert "job_dlq_pending_dlq_at_id_idx" not in plan  # the pending walk's index
