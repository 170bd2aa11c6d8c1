"""The ``http`` target: POST each row as JSON, with ``Idempotency-Key: <id>``.

A call cannot share the database transaction, so delivery is *at least once*:
the claiming transaction leases the rows (their schedule says "due again after
the calls could have ended"), the calls run after it committed, and a second
short transaction marks what a 2xx acknowledged. A crash between a 2xx and the
mark means the same request, with the same key, is sent again once the lease
has run out: receivers deduplicate on the key.

Bodies are rendered by Postgres (every column, ``payload`` as an object) and
fetched one request at a time; the bodies a process holds at once are capped
in bytes (``BODY_BYTES_IN_FLIGHT``; a bigger one goes alone). A request has a
total deadline (``timeout``, however slowly the server answers) and at most
``MAX_RESPONSE_BYTES`` of an answer are read. 2xx replays; 5xx, 408, 429,
timeouts and connection errors are failed attempts (retried after
``retry_delay``, or after ``Retry-After`` when the server says, clamped to
what a policy allows); any other 4xx parks the row (``http_4xx``). URLs are
shown with their credentials and query values redacted.
"""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

import anyio
import httpx

from dlqd.config import HttpTarget
from dlqd.db import replays
from dlqd.db.connector import Connection
from dlqd.errors import ConfigError

RETRYABLE_STATUS = frozenset({408, 429})
#: a lease outlives the calls it covers by this much
LEASE_MARGIN_SECONDS = 5.0
#: bytes of an answer read at most (its status and headers are all that count)
MAX_RESPONSE_BYTES = 64 * 1024
#: request bodies held at once by a process, in bytes (a bigger one goes alone)
BODY_BYTES_IN_FLIGHT = 64 * 1024**2
#: the longest Retry-After honoured (a policy's max_delay caps it further)
MAX_RETRY_AFTER_SECONDS = 7 * 86400.0


def redact_url(url: str) -> str:
    """``url`` for logs and messages: credentials and query values replaced."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        return "<invalid url>"
    if ":" in host:
        host = f"[{host}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    if parts.username is not None or parts.password is not None:
        netloc = f"***@{netloc}"
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    query = "&".join(f"{quote(k, safe='')}=***" for k, _ in pairs)
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


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


def retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds a ``Retry-After`` value asks for: a number or an HTTP date, clamped
    to ``[0, MAX_RETRY_AFTER_SECONDS]``; None for anything else (``inf``, garbage)."""
    if not value or len(value) > 64:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, OverflowError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if not math.isfinite(seconds):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER_SECONDS)


class ByteBudget:
    """At most ``capacity`` bytes held at once; a request for more than the
    capacity waits until nothing else is held, then goes alone."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._changed = anyio.Condition()

    @asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        size = max(1, min(size, self.capacity))
        async with self._changed:
            while self.used + size > self.capacity:
                await self._changed.wait()
            self.used += size
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                async with self._changed:
                    self.used -= size
                    self._changed.notify_all()


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
    """One client (connection pool and concurrency cap) per target; one budget
    for the request bodies held at once, whatever the target."""

    def __init__(self, body_bytes: int = BODY_BYTES_IN_FLIGHT) -> None:
        self._clients: dict[str, tuple[httpx.AsyncClient, anyio.Semaphore]] = {}
        self.bodies = ByteBudget(body_bytes)

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
                    size = await replays.http_body_size(conn, row_id)
                if size is None:
                    return  # purged meanwhile: nothing to deliver
                async with self.bodies.hold(size):
                    async with lock:
                        body = await replays.http_body(conn, row_id)
                    if body is None:
                        return
                    results[row_id] = await self._post(client, target, row_id, body)

        async with anyio.create_task_group() as tg:
            for row_id in ids:
                tg.start_soon(one, row_id)
        return results

    @staticmethod
    async def _post(
        client: httpx.AsyncClient, target: HttpTarget, row_id: Any, body: bytes
    ) -> Delivery:
        """One request under a total deadline: the status counts, at most
        MAX_RESPONSE_BYTES of the answer are read, then the connection is let go."""
        timeout = target.timeout.total_seconds()
        status: int | None = None
        wait: str | None = None
        error: str | None = None
        with anyio.move_on_after(timeout):
            try:
                async with client.stream(
                    "POST",
                    target.url,
                    content=body,
                    headers={"Content-Type": "application/json", "Idempotency-Key": str(row_id)},
                ) as response:
                    status = response.status_code
                    wait = response.headers.get("retry-after")
                    read = 0
                    async for chunk in response.aiter_raw():
                        read += len(chunk)
                        if read >= MAX_RESPONSE_BYTES:
                            break
            except httpx.TimeoutException:
                error = f"HTTP timeout after {timeout:g}s"
            except httpx.HTTPError as exc:
                error = f"HTTP error: {type(exc).__name__}"
        if status is None:
            return Delivery(None, error or f"HTTP timeout after {timeout:g}s")
        if 200 <= status < 300:
            return Delivery(status)
        return Delivery(status, f"HTTP {status}", retry_after(wait))

    async def aclose(self) -> None:
        for client, _ in self._clients.values():
            await client.aclose()
        self._clients.clear()
