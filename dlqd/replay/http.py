"""The ``http`` target: POST each row as JSON, with ``Idempotency-Key: <id>``.

A call cannot share the database transaction, so delivery is *at least once*:
the claiming transaction leases the rows (their schedule says "due again after
the calls could have ended"), the calls run after it committed, and a second
short transaction marks what a 2xx acknowledged. A crash between a 2xx and the
mark means the same request, with the same key, is sent again once the lease
has run out: receivers deduplicate on the key.

Bodies are rendered by Postgres (every column, ``payload`` as an object) and
fetched one request at a time, so the daemon holds at most ``max_in_flight``
bodies per target. 2xx replays; 5xx, 408, 429, timeouts and connection errors
are failed attempts (retried after ``retry_delay``, or after ``Retry-After``
when the server says); any other 4xx parks the row (``http_4xx``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import anyio
import httpx
import psycopg

from dlqd.config import HttpTarget
from dlqd.errors import ConfigError
from dlqd.queries import q

Connection = psycopg.AsyncConnection[dict[str, Any]]
RETRYABLE_STATUS = frozenset({408, 429})
#: a lease outlives the calls it covers by this much
LEASE_MARGIN_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Delivery:
    """The outcome of one request."""

    status: int | None  # None: no response (timeout, connection error)
    error: str | None = None  # None: acknowledged (2xx)
    retry_after: float | None = None

    @property
    def acknowledged(self) -> bool:
        return self.error is None

    @property
    def rejected(self) -> bool:
        """A 4xx the receiver will refuse again: park, do not retry."""
        return (
            self.status is not None
            and 400 <= self.status < 500
            and self.status not in RETRYABLE_STATUS
        )


def resolved_headers(target: HttpTarget) -> dict[str, str]:
    """The target's headers, ``env:NAME`` values read from the environment."""
    headers: dict[str, str] = {}
    for name, value in target.headers.items():
        if not value.startswith("env:"):
            headers[name] = value
            continue
        variable = value[len("env:") :]
        if variable not in os.environ:
            raise ConfigError(
                f"invalid configuration: http target header {name}: "
                f"environment variable {variable} is not set"
            )
        headers[name] = os.environ[variable]
    return headers


def lease_seconds(target: HttpTarget, rows: int) -> float:
    """How long the calls for ``rows`` rows can take, queued behind max_in_flight."""
    rounds = -(-rows // target.max_in_flight)
    return rounds * target.timeout.total_seconds() + LEASE_MARGIN_SECONDS


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


async def deliver_all(
    deliverer: HttpDeliverer, conn: Connection, items: Sequence[Any]
) -> dict[Any, Delivery]:
    """Deliver ``items`` (each with ``.target`` and ``.row.id``), grouped by target."""
    groups: dict[str, list[Any]] = {}
    for item in items:
        groups.setdefault(item.target.model_dump_json(), []).append(item)
    deliveries: dict[Any, Delivery] = {}
    for group in groups.values():
        ids = [item.row.id for item in group]
        deliveries.update(await deliverer.deliver(conn, group[0].target, ids))
    return deliveries


class HttpDeliverer:
    """One client (connection pool and concurrency cap) per target."""

    def __init__(self) -> None:
        self._clients: dict[str, tuple[httpx.AsyncClient, anyio.Semaphore]] = {}

    def _client(self, target: HttpTarget) -> tuple[httpx.AsyncClient, anyio.Semaphore]:
        key = target.model_dump_json()
        found = self._clients.get(key)
        if found is None:
            client = httpx.AsyncClient(
                timeout=target.timeout.total_seconds(),
                verify=target.tls_verify,
                limits=httpx.Limits(max_connections=target.max_in_flight),
                follow_redirects=False,
                headers=resolved_headers(target),
            )
            found = self._clients[key] = (client, anyio.Semaphore(target.max_in_flight))
        return found

    async def deliver(
        self, conn: Connection, target: HttpTarget, ids: Sequence[Any]
    ) -> dict[Any, Delivery]:
        """POST each row; bodies fetched one at a time through ``conn``."""
        client, slots = self._client(target)
        results: dict[Any, Delivery] = {}
        lock = anyio.Lock()  # one connection: one query at a time

        async def one(row_id: Any) -> None:
            async with slots:
                async with lock:
                    cur = await conn.execute(q("http_body"), {"id": row_id})
                    row = await cur.fetchone()
                if row is None:
                    return  # purged meanwhile: nothing to deliver
                results[row_id] = await self._post(client, target, row_id, row["body"])

        async with anyio.create_task_group() as tg:
            for row_id in ids:
                tg.start_soon(one, row_id)
        return results

    @staticmethod
    async def _post(
        client: httpx.AsyncClient, target: HttpTarget, row_id: Any, body: str
    ) -> Delivery:
        try:
            response = await client.post(
                target.url,
                content=body.encode(),
                headers={"Content-Type": "application/json", "Idempotency-Key": str(row_id)},
            )
        except httpx.TimeoutException:
            return Delivery(None, f"HTTP timeout after {target.timeout.total_seconds():g}s")
        except httpx.HTTPError as exc:
            return Delivery(None, f"HTTP error: {type(exc).__name__}")
        status = response.status_code
        if 200 <= status < 300:
            return Delivery(status)
        return Delivery(status, f"HTTP {status}", _retry_after(response))

    async def aclose(self) -> None:
        for client, _ in self._clients.values():
            await client.aclose()
        self._clients.clear()
