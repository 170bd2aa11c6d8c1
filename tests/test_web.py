"""The HTTP side (dlqd/web.py): Starlette under hypercorn, on a real socket."""

from __future__ import annotations

import contextlib
import gzip
import socket
from collections.abc import AsyncIterator

import anyio
import httpx
import pytest
from starlette.responses import PlainTextResponse

from dlqd import web
from dlqd.errors import DlqdError
from dlqd.metrics import Metrics

pytestmark = pytest.mark.anyio


@pytest.fixture
async def served() -> AsyncIterator[tuple[int, Metrics, list[str]]]:
    """A live server on a free port; the list is what /readyz reports."""
    metrics = Metrics()
    problems: list[str] = []
    app = web.build_app(metrics.registry, lambda: list(problems))
    async with anyio.create_task_group() as tg:
        port = await tg.start(web.serve, "127.0.0.1", 0, app)
        yield port, metrics, problems
        tg.cancel_scope.cancel()


async def _aget(port: int, path: str, method: str = "GET", **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=5) as client:
        return await client.request(method, f"http://127.0.0.1:{port}{path}", headers=headers)


async def test_metrics_in_the_text_format_with_the_standard_collectors(
    served: tuple[int, Metrics, list[str]],
) -> None:
    port, metrics, _ = served
    metrics.replays_total.labels("p", "replayed").inc(3)
    response = await _aget(port, "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    assert 'dlqd_replays_total{outcome="replayed",policy="p"} 3.0' in text
    for family in (
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "python_info",
        "python_gc_objects_collected_total",
        "dlqd_build_info",
    ):
        assert f"\n{family}" in text, family
    assert "# EOF" not in text


async def test_openmetrics_when_the_scraper_asks_for_it(
    served: tuple[int, Metrics, list[str]],
) -> None:
    port, metrics, _ = served
    metrics.listener_up.set(1)
    response = await _aget(
        port, "/metrics", accept="application/openmetrics-text; version=1.0.0,text/plain;q=0.5"
    )
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")
    assert "dlqd_listener_up 1.0" in response.text


async def test_gzip_when_accepted_and_identity_otherwise(
    served: tuple[int, Metrics, list[str]],
) -> None:
    port, _, _ = served
    decoded = await _aget(port, "/metrics", **{"accept-encoding": "gzip"})
    assert decoded.headers["content-encoding"] == "gzip"
    assert "dlqd_build_info" in decoded.text  # httpx decoded it: it was valid gzip
    plain = await _aget(port, "/metrics", **{"accept-encoding": "identity"})
    assert "content-encoding" not in plain.headers
    assert "dlqd_build_info" in plain.text
    data = await anyio.to_thread.run_sync(
        _exchange,
        port,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n",
    )
    head, body = data.split(b"\r\n\r\n", 1)
    assert b"content-encoding: gzip" in head.lower()
    if b"transfer-encoding: chunked" in head.lower():
        body = _unchunk(body)
    assert b"dlqd_build_info" in gzip.decompress(body)


def _exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes, read until the server closes (in a worker thread)."""
    with socket.create_connection(("127.0.0.1", port), timeout=web.KEEP_ALIVE + 10) as client:
        client.sendall(request)
        data = b""
        while chunk := client.recv(65536):
            data += chunk
    return data


def _unchunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, body = body.split(b"\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            break
        out, body = out + body[:size], body[size + 2 :]
    return out


async def test_health_readiness_head_and_wrong_methods(
    served: tuple[int, Metrics, list[str]],
) -> None:
    port, _, problems = served
    assert (await _aget(port, "/healthz")).text == "ok\n"
    assert (await _aget(port, "/readyz")).status_code == 200
    problems.extend(["listener not connected", "database unreachable"])
    not_ready = await _aget(port, "/readyz")
    assert not_ready.status_code == 503
    assert not_ready.text == "listener not connected; database unreachable\n"
    head = await _aget(port, "/metrics", method="HEAD")
    assert head.status_code == 200
    assert head.content == b""
    assert (await _aget(port, "/metrics", method="POST")).status_code == 405
    assert (await _aget(port, "/nope")).status_code == 404


async def test_slow_and_broken_clients_never_block_the_others(
    served: tuple[int, Metrics, list[str]],
) -> None:
    """Clients that trickle a head, send garbage or an oversized head, or
    connect and say nothing: /healthz still answers, every time."""
    port, _, _ = served
    clients: list[socket.socket] = []

    def misbehave() -> None:  # a thread: the server's loop must keep running
        for index in range(150):
            client = socket.create_connection(("127.0.0.1", port), timeout=10)
            clients.append(client)
            if index % 3 == 0:
                client.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finishes
            elif index % 3 == 1:
                client.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")

    try:
        await anyio.to_thread.run_sync(misbehave)
        with anyio.fail_after(10):
            response = await _aget(port, "/healthz")
        assert response.status_code == 200
        reply = await anyio.to_thread.run_sync(
            _exchange, port, b"GET /healthz HTTP/1.1\r\nX: " + b"a" * (64 * 1024) + b"\r\n\r\n"
        )
        assert reply == b"" or reply.startswith(b"HTTP/1.1 4")  # refused, not served
        with anyio.fail_after(10):
            assert (await _aget(port, "/healthz")).status_code == 200
    finally:
        for client in clients:
            client.close()


async def test_an_idle_connection_is_closed_by_the_server(
    served: tuple[int, Metrics, list[str]],
) -> None:
    port, _, _ = served
    started = anyio.current_time()
    assert await anyio.to_thread.run_sync(_exchange, port, b"") == b""  # hung up on silence
    assert anyio.current_time() - started >= web.KEEP_ALIVE - 1


async def test_stops_with_its_task_group_while_a_client_is_connected() -> None:
    metrics = Metrics()
    app = web.build_app(metrics.registry, list)
    with socket.socket() as lingering:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                port = await tg.start(web.serve, "127.0.0.1", 0, app)
                lingering.connect(("127.0.0.1", port))
                lingering.sendall(b"GET /metrics HTTP/1.1\r\n")
                tg.cancel_scope.cancel()
        # stopped: the half-sent request's connection is closed by the server
        lingering.settimeout(5)
        with contextlib.suppress(ConnectionResetError):  # a reset says it as well
            assert lingering.recv(1) == b""


@pytest.mark.parametrize(
    ("host", "expected"),
    [("not a host.invalid", "cannot serve metrics on not a host.invalid:0")],
)
async def test_an_unusable_address_is_a_one_line_error(host: str, expected: str) -> None:
    app = web.build_app(Metrics().registry, list)
    with pytest.raises(DlqdError, match=expected) as caught:
        await web.serve(host, 0, app)
    assert "\n" not in str(caught.value)


async def test_a_port_in_use_is_a_one_line_error() -> None:
    app = web.build_app(Metrics().registry, list)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(DlqdError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            await web.serve("127.0.0.1", port, app)


async def test_requests_beyond_the_cap_are_answered_503_at_once() -> None:
    release = anyio.Event()
    all_in = anyio.Event()
    entered = 0

    async def slow(scope: dict[str, object], receive: object, send: object) -> None:
        nonlocal entered
        entered += 1
        if entered == 3:
            all_in.set()
        await release.wait()
        await PlainTextResponse("done\n")(scope, receive, send)  # type: ignore[arg-type]

    limited = web.ConcurrencyLimit(slow, limit=3)  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=limited)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://dlqd") as client:
        answers: list[int] = []

        async def call() -> None:
            answers.append((await client.get("/metrics")).status_code)

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(call)
            with anyio.fail_after(5):
                await all_in.wait()
            busy = await client.get("/metrics")  # the fourth, while three are in flight
            assert busy.status_code == 503
            assert busy.headers["retry-after"] == "1"
            release.set()
        assert answers == [200, 200, 200]
        assert limited.in_flight == 0
        assert (await client.get("/metrics")).status_code == 200


async def test_http2_streams_that_never_drain_give_their_slots_back() -> None:
    """Security finding 8: 7 HTTP/2 connections of 10 /metrics streams each, with a
    zero flow-control window and never read, used to hold every in-flight slot
    for ever (503 on /healthz for good). Each now loses its slot at the
    response deadline, while its client is still connected."""
    import h2.config
    import h2.connection
    import h2.settings

    metrics = Metrics()
    app = web.build_app(metrics.registry, list, deadline=1.0)
    stalled: list[socket.socket] = []
    async with anyio.create_task_group() as tg:
        port = await tg.start(web.serve, "127.0.0.1", 0, app)
        try:
            for _ in range(7):
                conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
                conn.initiate_connection()
                conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
                for _ in range(10):
                    stream = conn.get_next_available_stream_id()
                    conn.send_headers(
                        stream,
                        [
                            (":method", "GET"),
                            (":path", "/metrics"),
                            (":scheme", "http"),
                            (":authority", f"127.0.0.1:{port}"),
                        ],
                        end_stream=True,
                    )
                sock = socket.create_connection(("127.0.0.1", port))
                sock.sendall(conn.data_to_send())
                stalled.append(sock)

            async def healthy() -> bool:
                return (await _aget(port, "/healthz")).status_code == 200

            with anyio.fail_after(20):
                while not await healthy():  # noqa: ASYNC110 - the server's own state
                    await anyio.sleep(0.1)
        finally:
            for sock in stalled:
                sock.close()
        # and for good: later requests are answered too
        for _ in range(5):
            assert (await _aget(port, "/metrics")).status_code == 200
        tg.cancel_scope.cancel()
