"""Issue 15, finding 3: per-user bounds on open sessions and streams, and on JSON-RPC batches.

FEDMCP_MAX_SESSIONS_PER_USER counts a user's open handshake-era sessions, whatever their
transport (Streamable HTTP sessions, /sse streams, WebSockets); the next one is refused with
HTTP 429 (-32031), or a WebSocket close 1008 with a reason. Streamable HTTP GET streams and
2026-07-28 subscriptions/listen streams are bounded by the same number per worker.
FEDMCP_MAX_BATCH bounds a 2025-03-26 batch: a longer one is refused whole (400, -32600).
"""

from __future__ import annotations

import json

from channels.db import database_sync_to_async
from django.test import override_settings

from mcp_endpoint import jsonrpc
from tests.base import (
    BOB,
    HOST,
    MODERN,
    AsgiTestCase,
    HttpExchange,
    McpClient,
    SseClient,
    bearer,
    http,
    mint_token,
    modern_meta,
    persona,
    request,
    ws_communicator,
)


class SessionLimitTests(AsgiTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.enterContext(override_settings(MCP_MAX_SESSIONS_PER_USER=2, MCP_MAX_BATCH=3))

    async def initialize(self, client: McpClient) -> tuple[int, dict]:
        params = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}
        reply = await client.post(request("initialize", params, client.next_id()))
        if reply.status == 200:
            client.session_id = reply.headers["mcp-session-id"]
            client.protocol_version = reply.json()["result"]["protocolVersion"]
        return reply.status, reply.json()

    async def test_sessions_per_user_are_bounded_on_streamable_http(self) -> None:
        first, second, third = McpClient(), McpClient(), McpClient()
        self.assertEqual((await self.initialize(first))[0], 200)
        self.assertEqual((await self.initialize(second))[0], 200)
        status, body = await self.initialize(third)
        self.assertEqual(status, 429)
        self.assertEqual(body["error"]["code"], jsonrpc.TOO_MANY_SESSIONS)
        self.assertEqual(body["error"]["data"]["limit"], 2)
        # Another user is not affected, and closing a session frees its place.
        await database_sync_to_async(persona)(BOB)
        bob = McpClient(token=await database_sync_to_async(mint_token)(BOB))
        self.assertEqual((await self.initialize(bob))[0], 200)
        closed = await http("DELETE", "/mcp", headers=first.headers())
        self.assertEqual(closed.status, 200)
        self.assertEqual((await self.initialize(third))[0], 200)

    async def test_sse_streams_and_websockets_count_as_sessions(self) -> None:
        async with SseClient():
            socket = ws_communicator()
            connected, _ = await socket.connect()
            self.assertTrue(connected)
            try:
                # Two open (an SSE stream and a WebSocket): a third session of any transport is refused.
                status, body = await self.initialize(McpClient())
                self.assertEqual((status, body["error"]["code"]), (429, jsonrpc.TOO_MANY_SESSIONS))
                async with HttpExchange("GET", "/sse", {"host": HOST, "accept": "text/event-stream", **bearer()}) as refused:
                    reply = await refused.read_all()
                self.assertEqual((reply.status, reply.json()["error"]["code"]), (429, jsonrpc.TOO_MANY_SESSIONS))
                extra = ws_communicator()
                connected, _ = await extra.connect()
                self.assertTrue(connected)
                closing = await extra.receive_output()
                self.assertEqual((closing["type"], closing["code"]), ("websocket.close", 1008))
                self.assertIn("too many open sessions", closing["reason"])
            finally:
                await socket.disconnect()

    async def test_get_streams_per_user_are_bounded(self) -> None:
        client = McpClient()
        await self.initialize(client)
        headers = {**client.headers(), "accept": "text/event-stream"}
        async with HttpExchange("GET", "/mcp", headers) as one, HttpExchange("GET", "/mcp", headers) as two:
            self.assertEqual((await one.start(), await two.start()), (200, 200))
            async with HttpExchange("GET", "/mcp", headers) as three:
                reply = await three.read_all()
            self.assertEqual((reply.status, reply.json()["error"]["code"]), (429, jsonrpc.TOO_MANY_SESSIONS))

    async def test_listen_streams_per_user_are_bounded(self) -> None:
        def listen(request_id: int) -> HttpExchange:
            params = {"notifications": {"toolsListChanged": True}, "_meta": modern_meta()}
            headers = {**McpClient().headers(), "mcp-protocol-version": MODERN, "mcp-method": "subscriptions/listen"}
            return HttpExchange("POST", "/mcp", headers, json.dumps(request("subscriptions/listen", params, request_id)).encode())

        async with listen(1) as one, listen(2) as two:
            self.assertEqual((await one.start(), await two.start()), (200, 200))
            self.assertEqual((await one.next_event())["method"], "notifications/subscriptions/acknowledged")
            self.assertEqual((await two.next_event())["method"], "notifications/subscriptions/acknowledged")
            async with listen(3) as three:
                reply = await three.read_all()
            self.assertEqual(reply.status, 429)
            message = reply.json() if reply.body.startswith(b"{") else reply.events()[-1]
            self.assertEqual(message["error"]["code"], jsonrpc.TOO_MANY_SESSIONS)

    async def test_a_batch_longer_than_the_limit_is_refused_whole(self) -> None:
        client = McpClient()
        await client.initialize("2025-03-26")
        pings = [request("ping", None, i) for i in range(4)]
        refused = await client.post(pings)
        self.assertEqual(refused.status, 400)
        self.assertEqual(refused.json()["error"]["code"], jsonrpc.INVALID_REQUEST)
        self.assertIn("at most 3", refused.json()["error"]["message"])
        accepted = await client.post(pings[:3])
        self.assertEqual((accepted.status, len(accepted.json())), (200, 3))

    async def test_a_batch_longer_than_the_limit_is_refused_on_websockets(self) -> None:
        socket = ws_communicator()
        await socket.connect()
        try:
            params = {"protocolVersion": "2025-03-26", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}
            await socket.send_to(text_data=json.dumps(request("initialize", params, 0)))
            await socket.receive_from()
            await socket.send_to(text_data=json.dumps([request("ping", None, i) for i in range(4)]))
            reply = json.loads(await socket.receive_from())
            self.assertEqual(reply["error"]["code"], jsonrpc.INVALID_REQUEST)
            self.assertIn("at most 3", reply["error"]["message"])
        finally:
            await socket.disconnect()

