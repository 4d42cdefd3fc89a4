"""The lean HTTP/1.1 client of Streamable HTTP peers (federation/upstream/lean_http.py).

A scripted asyncio server on loopback answers each request as the test says (Content-Length,
chunked, server-sent events, read-to-EOF, hanging, closing) and counts connections, so each test
sees what went over the wire: keep-alive reuse, a server that closes idle connections, timeouts,
cancellation, and the outbound guard still deciding where a connection may go.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.test import override_settings

from federation.client import describe_failure
from federation.tls import PeerTls, ssl_context
from federation.upstream.base import PeerConfig, UpstreamTimeoutError, UpstreamUnavailableError
from federation.upstream.lean_http import LeanHttpPool, LeanResponse, reuse_window
from federation.upstream.streamable_http import StreamableHttpConnection
from tests.federation.pki import Pki

TIMEOUT = 30.0
Reply = Callable[[bytes, asyncio.StreamWriter], Awaitable[bool]]
"""Answers one request (its raw head + body); returns False to close the connection afterwards."""


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(TIMEOUT):
            return await coro

    return asyncio.run(bounded())


class Server:
    """An HTTP/1.1 server on 127.0.0.1 whose replies the test scripts."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed = asyncio.Event()  # a connection ended (either side)
        self.writers: list[asyncio.StreamWriter] = []
        self.readers: list[asyncio.StreamReader] = []

    def drop_connections(self) -> None:
        """End every open connection from the server's side (as keep-alive timeouts do)."""
        for writer in self.writers:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        self.readers.append(reader)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
                )
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                if not await self.reply(request, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # cancelled: the test is over
        finally:
            writer.close()
            self.closed.set()

    @asynccontextmanager
    async def running(self, tls: ssl.SSLContext | None = None) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=tls)
        port = server.sockets[0].getsockname()[1]
        async with server:
            yield f"{'https' if tls else 'http'}://127.0.0.1:{port}/mcp"


def json_reply(message: dict[str, Any], *, extra: bytes = b"") -> Reply:
    async def reply(request: bytes, writer: asyncio.StreamWriter) -> bool:
        body = json.dumps(message).encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n" % (len(body), extra) + body)
        await writer.drain()
        return b"close" not in extra.lower()

    return reply


def pool_for(url: str, **options: Any) -> LeanHttpPool:
    return LeanHttpPool(httpx.URL(url), ssl_context=None, connect_timeout=5, read_timeout=options.pop("read_timeout", 5), **options)


async def body_of(response: LeanResponse) -> bytes:
    try:
        return b"".join([chunk async for chunk in response.aiter_bytes()])
    finally:
        await response.aclose()


async def post(pool: LeanHttpPool, message: dict[str, Any] | None = None) -> tuple[int, bytes]:
    response = await pool.post(json.dumps(message or {"jsonrpc": "2.0", "id": 1, "method": "ping"}).encode(), {"Accept": "application/json"})
    return response.status_code, await body_of(response)


# --- keep-alive ----------------------------------------------------------------------------------


def test_connections_are_kept_alive_and_reused() -> None:
    server = Server(json_reply({"jsonrpc": "2.0", "id": 1, "result": {}}))

    async def scenario() -> list[tuple[int, bytes]]:
        async with server.running() as url:
            pool = pool_for(url)
            try:
                return [await post(pool) for _ in range(5)]
            finally:
                await pool.aclose()

    replies = run(scenario())

    assert replies == [(200, b'{"jsonrpc": "2.0", "id": 1, "result": {}}')] * 5
    assert (server.connections, len(server.requests)) == (1, 5)
    head = server.requests[0].split(b"\r\n\r\n")[0].decode()
    assert head.startswith("POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:")
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"}).encode()
    assert f"Content-Length: {len(body)}" in head and "Accept: application/json" in head
    assert server.requests[0].endswith(b"\r\n\r\n" + body)


def gated_reply(gate: asyncio.Event) -> Reply:
    """A JSON reply sent only once `gate` is set: the requests before it are all in flight at once."""
    answer = json_reply({"jsonrpc": "2.0", "id": 1, "result": {}})

    async def reply(request: bytes, writer: asyncio.StreamWriter) -> bool:
        await gate.wait()
        return await answer(request, writer)

    return reply


