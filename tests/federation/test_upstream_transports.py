"""Every upstream connection kind behind the one `UpstreamConnection` contract.

The end-to-end test runs the same MCP exchange over each transport against real processes on
loopback: the fixture server (tests/fixtures/README.md) over Streamable HTTP in both eras, over
legacy HTTP+SSE and over stdio, and a real daphne gateway with the fixture behind it as the
WebSocket upstream. The other tests drive the two single-stream kinds (SSE, WebSocket) against
a scripted in-process upstream: SSE both through the outbound HTTP seam (`httpx.MockTransport`,
so httpx sends, as behind a proxy) and over loopback (tests/federation/sse_peer.py, so the lean
client sends), WebSocket through a `websockets` server on loopback. Stdio is scripted by a small child process
(`STDIO_UPSTREAM`).

Async code runs under `asyncio.run()` inside plain tests, each bounded by `run()`'s timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any
from unittest import mock
from urllib.parse import urlsplit

import httpx
import pytest
from mcp_types.version import LATEST_HANDSHAKE_VERSION, LATEST_MODERN_VERSION
from websockets.asyncio.server import ServerConnection, serve

from federation.pool import UpstreamPool
from federation.upstream import CONNECTION_KINDS
from federation.upstream.base import (
    Era,
    JsonDict,
    PeerConfig,
    UpstreamConnection,
    UpstreamProtocolError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
    modern_meta,
)
from federation.upstream.sse import SseConnection, resolve_endpoint
from federation.upstream.websocket import WebSocketConnection
from tests.e2e import harness
from tests.federation.sse_peer import SsePeer
from tests.fixtures.everything_server import SCHEMA_TOOLS
from tests.fixtures.everything_server import TOOLS as FIXTURE_TOOLS
from tests.fixtures.tasks_extension import TOOLS as TASK_TOOLS

TIMEOUT = 20.0
"""Bound on each test's async part (seconds)."""
FIXTURE_PEER = "fx"


def run(coro: Coroutine[Any, Any, Any], timeout: float = TIMEOUT) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


# --- real upstreams ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(everything_url: str) -> Iterator[harness.Gateway]:
    """Run a fedmcp gateway with the fixture server as peer `fx`: a WebSocket MCP server."""
    with harness.Gateway(name="transports") as gw:
        gw.migrate()
        gw.command("peer", "add", FIXTURE_PEER, "--url", everything_url)
        gw.start_worker()
        yield gw


@dataclass(frozen=True)
class BearerToken:
    """A fixed bearer token as the connection's credentials (federation/client.py `AuthProvider`)."""

    token: str

    async def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def refresh(self, rejected: dict[str, str]) -> None:
        pass


@dataclass(frozen=True)
class Upstream:
    peer: PeerConfig
    era: Era | None
    expected_era: Era
    protocol_version: str
    auth: BearerToken | None = None

    @property
    def port(self) -> int | None:
        return urlsplit(self.peer.url).port if self.peer.url else None


def _upstream(request: pytest.FixtureRequest, kind: str) -> Upstream:
    if kind.startswith("streamable-http"):
        url = request.getfixturevalue("everything_url")
        peer = PeerConfig(id=1, name="web", transport="streamable-http", url=url)
        if kind.endswith("legacy"):
            return Upstream(peer, "legacy", "legacy", LATEST_HANDSHAKE_VERSION)
        return Upstream(peer, "modern", "modern", LATEST_MODERN_VERSION)
    if kind == "sse":
        peer = PeerConfig(id=2, name="legacy-sse", transport="sse", url=request.getfixturevalue("handshake_only_url"))
        return Upstream(peer, None, "legacy", LATEST_HANDSHAKE_VERSION)
    if kind == "websocket":
        gateway = request.getfixturevalue("gateway")
        url = gateway.ws_url(f"/peers/{FIXTURE_PEER}/ws")
        peer = PeerConfig(id=3, name="ws", transport="websocket", url=url)
        return Upstream(peer, None, "legacy", LATEST_HANDSHAKE_VERSION, BearerToken(gateway.token()))
    command = harness.fixture_command(stdio=True)
    peer = PeerConfig(
        id=4, name="local", transport="stdio", command=command[0], args=tuple(command[1:]), env=(("PYTHONPATH", str(harness.ROOT)),)
    )
    # No era requested: the connection probes server/discover, which the fixture answers.
    return Upstream(peer, None, "modern", LATEST_MODERN_VERSION)


