"""The official MCP client (mcp 2.x) against a real gateway federating two real peers.

Every behaviour runs over each way a host can reach the aggregated endpoint: Streamable HTTP
at /mcp with `mode="auto"`, `"legacy"` and `"2026-07-28"`, and legacy HTTP+SSE at /sse. Both
peers (conftest: `web` over Streamable HTTP, `local` over stdio) speak both eras. The gateway
gives a handshake-era host the handshake era of `web` (a connection of its own), but `local`
is one process in 2026-07-28, so handshake-era hosts also exercise the gateway's bridge between
eras there (input_required turned into sampling/elicitation requests to the host).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.session import ClientRequestContext
from mcp.client.sse import sse_client
from mcp.shared.exceptions import MCPError
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS

from mcp_endpoint import jsonrpc
from tests.e2e.conftest import PEERS, sdk_client
from tests.e2e.harness import Gateway

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

WAIT = 20.0
"""Upper bound for anything the test waits for; a healthy run needs a fraction of a second."""
SAMPLED_TEXT = "sampled-by-the-test"


@dataclass(frozen=True)
class Connection:
    """One way for a host to reach the gateway: a transport, a client mode and an endpoint."""

    transport: str
    mode: str

    @property
    def modern(self) -> bool:
        # The gateway answers server/discover, so "auto" settles on 2026-07-28.
        return self.mode != "legacy"

    @contextlib.asynccontextmanager
    async def client(self, gateway: Gateway, path: str = "", **kwargs: Any) -> AsyncIterator[Client]:
        """Connect as alice: her bearer token goes on every request of the transport."""
        headers = gateway.auth_headers()
        if self.transport == "sse":
            async with Client(sse_client(gateway.url(f"{path}/sse"), headers=headers), mode=self.mode, **kwargs) as client:
                yield client
        else:
            async with sdk_client(gateway.url(f"{path}/mcp"), headers=headers, mode=self.mode, **kwargs) as client:
                yield client


CONNECTIONS = [
    pytest.param(Connection("streamable-http", "auto"), id="http-auto"),
    pytest.param(Connection("streamable-http", "legacy"), id="http-legacy"),
    pytest.param(Connection("streamable-http", "2026-07-28"), id="http-2026-07-28"),
    pytest.param(Connection("sse", "legacy"), id="sse-legacy"),
]


@dataclass
class Received:
    """Collects what a callback receives, so a test can wait (bounded) for N items."""

    items: list[Any] = field(default_factory=list)
    _changed: anyio.Event = field(default_factory=anyio.Event)

    def add(self, item: Any) -> None:
        self.items.append(item)
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_for(self, count: int) -> list[Any]:
        with anyio.fail_after(WAIT):
            while len(self.items) < count:
                await self._changed.wait()
        return self.items


def texts(result: types.CallToolResult | types.GetPromptResult) -> list[str]:
    if isinstance(result, types.GetPromptResult):
        blocks: list[Any] = [message.content for message in result.messages]
    else:
        blocks = list(result.content)
    return [block.text for block in blocks if isinstance(block, types.TextContent)]


@pytest.fixture(params=CONNECTIONS)
def connection(request: pytest.FixtureRequest) -> Connection:
    return request.param


@pytest.fixture(params=PEERS)
def peer(request: pytest.FixtureRequest) -> str:
    return request.param


async def test_it_negotiates_the_era_the_mode_asks_for(gateway: Gateway, connection: Connection) -> None:
    async with connection.client(gateway) as client:
        expected = MODERN_PROTOCOL_VERSIONS if connection.modern else HANDSHAKE_PROTOCOL_VERSIONS
        assert client.protocol_version in expected
        if connection.modern:
            # mode="2026-07-28" adopts the version without asking (and caches what it adopted).
            raw = await client.session.send_discover(client.protocol_version)
            capabilities = types.DiscoverResult.model_validate(raw).capabilities
        else:
            capabilities = client.server_capabilities
    assert capabilities.tools is not None and capabilities.resources is not None and capabilities.prompts is not None


async def test_it_lists_the_tools_of_both_peers_under_prefixed_names(gateway: Gateway, connection: Connection) -> None:
    async with connection.client(gateway) as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
    for peer in PEERS:
        assert {f"{peer}__add", f"{peer}__whoami", f"{peer}__test_sampling"} <= names
    assert not any("__" not in name for name in names)


async def test_it_calls_a_tool_on_each_peer(gateway: Gateway, connection: Connection, peer: str) -> None:
    async with connection.client(gateway) as client:
        added = await client.call_tool(f"{peer}__add", {"a": 2, "b": 3})
        who = await client.call_tool(f"{peer}__whoami", {})
    assert not added.is_error and texts(added) == ["5"]
    assert texts(who) == [peer]


async def test_an_unknown_tool_fails_with_invalid_params(gateway: Gateway, connection: Connection) -> None:
    async with connection.client(gateway) as client:
        with pytest.raises(MCPError) as failure:
            await client.call_tool("nobody__add", {"a": 1, "b": 1})
    assert failure.value.code == jsonrpc.INVALID_PARAMS


async def test_it_reads_a_static_and_a_templated_resource(gateway: Gateway, connection: Connection, peer: str) -> None:
    async with connection.client(gateway) as client:
        static = await client.read_resource(f"fedmcp://{peer}/test://static-text")
        templated = await client.read_resource(f"fedmcp://{peer}/test://template/42/data")
        templates = await client.list_resource_templates()
    assert [str(c.uri) for c in static.contents] == [f"fedmcp://{peer}/test://static-text"]
    assert isinstance(static.contents[0], types.TextResourceContents) and static.contents[0].text
    assert [str(c.uri) for c in templated.contents] == [f"fedmcp://{peer}/test://template/42/data"]
    assert isinstance(templated.contents[0], types.TextResourceContents)
    assert json.loads(templated.contents[0].text)["id"] == "42"
    assert f"fedmcp://{peer}/test://template/{{id}}/data" in {t.uri_template for t in templates.resource_templates}


async def test_an_unknown_resource_fails_with_the_not_found_code_of_the_era(
    gateway: Gateway, connection: Connection
) -> None:
    async with connection.client(gateway) as client:
        with pytest.raises(MCPError) as failure:
            await client.read_resource("fedmcp://web/test://no-such-resource")
    # "Resource not found" is -32002 in the handshake era and -32602 from 2026-07-28 on.
    expected = jsonrpc.INVALID_PARAMS if connection.modern else jsonrpc.RESOURCE_NOT_FOUND_LEGACY
    assert failure.value.code == expected


async def test_it_gets_a_prompt_with_arguments(gateway: Gateway, connection: Connection, peer: str) -> None:
    async with connection.client(gateway) as client:
        prompt = await client.get_prompt(f"{peer}__test_prompt_with_arguments", {"arg1": "one", "arg2": "two"})
    [text] = texts(prompt)
    assert "'one'" in text and "'two'" in text


async def test_it_relays_progress_notifications(gateway: Gateway, connection: Connection, peer: str) -> None:
    progress = Received()

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.add((value, total))

    async with connection.client(gateway) as client:
        result = await client.call_tool(f"{peer}__test_tool_with_progress", {}, progress_callback=on_progress)
        updates = await progress.wait_for(3)
    assert not result.is_error
    assert updates == [(0.0, 100.0), (50.0, 100.0), (100.0, 100.0)]


async def test_it_relays_log_messages_as_the_era_defines(gateway: Gateway, connection: Connection, peer: str) -> None:
    """Handshake era: logs flow until logging/setLevel raises the threshold.

    2026-07-28: only a request carrying a `logLevel` in its `_meta` gets logs.
    """
    logs = Received()

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logs.add(params)

    async with connection.client(gateway, logging_callback=on_log) as client:
        result = await client.call_tool(f"{peer}__test_tool_with_logging", {})
        assert not result.is_error
        if connection.modern:
            # The messages would travel on this call's own response stream, which has ended.
            assert logs.items == []
        else:
            messages = await logs.wait_for(3)
            assert [m.level for m in messages] == ["info"] * 3


@pytest.mark.parametrize("connection", [c for c in CONNECTIONS if c.values[0].modern])
async def test_a_modern_request_with_a_log_level_gets_log_messages(
    gateway: Gateway, connection: Connection, peer: str
) -> None:
    logs = Received()

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logs.add(params)

    async with connection.client(gateway, logging_callback=on_log, log_level="info") as client:
        await client.call_tool(f"{peer}__test_tool_with_logging", {})
        messages = await logs.wait_for(3)
    assert [m.level for m in messages] == ["info"] * 3


async def test_it_relays_a_sampling_request_to_the_host(gateway: Gateway, connection: Connection, peer: str) -> None:
    asked: list[types.CreateMessageRequestParams] = []

    async def sampling(
        context: ClientRequestContext, params: types.CreateMessageRequestParams
    ) -> types.CreateMessageResult:
        asked.append(params)
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(type="text", text=SAMPLED_TEXT), model="test-model"
        )

    async with connection.client(gateway, sampling_callback=sampling) as client:
        result = await client.call_tool(f"{peer}__test_sampling", {"prompt": "What is 2+2?"})
    assert not result.is_error
    assert [m.content for m in asked[0].messages] == [types.TextContent(type="text", text="What is 2+2?")]
    assert any(SAMPLED_TEXT in text for text in texts(result))


async def test_it_relays_an_elicitation_request_to_the_host(
    gateway: Gateway, connection: Connection, peer: str
) -> None:
    asked: list[types.ElicitRequestParams] = []

    async def elicitation(context: ClientRequestContext, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append(params)
        return types.ElicitResult(action="accept", content={"username": "alice", "email": "alice@example.org"})

    async with connection.client(gateway, elicitation_callback=elicitation) as client:
        result = await client.call_tool(f"{peer}__test_elicitation", {"message": "Who are you?"})
    assert not result.is_error
    assert [p.message for p in asked] == ["Who are you?"]
    [text] = texts(result)
    assert "action=accept" in text and "alice@example.org" in text


PER_PEER_CONNECTIONS = [c for c in CONNECTIONS if c.id in ("http-legacy", "http-2026-07-28")]


@pytest.mark.parametrize("connection", PER_PEER_CONNECTIONS)
async def test_the_per_peer_endpoint_serves_one_peer_under_its_own_names(
    gateway: Gateway, connection: Connection, peer: str
) -> None:
    async with connection.client(gateway, path=f"/peers/{peer}") as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
        who = await client.call_tool("whoami", {})
        added = await client.call_tool("add", {"a": 20, "b": 22})
        static = await client.read_resource("test://static-text")
        prompt = await client.get_prompt("test_simple_prompt")
    assert {"add", "whoami", "test_sampling"} <= names
    assert not any("__" in name for name in names)
    assert texts(who) == [peer]
    assert texts(added) == ["42"]
    assert [str(c.uri) for c in static.contents] == ["test://static-text"]
    assert texts(prompt)


@pytest.mark.parametrize(("method", "path"), [("POST", "/mcp"), ("GET", "/sse")])
async def test_a_host_without_a_token_gets_401_with_a_challenge(gateway: Gateway, method: str, path: str) -> None:
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    body = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    async with httpx2.AsyncClient(timeout=WAIT) as http:
        response = await http.request(method, gateway.url(path), headers=headers, json=body if method == "POST" else None)
    assert response.status_code == 401
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    assert f'resource_metadata="{gateway.public_url}/.well-known/oauth-protected-resource{path}"' in challenge
