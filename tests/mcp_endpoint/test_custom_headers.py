"""Custom headers from tool parameters (SEP-2243) through the gateway, in 2026-07-28.

A tool whose input schema marks a parameter with `x-mcp-header` gets that argument mirrored into
an `Mcp-Param-<Name>` HTTP header on each `tools/call`; the server refuses a call whose headers
and body disagree (-32020, HTTP 400). The gateway is both ends of that:

* toward the upstream, it sends the headers itself, from the arguments and the declarations in
  its catalog: the fixture server (tests/fixtures/everything_server.py, `test_custom_header`,
  `x-mcp-header: Region`) refuses a call without them, and a scripted upstream shows the exact
  header values (a non-ASCII value goes base64-wrapped);
* toward the host, it checks the host's headers against the schema it listed, as the SDK's
  server does;
* the catalog sync leaves out a tool whose declarations are invalid, saying why.
"""

from __future__ import annotations

import base64
import json
from typing import Any
from unittest import mock

from channels.db import database_sync_to_async
from django.test import override_settings

from federation.models import CatalogKind
from federation.services import peer_sync_catalog
from mcp_endpoint import jsonrpc
from tests.base import AsgiTestCase, FixturePeerTestCase, McpClient, Reply, register_peer
from tests.federation.test_catalog_sync import FakeUpstream

UPSTREAM_TIMEOUT = 20.0
TOOL = "everything__test_custom_header"


def result_text(reply: Reply) -> str:
    assert reply.status == 200, reply
    message = reply.json() if reply.body.startswith(b"{") else reply.events()[-1]
    assert "result" in message, message
    return message["result"]["content"][0]["text"]


def error_code(reply: Reply) -> int | None:
    message = reply.json() if reply.body.startswith(b"{") else reply.events()[-1]
    return (message.get("error") or {}).get("code")


class ThroughTheFixtureTests(FixturePeerTestCase):
    """A 2026-07-28 host calls the fixture's x-mcp-header tool; the fixture checks what arrives."""

    async def call(self, path: str, name: str, arguments: dict[str, Any], headers: dict[str, str]) -> Reply:
        return await McpClient(path).call_modern(
            "tools/call", {"name": name, "arguments": arguments}, name=name, headers=headers, timeout=UPSTREAM_TIMEOUT
        )

    async def test_a_call_reaches_the_upstream_with_its_mcp_param_header(self) -> None:
        for path, name in (("/mcp", TOOL), ("/peers/everything/mcp", "test_custom_header")):
            with self.subTest(path=path):
                reply = await self.call(path, name, {"region": "us-west1", "query": "q"}, {"mcp-param-region": "us-west1"})
                self.assertEqual(result_text(reply), "region=us-west1 query=q")

    async def test_a_value_that_needs_base64_reaches_the_upstream_intact(self) -> None:
        value = " Zürich "
        header = "=?base64?" + base64.b64encode(value.encode()).decode() + "?="
        reply = await self.call("/mcp", TOOL, {"region": value}, {"mcp-param-region": header})
        self.assertEqual(result_text(reply), f"region={value} query=")

    async def test_a_handshake_era_call_needs_no_header(self) -> None:
        client = McpClient()
        await client.initialize()
        reply = await client.call("tools/call", {"name": TOOL, "arguments": {"region": "eu"}}, timeout=UPSTREAM_TIMEOUT)
        self.assertEqual(result_text(reply), "region=eu query=")

    async def test_a_header_that_disagrees_with_the_body_is_refused(self) -> None:
        reply = await self.call("/mcp", TOOL, {"region": "us-west1"}, {"mcp-param-region": "eu-north1"})
        self.assertEqual(reply.status, 400, reply)
        self.assertEqual(error_code(reply), jsonrpc.HEADER_MISMATCH)

    async def test_a_missing_header_is_refused(self) -> None:
        reply = await self.call("/mcp", TOOL, {"region": "us-west1"}, {})
        self.assertEqual(reply.status, 400, reply)
        self.assertEqual(error_code(reply), jsonrpc.HEADER_MISMATCH)

    async def test_a_header_for_an_absent_argument_is_refused(self) -> None:
        reply = await self.call("/peers/everything/mcp", "test_custom_header", {}, {"mcp-param-region": "us-west1"})
        self.assertEqual(reply.status, 400, reply)
        self.assertEqual(error_code(reply), jsonrpc.HEADER_MISMATCH)

    async def test_a_malformed_base64_header_is_refused(self) -> None:
        reply = await self.call("/mcp", TOOL, {"region": "us"}, {"mcp-param-region": "=?base64?not base64!?="})
        self.assertEqual(reply.status, 400, reply)
        self.assertEqual(error_code(reply), jsonrpc.HEADER_MISMATCH)

    async def test_a_header_sent_twice_is_refused(self) -> None:
        # Two spellings of one name: the request carries two Mcp-Param-Region lines.
        reply = await self.call("/mcp", TOOL, {"region": "us"}, {"mcp-param-region": "us", "Mcp-Param-Region": "eu"})
        self.assertEqual(reply.status, 400, reply)
        self.assertEqual(error_code(reply), jsonrpc.HEADER_MISMATCH)


