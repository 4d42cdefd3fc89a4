"""The legacy HTTP+SSE upstream over the lean client: what goes over the wire, and bad answers.

A scripted HTTP+SSE peer on loopback (tests/federation/sse_peer.py) answers `initialize` and
`tools/call` (`echo`, or `hang`, which never answers); each test changes one thing about its
answers: the status of a POST, its body, the stream breaking, credentials. The behaviours shared
with the other single-stream kinds (correlation, cancellation, reconnection) are in
test_upstream_transports.py, over both clients.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any
from unittest import mock

import pytest
from mcp_types.version import LATEST_HANDSHAKE_VERSION

from federation.upstream.base import PeerConfig, UpstreamTimeoutError, UpstreamUnavailableError
from federation.upstream.sse import SseConnection
from tests.federation.sse_peer import CUT, ENDPOINT, SsePeer, chunk

TIMEOUT = 20.0
ECHO = {"name": "echo", "arguments": {"text": "hi"}}


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(TIMEOUT):
            return await coro

    return asyncio.run(bounded())


class Script:
    """The peer's MCP side: answers on the stream; `status` maps a tools/call name to a POST status."""

    def __init__(self, **status: int) -> None:
        self.status = status
        self.peer = SsePeer(self.receive)
        self.hanging = asyncio.Event()
        """Set when a call to `hang` arrived."""

    async def receive(self, message: dict[str, Any]) -> int | None:
        method, params = message.get("method"), message.get("params") or {}
        if method == "initialize":
            info = {"name": "scripted", "version": "1"}
            result = {"protocolVersion": LATEST_HANDSHAKE_VERSION, "capabilities": {"tools": {}}, "serverInfo": info}
            await self.peer.outbox.put({"jsonrpc": "2.0", "id": message["id"], "result": result})
        elif method == "tools/call" and params["name"] in self.status:
            return self.status[params["name"]]
        elif method == "tools/call" and params["name"] == "echo":
            text = params["arguments"]["text"]
            await self.peer.outbox.put({"jsonrpc": "2.0", "id": message["id"], "result": {"content": [{"type": "text", "text": text}]}})
        elif method == "tools/call" and params["name"] == "hang":
            self.hanging.set()
        return None


def connection_to(peer: SsePeer, *, auth: RotatingToken | None = None, call_timeout: float = 5) -> SseConnection:
    config = PeerConfig(id=1, name="legacy", transport="sse", url=peer.url, connect_timeout=5, call_timeout=call_timeout)
    return SseConnection(config, auth=auth)


@contextlib.asynccontextmanager
async def started(peer: SsePeer, **options: Any) -> AsyncIterator[SseConnection]:
    """Run `peer` and a started connection to it; close both after."""
    async with peer.running():
        connection = connection_to(peer, **options)
        await connection.start()
        try:
            yield connection
        finally:
            await connection.close()


async def echo(connection: SseConnection, text: str = "hi") -> str:
    reply = await connection.request("tools/call", {"name": "echo", "arguments": {"text": text}})
    return str(reply["result"]["content"][0]["text"])


# --- the wire ------------------------------------------------------------------------------------


def test_calls_post_over_one_kept_alive_connection_beside_the_stream() -> None:
    script = Script()

    async def scenario() -> tuple[list[str], int]:
        async with started(script.peer) as connection:
            texts = [await echo(connection, f"hi {n}") for n in range(5)]
            assert connection._post_pool is not None
            return texts, connection._post_pool.opened

    texts, opened = run(scenario())

    assert texts == [f"hi {n}" for n in range(5)]
    assert (opened, script.peer.connections) == (1, 2)
    [get] = script.peer.heads("GET")
    assert get.startswith("GET /sse HTTP/1.1\r\n") and "Accept: text/event-stream" in get
    posts = script.peer.heads("POST")
    assert len(posts) == 7  # initialize, notifications/initialized, five calls
    assert all(head.startswith(f"POST {ENDPOINT} HTTP/1.1\r\n") and "User-Agent: fedmcp" in head for head in posts)
    assert all("Content-Type: application/json" in head and "Accept-Encoding: identity" in head for head in posts)


# --- bad answers ---------------------------------------------------------------------------------


def test_a_post_refused_with_an_error_status_fails_the_call_and_keeps_the_session() -> None:
    script = Script(broken=500)

    async def scenario() -> tuple[str, bool, str]:
        async with started(script.peer) as connection:
            with pytest.raises(UpstreamUnavailableError) as caught:
                await connection.request("tools/call", {"name": "broken", "arguments": {}})
            return str(caught.value), connection.is_healthy(), await echo(connection)

    message, healthy, text = run(scenario())

    assert message == "peer 'legacy' answered HTTP 500"
    assert healthy and text == "hi"


def test_a_post_answered_404_ends_the_session() -> None:
    script = Script(forgotten=404)

    async def scenario() -> tuple[str, bool]:
        async with started(script.peer) as connection:
            with pytest.raises(UpstreamUnavailableError) as caught:
                await connection.request("tools/call", {"name": "forgotten", "arguments": {}})
            return str(caught.value), connection.is_healthy()

    message, healthy = run(scenario())

    assert message == "peer 'legacy' answered HTTP 404"
    assert not healthy


