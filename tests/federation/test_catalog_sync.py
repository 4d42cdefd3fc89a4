"""Catalog sync against a fake upstream served by httpx.MockTransport at the outbound seam."""

from __future__ import annotations

import json
from typing import Any
from unittest import mock

import httpx
from channels.db import database_sync_to_async
from django.test import override_settings

from federation.models import CatalogKind, Peer
from federation.services import SyncReport, peer_sync_catalog
from tests.base import HANDSHAKE, MODERN, AsgiTestCase, register_peer

JsonDict = dict[str, Any]
LISTS = {
    "tools/list": ("tools", "tools"),
    "resources/list": ("resources", "resources"),
    "resources/templates/list": ("resourceTemplates", "templates"),
    "prompts/list": ("prompts", "prompts"),
}


class FakeUpstream:
    """An MCP server in one era, answering over httpx.MockTransport.

    `fail[method]` makes that method fail: "http500", "malformed" (a JSON body that does not
    parse), "error" (a JSON-RPC error) or "endless" (a nextCursor on every page).
    """

    def __init__(self, *, era: str = "modern") -> None:
        self.era = era
        self.tools: list[JsonDict] = [
            {"name": "add", "inputSchema": {"type": "object"}, "x-vendor": {"kept": True}},
            {"name": "echo", "inputSchema": {"type": "object"}},
        ]
        self.resources: list[JsonDict] = [{"uri": "test://static-text", "name": "static"}]
        self.templates: list[JsonDict] = [{"uriTemplate": "test://template/{id}/data", "name": "tpl"}]
        self.prompts: list[JsonDict] = [{"name": "greet"}, {"name": "farewell"}]
        self.page_size: int | None = None
        self.fail: dict[str, str] = {}
        self.received: list[JsonDict] = []
        self.session_id = "fake-session"

    def client(self, *, connect_timeout: float, read_timeout: float) -> httpx.AsyncClient:
        """Stand-in for `federation.client.outbound_client`."""
        return httpx.AsyncClient(
            transport=httpx.MockTransport(self.handle),
            timeout=httpx.Timeout(connect_timeout, read=read_timeout),
        )

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.method != "POST":
            return httpx.Response(405 if request.method == "GET" else 200)
        body = json.loads(request.content)
        self.received.append({**body, "headers": dict(request.headers)})
        if "id" not in body:
            return httpx.Response(202)
        method = body["method"]
        if self.era == "legacy":
            if method == "server/discover":
                return self.reply(body, error={"code": -32601, "message": "Method not found"}, status=400)
            if method == "initialize":
                result = {
                    "protocolVersion": HANDSHAKE,
                    "capabilities": self.capabilities(),
                    "serverInfo": {"name": "fake", "version": "1"},
                }
                return self.reply(body, result, headers={"mcp-session-id": self.session_id})
            if request.headers.get("mcp-session-id") != self.session_id:
                return httpx.Response(400, text="missing session")
        else:
            meta = (body.get("params") or {}).get("_meta") or {}
            if (
                meta.get("io.modelcontextprotocol/protocolVersion") != MODERN
                or request.headers.get("mcp-method") != method
            ):
                return self.reply(body, error={"code": -32020, "message": "header mismatch"}, status=400)
            if method == "server/discover":
                return self.reply(
                    body,
                    {
                        "supportedVersions": [MODERN],
                        "capabilities": self.capabilities(),
                        "_meta": {"io.modelcontextprotocol/serverInfo": {"name": "fake", "version": "1"}},
                        "ttlMs": 0,
                        "cacheScope": "private",
                    },
                )
        if method in LISTS:
            return self.list_page(body, method)
        return self.reply(body, error={"code": -32601, "message": "Method not found"})

    def capabilities(self) -> JsonDict:
        return {"tools": {}, "resources": {}, "prompts": {}}

    def list_page(self, body: JsonDict, method: str) -> httpx.Response:
        failure = self.fail.get(method)
        if failure == "http500":
            return httpx.Response(500, text="Internal Server Error")
        if failure == "malformed":
            return httpx.Response(
                200, headers={"content-type": "application/json"}, content=b'{"jsonrpc": "2.0", "id": '
            )
        if failure == "error":
            return self.reply(body, error={"code": -32603, "message": "database is down"})
        key, attribute = LISTS[method]
        items: list[JsonDict] = getattr(self, attribute)
        cursor = (body.get("params") or {}).get("cursor")
        if failure == "endless":
            return self.reply(body, {key: [], "nextCursor": f"{cursor or ''}+"})
        start = int(cursor.removeprefix("page-")) if cursor else 0
        size = self.page_size or len(items) or 1
        result: JsonDict = {key: items[start : start + size]}
        if start + size < len(items):
            result["nextCursor"] = f"page-{start + size}"
        return self.reply(body, result)

    def reply(
        self,
        body: JsonDict,
        result: JsonDict | None = None,
        *,
        error: JsonDict | None = None,
        status: int = 200,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        message: JsonDict = {"jsonrpc": "2.0", "id": body["id"]}
        message.update({"error": error} if error is not None else {"result": result})
        return httpx.Response(status, json=message, headers=headers)

    def cursors(self, method: str) -> list[str | None]:
        return [(m.get("params") or {}).get("cursor") for m in self.received if m.get("method") == method]


@database_sync_to_async
def stored(peer: Peer, kind: str) -> list[str]:
    return list(peer.catalog.filter(kind=kind).order_by("position").values_list("upstream_name", flat=True))


@database_sync_to_async
def reload(peer: Peer) -> Peer:
    peer.refresh_from_db()
    return peer


@override_settings(FEDERATION_ALLOW_LOOPBACK=True)
class CatalogSyncTests(AsgiTestCase):
    def setUp(self) -> None:
        # Nothing listens here; every request is answered by the fake at the outbound seam.
        self.peer = register_peer("fake", "http://127.0.0.1:9/mcp", sync=False)
        self.upstream = FakeUpstream()

    async def sync(self) -> SyncReport:
        with mock.patch("federation.upstream.streamable_http.outbound_client", self.upstream.client):
            return await peer_sync_catalog(peer=self.peer)

    async def test_it_stores_tools_resources_templates_and_prompts(self) -> None:
        report = await self.sync()

        self.assertTrue(report.ok, report.errors)
        self.assertEqual(report.protocol_version, MODERN)
        self.assertEqual(await stored(self.peer, CatalogKind.TOOL), ["add", "echo"])
        self.assertEqual(await stored(self.peer, CatalogKind.RESOURCE), ["test://static-text"])
        self.assertEqual(
            await stored(self.peer, CatalogKind.RESOURCE_TEMPLATE), ["test://template/{id}/data"]
        )
        self.assertEqual(await stored(self.peer, CatalogKind.PROMPT), ["greet", "farewell"])
        peer = await reload(self.peer)
        self.assertEqual(peer.protocol_version, MODERN)
        self.assertEqual(peer.server_info, {"name": "fake", "version": "1"})
        self.assertEqual(peer.last_error, "")
        self.assertIsNotNone(peer.last_synced_at)

    async def test_it_keeps_each_item_verbatim(self) -> None:
        await self.sync()

        payload = await database_sync_to_async(lambda: self.peer.catalog.get(upstream_name="add").payload)()
        self.assertEqual(payload, self.upstream.tools[0])

    async def test_a_later_sync_applies_additions_and_removals(self) -> None:
        await self.sync()
        self.upstream.tools = [
            {"name": "echo", "inputSchema": {"type": "object"}},
            {"name": "new", "inputSchema": {"type": "object"}},
        ]

        report = await self.sync()

        self.assertTrue(report.ok, report.errors)
        self.assertEqual(await stored(self.peer, CatalogKind.TOOL), ["echo", "new"])

    async def test_a_failed_tools_list_never_empties_the_stored_tools(self) -> None:
        for failure in ("http500", "malformed", "error", "endless"):
            await self.sync()
            self.upstream.tools = [{"name": "replacement", "inputSchema": {"type": "object"}}]
            self.upstream.prompts = [{"name": "greet"}]
            self.upstream.fail = {"tools/list": failure}

            report = await self.sync()

            self.assertEqual(list(report.errors), [CatalogKind.TOOL], failure)
            self.assertEqual(await stored(self.peer, CatalogKind.TOOL), ["add", "echo"], failure)
            # The kinds that did list are still refreshed.
            self.assertEqual(await stored(self.peer, CatalogKind.PROMPT), ["greet"], failure)
            self.assertNotEqual((await reload(self.peer)).last_error, "", failure)
            self.upstream = FakeUpstream()

    async def test_an_unreachable_upstream_changes_nothing(self) -> None:
        await self.sync()

        def refuse(request: httpx.Request) -> httpx.Response:
            raise httpx.ConnectError("connection refused", request=request)

        self.upstream.handle = refuse  # type: ignore[method-assign]
        report = await self.sync()

        self.assertIn("connect", report.errors)
        self.assertEqual(await stored(self.peer, CatalogKind.TOOL), ["add", "echo"])
        self.assertEqual(await stored(self.peer, CatalogKind.PROMPT), ["greet", "farewell"])
        self.assertNotEqual((await reload(self.peer)).last_error, "")

    async def test_it_follows_next_cursor_to_the_last_page(self) -> None:
        self.upstream.tools = [{"name": f"tool-{i}", "inputSchema": {"type": "object"}} for i in range(5)]
        self.upstream.page_size = 2

        report = await self.sync()

        self.assertTrue(report.ok, report.errors)
        self.assertEqual(await stored(self.peer, CatalogKind.TOOL), [f"tool-{i}" for i in range(5)])
        self.assertEqual(self.upstream.cursors("tools/list"), [None, "page-2", "page-4"])

    async def test_it_syncs_a_handshake_era_upstream_over_its_session(self) -> None:
        self.upstream = FakeUpstream(era="legacy")

        report = await self.sync()

        self.assertTrue(report.ok, report.errors)
        self.assertEqual(report.protocol_version, HANDSHAKE)
        self.assertEqual(await stored(self.peer, CatalogKind.TOOL), ["add", "echo"])
        methods = [m["method"] for m in self.upstream.received]
        self.assertEqual(methods[:3], ["server/discover", "initialize", "notifications/initialized"])
        listed = [m for m in self.upstream.received if m["method"] in LISTS]
        self.assertTrue(all(m["headers"].get("mcp-session-id") == "fake-session" for m in listed))