@override_settings(FEDERATION_ALLOW_LOOPBACK=True)
class ScriptedUpstreamTests(AsgiTestCase):
    """What the gateway sends: exactly the declared arguments, encoded as the SDK encodes them."""

    def setUp(self) -> None:
        super().setUp()
        self.upstream = FakeUpstream()
        self.upstream.tools = [
            {
                "name": "deploy",
                "inputSchema": {
                    "type": "object",
                    "properties": {
                        "region": {"type": "string", "x-mcp-header": "Region"},
                        "priority": {"type": "integer", "x-mcp-header": "Priority"},
                        "dry": {"type": "boolean", "x-mcp-header": "Dry"},
                        "target": {"type": "object", "properties": {"zone": {"type": "string", "x-mcp-header": "Zone"}}},
                        "note": {"type": "string"},
                    },
                },
            }
        ]
        self.patch = mock.patch("federation.upstream.streamable_http.outbound_client", self.upstream.client)
        self.patch.start()
        self.addCleanup(self.patch.stop)
        self.peer = register_peer("fake", "http://127.0.0.1:9/mcp")

    def sent_headers(self) -> dict[str, str]:
        calls = [m for m in self.upstream.received if m.get("method") == "tools/call"]
        self.assertEqual(len(calls), 1, calls)
        return {k: v for k, v in calls[0]["headers"].items() if k.startswith("mcp-param-")}

    async def test_the_upstream_gets_each_declared_argument_as_a_header(self) -> None:
        self.upstream.handle = self.answering(self.upstream.handle)
        arguments = {"region": "Région 1", "priority": 42, "dry": False, "target": {"zone": "b"}, "note": "not mirrored"}
        headers = {
            "mcp-param-region": "=?base64?" + base64.b64encode("Région 1".encode()).decode() + "?=",
            "mcp-param-priority": "42", "mcp-param-dry": "false", "mcp-param-zone": "b",
        }
        reply = await McpClient().call_modern("tools/call", {"name": "fake__deploy", "arguments": arguments}, name="fake__deploy", headers=headers)
        self.assertEqual(result_text(reply), "deployed")
        self.assertEqual(self.sent_headers(), headers)

    async def test_an_argument_left_out_or_null_sends_no_header(self) -> None:
        self.upstream.handle = self.answering(self.upstream.handle)
        reply = await McpClient().call_modern(
            "tools/call", {"name": "fake__deploy", "arguments": {"region": None, "priority": 1}}, name="fake__deploy",
            headers={"mcp-param-priority": "1"},
        )
        self.assertEqual(result_text(reply), "deployed")
        self.assertEqual(self.sent_headers(), {"mcp-param-priority": "1"})

    def answering(self, handle: Any) -> Any:
        def answer(request: Any) -> Any:
            body = json.loads(request.content) if request.method == "POST" else {}
            if body.get("method") == "tools/call":
                self.upstream.received.append({**body, "headers": dict(request.headers)})
                return self.upstream.reply(body, {"content": [{"type": "text", "text": "deployed"}]})
            return handle(request)

        return answer


