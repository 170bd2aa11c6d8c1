"""A loopback TCP proxy whose connections a test can make deaf (drop server->client bytes)."""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio
from anyio.abc import SocketAttribute, SocketStream, TaskGroup


@dataclass
class Link:
    deaf: bool = False


@dataclass
class TcpProxy:
    target_port: int
    port: int = 0
    links: list[Link] = field(default_factory=list)
    deaf_after: int | None = None  # connections after this many hear nothing either

    async def run(self, tg: TaskGroup) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.extra(SocketAttribute.local_port)

        async def pump(src: SocketStream, dst: SocketStream, link: Link | None) -> None:
            try:
                async for chunk in src:
                    if link is not None and link.deaf:
                        continue  # swallowed: the client hears nothing, the socket stays up
                    await dst.send(chunk)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass
            finally:
                await dst.aclose()

        async def handle(client: SocketStream) -> None:
            server = await anyio.connect_tcp("127.0.0.1", self.target_port)
            deaf = self.deaf_after is not None and len(self.links) >= self.deaf_after
            link = Link(deaf=deaf)
            self.links.append(link)
            async with anyio.create_task_group() as inner:
                inner.start_soon(pump, client, server, None)
                inner.start_soon(pump, server, client, link)

        tg.start_soon(listener.serve, handle)

    def deafen_all(self) -> None:
        for link in self.links:
            link.deaf = True