def established_connections_to(port: int) -> int:
    """Count this process's established TCP connections to a loopback port (Linux /proc)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/self/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[len("socket:[") : -1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if fields[3] == "01" and remote_port == port and fields[9] in inodes:
                    count += 1
    return count


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def with_meta(connection: UpstreamConnection, params: JsonDict, meta: JsonDict | None = None) -> JsonDict:
    """Add the `_meta` a request needs in the connection's era."""
    if connection.era == "modern":
        return {**params, "_meta": modern_meta(extra=meta)}
    return {**params, "_meta": meta} if meta else params


TRANSPORTS = ["streamable-http-legacy", "streamable-http-2026-07-28", "sse", "websocket", "stdio"]


@pytest.mark.e2e
@pytest.mark.parametrize("kind", TRANSPORTS)
def test_each_transport_lists_calls_relays_progress_and_closes_cleanly(request: pytest.FixtureRequest, kind: str) -> None:
    upstream = _upstream(request, kind)
    connection = CONNECTION_KINDS[upstream.peer.transport](upstream.peer, era=upstream.era, auth=upstream.auth)
    progress: list[JsonDict] = []

    async def on_message(message: JsonDict) -> JsonDict | None:
        progress.append(message)
        return None

    async def exchange() -> tuple[JsonDict, JsonDict, JsonDict, int, int | None]:
        await connection.start()
        try:
            tools = await connection.request("tools/list", with_meta(connection, {}))
            added = await connection.request("tools/call", with_meta(connection, {"name": "add", "arguments": {"a": 2, "b": 3}}))
            echoed = await connection.request(
                "tools/call",
                with_meta(connection, {"name": "slow_echo", "arguments": {"text": "hi", "delay_ms": 300}}, {"progressToken": "host-7"}),
                on_message=on_message,
            )
            open_before = established_connections_to(upstream.port) if upstream.port else 0
            pid = getattr(connection, "pid", None)
        finally:
            await connection.close()
        return tools, added, echoed, open_before, pid

    tools, added, echoed, open_before, pid = run(exchange())

    assert (connection.era, connection.protocol_version) == (upstream.expected_era, upstream.protocol_version)
    assert "add" in [tool["name"] for tool in tools["result"]["tools"]]
    assert added["result"]["content"] == [{"type": "text", "text": "5"}]
    assert echoed["result"]["content"] == [{"type": "text", "text": "hi"}]
    assert progress, "no progress notification reached on_message"
    assert {m["method"] for m in progress} == {"notifications/progress"}
    assert {m["params"]["progressToken"] for m in progress} == {"host-7"}
    values = [m["params"]["progress"] for m in progress]
    assert values == sorted(values)
    assert not connection.is_healthy()
    if upstream.port is not None:
        assert open_before > 0
        assert established_connections_to(upstream.port) == 0
    if upstream.peer.transport == "stdio":
        assert pid is not None and not process_exists(pid)


@pytest.mark.e2e
@pytest.mark.parametrize("transport", ["sse", "websocket"])
def test_peer_add_syncs_a_catalog(request: pytest.FixtureRequest, gateway: harness.Gateway, transport: str) -> None:
    credentials: list[str] = []
    if transport == "websocket":
        url = gateway.ws_url(f"/peers/{FIXTURE_PEER}/ws")
        # The gateway itself is the upstream: it lets this client in as a trusted gateway would.
        trusted = gateway.command("gateway", "trust", "self", "--issuer", gateway.public_url).stdout
        client_id, secret = (line.split(": ", 1)[1] for line in trusted.splitlines() if line.startswith(("client_id:", "client_secret:")))
        (gateway.dir / "client-secret").write_text(secret)
        credentials = ["--client-id", client_id, "--client-secret-file", str(gateway.dir / "client-secret")]
    else:
        url = request.getfixturevalue("handshake_only_url")
    result = gateway.command("peer", "add", f"via-{transport}", "--url", url, "--transport", transport, *credentials, check=False)

    assert result.returncode == 0, result.stderr
    assert f"Synced via-{transport} (protocol {LATEST_HANDSHAKE_VERSION}): {len(FIXTURE_TOOLS) + len(SCHEMA_TOOLS) + len(TASK_TOOLS)} tools" in result.stdout


