"""A hostile upstream fails only the call it answers, on every transport, and the peer keeps working.

Issue 15: one reply nested 50,000 deep from a stdio upstream raised `RecursionError` in the
stdio reader, which died while the process lived on, so every later call to that peer timed
out, for every user; over Streamable HTTP the same reply gave -32603 and a traceback in the
log. Here a host calls, through the gateway (in process), a peer served by
tests/federation/hostile_server.py over each transport: stdio (a child the gateway spawns),
Streamable HTTP with JSON replies and with event-stream replies (a process on loopback),
legacy HTTP+SSE (tests/federation/sse_peer.py) and WebSocket (a `websockets` server), the last
two in the test's own loop. Each hostile answer must reach the host as -32010 (or, for a
message that answers no call, be dropped), with no traceback logged, and the next call to the
same peer, on the same connection, must work.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from channels.db import database_sync_to_async
from django.test import override_settings
from websockets.asyncio.server import ServerConnection, serve

from federation.models import CatalogKind, Transport
from federation.pool import pool
from federation.services import peer_add
from federation.upstream.stdio import StdioConnection
from mcp_endpoint import jsonrpc
from tests.base import AsgiTestCase, McpClient, Reply, add_catalog_entry
from tests.e2e.harness import free_port, stop, wait_http
from tests.federation import hostile_server
from tests.federation.sse_peer import SsePeer, chunk

SCRIPT = Path(hostile_server.__file__)
PEER = "hostile"
CALL_TIMEOUT = 3.0
"""The peer's call timeout: a dropped reply fails its call this soon."""


def text_of(reply: Reply) -> str:
    assert reply.status == 200, reply
    message = reply.json() if reply.body.startswith(b"{") else reply.events()[-1]
    assert "result" in message, message
    return message["result"]["content"][0]["text"]


def error_of(reply: Reply) -> dict[str, Any]:
    message = reply.json() if reply.body.startswith(b"{") else reply.events()[-1]
    assert "error" in message, message
    return message["error"]


@contextlib.asynccontextmanager
async def served(kind: str) -> AsyncIterator[dict[str, Any]]:
    """Serve the hostile upstream over `kind`; yield the peer's fields for `peer_add`."""
    if kind == "stdio":
        yield {"transport": Transport.STDIO, "command": f"{sys.executable} {SCRIPT}"}
    elif kind in ("http-json", "http-sse"):
        port = free_port()
        command = [sys.executable, str(SCRIPT), "--http", str(port), *(["--sse-replies"] if kind == "http-sse" else [])]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            await database_sync_to_async(wait_http)(f"http://127.0.0.1:{port}/mcp", process=process)
            yield {"transport": Transport.STREAMABLE_HTTP, "url": f"http://127.0.0.1:{port}/mcp"}
        finally:
            stop(process)
    elif kind == "sse":
        server: SsePeer

        async def receive(message: dict[str, Any]) -> None:
            for line in hostile_server.answer(message):
                await server.outbox.put(chunk(f"event: message\ndata: {line}\n\n".encode()))

        server = SsePeer(receive)
        async with server.running():
            yield {"transport": Transport.SSE, "url": server.url}
    else:

        async def handle(socket: ServerConnection) -> None:
            async for frame in socket:
                for line in hostile_server.answer(json.loads(frame)):
                    await socket.send(line)

        async with serve(handle, "127.0.0.1", 0, subprotocols=["mcp"], max_size=None) as ws_server:  # type: ignore[list-item]
            port = next(iter(ws_server.sockets)).getsockname()[1]
            yield {"transport": Transport.WEBSOCKET, "url": f"ws://127.0.0.1:{port}/"}


def _register(fields: dict[str, Any]) -> None:
    peer = peer_add(name=PEER, connect_timeout=10.0, call_timeout=CALL_TIMEOUT, **fields)
    for tool in hostile_server.TOOLS:
        add_catalog_entry(peer, CatalogKind.TOOL, tool)


