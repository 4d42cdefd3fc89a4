"""Two reference servers for the benchmark's ceiling rows: fedmcp's own code left out.

The throughput bar compares the gateway with the fast upstream called directly. These two
servers show what is reachable at all, measured in the same run:

* `application` — the fast upstream's own MCP answers (`bench.fast_upstream.streamable_http`)
  served as an ASGI application by daphne, started exactly like a gateway worker (fedmcp's
  server-level changes installed: the request deadlines of `fedmcp_site.runtime.request_guard` and the
  collector settings of `fedmcp_site.runtime.gc_tuning`). No authentication, no routing, no upstream:
  the most any application on this server can serve. Run::

      .venv/bin/daphne -b 127.0.0.1 -p 9200 bench.reference:application

* `--proxy` — a pass-through HTTP/1.1 proxy in raw asyncio, no framework: each client
  connection gets its own keep-alive connection to the upstream, and each request and answer is
  framed (head and `Content-Length` body) and relayed unchanged. No checks of any kind: the most
  a proxy written in Python can serve, since it reads and writes every call twice. Run::

      .venv/bin/python -m bench.reference --proxy --port 9300 --upstream http://127.0.0.1:9100

Both handle only what the benchmark sends them (Streamable HTTP POSTs with a body length).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any
from urllib.parse import urlsplit

from bench.fast_upstream import Mcp, serve_until_signalled, streamable_http

MCP = Mcp(0)


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """ASGI: `/mcp` answered like the fast upstream, 404 elsewhere."""
    if scope["type"] != "http":
        return
    body = b""
    more = True
    while more:
        event = await receive()
        if event["type"] == "http.disconnect":
            return
        body += event.get("body", b"")
        more = event.get("more_body", False)
    if scope["path"].rstrip("/") != "/mcp":
        status, payload, extra = 404, b"", ()
    else:
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        status, _, payload, extra = streamable_http(MCP, scope["method"], headers, body)
    head = [(b"content-length", str(len(payload)).encode())]
    head += [(name.encode(), value.encode()) for name, value in extra]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": payload})


def _install_server_changes() -> None:
    """What fedmcp_site.asgi installs into daphne, without the application."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fedmcp_site.settings")
    import django

    django.setup()
    from fedmcp_site.runtime import gc_tuning, request_guard

    request_guard.install()
    gc_tuning.install()


# --- the pass-through proxy ----------------------------------------------------------------------


class _Framer:
    """Splits a byte stream into HTTP/1.1 messages (head plus `Content-Length` body)."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.need = 0
        """Length of the message being received, once its head is complete; 0 before."""

    def feed(self, data: bytes) -> list[bytes]:
        self.buffer += data
        messages = []
        while True:
            if not self.need:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return messages
                length = 0
                for line in bytes(self.buffer[:end]).split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                self.need = end + 4 + length
            if len(self.buffer) < self.need:
                return messages
            messages.append(bytes(self.buffer[: self.need]))
            del self.buffer[: self.need]
            self.need = 0


class _UpstreamSide(asyncio.Protocol):
    def __init__(self, client: _ClientSide) -> None:
        self.client = client
        self.framer = _Framer()

    def data_received(self, data: bytes) -> None:
        for answer in self.framer.feed(data):
            self.client.transport.write(answer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()


class _ClientSide(asyncio.Protocol):
    """One client connection, relayed message by message over its own upstream connection."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.framer = _Framer()
        self.to_upstream: asyncio.Transport | None = None
        self.waiting: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        try:
            self.to_upstream, _ = await asyncio.get_running_loop().create_connection(lambda: _UpstreamSide(self), *self.upstream)
        except OSError:
            self.transport.close()
            return
        for request in self.waiting:
            self.to_upstream.write(request)
        self.waiting = []

    def data_received(self, data: bytes) -> None:
        for request in self.framer.feed(data):
            if self.to_upstream is None:
                self.waiting.append(request)
            else:
                self.to_upstream.write(request)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.to_upstream is not None:
            self.to_upstream.close()


async def serve_proxy(port: int, upstream: str) -> None:
    parts = urlsplit(upstream)
    target = (parts.hostname or "127.0.0.1", parts.port or 80)
    await serve_until_signalled(lambda: _ClientSide(target), port)


def main() -> None:
    parser = argparse.ArgumentParser(description="the benchmark's pass-through proxy (see bench/reference.py)")
    parser.add_argument("--proxy", action="store_true", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL of the fast upstream, http://127.0.0.1:<port>")
    args = parser.parse_args()
    asyncio.run(serve_proxy(args.port, args.upstream))


if __name__ == "__main__":
    main()
else:
    # Imported by daphne as bench.reference:application.
    _install_server_changes()