# --- scripted upstreams for the single-stream kinds ---------------------------------------------


class ScriptedUpstream:
    """A handshake-era MCP server whose tools script the awkward cases.

    `add` answers; `ask` sends a sampling request and a ping, and answers with the client's
    sampling reply; `hang` never answers; `drop` ends the stream. Server messages go through
    `outbox`; None ends the current stream.
    """

    def __init__(self) -> None:
        self.outbox: asyncio.Queue[JsonDict | None] = asyncio.Queue()
        self.received: list[JsonDict] = []
        self._arrived = asyncio.Event()
        self._asking: dict[str, Any] = {}

    async def receive(self, message: JsonDict) -> None:
        self.received.append(message)
        self._arrived.set()
        method, params = message.get("method"), message.get("params") or {}
        if method == "initialize":
            result = {
                "protocolVersion": LATEST_HANDSHAKE_VERSION,
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "scripted", "version": "1"},
            }
            await self.outbox.put({"jsonrpc": "2.0", "id": message["id"], "result": result})
        elif method == "tools/call" and params.get("name") == "add":
            await self.outbox.put({"jsonrpc": "2.0", "id": message["id"], "result": {"content": [{"type": "text", "text": "5"}]}})
        elif method == "tools/call" and params.get("name") == "ask":
            server_request = f"s-{message['id']}"
            self._asking[server_request] = message["id"]
            await self.outbox.put({"jsonrpc": "2.0", "id": f"p-{message['id']}", "method": "ping"})
            sampling = {"messages": [], "maxTokens": 5}
            await self.outbox.put({"jsonrpc": "2.0", "id": server_request, "method": "sampling/createMessage", "params": sampling})
        elif method == "tools/call" and params.get("name") == "drop":
            await self.outbox.put(None)
        elif "method" not in message and message.get("id") in self._asking:
            reply = {k: v for k, v in message.items() if k in ("result", "error")}
            call = self._asking.pop(message["id"])
            await self.outbox.put({"jsonrpc": "2.0", "id": call, "result": {"content": [{"type": "text", "text": json.dumps(reply)}]}})

    async def wait_for(self, predicate: Callable[[JsonDict], bool]) -> JsonDict:
        """Return the first received message matching `predicate`, waiting for it (bounded by `run`)."""
        while True:
            for message in self.received:
                if predicate(message):
                    return message
            self._arrived.clear()
            await self._arrived.wait()


@contextlib.asynccontextmanager
async def scripted_sse(upstream: ScriptedUpstream, endpoint: str = "/messages/?session_id=abc") -> AsyncIterator[PeerConfig]:
    """Serve `upstream` over HTTP+SSE at the outbound HTTP seam."""

    async def handle(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":

            async def stream() -> AsyncIterator[bytes]:
                yield f"event: endpoint\ndata: {endpoint}\n\n".encode()
                while (message := await upstream.outbox.get()) is not None:
                    yield f"event: message\ndata: {json.dumps(message)}\n\n".encode()

            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=stream())
        assert str(request.url).startswith("http://127.0.0.1:9/"), f"POST left the SSE origin: {request.url}"
        await upstream.receive(json.loads(request.content))
        return httpx.Response(202)

    def client(**_: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(handle))

    with mock.patch("federation.upstream.sse.outbound_client", client):
        yield PeerConfig(id=10, name="scripted", transport="sse", url="http://127.0.0.1:9/sse", connect_timeout=5, call_timeout=5)


@contextlib.asynccontextmanager
async def scripted_sse_lean(upstream: ScriptedUpstream) -> AsyncIterator[PeerConfig]:
    """Serve `upstream` over HTTP+SSE on a loopback port: the lean client carries stream and POSTs."""
    async with SsePeer(upstream.receive, outbox=upstream.outbox).running() as server:
        yield PeerConfig(id=10, name="scripted", transport="sse", url=server.url, connect_timeout=5, call_timeout=5)


