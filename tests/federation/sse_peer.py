"""A legacy HTTP+SSE peer on loopback whose answers tests script, byte by byte.

`SsePeer` speaks raw HTTP/1.1 over asyncio, so the gateway's own client (the lean one, or httpx
behind a proxy) is what talks to it. `GET /sse` opens a chunked event stream that starts with
the `endpoint` event; what the test puts in `outbox` follows (a dict is sent as a `message`
event, other bytes are written as they are, None ends the stream and `CUT` drops its connection
without ending it). Each `POST` to the
endpoint goes to `receive`, which returns the status to answer (default 202). Everything that
arrives is kept in `requests` (head and body), with the connections made in `connections`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

ENDPOINT = "/messages/?session_id=abc"
CUT = b""
"""Put in `outbox`: close the stream's connection in the middle of the stream."""

Receive = Callable[[dict[str, Any]], Awaitable[int | None]]


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def event(message: dict[str, Any]) -> bytes:
    return chunk(f"event: message\ndata: {json.dumps(message)}\n\n".encode())


class SsePeer:
    """An HTTP+SSE server on 127.0.0.1 (see the module docstring)."""

    def __init__(
        self, receive: Receive, *, token: str | None = None, outbox: asyncio.Queue[Any] | None = None
    ) -> None:
        self.receive = receive
        self.token = token
        """The bearer token required on every request (None: none)."""
        self.stream_head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        self.post_body = b"Accepted"
        self.outbox: asyncio.Queue[dict[str, Any] | bytes | None] = outbox if outbox is not None else asyncio.Queue()
        self.requests: list[tuple[str, bytes]] = []
        self.connections = 0
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/sse"

    def heads(self, method: str) -> list[str]:
        """The heads of the requests that used `method`."""
        return [head for head, _ in self.requests if head.startswith(method + " ")]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head.split("\r\n")[1:] if line)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append((head, body))
                if self.token is not None and headers.get("authorization") != f"Bearer {self.token}":
                    writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 12\r\n\r\nunauthorized")
                elif head.startswith("GET "):
                    await self._stream(writer)
                    return
                else:
                    status = await self.receive(json.loads(body)) or 202
                    writer.write(b"HTTP/1.1 %d Whatever\r\nContent-Length: %d\r\n\r\n%s" % (status, len(self.post_body), self.post_body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _stream(self, writer: asyncio.StreamWriter) -> None:
        writer.write(self.stream_head + chunk(f"event: endpoint\ndata: {ENDPOINT}\n\n".encode()))
        await writer.drain()
        while (item := await self.outbox.get()) is not None:
            if item == CUT:
                return
            writer.write(item if isinstance(item, bytes) else event(item))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[SsePeer]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        async with server:
            yield self
