"""A request the worker's shutdown cancels is answered -32603 `worker_shutdown`, on every transport.

What the shutdown does to requests still running is `release_worker`'s (fedmcp_site/runtime/
lifecycle.py): cancel every in-flight task. The host must then be told, so it can send the
request again (to another worker): before, a handshake-era Streamable HTTP POST was answered
202 Accepted with no body (no host expects that for a request), a 2026-07-28 POST got no answer
(its connection dropped), and a WebSocket request got no reply at all. A host's own notifications/cancelled still gets no response, as the spec says.
Legacy SSE is tests/mcp_endpoint/test_sse_accepted.py.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fedmcp_lib import observability
from mcp_endpoint import jsonrpc
from mcp_endpoint.dispatcher import SHUTDOWN_REASON
from tests.base import FixturePeerTestCase, McpClient, request, ws_communicator

WAIT = 20.0
SLOW = {"name": "everything__slow_echo", "arguments": {"text": "x", "delay_ms": 20000}}


async def cancel_in_flight_once_running() -> None:
    """Wait (polling, bounded) until a request runs, then do what the shutdown does to it."""
    async with asyncio.timeout(WAIT):
        while not observability.in_flight_tasks():
            await asyncio.sleep(0.01)
    for task in observability.in_flight_tasks():
        task.cancel()


class ShutdownAnswerTests(FixturePeerTestCase):
    async def test_a_handshake_era_post_cancelled_by_the_shutdown_is_answered_worker_shutdown(self) -> None:
        client = McpClient()
        await client.initialize()
        call = asyncio.create_task(client.call("tools/call", SLOW, timeout=WAIT))
        await cancel_in_flight_once_running()
        reply = await call

        assert reply.status == 200, reply
        messages = reply.events() if reply.headers.get("content-type", "").startswith("text/event-stream") else [reply.json()]
        answer = [m for m in messages if "method" not in m][-1]
        assert answer["error"]["code"] == jsonrpc.INTERNAL_ERROR and answer["error"]["data"] == {"reason": SHUTDOWN_REASON}, answer

    async def test_a_2026_07_28_post_cancelled_by_the_shutdown_is_answered_worker_shutdown(self) -> None:
        client = McpClient()
        call = asyncio.create_task(client.call_modern("tools/call", SLOW, name=SLOW["name"], timeout=WAIT))
        await cancel_in_flight_once_running()
        reply = await call

        messages = reply.events() if reply.headers.get("content-type", "").startswith("text/event-stream") else [reply.json()]
        answer = [m for m in messages if "method" not in m][-1]
        assert answer["error"]["code"] == jsonrpc.INTERNAL_ERROR and answer["error"]["data"] == {"reason": SHUTDOWN_REASON}, answer

    async def test_a_websocket_request_cancelled_by_the_shutdown_is_answered_worker_shutdown(self) -> None:
        socket = ws_communicator()
        connected, _ = await socket.connect()
        assert connected
        try:
            init = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}
            await socket.send_to(text_data=json.dumps(request("initialize", init, 1)))
            assert "result" in json.loads(await socket.receive_from(WAIT))
            await socket.send_to(text_data=json.dumps(request("tools/call", SLOW, 2)))
            await cancel_in_flight_once_running()

            answer: dict[str, Any] = {}
            while answer.get("id") != 2:
                answer = json.loads(await socket.receive_from(WAIT))
            assert answer["error"]["code"] == jsonrpc.INTERNAL_ERROR and answer["error"]["data"] == {"reason": SHUTDOWN_REASON}, answer
        finally:
            await socket.disconnect()

    async def test_a_request_the_host_cancelled_still_gets_no_response(self) -> None:
        client = McpClient()
        await client.initialize()
        call = asyncio.create_task(client.call("tools/call", SLOW, timeout=WAIT))
        async with asyncio.timeout(WAIT):
            while not observability.in_flight_tasks():
                await asyncio.sleep(0.01)
        cancelled = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": client._ids}}
        assert (await client.post(cancelled)).status == 202
        reply = await call

        messages = reply.events() if reply.headers.get("content-type", "").startswith("text/event-stream") else ([reply.json()] if reply.body else [])
        assert not [m for m in messages if "method" not in m], messages