INVALID_DECLARATIONS: dict[str, dict[str, Any]] = {
    "empty": {"v": {"type": "string", "x-mcp-header": ""}},
    "on an object": {"v": {"type": "object", "x-mcp-header": "Data"}},
    "on an array": {"v": {"type": "array", "items": {"type": "string"}, "x-mcp-header": "Items"}},
    "on null": {"v": {"type": "null", "x-mcp-header": "Nil"}},
    "on a number": {"v": {"type": "number", "x-mcp-header": "Score"}},
    "without a type": {"v": {"x-mcp-header": "Any"}},
    "not a string": {"v": {"type": "string", "x-mcp-header": 7}},
    "a duplicate": {"a": {"type": "string", "x-mcp-header": "Region"}, "b": {"type": "string", "x-mcp-header": "Region"}},
    "a duplicate in another case": {"a": {"type": "string", "x-mcp-header": "MyField"}, "b": {"type": "string", "x-mcp-header": "myfield"}},
    "with a space": {"v": {"type": "string", "x-mcp-header": "My Region"}},
    "with a colon": {"v": {"type": "string", "x-mcp-header": "Region:Primary"}},
    "not ASCII": {"v": {"type": "string", "x-mcp-header": "Région"}},
    "with a control character": {"v": {"type": "string", "x-mcp-header": "Region\t1"}},
    "off the properties chain": {"v": {"type": "array", "items": {"type": "string", "x-mcp-header": "Item"}}},
}


@override_settings(FEDERATION_ALLOW_LOOPBACK=True)
class InvalidDeclarationTests(AsgiTestCase):
    """A tool with an invalid `x-mcp-header` is left out of the catalog; its valid neighbours stay."""

    async def test_each_invalid_declaration_leaves_its_tool_out(self) -> None:
        upstream = FakeUpstream()
        upstream.tools = [{"name": "valid_tool", "inputSchema": {"type": "object", "properties": {"r": {"type": "string", "x-mcp-header": "Region"}}}}]
        upstream.tools += [
            {"name": f"invalid {label}", "inputSchema": {"type": "object", "properties": properties}}
            for label, properties in INVALID_DECLARATIONS.items()
        ]
        upstream.tools.append({"name": "invalid at the root", "inputSchema": {"type": "object", "x-mcp-header": "Root"}})
        peer = await database_sync_to_async(register_peer)("fake", "http://127.0.0.1:9/mcp", sync=False)
        with mock.patch("federation.upstream.streamable_http.outbound_client", upstream.client), self.assertLogs("federation.services", "WARNING") as logs:
            report = await peer_sync_catalog(peer=peer)
        self.assertTrue(report.ok, report.errors)
        stored = await database_sync_to_async(lambda: list(peer.catalog.filter(kind=CatalogKind.TOOL).values_list("upstream_name", flat=True)))()
        self.assertEqual(stored, ["valid_tool"])
        left_out = [name for name in (t["name"] for t in upstream.tools) if name != "valid_tool"]
        for name in left_out:
            with self.subTest(tool=name):
                self.assertTrue(any(repr(name) in w and "invalid x-mcp-header" in w for w in report.warnings), report.warnings)
                self.assertTrue(any(repr(name) in line for line in logs.output), logs.output)
        listed = await McpClient().call_modern("tools/list")
        self.assertEqual([t["name"] for t in listed.json()["result"]["tools"]], ["fake__valid_tool"])