class HostileUpstreamTests(AsgiTestCase):
    async def exchange(self, kind: str, tool: str, arguments: dict[str, Any] | None = None) -> tuple[Reply, str, list[logging.LogRecord]]:
        """Call `tool` on a hostile peer served over `kind`, between two calls of `add`.

        Returns the hostile call's reply, the text of the `add` after it, and what was logged;
        checks that both `add`s went over the same, healthy connection (a stdio child never
        restarted).
        """
        async with served(kind) as fields:
            await database_sync_to_async(_register)(fields)
            client = McpClient()
            await client.initialize()
            self.assertEqual(text_of(await client.call("tools/call", {"name": f"{PEER}__add", "arguments": {"a": 1, "b": 1}})), "2")
            before = list(pool.connections())
            with self.assertLogs(level="DEBUG") as logs:
                hostile = await client.call("tools/call", {"name": f"{PEER}__{tool}", "arguments": arguments or {}})
                after = text_of(await client.call("tools/call", {"name": f"{PEER}__add", "arguments": {"a": 2, "b": 3}}))
            connections = list(pool.connections())
            self.assertEqual(connections, before, "the connection was replaced")
            self.assertTrue(all(c.is_healthy() for c in connections))
        for connection in connections:
            if isinstance(connection, StdioConnection):
                self.assertEqual(connection.restarts, 0, "the stdio child was restarted")
        for record in logs.records:
            self.assertIsNone(record.exc_info, f"a traceback was logged: {record.getMessage()}")
            self.assertNotIn("RecursionError", record.getMessage())
        return hostile, after, logs.records

    async def assert_refused(self, kind: str, tool: str, arguments: dict[str, Any] | None = None, said: str = "") -> None:
        hostile, after, _ = await self.exchange(kind, tool, arguments)
        error = error_of(hostile)
        self.assertEqual(error["code"], jsonrpc.UPSTREAM_ERROR, error)
        self.assertIn(said, error["message"])
        self.assertEqual(after, "5")

    # --- a reply nested 50,000 deep -------------------------------------------------------------

    async def test_stdio_deep_reply(self) -> None:
        await self.assert_refused("stdio", "deep", said="nested deeper than 128 levels")

    async def test_streamable_http_deep_json_reply(self) -> None:
        await self.assert_refused("http-json", "deep", said="nested deeper than 128 levels")

    async def test_streamable_http_deep_event_stream_reply(self) -> None:
        await self.assert_refused("http-sse", "deep", said="nested deeper than 128 levels")

    async def test_legacy_sse_deep_reply(self) -> None:
        await self.assert_refused("sse", "deep", said="nested deeper than 128 levels")

    async def test_websocket_deep_reply(self) -> None:
        await self.assert_refused("websocket", "deep", said="nested deeper than 128 levels")

    async def test_stdio_deep_reply_with_its_id_last(self) -> None:
        await self.assert_refused("stdio", "deep_id_last", said="nested deeper")

    async def test_websocket_deep_reply_with_its_id_last(self) -> None:
        await self.assert_refused("websocket", "deep_id_last", said="nested deeper")

    async def test_a_reply_just_within_the_depth_bound_is_forwarded(self) -> None:
        # 120 arrays inside structuredContent, inside the result, inside the message: 123 levels.
        hostile, after, _ = await self.exchange("stdio", "deep", {"depth": 120})
        self.assertEqual(text_of(hostile), "deep")
        self.assertEqual(after, "5")

    # --- a reply past FEDMCP_UPSTREAM_MAX_MESSAGE_BYTES -----------------------------------------

    @override_settings(FEDMCP_UPSTREAM_MAX_MESSAGE_BYTES=64 * 1024)
    async def test_stdio_oversized_reply(self) -> None:
        await self.assert_refused("stdio", "huge", {"size": 300_000}, said="larger than 65536 bytes")

    @override_settings(FEDMCP_UPSTREAM_MAX_MESSAGE_BYTES=64 * 1024)
    async def test_streamable_http_oversized_reply(self) -> None:
        await self.assert_refused("http-json", "huge", {"size": 300_000}, said="larger than 65536 bytes")

    @override_settings(FEDMCP_UPSTREAM_MAX_MESSAGE_BYTES=64 * 1024)
    async def test_streamable_http_oversized_event_stream_reply(self) -> None:
        await self.assert_refused("http-sse", "huge", {"size": 300_000}, said="larger than 65536 bytes")

    @override_settings(FEDMCP_UPSTREAM_MAX_MESSAGE_BYTES=64 * 1024)
    async def test_legacy_sse_oversized_reply(self) -> None:
        await self.assert_refused("sse", "huge", {"size": 300_000}, said="larger than 65536 bytes")

    @override_settings(FEDMCP_UPSTREAM_MAX_MESSAGE_BYTES=64 * 1024)
    async def test_websocket_oversized_reply(self) -> None:
        await self.assert_refused("websocket", "huge", {"size": 300_000}, said="larger than 65536 bytes")

    # --- messages of the wrong shape ------------------------------------------------------------

    async def test_stdio_notification_with_string_params_is_dropped(self) -> None:
        hostile, after, records = await self.exchange("stdio", "bad_params")
        self.assertEqual(text_of(hostile), "after bad params")
        self.assertEqual(after, "5")
        self.assertTrue(any("params that are not an object" in r.getMessage() for r in records))

    async def test_streamable_http_notification_with_string_params_is_dropped(self) -> None:
        hostile, after, _ = await self.exchange("http-sse", "bad_params")
        self.assertEqual(text_of(hostile), "after bad params")
        self.assertEqual(after, "5")

    async def test_stdio_response_with_a_list_id_is_dropped_and_the_reader_lives(self) -> None:
        hostile, after, records = await self.exchange("stdio", "bad_id")
        self.assertEqual(error_of(hostile)["code"], jsonrpc.UPSTREAM_ERROR)  # its call timed out
        self.assertEqual(after, "5")
        self.assertTrue(any("id is not a string or an integer" in r.getMessage() for r in records))

    async def test_websocket_response_with_a_list_id_is_dropped(self) -> None:
        hostile, after, _ = await self.exchange("websocket", "bad_id")
        self.assertEqual(error_of(hostile)["code"], jsonrpc.UPSTREAM_ERROR)
        self.assertEqual(after, "5")
