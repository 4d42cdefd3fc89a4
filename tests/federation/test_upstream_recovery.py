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
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any
from unittest import mock

import httpx
import pytest

from federation.upstream.base import PeerConfig, UpstreamError, modern_meta
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


def sse_message(message: JsonDict) -> httpx.Response:
    """An event stream carrying one message, then its end."""
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=f"event: message\ndata: {json.dumps(message)}\n\n".encode())


def sse_later(ready: asyncio.Event, message: Callable[[], JsonDict], *, then: asyncio.Event | None = None) -> httpx.Response:
    """An event stream open at once, whose one message comes when `ready` is set; it ends when `then` is (or at once)."""

    async def body() -> AsyncIterator[bytes]:
        await ready.wait()
        yield f"event: message\ndata: {json.dumps(message())}\n\n".encode()
        if then is not None:
            await then.wait()

    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body())


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


def test_a_2026_request_refused_with_a_list_naming_2026_is_asked_again_not_downgraded(upstream: Callable[[Handler], None]) -> None:
    """The suite's request-metadata server refuses the first request of each kind with -32022 listing 2026-07-28."""
    seen: list[tuple[str, str | None]] = []
    refused: set[str] = set()

    async def handle(request: httpx.Request) -> httpx.Response:
        if request.method != "POST":
            return httpx.Response(405)
        message = json.loads(request.content)
        method = message.get("method")
        seen.append((method, request.headers.get("mcp-protocol-version")))
        if method not in refused:
            refused.add(method)
            return error(message["id"], -32022, "Unsupported protocol version", {"supported": ["2026-07-28"], "requested": "2026-07-28"})
        if method == "server/discover":
            discovered = {"supportedVersions": ["2026-07-28"], "capabilities": {"tools": {}}, "serverInfo": {"name": "picky", "version": "1"}}
            return result(message["id"], {"resultType": "complete", **discovered})
        return result(message["id"], {"resultType": "complete", "content": [], "isError": False})

    upstream(handle)

    async def scenario() -> tuple[str, JsonDict]:
        connection = StreamableHttpConnection(PEER)
        try:
            await connection.start()
            return connection.era, await connection.request("tools/call", {"name": "t", "arguments": {}, "_meta": modern_meta()})
        finally:
            await connection.close()

    era, reply = run(scenario())
    assert era == "modern"
    assert "result" in reply, reply
    assert [m for m, _ in seen] == ["server/discover", "server/discover", "tools/call", "tools/call"]
    assert {v for _, v in seen} == {"2026-07-28"}


def test_a_2026_refusal_listing_only_other_versions_is_not_retried_in_2026(upstream: Callable[[Handler], None]) -> None:
    discovers: list[Any] = []

    async def handle(request: httpx.Request) -> httpx.Response:
        if request.method != "POST":
            return httpx.Response(405)
        message = json.loads(request.content)
        if message.get("method") == "server/discover":
            discovers.append(message["id"])
            return error(message["id"], -32022, "Unsupported protocol version", {"supported": ["2025-11-25"], "requested": "2026-07-28"})
        if message.get("method") == "initialize":
            return result(message["id"], initialize_result("2025-11-25"), {"mcp-session-id": "s1"})
        return httpx.Response(202)

    upstream(handle)

    async def scenario() -> str:
        connection = StreamableHttpConnection(PEER)
        try:
            await connection.start()
            return connection.protocol_version
        finally:
            await connection.close()

    assert run(scenario()) == "2025-11-25"
    assert len(discovers) == 1


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


# --- a request on the standalone GET stream, outside any call -----------------------------------