async def burst(pool: LeanHttpPool, server: Server, gate: asyncio.Event, size: int) -> None:
    """`size` requests in flight together (each on its own connection), then all answered."""
    gate.clear()
    expected = len(server.requests) + size
    calls = [asyncio.ensure_future(post(pool)) for _ in range(size)]
    while len(server.requests) < expected:
        await asyncio.sleep(0.01)
    gate.set()
    assert [status for status, _ in await asyncio.gather(*calls)] == [200] * size


def test_connections_a_burst_opened_beyond_max_idle_are_kept_for_the_next_one() -> None:
    gate = asyncio.Event()
    server = Server(gated_reply(gate))

    async def scenario() -> tuple[int, int]:
        async with server.running() as url:
            pool = pool_for(url, max_idle=2)
            try:
                await burst(pool, server, gate, 5)
                await burst(pool, server, gate, 5)
                return pool.opened, len(pool._idle)
            finally:
                await pool.aclose()

    # Closing the three surplus connections as they came back would have opened eight in all.
    assert run(scenario()) == (5, 5)
    assert server.connections == 5


def test_surplus_idle_connections_are_closed_once_unused_for_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    gate = asyncio.Event()
    server = Server(gated_reply(gate))
    monkeypatch.setattr("federation.upstream.lean_http.SURPLUS_IDLE_SECONDS", 0.2)

    async def scenario() -> tuple[int, int]:
        async with server.running() as url:
            pool = pool_for(url, max_idle=2)
            try:
                await burst(pool, server, gate, 5)
                await asyncio.sleep(0.3)
                # One call takes the most recently used connection; its release closes the
                # surplus ones that waited too long, and keeps `max_idle`.
                gate.set()
                await post(pool)
                return pool.opened, len(pool._idle)
            finally:
                await pool.aclose()

    assert run(scenario()) == (5, 2)


def test_a_connection_the_server_closed_while_idle_is_not_used_again() -> None:
    server = Server(json_reply({"jsonrpc": "2.0", "id": 1, "result": {}}))

    async def scenario() -> tuple[int, bytes]:
        async with server.running() as url:
            pool = pool_for(url)
            try:
                await post(pool)
                server.drop_connections()
                await asyncio.wait_for(server.closed.wait(), 10)
                await asyncio.sleep(0.05)
                return await post(pool)
            finally:
                await pool.aclose()

    assert run(scenario()) == (200, b'{"jsonrpc": "2.0", "id": 1, "result": {}}')
    assert server.connections == 2


def test_a_connection_idle_past_the_reuse_window_is_closed_not_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    # Servers close idle connections after 5 s by default; one reused at that moment loses its request.
    monkeypatch.setattr("federation.upstream.lean_http.IDLE_REUSE_SECONDS", 0.2)
    server = Server(json_reply({"jsonrpc": "2.0", "id": 1, "result": {}}))

    async def scenario() -> tuple[int, int]:
        async with server.running() as url:
            pool = pool_for(url)
            try:
                await post(pool)
                await post(pool)  # within the window: the same connection
                await asyncio.sleep(0.3)
                await post(pool)
                await asyncio.wait_for(server.closed.wait(), 10)  # the expired one was closed, not left open
                return pool.opened, server.connections
            finally:
                await pool.aclose()

    assert run(scenario()) == (2, 2)


def test_the_servers_keep_alive_timeout_sets_the_reuse_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("federation.upstream.lean_http.IDLE_REUSE_SECONDS", 0.1)
    server = Server(json_reply({"jsonrpc": "2.0", "id": 1, "result": {}}, extra=b"Keep-Alive: timeout=30, max=1000\r\n"))

    async def scenario() -> int:
        async with server.running() as url:
            pool = pool_for(url)
            try:
                await post(pool)
                await asyncio.sleep(0.3)  # past the default window, well inside the server's 30 s less a second
                await post(pool)
                return pool.opened
            finally:
                await pool.aclose()

    assert run(scenario()) == 1


@pytest.mark.parametrize(
    ("headers", "window"),
    [
        ({}, 4.0),
        ({"keep-alive": "timeout=5"}, 4.0),
        ({"keep-alive": "max=100, timeout=75"}, 74.0),
        ({"keep-alive": "Timeout = 1"}, 0.0),
        ({"keep-alive": "timeout=86400"}, 600.0),
        ({"keep-alive": "max=100"}, 4.0),
        ({"keep-alive": "timeout=soon"}, 4.0),
    ],
)
def test_reuse_window(headers: dict[str, str], window: float) -> None:
    assert reuse_window(headers) == window