@contextlib.asynccontextmanager
async def scripted_websocket(upstream: ScriptedUpstream, subprotocols: list[str] | None = None) -> AsyncIterator[PeerConfig]:
    """Serve `upstream` over WebSocket on a loopback port."""

    async def handle(socket: ServerConnection) -> None:
        async def pump() -> None:
            while (message := await upstream.outbox.get()) is not None:
                await socket.send(json.dumps(message))
            await socket.close()

        pumping = asyncio.create_task(pump())
        try:
            async for frame in socket:
                await upstream.receive(json.loads(frame))
        finally:
            pumping.cancel()

    async with serve(handle, "127.0.0.1", 0, subprotocols=subprotocols if subprotocols is not None else ["mcp"]) as server:  # type: ignore[arg-type]
        port = next(iter(server.sockets)).getsockname()[1]
        yield PeerConfig(id=11, name="scripted", transport="websocket", url=f"ws://127.0.0.1:{port}/", connect_timeout=5, call_timeout=5)


SCRIPTED = {"sse": scripted_sse, "sse-lean": scripted_sse_lean, "websocket": scripted_websocket}


def scripted(kind: str, body: Callable[[ScriptedUpstream, PeerConfig], Awaitable[Any]]) -> Any:
    """Run `body` with a scripted upstream served over `kind`."""

    async def main() -> Any:
        upstream = ScriptedUpstream()
        async with SCRIPTED[kind](upstream) as peer:
            return await body(upstream, peer)

    return run(main())


def is_call(name: str) -> Callable[[JsonDict], bool]:
    return lambda m: m.get("method") == "tools/call" and m["params"]["name"] == name


@pytest.mark.parametrize("kind", SCRIPTED)
def test_server_requests_go_to_the_sole_call_in_flight_and_pings_are_answered(kind: str) -> None:
    relayed: list[JsonDict] = []

    async def on_message(message: JsonDict) -> JsonDict | None:
        relayed.append(message)
        return {"result": {"role": "assistant", "content": {"type": "text", "text": "Paris"}, "model": "m"}}

    async def body(upstream: ScriptedUpstream, peer: PeerConfig) -> tuple[JsonDict, JsonDict]:
        connection = CONNECTION_KINDS[peer.transport](peer)
        await connection.start()
        try:
            reply = await connection.request("tools/call", {"name": "ask", "arguments": {}}, on_message=on_message)
            pong = await upstream.wait_for(lambda m: str(m.get("id", "")).startswith("p-"))
        finally:
            await connection.close()
        return reply, pong

    reply, pong = scripted(kind, body)

    assert [m["method"] for m in relayed] == ["sampling/createMessage"]
    assert json.loads(reply["result"]["content"][0]["text"])["result"]["content"]["text"] == "Paris"
    assert pong["result"] == {}


@pytest.mark.parametrize("kind", SCRIPTED)
def test_server_requests_are_refused_when_several_calls_are_in_flight(kind: str) -> None:
    async def on_message(message: JsonDict) -> JsonDict | None:
        raise AssertionError("a request nobody can own was relayed to a host")

    async def body(upstream: ScriptedUpstream, peer: PeerConfig) -> JsonDict:
        connection = CONNECTION_KINDS[peer.transport](peer)
        await connection.start()
        try:
            hanging = asyncio.create_task(connection.request("tools/call", {"name": "hang"}, on_message=on_message))
            await upstream.wait_for(is_call("hang"))
            reply = await connection.request("tools/call", {"name": "ask", "arguments": {}}, on_message=on_message)
            hanging.cancel()
            return reply
        finally:
            await connection.close()

    reply = scripted(kind, body)

    assert json.loads(reply["result"]["content"][0]["text"])["error"]["code"] == -32603


