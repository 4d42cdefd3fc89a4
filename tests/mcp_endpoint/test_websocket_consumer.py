"""The WebSocket transport at /ws: subprotocol `mcp`, one JSON-RPC message per text frame."""

from __future__ import annotations

import json

from mcp_endpoint import jsonrpc
from mcp_endpoint.consumers.websocket import WS_1003_UNSUPPORTED_DATA
from tests.base import HANDSHAKE, AsgiTestCase, request, ws_communicator

INITIALIZE = request(
    "initialize",
    {"protocolVersion": HANDSHAKE, "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
)


class WebSocketConsumerTests(AsgiTestCase):
    async def test_it_refuses_a_client_without_the_mcp_subprotocol(self) -> None:
        socket = ws_communicator(subprotocols=())

        connected, _ = await socket.connect()

        self.assertFalse(connected)
        await socket.disconnect()

    async def test_it_refuses_a_foreign_origin(self) -> None:
        socket = ws_communicator(origin="http://evil.example")

        connected, _ = await socket.connect()

        self.assertFalse(connected)
        await socket.disconnect()

    async def test_it_accepts_a_client_that_sends_no_origin(self) -> None:
        # Non-browser clients (the SDK 1.x websocket_client, CLIs) send no Origin header.
        socket = ws_communicator(origin=None)

        connected, subprotocol = await socket.connect()

        self.assertTrue(connected)
        self.assertEqual(subprotocol, "mcp")
        await socket.disconnect()

    async def test_initialize_answers_with_the_protocol_version(self) -> None:
        socket = ws_communicator()
        connected, subprotocol = await socket.connect()
        self.assertTrue(connected)
        self.assertEqual(subprotocol, "mcp")

        await socket.send_json_to(INITIALIZE)
        reply = await socket.receive_json_from()

        self.assertEqual(reply["id"], 1)
        self.assertEqual(reply["result"]["protocolVersion"], HANDSHAKE)
        self.assertIn("tools", reply["result"]["capabilities"])
        await socket.disconnect()

    async def test_a_frame_that_is_not_json_gets_32700_and_the_socket_stays_open(self) -> None:
        socket = ws_communicator()
        await socket.connect()

        await socket.send_to(text_data="{not json")
        reply = await socket.receive_json_from()
        await socket.send_json_to(INITIALIZE)
        after = await socket.receive_json_from()

        self.assertEqual(reply["error"]["code"], jsonrpc.PARSE_ERROR)
        self.assertIsNone(reply["id"])
        self.assertIn("result", after)
        await socket.disconnect()

    async def test_a_request_before_initialize_gets_32600(self) -> None:
        socket = ws_communicator()
        await socket.connect()

        await socket.send_json_to(request("tools/list", request_id="early"))
        reply = await socket.receive_json_from()

        self.assertEqual(reply["id"], "early")
        self.assertEqual(reply["error"]["code"], jsonrpc.INVALID_REQUEST)
        await socket.disconnect()

    async def test_ping_is_answered_before_initialize(self) -> None:
        socket = ws_communicator()
        await socket.connect()

        await socket.send_json_to(request("ping", request_id=3))
        reply = await socket.receive_json_from()

        self.assertEqual(reply, {"jsonrpc": "2.0", "id": 3, "result": {}})
        await socket.disconnect()

    async def test_a_binary_frame_closes_the_socket_with_1003(self) -> None:
        socket = ws_communicator()
        await socket.connect()

        await socket.send_to(bytes_data=json.dumps(INITIALIZE).encode())
        closed = await socket.receive_output()

        self.assertEqual(closed, {"type": "websocket.close", "code": WS_1003_UNSUPPORTED_DATA})
        await socket.disconnect()

    async def test_after_initialize_it_lists_the_catalog(self) -> None:
        socket = ws_communicator()
        await socket.connect()
        await socket.send_json_to(INITIALIZE)
        await socket.receive_json_from()
        await socket.send_json_to({"jsonrpc": "2.0", "method": "notifications/initialized"})

        await socket.send_json_to(request("tools/list", request_id=2))
        reply = await socket.receive_json_from()

        self.assertEqual(reply["id"], 2)
        self.assertEqual(reply["result"]["tools"], [])
        await socket.disconnect()
