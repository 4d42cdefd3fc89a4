"""MCP over WebSocket (/ws, subprotocol `mcp`) against a real gateway with two real peers.

The mcp 2.x SDK has no WebSocket client, so `McpSocket` below is a small JSON-RPC client: one
message per text frame, handshake-era semantics, server->client requests and notifications
interleaved on the same socket. The bearer token goes on the upgrade request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin, Subprotocol

from mcp_endpoint import jsonrpc
from tests.e2e.conftest import PEERS
from tests.e2e.harness import Gateway

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

WAIT = 20.0
"""Upper bound for any single frame; a healthy run needs milliseconds."""
PROTOCOL_VERSION = "2025-11-25"
MCP = Subprotocol("mcp")
JsonDict = dict[str, Any]
OnRequest = Callable[[JsonDict], Awaitable[JsonDict]]


class McpSocket:
    """A minimal MCP client over one WebSocket."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._ids = itertools.count(1)

    async def send(self, message: JsonDict) -> None:
        await self.ws.send(json.dumps(message))

    async def receive(self) -> JsonDict:
        frame = await asyncio.wait_for(self.ws.recv(), WAIT)
        assert isinstance(frame, str), "the gateway sends text frames only"
        message = json.loads(frame)
        assert isinstance(message, dict) and message.get("jsonrpc") == "2.0"
        return message

    async def notify(self, method: str, params: JsonDict | None = None) -> None:
        await self.send({"jsonrpc": "2.0", "method": method, **({"params": params} if params is not None else {})})

    async def request(
        self, method: str, params: JsonDict | None = None, *, on_request: OnRequest | None = None
    ) -> tuple[JsonDict, list[JsonDict]]:
        """Send a request; return its response and the notifications that arrived before it.

        Server->client requests arriving meanwhile are answered with `on_request`'s result, or
        refused with -32601 when there is none.
        """
        request_id = next(self._ids)
        await self.send(
            {"jsonrpc": "2.0", "id": request_id, "method": method, **({"params": params} if params is not None else {})}
        )
        notifications: list[JsonDict] = []
        while True:
            message = await self.receive()
            if "method" not in message and message.get("id") == request_id:
                return message, notifications
            if "method" in message and "id" in message:
                if on_request is None:
                    reply: JsonDict = {
                        "error": {"code": jsonrpc.METHOD_NOT_FOUND, "message": "not supported by this test"}
                    }
                else:
                    reply = {"result": await on_request(message)}
                await self.send({"jsonrpc": "2.0", "id": message["id"], **reply})
            elif "method" in message:
                notifications.append(message)
            else:
                raise AssertionError(f"response to a request this client did not send: {message}")

    async def result(
        self, method: str, params: JsonDict | None = None, *, on_request: OnRequest | None = None
    ) -> JsonDict:
        response, _ = await self.request(method, params, on_request=on_request)
        assert "result" in response, response
        return response["result"]

    async def initialize(self, capabilities: JsonDict | None = None) -> JsonDict:
        result = await self.result(
            "initialize",
            {
                "protocolVersion": PROTOCOL_VERSION,
                "capabilities": capabilities or {},
                "clientInfo": {"name": "e2e-ws", "version": "0"},
            },
        )
        await self.notify("notifications/initialized")
        return result


@contextlib.asynccontextmanager
async def mcp_socket(
    gateway: Gateway, origin: str, *, capabilities: JsonDict | None = None, initialize: bool = True
) -> AsyncIterator[McpSocket]:
    async with connect(
        gateway.ws_url("/ws"),
        subprotocols=[MCP],
        origin=Origin(origin),
        additional_headers=gateway.auth_headers(),
        open_timeout=WAIT,
    ) as ws:
        assert ws.subprotocol == MCP
        socket = McpSocket(ws)
        if initialize:
            await socket.initialize(capabilities)
        yield socket


def texts(result: JsonDict) -> list[str]:
    return [block["text"] for block in result["content"] if block.get("type") == "text"]


@pytest.fixture(params=PEERS)
def peer(request: pytest.FixtureRequest) -> str:
    return request.param


async def test_it_initializes_and_lists_the_tools_of_both_peers(gateway: Gateway, gateway_origin: str) -> None:
    async with mcp_socket(gateway, gateway_origin, initialize=False) as socket:
        init = await socket.initialize()
        tools = await socket.result("tools/list")
    assert init["protocolVersion"] in HANDSHAKE_PROTOCOL_VERSIONS
    assert {"tools", "resources", "prompts"} <= set(init["capabilities"])
    names = {tool["name"] for tool in tools["tools"]}
    for peer in PEERS:
        assert {f"{peer}__add", f"{peer}__whoami"} <= names


async def test_a_request_before_initialize_fails_with_invalid_request(gateway: Gateway, gateway_origin: str) -> None:
    async with mcp_socket(gateway, gateway_origin, initialize=False) as socket:
        response, _ = await socket.request("tools/list")
    assert response["error"]["code"] == jsonrpc.INVALID_REQUEST


async def test_it_answers_ping(gateway: Gateway, gateway_origin: str) -> None:
    async with mcp_socket(gateway, gateway_origin) as socket:
        assert await socket.result("ping") == {}