def test_connection_close_in_the_reply_is_honoured() -> None:
    server = Server(json_reply({"jsonrpc": "2.0", "id": 1, "result": {}}, extra=b"Connection: close\r\n"))

    async def scenario() -> int:
        async with server.running() as url:
            pool = pool_for(url)
            try:
                await post(pool)
                await post(pool)
                return pool.opened
            finally:
                await pool.aclose()

    assert run(scenario()) == 2
    assert server.connections == 2


# --- reply framing -------------------------------------------------------------------------------


async def chunked(request: bytes, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    writer.write(b"5;ext=1\r\n{\"a\":\r\n")
    await writer.drain()
    await asyncio.sleep(0.01)
    writer.write(b"3\r\n 1}\r\n0\r\nX-Trailer: t\r\n\r\n")
    await writer.drain()
    return True


def test_chunked_replies_are_joined_and_the_connection_reused() -> None:
    server = Server(chunked)

    async def scenario() -> list[tuple[int, bytes]]:
        async with server.running() as url:
            pool = pool_for(url)
            try:
                return [await post(pool), await post(pool)]
            finally:
                await pool.aclose()

    assert run(scenario()) == [(200, b'{"a": 1}')] * 2
    assert server.connections == 1


SSE_EVENTS = [
    b'event: message\r\ndata: {"jsonrpc":"2.0","method":"notifications/progress"',
    b',"params":{}}\r',
    b'\n\r\ndata: {"jsonrpc":"2.0","id":7,"result":{"text":"\xc3',
    b'\xa9"}}\n\n',
]


async def sse_chunked(request: bytes, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    for part in SSE_EVENTS:
        writer.write(b"%x\r\n%s\r\n" % (len(part), part))
        await writer.drain()
        await asyncio.sleep(0.005)
    writer.write(b"0\r\n\r\n")
    await writer.drain()
    return True


async def sse_until_close(request: bytes, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
    for part in SSE_EVENTS:
        writer.write(part)
        await writer.drain()
        await asyncio.sleep(0.005)
    return False


EXPECTED_LINES = [
    "event: message",
    'data: {"jsonrpc":"2.0","method":"notifications/progress","params":{}}',
    "",
    'data: {"jsonrpc":"2.0","id":7,"result":{"text":"é"}}',
    "",
]


@pytest.mark.parametrize("reply", [sse_chunked, sse_until_close])
def test_event_stream_lines_survive_any_chunking_and_line_ending(reply: Reply) -> None:
    server = Server(reply)

    async def scenario() -> tuple[list[str], int]:
        async with server.running() as url:
            pool = pool_for(url)
            try:
                response = await pool.post(b"{}", {})
                try:
                    lines = [line async for line in response.aiter_lines()]
                finally:
                    await response.aclose()
                await post(pool)  # kept alive only when the stream ended with its framing
                return lines, pool.opened
            finally:
                await pool.aclose()

    lines, opened = run(scenario())

    assert lines == EXPECTED_LINES
    assert opened == (1 if reply is sse_chunked else 2)


async def stalled_stream(request: bytes, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    writer.write(b"%x\r\n%s\r\n" % (len(SSE_EVENTS[0]), SSE_EVENTS[0]))
    await writer.drain()
    await asyncio.sleep(60)
    return False


async def settled(pool: LeanHttpPool) -> None:
    while pool._draining:
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(("reply", "opened"), [(sse_chunked, 1), (stalled_stream, 2)])
def test_a_reply_left_unread_is_drained_for_reuse_or_its_connection_closed(reply: Reply, opened: int) -> None:
    """The caller stops at the first line; a stream that ends soon keeps its connection, one that stalls does not."""
    server = Server(reply)

    async def scenario() -> int:
        async with server.running() as url:
            pool = pool_for(url, drain_timeout=0.5)
            try:
                response = await pool.post(b"{}", {})
                async for _ in response.aiter_lines():
                    break
                await response.aclose()
                await settled(pool)
                if reply is sse_chunked:
                    again = await pool.post(b"{}", {})
                    assert [line async for line in again.aiter_lines()] == EXPECTED_LINES
                    await again.aclose()
                else:
                    server.reply = json_reply({})
                    await post(pool)
                return pool.opened
            finally:
                await pool.aclose()

    assert run(scenario()) == opened
    assert server.connections == opened


def test_a_pool_that_never_drains_closes_a_reply_left_unread_at_once() -> None:
    """As the HTTP+SSE stream's pool does: an event stream never ends, so draining it is pointless."""
    server = Server(sse_chunked)

    async def scenario() -> tuple[int, bool]:
        async with server.running() as url:
            pool = pool_for(url, drain_timeout=0)
            try:
                response = await pool.post(b"{}", {})
                async for _ in response.aiter_lines():
                    break
                await response.aclose()
                draining = bool(pool._draining)
                await server.closed.wait()
                server.reply = json_reply({})
                await post(pool)
                return pool.opened, draining
            finally:
                await pool.aclose()

    assert run(scenario()) == (2, False)


async def accepted(request: bytes, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
    await writer.drain()
    return True


def test_an_empty_reply_frees_its_connection_without_a_read() -> None:
    server = Server(accepted)

    async def scenario() -> tuple[list[int], int]:
        async with server.running() as url:
            pool = pool_for(url)
            try:
                statuses = []
                for _ in range(3):
                    response = await pool.post(b"{}", {})
                    await response.aclose()
                    assert not pool._draining  # nothing was left to read in the background
                    statuses.append(response.status_code)
                return statuses, pool.opened
            finally:
                await pool.aclose()

    assert run(scenario()) == ([202, 202, 202], 1)


def test_a_get_is_sent_without_a_body() -> None:
    server = Server(accepted)

    async def scenario() -> int:
        async with server.running() as url:
            pool = pool_for(url)
            try:
                response = await pool.request("GET", None, {"Accept": "text/event-stream"})
                await response.aclose()
                response = await pool.request("GET", None, {})
                await response.aclose()
                return pool.opened
            finally:
                await pool.aclose()

    assert run(scenario()) == 1
    assert [request.split(b"\r\n")[0] for request in server.requests] == [b"GET /mcp HTTP/1.1"] * 2
    assert server.requests[0].endswith(b"\r\nAccept: text/event-stream\r\n\r\n")
    assert not any(b"content-length" in request.lower() for request in server.requests)


async def garbage(request: bytes, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
    await writer.drain()
    return False


async def hang_up(request: bytes, writer: asyncio.StreamWriter) -> bool:
    return False


async def gzip_reply(request: bytes, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 2\r\n\r\nxx")
    await writer.drain()
    return True


async def huge_headers(request: bytes, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n")
    await writer.drain()
    return False


async def short_body(request: bytes, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
    await writer.drain()
    return False


async def bad_chunk_size(request: bytes, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5_0\r\n" + b"x" * 80 + b"\r\n0\r\n\r\n")
    await writer.drain()
    return False


async def other_coding(request: bytes, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n")
    await writer.drain()
    return False


@pytest.mark.parametrize(
    ("reply", "said"),
    [
        (bad_chunk_size, "malformed chunk size"),
        (other_coding, "unsupported Transfer-Encoding 'gzip, chunked'"),
        (garbage, "not an HTTP/1.x reply"),
        (hang_up, "Server disconnected without sending a response."),
        (gzip_reply, "unasked Content-Encoding 'gzip'"),
        (huge_headers, "too long"),
        (short_body, "before the end of the body"),
    ],
)
def test_broken_replies_are_protocol_errors(reply: Reply, said: str) -> None:
    async def scenario() -> httpx.RemoteProtocolError:
        async with Server(reply).running() as url:
            pool = pool_for(url)
            try:
                with pytest.raises(httpx.RemoteProtocolError) as caught:
                    await post(pool)
                return caught.value
            finally:
                await pool.aclose()

    assert said in str(run(scenario()))


def test_a_header_with_a_line_break_is_refused_before_sending() -> None:
    server = Server(json_reply({}))

    async def scenario() -> None:
        async with server.running() as url:
            pool = pool_for(url)
            try:
                with pytest.raises(httpx.LocalProtocolError):
                    await pool.post(b"{}", {"Mcp-Name": "x\r\nX-Injected: 1"})
            finally:
                await pool.aclose()

    run(scenario())
    assert server.connections == 0


def test_a_header_that_is_not_latin_1_is_refused_before_sending() -> None:
    server = Server(json_reply({}))

    async def scenario() -> None:
        async with server.running() as url:
            pool = pool_for(url)
            try:
                with pytest.raises(httpx.LocalProtocolError):
                    await pool.post(b"{}", {"Authorization": "Bearer \u2603"})
            finally:
                await pool.aclose()

    run(scenario())
    assert server.connections == 0


# --- timeouts and cancellation -------------------------------------------------------------------


def test_connections_in_use_are_limited_and_a_waiting_request_times_out() -> None:
    server = Server(json_reply({"jsonrpc": "2.0", "id": 1, "result": {}}))

    async def scenario() -> int:
        async with server.running() as url:
            pool = LeanHttpPool(httpx.URL(url), ssl_context=None, connect_timeout=0.3, read_timeout=5, max_connections=1)
            try:
                held = await pool.post(b"{}", {})  # its reply not yet read: the one slot is taken
                with pytest.raises(httpx.PoolTimeout):
                    await pool.post(b"{}", {})
                assert await body_of(held) == b'{"jsonrpc": "2.0", "id": 1, "result": {}}'
                assert (await post(pool))[0] == 200  # the slot and the connection are free again
                return pool.opened
            finally:
                await pool.aclose()

    assert run(scenario()) == 1


async def silent(request: bytes, writer: asyncio.StreamWriter) -> bool:
    await asyncio.sleep(60)
    return False


def test_a_silent_server_times_out_and_its_connection_is_closed() -> None:
    server = Server(silent)

    async def scenario() -> None:
        async with server.running() as url:
            pool = pool_for(url, read_timeout=0.3)
            try:
                with pytest.raises(httpx.ReadTimeout):
                    await post(pool)
                assert pool._idle == []
            finally:
                await pool.aclose()

    run(scenario())


def test_a_cancelled_request_closes_its_connection() -> None:
    ended = asyncio.Event()

    async def wait_for_the_end(request: bytes, writer: asyncio.StreamWriter) -> bool:
        await server.readers[-1].read()  # b"" once the client closed the connection
        ended.set()
        return False

    server = Server(wait_for_the_end)

    async def scenario() -> None:
        async with server.running() as url:
            pool = pool_for(url)
            try:
                task = asyncio.create_task(post(pool))
                while not server.requests:
                    await asyncio.sleep(0.01)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert pool._idle == []
                await asyncio.wait_for(ended.wait(), 10)  # the server saw the connection end
            finally:
                await pool.aclose()

    run(scenario())


# --- the guard and TLS ---------------------------------------------------------------------------


@override_settings(FEDERATION_ALLOW_LOOPBACK=False, FEDERATION_ALLOW_PRIVATE_IPS=False)
def test_the_outbound_guard_still_decides_where_a_connection_may_go() -> None:
    server = Server(json_reply({}))

    async def scenario() -> str:
        async with server.running() as url:
            pool = pool_for(url)
            try:
                with pytest.raises(httpx.ConnectError) as caught:
                    await post(pool)
                return describe_failure(caught.value)
            finally:
                await pool.aclose()

    assert run(scenario()).startswith("127.0.0.1 resolves to 127.0.0.1, a private or loopback address")
    assert server.connections == 0


def server_tls(pki: Pki, folder: Path) -> ssl.SSLContext:
    files = pki.write(folder)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files["server_cert"], files["server_key"])
    return context


def test_tls_verifies_the_peer_with_its_own_ca_and_keeps_the_connection(tmp_path: Path) -> None:
    pki, stranger = Pki.create(), Pki.create()
    server = Server(json_reply({"jsonrpc": "2.0", "id": 1, "result": {}}))

    async def scenario() -> tuple[list[int], str]:
        async with server.running(tls=server_tls(pki, tmp_path)) as url:
            trusted = LeanHttpPool(httpx.URL(url), ssl_context=ssl_context(PeerTls(pki.ca.pem)), connect_timeout=5, read_timeout=5)
            untrusted = LeanHttpPool(httpx.URL(url), ssl_context=ssl_context(PeerTls(stranger.ca.pem)), connect_timeout=5, read_timeout=5)
            try:
                statuses = [(await post(trusted))[0] for _ in range(3)]
                with pytest.raises(httpx.ConnectError) as caught:
                    await post(untrusted)
                return statuses, describe_failure(caught.value)
            finally:
                await trusted.aclose()
                await untrusted.aclose()

    statuses, refusal = run(scenario())

    assert statuses == [200, 200, 200]
    assert server.connections == 1  # kept for three calls; the refused handshake never became a connection
    assert "certificate" in refusal.lower()


# --- through a Streamable HTTP connection --------------------------------------------------------


class McpServer:
    """A legacy-era Streamable HTTP peer: refuses discovery, hands out a session, answers calls."""

    def __init__(self, *, token_required: str = "") -> None:
        self.token_required = token_required
        self.server = Server(self.reply)
        self.authorizations: list[str] = []

    async def reply(self, request: bytes, writer: asyncio.StreamWriter) -> bool:
        head, _, body = request.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {line.split(":", 1)[0].lower(): line.split(":", 1)[1].strip() for line in lines[1:]}
        self.authorizations.append(headers.get("authorization", ""))
        if lines[0].startswith("GET") or lines[0].startswith("DELETE"):
            writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            return True
        if self.token_required and headers.get("authorization") != f"Bearer {self.token_required}":
            writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 12\r\n\r\nunauthorized")
            return True
        message = json.loads(body)
        if "id" not in message:
            writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")
            return True
        if message["method"] == "server/discover":
            answer: dict[str, Any] = {"error": {"code": -32601, "message": "no such method"}}
        elif message["method"] == "initialize":
            answer = {"result": {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}}, "serverInfo": {"name": "s", "version": "1"}}}
        else:
            assert headers.get("mcp-session-id") == "s-1" and headers.get("accept-encoding") == "identity"
            answer = {"result": {"content": [{"type": "text", "text": message["params"]["arguments"]["text"]}]}}
        data = json.dumps({"jsonrpc": "2.0", "id": message["id"], **answer}).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nMcp-Session-Id: s-1\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data)
        )
        await writer.drain()
        return True


class RotatingToken:
    """An `AuthProvider` whose first token the peer refuses."""

    def __init__(self) -> None:
        self.token, self.refreshed = "old", 0

    async def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def refresh(self, rejected: dict[str, str]) -> None:
        self.token, self.refreshed = "new", self.refreshed + 1


async def call_echo(url: str, count: int, auth: RotatingToken | None = None) -> tuple[list[str], int]:
    connection = StreamableHttpConnection(PeerConfig(id=1, name="lean", transport="streamable-http", url=url, connect_timeout=5, call_timeout=5))
    connection.auth = auth  # type: ignore[assignment]
    try:
        await connection.start()
        assert connection._lean is not None  # the lean client carries the calls
        texts = []
        for number in range(count):
            reply = await connection.request("tools/call", {"name": "echo", "arguments": {"text": f"hi {number}"}})
            texts.append(reply["result"]["content"][0]["text"])
        return texts, connection._lean.opened
    finally:
        await connection.close()


def test_calls_over_a_streamable_http_connection_share_one_kept_alive_connection() -> None:
    peer = McpServer()

    async def scenario() -> tuple[list[str], int]:
        async with peer.server.running() as url:
            return await call_echo(url, 5)

    texts, opened = run(scenario())

    assert texts == [f"hi {n}" for n in range(5)]
    assert opened == 1


def test_refused_credentials_are_refreshed_and_the_request_sent_once_more() -> None:
    peer = McpServer(token_required="new")
    auth = RotatingToken()

    async def scenario() -> tuple[list[str], int]:
        async with peer.server.running() as url:
            return await call_echo(url, 2, auth)

    texts, opened = run(scenario())

    assert texts == ["hi 0", "hi 1"] and auth.refreshed == 1
    assert opened == 1  # the 401 was read to its end, so its connection carried the retry
    assert "Bearer old" in peer.authorizations and peer.authorizations[-1] == "Bearer new"


def test_a_silent_peer_is_a_timeout_for_the_caller() -> None:
    async def scenario() -> None:
        async with Server(silent).running() as url:
            connection = StreamableHttpConnection(PeerConfig(id=1, name="slow", transport="streamable-http", url=url, connect_timeout=1, call_timeout=1))
            try:
                with pytest.raises((UpstreamTimeoutError, UpstreamUnavailableError)) as caught:
                    await connection.start()
                assert "peer 'slow'" in str(caught.value)
            finally:
                await connection.close()

    run(scenario())
