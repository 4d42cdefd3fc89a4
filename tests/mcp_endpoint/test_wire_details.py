"""Wire details a host checks against the spec of its own era, through the gateway.

* `server/discover` is a 2026-07-28 result: it carries `resultType` (DiscoverResult requires it).
* A 2025-11-25 POST answered as SSE starts with a priming event (an id and empty data) that
  carries a `retry` hint, so the host knows where and when it may resume (SEP-1699).
* The `io.modelcontextprotocol/serverInfo` stamp is 2026-07-28 vocabulary: a handshake-era
  result never carries one, even when the upstream behind the gateway stamped its own; a
  2026-07-28 result names the server that produced it, the gateway.

The upstream is the fixture server (tests/fixtures/everything_server.py), which speaks both eras;
the gateway talks to it in 2026-07-28, where the SDK stamps every result with its serverInfo.
"""

from __future__ import annotations

import json

from django.conf import settings
from mcp_types import DiscoverResult

from tests.base import HANDSHAKE, FixturePeerTestCase, HttpExchange, McpClient, request

SERVER_INFO = "io.modelcontextprotocol/serverInfo"
UPSTREAM_TIMEOUT = 20.0


class DiscoverTests(FixturePeerTestCase):
    async def test_discover_answers_a_complete_result(self) -> None:
        for path in ("/mcp", "/peers/everything/mcp"):
            reply = await McpClient(path).call_modern("server/discover")
            self.assertEqual(reply.status, 200, reply)
            result = reply.json()["result"]
            self.assertEqual(result.get("resultType"), "complete", path)
            DiscoverResult.model_validate(result)


class PrimingEventTests(FixturePeerTestCase):
    async def stream_of_a_call(self, client: McpClient) -> list[tuple[str, dict[str, str]]]:
        """POST a tools/call whose upstream reports progress; return its SSE blocks as (raw, fields)."""
        params = {"name": "everything__test_tool_with_progress", "arguments": {}, "_meta": {"progressToken": "p"}}
        body = request("tools/call", params, client.next_id())
        async with HttpExchange("POST", "/mcp", client.headers(), json.dumps(body).encode()) as exchange:
            reply = await exchange.read_all(UPSTREAM_TIMEOUT)
        self.assertEqual(reply.status, 200, reply)
        self.assertTrue(reply.headers["content-type"].startswith("text/event-stream"), reply.headers)
        blocks = []
        for block in reply.body.decode().split("\n\n"):
            if not block.strip():
                continue
            fields: dict[str, str] = {}
            for line in block.split("\n"):
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(":")
                fields.setdefault(name, value.removeprefix(" "))
            if fields:
                blocks.append((block, fields))
        return blocks

    async def test_a_2025_11_25_post_stream_starts_with_a_priming_event_and_a_retry_hint(self) -> None:
        client = McpClient()
        await client.initialize(HANDSHAKE)
        blocks = await self.stream_of_a_call(client)
        first = blocks[0][1]
        self.assertTrue(first.get("id"), blocks[0][0])
        self.assertEqual(first.get("data"), "", blocks[0][0])
        self.assertTrue(first.get("retry", "").isdigit(), blocks[0][0])
        # Everything after the priming event is the call's own traffic, ending with its answer.
        self.assertEqual([b for b in blocks[1:] if b[1].get("data") == ""], [])

    async def test_an_older_session_gets_no_priming_event(self) -> None:
        # Clients before 2025-11-25 cannot parse an event with empty data (the SDK's rule too).
        client = McpClient()
        await client.initialize("2025-06-18")
        blocks = await self.stream_of_a_call(client)
        self.assertTrue(all(fields.get("data") for _, fields in blocks), blocks)
        self.assertFalse(any("retry" in fields for _, fields in blocks), blocks)


class ServerInfoStampTests(FixturePeerTestCase):
    async def test_a_handshake_era_result_carries_no_2026_server_info(self) -> None:
        client = McpClient()
        await client.initialize(HANDSHAKE)
        for method, params in (
            ("tools/call", {"name": "everything__add", "arguments": {"a": 1, "b": 2}}),
            ("resources/read", {"uri": "fedmcp://everything/test://static-text"}),
            ("prompts/get", {"name": "everything__test_simple_prompt"}),
            ("tools/list", {}),
        ):
            reply = await client.call(method, params, timeout=UPSTREAM_TIMEOUT)
            result = reply.json()["result"]
            self.assertNotIn(SERVER_INFO, result.get("_meta") or {}, method)
            self.assertNotIn("resultType", result, method)

    async def test_a_2026_result_names_the_gateway_that_produced_it(self) -> None:
        client = McpClient()
        for method, params, name in (
            ("tools/call", {"name": "everything__add", "arguments": {"a": 1, "b": 2}}, "everything__add"),
            ("tools/list", {}, None),
        ):
            reply = await client.call_modern(method, params, name=name, timeout=UPSTREAM_TIMEOUT)
            result = reply.json()["result"]
            stamp = (result.get("_meta") or {}).get(SERVER_INFO)
            self.assertEqual((stamp or {}).get("name"), settings.FEDMCP_GATEWAY_NAME, method)
            self.assertEqual(result.get("resultType"), "complete", method)
