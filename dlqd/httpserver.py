"""A minimal HTTP/1.1 server for /metrics, /healthz and /readyz (GET and HEAD only)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
from anyio.abc import Listener, SocketAttribute, SocketStream, TaskStatus

from dlqd.errors import DlqdError
from dlqd.logs import get_logger

Response = tuple[int, str, bytes]
Route = Callable[[], Awaitable[Response]]
log = get_logger("dlqd.http")

_REASONS = {
    200: "OK",
    404: "Not Found",
    405: "Method Not Allowed",
    400: "Bad Request",
    503: "Service Unavailable",
}
_MAX_HEADER_BYTES = 16 * 1024
# At most this many clients at once; the next waits in the kernel's backlog.
# Whatever clients do (hold connections open, trickle bytes), the daemon keeps
# its file descriptors for the database.
MAX_CONNECTIONS = 64
CONNECTION_DEADLINE = 10.0  # seconds a client may take for one request


async def _read_head(stream: SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data and len(data) < _MAX_HEADER_BYTES:
        chunk = await stream.receive(4096)
        if not chunk:
            break
        data += chunk
    return data


async def _respond(stream: SocketStream, status: int, ctype: str, body: bytes, head: bool) -> None:
    header = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}\r\n"
        f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
    ).encode()
    await stream.send(header if head else header + body)


async def serve(
    host: str,
    port: int,
    routes: dict[str, Route],
    *,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``routes`` until cancelled; report the bound port once listening."""
    try:
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    except OSError as exc:
        raise DlqdError(
            f"cannot serve metrics on {host}:{port}: {exc.strerror or exc} "
            "(set metrics_host / metrics_port)"
        ) from None

    slots = anyio.Semaphore(MAX_CONNECTIONS)

    async def handle(stream: SocketStream) -> None:
        try:
            await _handle(stream)
        finally:
            slots.release()

    async def _handle(stream: SocketStream) -> None:
        async with stream:
            with anyio.move_on_after(CONNECTION_DEADLINE):
                try:
                    request_line = (await _read_head(stream)).split(b"\r\n", 1)[0]
                    parts = request_line.decode("latin-1").split()
                    if len(parts) != 3:
                        await _respond(stream, 400, "text/plain", b"bad request\n", False)
                        return
                    method, target = parts[0], parts[1].split("?", 1)[0]
                    if method not in ("GET", "HEAD"):
                        await _respond(stream, 405, "text/plain", b"GET only\n", False)
                        return
                    route = routes.get(target)
                    if route is None:
                        await _respond(stream, 404, "text/plain", b"not found\n", method == "HEAD")
                        return
                    status, ctype, body = await route()
                    await _respond(stream, status, ctype, body, method == "HEAD")
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    return
                except Exception as exc:  # noqa: BLE001 - no client may end the server
                    log.warning("http request failed", error=type(exc).__name__)

    async def accept_loop(sub: Listener[SocketStream]) -> None:
        async with anyio.create_task_group() as tg:
            while True:
                await slots.acquire()  # a free slot before accepting the next client
                try:
                    stream = await sub.accept()  # type: ignore[attr-defined]
                except OSError as exc:
                    # out of descriptors (EMFILE), buffers, ...: never fatal
                    slots.release()
                    log.warning("http accept failed", error=exc.strerror or str(exc))
                    await anyio.sleep(0.1)
                    continue
                tg.start_soon(handle, stream)

    async with listener, anyio.create_task_group() as tg:
        bound = listener.extra(SocketAttribute.local_port)
        log.info("http listening", host=host, port=bound)
        task_status.started(bound)
        for sub in listener.listeners:
            tg.start_soon(accept_loop, sub)
