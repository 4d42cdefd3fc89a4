"""fedmcp as a client: what it does when a Streamable HTTP upstream is picky or drops a stream.

Each upstream here is scripted behind the outbound HTTP seam (`httpx.MockTransport`):

* one that answers a protocol version it does not speak with its list of supported versions
  (`-32022` in 2026-07-28, `data.supported` in the handshake era's error too): the gateway picks
  a version from that list it speaks and tries again, instead of giving up;
* one that closes a call's SSE stream before answering, after a priming event (SEP-1699): the
  gateway waits the `retry` delay and resumes with `GET` + `Last-Event-ID`, instead of failing
  the call with -32010.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine, Iterator
from typing import Any
from unittest import mock

import httpx
import pytest

from federation.upstream.base import PeerConfig, UpstreamError
from federation.upstream.streamable_http import StreamableHttpConnection

URL = "http://127.0.0.1:9/mcp"
PEER = PeerConfig(id=11, name="picky", transport="streamable-http", url=URL, connect_timeout=5, call_timeout=5)
JsonDict = dict[str, Any]
Handler = Callable[[httpx.Request], Coroutine[Any, Any, httpx.Response]]


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(20):
            return await coro

    return asyncio.run(bounded())


@pytest.fixture
def upstream() -> Iterator[Callable[[Handler], None]]:
    """Install a scripted upstream: every request of the connection goes to the given handler."""
    handlers: list[Handler] = []

    async def handle(request: httpx.Request) -> httpx.Response:
        return await handlers[0](request)

    def client(**_: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(handle))

    with mock.patch("federation.upstream.streamable_http.outbound_client", client):
        yield handlers.append


def error(request_id: Any, code: int, message: str, data: Any = None, status: int = 400) -> httpx.Response:
    body: JsonDict = {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}
    if data is not None:
        body["error"]["data"] = data
    return httpx.Response(status, json=body)


def result(request_id: Any, value: JsonDict, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(200, json={"jsonrpc": "2.0", "id": request_id, "result": value}, headers=headers)


def initialize_result(version: str) -> JsonDict:
    return {"protocolVersion": version, "capabilities": {"tools": {}}, "serverInfo": {"name": "picky", "version": "1"}}


# --- unsupported protocol versions --------------------------------------------------------------


def test_an_initialize_refused_for_its_version_is_retried_with_one_the_upstream_lists(upstream: Callable[[Handler], None]) -> None:
    """Servers that answer an unknown version with an error (not a counter-offer) still get connected."""
    asked: list[str] = []

    async def handle(request: httpx.Request) -> httpx.Response:
        if request.method != "POST":
            return httpx.Response(405)
        message = json.loads(request.content)
        method = message.get("method")
        if method == "server/discover":
            return error(message["id"], -32022, "Unsupported protocol version", {"supported": ["2025-06-18"], "requested": "2026-07-28"})
        if method == "initialize":
            version = message["params"]["protocolVersion"]
            asked.append(version)
            if version != "2025-06-18":
                return error(message["id"], -32602, "Unsupported protocol version", {"supported": ["2025-06-18"], "requested": version})
            return result(message["id"], initialize_result("2025-06-18"), {"mcp-session-id": "s1"})
        if "id" not in message:
            return httpx.Response(202)
        return result(message["id"], {"tools": []})

    upstream(handle)

    async def scenario() -> tuple[str, JsonDict]:
        connection = StreamableHttpConnection(PEER)
        try:
            await connection.start()
            return connection.protocol_version, await connection.request("tools/list", {})
        finally:
            await connection.close()

    version, reply = run(scenario())
    assert version == "2025-06-18"
    assert reply["result"] == {"tools": []}
    assert asked[-1] == "2025-06-18"


def test_a_version_list_without_one_we_speak_still_fails_clearly(upstream: Callable[[Handler], None]) -> None:
    async def handle(request: httpx.Request) -> httpx.Response:
        message = json.loads(request.content)
        return error(message.get("id"), -32022, "Unsupported protocol version", {"supported": ["2031-01-01"]})

    upstream(handle)

    async def scenario() -> None:
        connection = StreamableHttpConnection(PEER)
        try:
            await connection.start()
        finally:
            await connection.close()

    with pytest.raises(UpstreamError) as failure:
        run(scenario())
    assert "picky" in str(failure.value)


# --- a call's stream closed before its answer ---------------------------------------------------


def test_a_stream_closed_before_the_answer_is_resumed_with_last_event_id(upstream: Callable[[Handler], None]) -> None:
    gets: list[dict[str, str]] = []
    call_id: list[Any] = []

    async def handle(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            headers = {k.lower(): v for k, v in request.headers.items()}
            if "last-event-id" not in headers:
                return httpx.Response(405)  # no standalone stream
            gets.append(headers)
            answer = {"jsonrpc": "2.0", "id": call_id[0], "result": {"content": [{"type": "text", "text": "resumed"}]}}
            body = f"id: e2\nevent: message\ndata: {json.dumps(answer)}\n\n"
            return httpx.Response(200, content=body.encode(), headers={"content-type": "text/event-stream"})
        if request.method == "DELETE":
            return httpx.Response(200)
        message = json.loads(request.content)
        method = message.get("method")
        if method == "server/discover":
            return error(message["id"], -32601, "Method not found", status=404)
        if method == "initialize":
            return result(message["id"], initialize_result("2025-11-25"), {"mcp-session-id": "s1"})
        if "id" not in message:
            return httpx.Response(202)
        call_id.append(message["id"])
        # The priming event, then the server closes the stream (SEP-1699 polling).
        body = b"id: e1\nretry: 10\ndata: \n\n"
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    upstream(handle)

    async def scenario() -> JsonDict:
        connection = StreamableHttpConnection(PEER)
        try:
            await connection.start()
            return await connection.request("tools/call", {"name": "slow", "arguments": {}})
        finally:
            await connection.close()

    reply = run(scenario())
    assert reply["result"]["content"][0]["text"] == "resumed"
    assert [(g["last-event-id"], g["mcp-session-id"], g["accept"]) for g in gets] == [("e1", "s1", "text/event-stream")]


def test_a_stream_closed_without_a_priming_event_still_fails_as_unavailable(upstream: Callable[[Handler], None]) -> None:
    """Without an event id there is nothing to resume from: the call fails, as before."""

    async def handle(request: httpx.Request) -> httpx.Response:
        if request.method != "POST":
            return httpx.Response(405)
        message = json.loads(request.content)
        method = message.get("method")
        if method == "server/discover":
            return error(message["id"], -32601, "Method not found", status=404)
        if method == "initialize":
            return result(message["id"], initialize_result("2025-11-25"), {"mcp-session-id": "s1"})
        if "id" not in message:
            return httpx.Response(202)
        return httpx.Response(200, content=b": nothing\n\n", headers={"content-type": "text/event-stream"})

    upstream(handle)

    async def scenario() -> JsonDict:
        connection = StreamableHttpConnection(PEER)
        try:
            await connection.start()
            return await connection.request("tools/call", {"name": "slow", "arguments": {}})
        finally:
            await connection.close()

    with pytest.raises(UpstreamError, match="closed the stream"):
        run(scenario())
