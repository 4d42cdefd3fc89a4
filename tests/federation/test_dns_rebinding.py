"""DNS rebinding: a name that is public when checked and private when dialled is refused.

A resolver we control answers a public address for `rebind.test` the first time it is asked
(when `check_url_allowed` runs) and a loopback or metadata address afterwards (when the
connection is made). With loopback not allowed, every outbound path must refuse before the
listener on 127.0.0.1 sees a byte; with loopback allowed, the same path reaches it (so the test
would notice a guard that refuses everything).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any
from unittest import mock

import httpx
import pytest
from django.test import override_settings

from federation.client import check_url_allowed, describe_failure, outbound_client
from federation.credentials import PeerCredentialsError, request_token
from federation.upstream import CONNECTION_KINDS
from federation.upstream.base import PeerConfig, UpstreamUnavailableError

HOST = "rebind.test"
PUBLIC = "93.184.216.34"
TIMEOUT = 20.0
real_getaddrinfo = socket.getaddrinfo


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(TIMEOUT):
            return await coro

    return asyncio.run(bounded())


class RebindingResolver:
    """Answer `PUBLIC` for `HOST` the first time, then `later`; other names resolve as usual."""

    def __init__(self, later: str) -> None:
        self.later = later
        self.asked = 0

    def __call__(self, host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0) -> Any:
        if host not in (HOST, HOST.encode()):
            return real_getaddrinfo(host, port, family, type, proto, flags)
        self.asked += 1
        address = PUBLIC if self.asked == 1 else self.later
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, int(port or 0)))]


class Listener:
    """A TCP listener on 127.0.0.1 that records what arrives and answers HTTP 204."""

    def __init__(self) -> None:
        self.connections = 0
        self.received = b""
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            self.received += await asyncio.wait_for(reader.read(65536), 5)
            writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Listener]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        async with server:
            yield self


@asynccontextmanager
async def rebinding(later: str = "127.0.0.1") -> AsyncIterator[Listener]:
    with mock.patch("socket.getaddrinfo", RebindingResolver(later)):
        async with Listener().running() as listener:
            yield listener


async def connect_peer(transport: str, scheme: str, path: str) -> tuple[str, Listener]:
    """Start a connection to a rebinding peer; return the refusal and the listener."""
    async with rebinding() as listener:
        peer = PeerConfig(id=1, name="rebound", transport=transport, url=f"{scheme}://{HOST}:{listener.port}{path}", connect_timeout=5)
        connection = CONNECTION_KINDS[transport](peer)
        try:
            with pytest.raises(UpstreamUnavailableError) as caught:
                await connection.start()
        finally:
            await connection.close()
        return str(caught.value), listener


REFUSED = f"{HOST} resolves to 127.0.0.1, a private or loopback address"


@override_settings(FEDERATION_ALLOW_LOOPBACK=False, FEDERATION_ALLOW_PRIVATE_IPS=False)
@pytest.mark.parametrize(
    ("transport", "scheme", "path"),
    [("streamable-http", "http", "/mcp"), ("streamable-http", "https", "/mcp"), ("sse", "http", "/sse"), ("websocket", "ws", "/")],
)
def test_a_peer_rebound_to_loopback_after_the_check_is_refused_before_any_byte(transport: str, scheme: str, path: str) -> None:
    message, listener = run(connect_peer(transport, scheme, path))

    assert "peer 'rebound'" in message and REFUSED in message
    assert (listener.connections, listener.received) == (0, b"")


@override_settings(FEDERATION_ALLOW_LOOPBACK=False, FEDERATION_ALLOW_PRIVATE_IPS=False)
def test_a_rebind_to_the_metadata_address_is_refused_without_dialling_it() -> None:
    url = f"http://{HOST}/latest/meta-data/"

    async def scenario() -> str:
        with mock.patch("socket.getaddrinfo", RebindingResolver("169.254.169.254")):
            await check_url_allowed(url)  # the public answer passes the check
            async with outbound_client(connect_timeout=5, read_timeout=5) as client:
                with pytest.raises(httpx.ConnectError) as caught:
                    await client.get(url)
        return describe_failure(caught.value)

    assert run(scenario()).startswith(f"{HOST} resolves to 169.254.169.254, a private or loopback address")


@override_settings(FEDERATION_ALLOW_LOOPBACK=False, FEDERATION_ALLOW_PRIVATE_IPS=False)
def test_a_token_endpoint_rebound_to_loopback_is_refused() -> None:
    async def scenario() -> tuple[str, Listener]:
        async with rebinding() as listener:
            with pytest.raises(PeerCredentialsError) as caught:
                await request_token(
                    token_url=f"http://{HOST}:{listener.port}/oauth/token/", client_id="gw", client_secret="s", audience="http://x"
                )
            return str(caught.value), listener

    message, listener = run(scenario())

    assert REFUSED in message
    assert (listener.connections, listener.received) == (0, b"")


@override_settings(FEDERATION_ALLOW_LOOPBACK=True, FEDERATION_ALLOW_PRIVATE_IPS=False)
def test_with_loopback_allowed_the_same_request_reaches_the_listener() -> None:
    async def scenario() -> tuple[int, Listener]:
        async with rebinding() as listener:
            url = f"http://{HOST}:{listener.port}/"
            await check_url_allowed(url)  # takes the public answer, as in the refused cases
            async with outbound_client(connect_timeout=5, read_timeout=5) as client:
                response = await client.get(url)
            return response.status_code, listener

    status, listener = run(scenario())

    assert status == 204
    assert listener.received.startswith(b"GET / HTTP/1.1")
