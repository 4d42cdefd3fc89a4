"""The MCP consumers' own message loop (mcp_endpoint/consumers/base.py `DirectDispatchMixin`).

An MCP request holds no channel-layer channel of its own: what crosses workers travels on the
session's and the correlator's channels, which exist once per stream or worker, not per POST.
Whole answers carry their Content-Length (daphne would otherwise frame them as chunked).
"""

from __future__ import annotations

from unittest import mock

from channels.layers import get_channel_layer

from tests.base import AsgiTestCase, McpClient, http, ws_communicator


class ConsumerLoopTests(AsgiTestCase):
    async def test_a_post_on_a_session_opens_no_channel(self) -> None:
        client = McpClient()
        await client.initialize()
        await client.call("ping")  # the worker's correlation channel, once per process
        layer = get_channel_layer()
        with mock.patch.object(layer, "new_channel", wraps=layer.new_channel) as new_channel:
            for _ in range(3):
                reply = await client.call("ping")
                assert reply.status == 200 and reply.json()["result"] == {}
        assert new_channel.call_count == 0

    async def test_whole_answers_carry_their_content_length(self) -> None:
        client = McpClient()
        await client.initialize()
        answers = [
            await client.call("ping"),  # JSON
            await client.post({"jsonrpc": "2.0", "method": "notifications/initialized"}),  # 202, empty
            await client.post(b"{not json"),  # an error
            await http("PUT", "/mcp"),  # plain text
        ]
        assert [a.status for a in answers] == [200, 202, 400, 405]
        assert [a.headers.get("content-length") for a in answers] == [str(len(a.body)) for a in answers]

    async def test_a_websocket_answers_messages_in_order_on_one_channel_for_its_session(self) -> None:
        layer = get_channel_layer()
        with mock.patch.object(layer, "new_channel", wraps=layer.new_channel) as new_channel:
            communicator = ws_communicator()
            connected, subprotocol = await communicator.connect()
            assert connected and subprotocol == "mcp"
            try:
                await communicator.send_json_to({
                    "jsonrpc": "2.0", "id": 1, "method": "initialize",
                    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
                })
                assert (await communicator.receive_json_from())["id"] == 1
                await communicator.send_json_to({"jsonrpc": "2.0", "method": "notifications/initialized"})
                for request_id in range(2, 6):
                    await communicator.send_json_to({"jsonrpc": "2.0", "id": request_id, "method": "ping"})
                    assert await communicator.receive_json_from() == {"jsonrpc": "2.0", "id": request_id, "result": {}}
            finally:
                await communicator.disconnect()
        # The session's event stream, the worker's correlation channel and its retired-peers
        # listener (federation/upkeep.py); none for the socket itself.
        assert new_channel.call_count <= 3
