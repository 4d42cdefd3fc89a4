"""Params that are not an object get a clear JSON-RPC error in every state, never a 500 (issue 15).

`{"jsonrpc":"2.0","id":1,"method":"tools/call","params":"nope"}` POSTed to /mcp with no session
header answered 500: the Streamable HTTP consumer read `params.get("_meta")` to choose the era
before anything checked the params' shape. Now `dispatcher.params_of` is the one check, and
everything that reads params goes through it. The state-aware fuzzer
(tests/hardening/test_fuzz_mcp.py) found the class; these are its cases, pinned.
"""

from __future__ import annotations

from typing import Any

import pytest

from mcp_endpoint import jsonrpc
from tests.base import MODERN, AsgiTestCase, McpClient, SseClient, modern_meta, ws_communicator

NOT_OBJECTS: list[Any] = ["nope", 5, 1.5, True, [], [[], []], ["a", {"b": 1}]]


def call(params: Any, method: str = "tools/call") -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}


class ParamsShapeTests(AsgiTestCase):
    async def test_without_a_session_the_answer_is_400_no_session(self) -> None:
        for params in NOT_OBJECTS:
            reply = await McpClient().post(call(params))
            assert (reply.status, reply.error_code) == (400, jsonrpc.INVALID_REQUEST), (params, reply)
            assert reply.json()["id"] == 1

    async def test_with_an_unknown_session_the_answer_is_404(self) -> None:
        for params in NOT_OBJECTS:
            reply = await McpClient().post(call(params), {"mcp-session-id": "no-such-session"})
            assert (reply.status, reply.error_code) == (404, jsonrpc.INVALID_REQUEST), (params, reply)

    async def test_in_a_handshake_session_the_answer_is_invalid_params(self) -> None:
        client = McpClient()
        await client.initialize()
        for params in NOT_OBJECTS:
            reply = await client.post(call(params))
            assert (reply.status, reply.error_code) == (200, jsonrpc.INVALID_PARAMS), (params, reply)

    async def test_in_the_2026_era_the_answer_is_invalid_params(self) -> None:
        for params in NOT_OBJECTS:
            reply = await McpClient().post(call(params), {"mcp-protocol-version": MODERN, "mcp-method": "tools/call"})
            assert (reply.status, reply.error_code) == (400, jsonrpc.INVALID_PARAMS), (params, reply)

    async def test_initialize_with_params_that_are_not_an_object(self) -> None:
        for params in NOT_OBJECTS:
            reply = await McpClient().post(call(params, "initialize"))
            assert reply.error_code == jsonrpc.INVALID_PARAMS and reply.status < 500, (params, reply)
            assert "mcp-session-id" not in reply.headers

    async def test_a_notification_with_params_that_are_not_an_object_is_acknowledged(self) -> None:
        client = McpClient()
        await client.initialize()
        for params in NOT_OBJECTS:
            reply = await client.post({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": params})
            assert reply.status == 202, (params, reply)
        assert (await client.call("ping")).status == 200

    async def test_over_websocket_and_legacy_sse(self) -> None:
        socket = ws_communicator()
        connected, _ = await socket.connect(5)
        assert connected
        try:
            await socket.send_json_to(call("nope"))
            answer = await socket.receive_json_from(5)
            assert answer["error"]["code"] == jsonrpc.INVALID_PARAMS, answer
        finally:
            await socket.disconnect()
        async with SseClient() as client:
            await client.initialize()
            posted = await client.post(call("nope") | {"id": 9})
            assert posted.status == 202
            answer = await client.reply_to(9)
            assert answer["error"]["code"] == jsonrpc.INVALID_PARAMS, answer


@pytest.mark.parametrize("meta", ["x", 1, [], None, True])
def test_a_meta_that_is_not_an_object_is_not_an_envelope(meta: Any) -> None:
    from mcp_endpoint.dispatcher import has_modern_envelope

    assert not has_modern_envelope({"params": {"_meta": meta}})
    assert has_modern_envelope({"params": {"_meta": modern_meta()}})