async def test_it_calls_a_tool_on_each_peer(gateway: Gateway, gateway_origin: str, peer: str) -> None:
    async with mcp_socket(gateway, gateway_origin) as socket:
        added = await socket.result("tools/call", {"name": f"{peer}__add", "arguments": {"a": 2, "b": 3}})
        who = await socket.result("tools/call", {"name": f"{peer}__whoami", "arguments": {}})
    assert added["isError"] is False and texts(added) == ["5"]
    assert texts(who) == [peer]


async def test_it_reads_resources_and_gets_a_prompt(gateway: Gateway, gateway_origin: str, peer: str) -> None:
    async with mcp_socket(gateway, gateway_origin) as socket:
        static = await socket.result("resources/read", {"uri": f"fedmcp://{peer}/test://static-text"})
        templated = await socket.result("resources/read", {"uri": f"fedmcp://{peer}/test://template/7/data"})
        missing, _ = await socket.request("resources/read", {"uri": f"fedmcp://{peer}/test://no-such-resource"})
        prompt = await socket.result("prompts/get", {"name": f"{peer}__test_simple_prompt"})
    assert [c["uri"] for c in static["contents"]] == [f"fedmcp://{peer}/test://static-text"]
    assert static["contents"][0]["text"]
    assert json.loads(templated["contents"][0]["text"])["id"] == "7"
    assert missing["error"]["code"] == jsonrpc.RESOURCE_NOT_FOUND_LEGACY
    assert [m["role"] for m in prompt["messages"]] == ["user"]


async def test_it_relays_progress_with_the_hosts_token(gateway: Gateway, gateway_origin: str, peer: str) -> None:
    async with mcp_socket(gateway, gateway_origin) as socket:
        response, notifications = await socket.request(
            "tools/call",
            {"name": f"{peer}__test_tool_with_progress", "arguments": {}, "_meta": {"progressToken": "p-42"}},
        )
    assert response["result"]["isError"] is False
    progress = [n["params"] for n in notifications if n["method"] == "notifications/progress"]
    assert [(p["progressToken"], p["progress"], p["total"]) for p in progress] == [
        ("p-42", 0, 100),
        ("p-42", 50, 100),
        ("p-42", 100, 100),
    ]


async def test_it_asks_the_host_for_sampling_on_the_socket(gateway: Gateway, gateway_origin: str, peer: str) -> None:
    asked: list[JsonDict] = []

    async def answer(request: JsonDict) -> JsonDict:
        asked.append(request)
        return {
            "role": "assistant",
            "content": {"type": "text", "text": "four, says the socket"},
            "model": "test-model",
        }

    async with mcp_socket(gateway, gateway_origin, capabilities={"sampling": {}}) as socket:
        result = await socket.result(
            "tools/call", {"name": f"{peer}__test_sampling", "arguments": {"prompt": "What is 2+2?"}}, on_request=answer
        )
    assert [r["method"] for r in asked] == ["sampling/createMessage"]
    assert asked[0]["params"]["messages"][0]["content"]["text"] == "What is 2+2?"
    assert result["isError"] is False
    assert any("four, says the socket" in text for text in texts(result))


async def test_it_refuses_a_connection_without_the_mcp_subprotocol(gateway: Gateway, gateway_origin: str) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(
            gateway.ws_url("/ws"), origin=Origin(gateway_origin), additional_headers=gateway.auth_headers(), open_timeout=WAIT
        ):
            pass
    assert refused.value.response.status_code == 403


async def test_it_refuses_a_foreign_origin(gateway: Gateway) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(
            gateway.ws_url("/ws"),
            subprotocols=[MCP],
            origin=Origin("http://evil.example"),
            additional_headers=gateway.auth_headers(),
            open_timeout=WAIT,
        ):
            pass
    assert refused.value.response.status_code == 403


async def test_it_refuses_a_handshake_without_a_token(gateway: Gateway, gateway_origin: str) -> None:
    # daphne cannot send a 401 for a WebSocket handshake: the refusal is a 403.
    with pytest.raises(InvalidStatus) as refused:
        async with connect(gateway.ws_url("/ws"), subprotocols=[MCP], origin=Origin(gateway_origin), open_timeout=WAIT):
            pass
    assert refused.value.response.status_code == 403


async def test_it_accepts_a_non_browser_client_that_sends_no_origin(gateway: Gateway) -> None:
    # Browsers always send Origin on a WebSocket handshake; CLIs and SDK clients send none.
    async with connect(
        gateway.ws_url("/ws"), subprotocols=[MCP], additional_headers=gateway.auth_headers(), open_timeout=WAIT
    ) as ws:
        assert await McpSocket(ws).result("ping") == {}


async def test_a_binary_frame_closes_the_socket_with_1003(gateway: Gateway, gateway_origin: str) -> None:
    # RFC 6455's code for data of a type the endpoint cannot accept; under daphne it used to
    # arrive as 1011 (autobahn refused the code and daphne reported an application error).
    async with mcp_socket(gateway, gateway_origin) as socket:
        await socket.ws.send(b"\x00\x01")
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(socket.ws.recv(), WAIT)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1003, closed.value
