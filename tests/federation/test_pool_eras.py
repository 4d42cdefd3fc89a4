"""Which era the pool gives a host of an upstream whose `server/discover` lists only 2026-07-28.

Such an upstream may still accept `initialize` (the SDK's `MCPServer` does): a handshake-era
host then gets a handshake-era connection of its own (tests/e2e/test_handshake_upstream.py).
One that refuses is bridged over its 2026-07-28 connection, and is not asked again on every call.
The upstream is scripted behind the outbound HTTP seam (`httpx.MockTransport`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from typing import Any
from unittest import mock

import httpx
from mcp_types.version import LATEST_MODERN_VERSION

from federation.pool import UpstreamPool
from federation.upstream.base import PeerConfig

PEER = PeerConfig(id=12, name="modern", transport="streamable-http", url="http://127.0.0.1:9/mcp", connect_timeout=5, call_timeout=5)
DISCOVER = {
    "supportedVersions": [LATEST_MODERN_VERSION],
    "capabilities": {"tools": {}},
    "_meta": {"io.modelcontextprotocol/serverInfo": {"name": "modern", "version": "1"}},
    "resultType": "complete",
    "ttlMs": 0,
    "cacheScope": "private",
}


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(20):
            return await coro

    return asyncio.run(bounded())


def scripted(accepts_initialize: bool, seen: list[str]) -> Any:
    async def handle(request: httpx.Request) -> httpx.Response:
        if request.method != "POST":
            return httpx.Response(405)
        message = json.loads(request.content)
        method = message.get("method", "")
        seen.append(method)
        if method == "server/discover":
            return httpx.Response(200, json={"jsonrpc": "2.0", "id": message["id"], "result": DISCOVER})
        if method == "initialize":
            if not accepts_initialize:
                error = {"code": -32022, "message": "Unsupported protocol version", "data": {"supported": [LATEST_MODERN_VERSION]}}
                return httpx.Response(400, json={"jsonrpc": "2.0", "id": message["id"], "error": error})
            result = {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}}, "serverInfo": {"name": "modern", "version": "1"}}
            return httpx.Response(200, json={"jsonrpc": "2.0", "id": message["id"], "result": result}, headers={"mcp-session-id": "s"})
        return httpx.Response(202)

    def client(**_: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(handle))

    return mock.patch("federation.upstream.streamable_http.outbound_client", client)


async def eras_for_two_legacy_calls(pool: UpstreamPool) -> list[str]:
    try:
        return [(await pool.get(PEER, prefer="legacy")).era for _ in range(2)]
    finally:
        await pool.close()


def test_a_handshake_era_host_gets_the_handshake_era_when_the_upstream_accepts_initialize() -> None:
    seen: list[str] = []
    with scripted(True, seen):
        eras = run(eras_for_two_legacy_calls(UpstreamPool()))
    assert eras == ["legacy", "legacy"]
    assert seen.count("initialize") == 1


def test_an_upstream_that_refuses_initialize_is_bridged_and_not_asked_again_on_every_call() -> None:
    seen: list[str] = []
    with scripted(False, seen):
        eras = run(eras_for_two_legacy_calls(UpstreamPool()))
    assert eras == ["modern", "modern"]
    assert seen.count("initialize") == 1


def test_a_2026_host_never_triggers_the_handshake() -> None:
    seen: list[str] = []

    async def scenario() -> str:
        pool = UpstreamPool()
        try:
            return (await pool.get(PEER, prefer="modern")).era
        finally:
            await pool.close()

    with scripted(True, seen):
        assert run(scenario()) == "modern"
    assert "initialize" not in seen
