"""dlqd's HTTP side: a Starlette application served by hypercorn inside the
daemon's task group.

Routes: ``/metrics`` (prometheus-client's exposition: OpenMetrics when the
scraper asks for it, gzip when it accepts it), ``/healthz`` and ``/readyz``.
The console (``dlqd.console``) is an application of its own, served by
:func:`serve` on its own address, never beside ``/metrics``.

Hypercorn is embedded through its public ``serve(app, config,
shutdown_trigger=...)``: it runs as one task among the daemon's and stops when
the daemon's scope does. Clients never hold the daemon hostage: at most
``MAX_IN_FLIGHT`` requests are served at once (the rest get 503 at once), a
request's head must arrive within ``READ_TIMEOUT``, idle connections close
after ``KEEP_ALIVE``, heads are capped at 16 KB, and running out of descriptors
only pauses accepting (the database pool holds its connections for the
daemon's life, see ``daemon.py``).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable

import anyio
from anyio.abc import TaskStatus
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from dlqd.errors import DlqdError
from dlqd.logs import get_logger

log = get_logger("dlqd.http")

READ_TIMEOUT = 10  # seconds a client may take to send a request
KEEP_ALIVE = 5.0  # seconds an idle connection stays open
BACKLOG = 64  # connections the kernel queues while the daemon is busy
MAX_HEAD_BYTES = 16 * 1024
GRACE = 1.0  # seconds in-flight requests get at shutdown
MAX_IN_FLIGHT = 64  # requests served at once; more are answered 503 at once
# seconds a request may take from its arrival to the last byte of its answer:
# a client that never reads (an HTTP/2 stream with a zero window, say) loses
# its slot then, whatever it does
RESPONSE_DEADLINE = 10.0


class ConcurrencyLimit:
    """ASGI middleware: at most ``limit`` HTTP requests in flight; the next
    ones get 503 with Retry-After at once, costing nothing but the answer.
    A request in flight longer than ``deadline`` seconds (its answer never
    drained by the client) is cancelled and gives its slot back."""

    def __init__(
        self, app: ASGIApp, limit: int = MAX_IN_FLIGHT, deadline: float = RESPONSE_DEADLINE
    ) -> None:
        self.app = app
        self.limit = limit
        self.deadline = deadline
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            busy = PlainTextResponse("busy\n", 503, headers={"Retry-After": "1"})
            await busy(scope, receive, send)
            return
        self.in_flight += 1
        try:
            with anyio.move_on_after(self.deadline):
                await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


def build_app(
    registry: CollectorRegistry,
    readiness: Callable[[], list[str]],
    *,
    deadline: float = RESPONSE_DEADLINE,
) -> Starlette:
    """The ASGI application: metrics from ``registry``; ``readiness()`` returns
    what stops the daemon from being ready (empty when it is)."""

    async def metrics(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        body = encoder(registry)
        return Response(body, media_type=content_type, headers={"Cache-Control": "no-store"})

    async def healthz(_: Request) -> Response:
        # Answering at all proves the event loop runs.
        return PlainTextResponse("ok\n", headers={"Cache-Control": "no-store"})

    async def readyz(_: Request) -> Response:
        problems = readiness()
        if problems:
            return PlainTextResponse(
                "; ".join(problems) + "\n", 503, headers={"Cache-Control": "no-store"}
            )
        return PlainTextResponse("ready\n", headers={"Cache-Control": "no-store"})

    return Starlette(
        routes=[
            Route("/metrics", metrics, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
        ],
        middleware=[
            Middleware(ConcurrencyLimit, limit=MAX_IN_FLIGHT, deadline=deadline),
            Middleware(GZipMiddleware, minimum_size=500),
        ],
    )


def _bind(host: str, port: int, what: str = "metrics") -> list[socket.socket]:
    """Listening sockets for every address of ``host`` on one port (port 0:
    the first free one, shared by all). ``what``: metrics or console, for messages."""
    hint = "metrics_host / metrics_port" if what == "metrics" else "console.host / console.port"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise DlqdError(
            f"cannot serve {what} on {host}:{port}: {exc.strerror or exc} (set {hint})"
        ) from None
    sockets: list[socket.socket] = []
    seen: set[tuple[int, str]] = set()
    try:
        for family, kind, proto, _, found in infos:
            address = tuple(found)
            if (family, str(address[0])) in seen:
                continue
            seen.add((family, str(address[0])))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if sockets[1:]:  # same port as the first
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(BACKLOG)  # clients queue from now on, before hypercorn accepts
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise DlqdError(
            f"cannot serve {what} on {host}:{port}: {exc.strerror or exc} (set {hint})"
        ) from None
    return sockets


def _config(sockets: list[socket.socket]) -> Config:
    config = Config()
    # hypercorn takes ownership of the descriptors: the socket objects let go
    config.bind = [f"fd://{sock.detach()}" for sock in sockets]
    config.backlog = BACKLOG
    config.read_timeout = READ_TIMEOUT
    config.keep_alive_timeout = KEEP_ALIVE
    config.h11_max_incomplete_size = MAX_HEAD_BYTES
    config.graceful_timeout = GRACE
    config.accesslog = None
    # hypercorn's own messages ("Running on …") through dlqd's logging, warnings only
    error_log = logging.getLogger("hypercorn.error")
    error_log.setLevel(logging.WARNING)
    config.errorlog = error_log
    return config


async def serve(
    host: str,
    port: int,
    app: Starlette,
    *,
    what: str = "metrics",
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until cancelled; report the bound port once listening."""
    sockets = _bind(host, port, what)
    bound = int(sockets[0].getsockname()[1])
    config = _config(sockets)
    shutdown = anyio.Event()
    finished = anyio.Event()

    async def run() -> None:
        # hypercorn closes its servers and in-flight requests itself once the
        # trigger fires; the shield lets that clean-up await undisturbed.
        with anyio.CancelScope(shield=True):
            try:
                trigger: Callable[[], Awaitable[None]] = shutdown.wait
                await hypercorn_serve(app, config, shutdown_trigger=trigger)  # type: ignore[arg-type]
            finally:
                finished.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        log.info(
            "http listening" if what == "metrics" else f"{what} listening", host=host, port=bound
        )
        task_status.started(bound)
        try:
            await finished.wait()
            raise DlqdError("the HTTP server stopped on its own")
        finally:
            shutdown.set()
            with anyio.CancelScope(shield=True), anyio.move_on_after(GRACE + 2):
                await finished.wait()