@pytest.mark.parametrize("kind", SCRIPTED)
def test_cancelling_a_call_sends_notifications_cancelled(kind: str) -> None:
    async def body(upstream: ScriptedUpstream, peer: PeerConfig) -> tuple[JsonDict, JsonDict]:
        connection = CONNECTION_KINDS[peer.transport](peer)
        await connection.start()
        try:
            task = asyncio.create_task(connection.request("tools/call", {"name": "hang"}))
            call = await upstream.wait_for(is_call("hang"))
            task.cancel()
            cancelled = await upstream.wait_for(lambda m: m.get("method") == "notifications/cancelled")
        finally:
            await connection.close()
        return call, cancelled

    call, cancelled = scripted(kind, body)

    assert cancelled["params"]["requestId"] == call["id"]


@pytest.mark.parametrize("kind", SCRIPTED)
def test_a_call_past_its_timeout_raises_and_is_cancelled_upstream(kind: str) -> None:
    async def body(upstream: ScriptedUpstream, peer: PeerConfig) -> tuple[JsonDict, JsonDict]:
        connection = CONNECTION_KINDS[peer.transport](peer)
        await connection.start()
        try:
            with pytest.raises(UpstreamTimeoutError):
                await connection.request("tools/call", {"name": "hang"}, timeout=0.2)
            call = await upstream.wait_for(is_call("hang"))
            cancelled = await upstream.wait_for(lambda m: m.get("method") == "notifications/cancelled")
            healthy = connection.is_healthy()
        finally:
            await connection.close()
        assert healthy
        return call, cancelled

    call, cancelled = scripted(kind, body)

    assert cancelled["params"]["requestId"] == call["id"]


@pytest.mark.parametrize("kind", SCRIPTED)
def test_a_dropped_stream_fails_pending_calls_and_the_pool_reconnects(kind: str) -> None:
    async def body(upstream: ScriptedUpstream, peer: PeerConfig) -> None:
        pool = UpstreamPool()
        try:
            first = await pool.get(peer, prefer="legacy")
            hanging = asyncio.create_task(first.request("tools/call", {"name": "hang"}))
            await upstream.wait_for(is_call("hang"))
            with pytest.raises(UpstreamUnavailableError):
                await first.request("tools/call", {"name": "drop"})
            with pytest.raises(UpstreamUnavailableError):
                await hanging
            assert not first.is_healthy()

            second = await pool.get(peer, prefer="legacy")
            added = await second.request("tools/call", {"name": "add", "arguments": {"a": 2, "b": 3}})
            assert second is not first and second.is_healthy()
            assert added["result"]["content"][0]["text"] == "5"
        finally:
            await pool.close()

    scripted(kind, body)