def test_a_request_outside_any_call_is_refused_with_a_defined_error(upstream: Callable[[Handler], None]) -> None:
    """A roots/list on the GET stream belongs to no host call: answered -32601, reason no-host-call (docs/INTEROP.md)."""
    answered: asyncio.Queue[JsonDict] = asyncio.Queue()
    events: list[JsonDict] = []
    sent = False

    async def handle(request: httpx.Request) -> httpx.Response:
        nonlocal sent
        if request.method == "GET":
            if sent:
                return httpx.Response(405)
            sent = True
            roots = {"jsonrpc": "2.0", "id": "r-1", "method": "roots/list"}
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=f"event: message\ndata: {json.dumps(roots)}\n\n".encode())
        message = json.loads(request.content)
        if message.get("method") == "server/discover":
            return error(message["id"], -32601, "Method not found", status=404)
        if message.get("method") == "initialize":
            return result(message["id"], initialize_result("2025-11-25"), {"mcp-session-id": "s1"})
        if "method" not in message:
            await answered.put(message)
        return httpx.Response(202)

    upstream(handle)

    async def on_event(message: JsonDict) -> None:
        events.append(message)

    async def scenario() -> JsonDict:
        connection = StreamableHttpConnection(PEER, on_event=on_event)
        try:
            await connection.start()
            return await answered.get()
        finally:
            await connection.close()

    answer = run(scenario())
    assert answer["id"] == "r-1"
    assert answer["error"]["code"] == -32601
    assert answer["error"]["data"] == {"method": "roots/list", "reason": "no-host-call"}
    assert events == []


def test_a_request_on_the_get_stream_during_the_one_call_in_flight_goes_to_that_calls_host(upstream: Callable[[Handler], None]) -> None:
    """As the TypeScript SDK's servers send ctx requests without a related id: on the GET stream, mid-call."""
    call_arrived = asyncio.Event()
    done = asyncio.Event()
    answered: asyncio.Queue[JsonDict] = asyncio.Queue()
    relayed: list[JsonDict] = []

    async def handle(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            params = {"message": "name?", "requestedSchema": {"type": "object", "properties": {}}}
            # Open at once (the session waits for it); the request comes once the call began.
            return sse_later(call_arrived, lambda: {"jsonrpc": "2.0", "id": "e-1", "method": "elicitation/create", "params": params}, then=done)
        if request.method == "DELETE":
            return httpx.Response(200)
        message = json.loads(request.content)
        method = message.get("method")
        if method == "server/discover":
            return error(message["id"], -32601, "Method not found", status=404)
        if method == "initialize":
            return result(message["id"], initialize_result("2025-11-25"), {"mcp-session-id": "s1"})
        if "method" not in message:
            await answered.put(message)
            return httpx.Response(202)
        if "id" not in message:
            return httpx.Response(202)
        call_arrived.set()
        answer = await answered.get()
        done.set()
        return result(message["id"], {"content": [{"type": "text", "text": answer["result"]["action"]}]})

    upstream(handle)

    async def on_message(message: JsonDict) -> JsonDict | None:
        relayed.append(message)
        return {"result": {"action": "accept", "content": {}}}

    async def scenario() -> JsonDict:
        connection = StreamableHttpConnection(PEER)
        try:
            await connection.start()
            return await connection.request("tools/call", {"name": "ask", "arguments": {}}, on_message=on_message)
        finally:
            await connection.close()

    reply = run(scenario())
    assert [m["method"] for m in relayed] == ["elicitation/create"]
    assert reply["result"]["content"][0]["text"] == "accept"


def test_an_answer_sent_on_the_get_stream_while_resuming_ends_the_call(upstream: Callable[[Handler], None]) -> None:
    """The suite's sse-retry server answers on whichever GET comes first; the resumed one may wait forever."""
    stream_closed = asyncio.Event()
    call_id: list[Any] = []
    forever = asyncio.Event()

    async def handle(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            if "last-event-id" in {k.lower() for k in request.headers}:
                await forever.wait()  # the resumed stream never brings the answer
            answer = {"content": [{"type": "text", "text": "on the GET stream"}]}
            return sse_later(stream_closed, lambda: {"jsonrpc": "2.0", "id": call_id[0], "result": answer}, then=forever)
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
        stream_closed.set()
        return httpx.Response(200, content=b"id: e1\nretry: 10\ndata: \n\n", headers={"content-type": "text/event-stream"})

    upstream(handle)

    async def scenario() -> JsonDict:
        connection = StreamableHttpConnection(PEER)
        try:
            await connection.start()
            return await connection.request("tools/call", {"name": "slow", "arguments": {}})
        finally:
            await connection.close()

    assert run(scenario())["result"]["content"][0]["text"] == "on the GET stream"