def test_a_post_reply_past_the_cap_is_not_read_and_its_connection_not_reused() -> None:
    script = Script()
    script.peer.post_body = b"x" * (1024 * 1024)

    async def scenario() -> tuple[list[str], int]:
        async with started(script.peer) as connection:
            texts = [await echo(connection), await echo(connection)]
            assert connection._post_pool is not None
            return texts, connection._post_pool.opened

    texts, opened = run(scenario())

    assert texts == ["hi", "hi"]
    assert opened == 4  # one per POST: initialize, notifications/initialized and two calls


def test_a_post_the_peer_never_answers_times_out() -> None:
    script = Script()

    async def never(message: dict[str, Any]) -> int | None:
        if message.get("method") == "tools/call":
            await asyncio.Event().wait()
        return await script.receive(message)

    script.peer.receive = never

    async def scenario() -> str:
        async with started(script.peer, call_timeout=0.5) as connection:
            with pytest.raises(UpstreamTimeoutError) as caught:
                await echo(connection)
            return str(caught.value)

    assert run(scenario()).startswith("peer 'legacy' ")


def test_a_stream_ending_in_the_middle_of_a_call_fails_it_and_the_session() -> None:
    script = Script()

    async def scenario() -> tuple[str, bool]:
        async with started(script.peer) as connection:
            call = asyncio.create_task(connection.request("tools/call", {"name": "hang", "arguments": {}}))
            await script.hanging.wait()
            await script.peer.outbox.put(None)
            with pytest.raises(UpstreamUnavailableError) as caught:
                await call
            return str(caught.value), connection.is_healthy()

    message, healthy = run(scenario())

    assert message == "peer 'legacy' closed the event stream"
    assert not healthy


@pytest.mark.parametrize(
    ("stream", "said"),
    [
        (b"a\r\nevent", "peer 'legacy' broke the event stream: RemoteProtocolError"),  # cut inside a chunk
        (b"zz\r\n", "peer 'legacy' broke the event stream: RemoteProtocolError"),  # not a chunk size
        (chunk(b"event: message\ndata: " + b"x" * 2000 + b"\n\n"), "peer 'legacy' sent an invalid event stream"),
    ],
)
def test_a_broken_stream_fails_the_call_in_flight_saying_why(stream: bytes, said: str) -> None:
    script = Script()

    async def scenario() -> str:
        async with started(script.peer) as connection:
            call = asyncio.create_task(connection.request("tools/call", {"name": "hang", "arguments": {}}))
            await script.hanging.wait()
            await script.peer.outbox.put(stream)
            await script.peer.outbox.put(CUT)
            with pytest.raises(UpstreamUnavailableError) as caught:
                await call
            return str(caught.value)

    with mock.patch("federation.upstream.sse.MAX_EVENT_BYTES", 1000):
        assert run(scenario()) == said


def test_an_event_that_is_not_json_is_skipped() -> None:
    script = Script()

    async def scenario() -> str:
        async with started(script.peer) as connection:
            await script.peer.outbox.put(chunk(b"event: message\ndata: {not json\n\n"))
            return await echo(connection)

    assert run(scenario()) == "hi"


@pytest.mark.parametrize(
    ("head", "said"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 0\r\n\r\n", "answered HTTP 200 without an event stream"),
        (b"HTTP/1.1 302 Found\r\nLocation: http://169.254.169.254/\r\nContent-Length: 0\r\n\r\n", "answered HTTP 302 without an event stream"),
        (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Encoding: gzip\r\n\r\n", "cannot reach peer 'legacy': RemoteProtocolError"),
    ],
)
def test_a_stream_request_answered_without_an_event_stream_is_refused(head: bytes, said: str) -> None:
    script = Script()
    script.peer.stream_head = head

    async def scenario() -> str:
        async with script.peer.running():
            connection = connection_to(script.peer)
            try:
                with pytest.raises(UpstreamUnavailableError) as caught:
                    await connection.start()
                return str(caught.value)
            finally:
                await connection.close()

    assert said in run(scenario())
    assert len(script.peer.requests) == 1  # the redirect was not followed


# --- credentials ---------------------------------------------------------------------------------


class RotatingToken:
    """An `AuthProvider` that moves to the next token when the peer refuses one."""

    def __init__(self, *tokens: str) -> None:
        self.tokens, self.refreshed = list(tokens), 0

    async def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[0]}"}

    async def refresh(self, rejected: dict[str, str]) -> None:
        self.tokens.pop(0)
        self.refreshed += 1


def test_credentials_refused_on_the_stream_are_refreshed_and_sent_once_more() -> None:
    script = Script()
    script.peer.token = "new"
    auth = RotatingToken("old", "new")

    async def scenario() -> str:
        async with started(script.peer, auth=auth) as connection:
            return await echo(connection)

    assert run(scenario()) == "hi"
    assert auth.refreshed == 1
    assert [head.count("Bearer old") for head in script.peer.heads("GET")] == [1, 0]
    assert all("Bearer new" in head for head in script.peer.heads("POST"))


def test_credentials_refused_on_a_post_are_refreshed_and_the_post_sent_once_more_on_its_connection() -> None:
    script = Script()
    script.peer.token = "first"
    auth = RotatingToken("first", "second")

    async def scenario() -> tuple[str, int]:
        async with started(script.peer, auth=auth) as connection:
            script.peer.token = "second"  # the peer rotated its credentials
            text = await echo(connection)
            assert connection._post_pool is not None
            return text, connection._post_pool.opened

    text, opened = run(scenario())

    assert text == "hi" and auth.refreshed == 1
    assert opened == 1  # the refusal was read to its end, so its connection carried the second try
    assert ["Bearer first" in head for head in script.peer.heads("POST")] == [True, True, True, False]
