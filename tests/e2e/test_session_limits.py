"""Per-user session bound under daphne (issue 15, finding 3): what a real client is told.

A gateway with FEDMCP_MAX_SESSIONS_PER_USER=1: alice's second WebSocket is accepted and closed
at once with 1008 and a reason; her Streamable HTTP initialize is answered 429 (-32031).
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from mcp_endpoint import jsonrpc
from tests.e2e.harness import gateways

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

WAIT = 20.0
MCP = Subprotocol("mcp")
INITIALIZE = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "e2e", "version": "0"}},
}


async def test_a_user_over_the_session_bound_gets_a_close_code_with_a_reason_and_a_429() -> None:
    with gateways("limits", env={"FEDMCP_MAX_SESSIONS_PER_USER": "1"}) as made:
        gateway = made["limits"]
        headers = gateway.auth_headers()
        gateway.start_worker()
        async with connect(gateway.ws_url("/ws"), subprotocols=[MCP], additional_headers=headers, open_timeout=WAIT) as first:
            assert first.subprotocol == MCP
            async with connect(gateway.ws_url("/ws"), subprotocols=[MCP], additional_headers=headers, open_timeout=WAIT) as second:
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(second.recv(), WAIT)
            assert closed.value.rcvd is not None, closed.value
            assert closed.value.rcvd.code == 1008 and "too many open sessions" in closed.value.rcvd.reason, closed.value
            async with httpx.AsyncClient(timeout=WAIT) as client:
                reply = await client.post(
                    gateway.url("/mcp"), json=INITIALIZE, headers={**headers, "Accept": "application/json, text/event-stream"}
                )
            assert reply.status_code == 429, reply.text
            assert reply.json()["error"]["code"] == jsonrpc.TOO_MANY_SESSIONS