@pytest.mark.parametrize("kind", SCRIPTED)
def test_a_list_changed_during_a_call_reaches_on_event_which_can_call_back_in(kind: str) -> None:
    relayed: list[JsonDict] = []

    async def on_message(message: JsonDict) -> JsonDict | None:
        relayed.append(message)
        return None

    async def body(upstream: ScriptedUpstream, peer: PeerConfig) -> tuple[list[JsonDict], JsonDict]:
        events: list[JsonDict] = []
        called_back: asyncio.Future[JsonDict] = asyncio.get_running_loop().create_future()

        async def on_event(message: JsonDict) -> None:
            events.append(message)
            # As a catalog re-sync does: a request whose answer arrives on the same stream.
            called_back.set_result(await connection.request("tools/call", {"name": "add", "arguments": {"a": 2, "b": 3}}))

        connection = CONNECTION_KINDS[peer.transport](peer, on_event=on_event)
        await connection.start()
        try:
            hanging = asyncio.create_task(connection.request("tools/call", {"name": "hang"}, on_message=on_message))
            await upstream.wait_for(is_call("hang"))
            await upstream.outbox.put({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
            added = await called_back
            hanging.cancel()
        finally:
            await connection.close()
        return events, added

    events, added = scripted(kind, body)

    assert [m["method"] for m in events] == ["notifications/tools/list_changed"]
    assert added["result"]["content"][0]["text"] == "5"
    assert relayed == []


STDIO_UPSTREAM = r"""
import json, sys

def send(message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()

while line := sys.stdin.readline():
    message = json.loads(line)
    method, request_id = message.get("method"), message.get("id")
    if method is None or request_id is None:
        continue
    if method == "initialize":
        info = {"name": "scripted", "version": "1"}
        result = {"protocolVersion": sys.argv[1], "capabilities": {"tools": {"listChanged": True}}, "serverInfo": info}
        send({"jsonrpc": "2.0", "id": request_id, "result": result})
    elif method == "tools/call":
        send({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
        send({"jsonrpc": "2.0", "id": request_id, "result": {"content": [{"type": "text", "text": "changed"}]}})
    elif method == "tools/list":
        tools = [{"name": "added", "inputSchema": {"type": "object"}}]
        send({"jsonrpc": "2.0", "id": request_id, "result": {"tools": tools}})
    else:
        send({"jsonrpc": "2.0", "id": request_id, "error": {"code": -32601, "message": "Method not found"}})
"""
"""A handshake-era stdio server: every tools/call announces a tools list change, then answers."""


def test_stdio_event_handlers_can_call_back_into_the_connection() -> None:
    peer = PeerConfig(
        id=12,
        name="scripted",
        transport="stdio",
        command=sys.executable,
        args=("-c", STDIO_UPSTREAM, LATEST_HANDSHAKE_VERSION),
        connect_timeout=5,
        call_timeout=5,
    )

    async def main() -> tuple[JsonDict, JsonDict]:
        listed: asyncio.Future[JsonDict] = asyncio.get_running_loop().create_future()

        async def on_event(message: JsonDict) -> None:
            # As a catalog re-sync does: its answer arrives on the stdout the event came from.
            try:
                listed.set_result(await connection.request("tools/list", {}))
            except Exception as exc:
                listed.set_exception(exc)

        connection = CONNECTION_KINDS["stdio"](peer, on_event=on_event)
        await connection.start()
        try:
            changed = await connection.request("tools/call", {"name": "change", "arguments": {}})
            tools = await listed
        finally:
            await connection.close()
        return changed, tools

    changed, tools = run(main())

    assert changed["result"]["content"][0]["text"] == "changed"
    assert [tool["name"] for tool in tools["result"]["tools"]] == ["added"]


@pytest.mark.parametrize("kind", SCRIPTED)
def test_it_refuses_the_2026_era(kind: str) -> None:
    async def body(upstream: ScriptedUpstream, peer: PeerConfig) -> None:
        with pytest.raises(UpstreamProtocolError):
            await CONNECTION_KINDS[peer.transport](peer, era="modern").start()

    scripted(kind, body)


def test_sse_refuses_a_message_endpoint_on_another_origin() -> None:
    async def main() -> list[JsonDict]:
        upstream = ScriptedUpstream()
        async with scripted_sse(upstream, endpoint="http://169.254.169.254/latest/meta-data/") as peer:
            with pytest.raises(UpstreamProtocolError):
                await SseConnection(peer).start()
        return upstream.received

    assert run(main()) == []


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("/messages/?session_id=ab", "http://127.0.0.1:8000/messages/?session_id=ab"),
        ("messages/?session_id=ab", "http://127.0.0.1:8000/mcp/messages/?session_id=ab"),
        ("http://127.0.0.1:8000/m#frag", "http://127.0.0.1:8000/m"),
    ],
)
def test_sse_resolves_a_same_origin_endpoint(endpoint: str, expected: str) -> None:
    assert resolve_endpoint("http://127.0.0.1:8000/mcp/sse", endpoint) == expected


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://127.0.0.1:8001/messages/",
        "https://127.0.0.1:8000/messages/",
        "//169.254.169.254/latest/",
        "http://localhost:8000/messages/",
        "http://user:pw@127.0.0.1:8000/messages/",
        "http://127.0.0.1:99999/messages/",
    ],
)
def test_sse_refuses_an_endpoint_on_another_origin(endpoint: str) -> None:
    with pytest.raises(UpstreamProtocolError):
        resolve_endpoint("http://127.0.0.1:8000/mcp/sse", endpoint)


def test_websocket_refuses_a_server_that_does_not_speak_the_mcp_subprotocol() -> None:
    async def main() -> None:
        async with scripted_websocket(ScriptedUpstream(), subprotocols=[]) as peer:
            with pytest.raises(UpstreamProtocolError):
                await WebSocketConnection(peer).start()

    run(main())
