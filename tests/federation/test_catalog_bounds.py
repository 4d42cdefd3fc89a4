"""Issue 15, finding 2: a hostile upstream cannot make the gateway store a catalog of any size.

FEDERATION_MAX_CATALOG_ENTRIES bounds the items of each kind per peer,
FEDERATION_MAX_CATALOG_ITEM_BYTES one item (its description, schema, ...), and
FEDERATION_MAX_CATALOG_BYTES all of a peer's items together. Over a bound, listing stops at
once (no further pages are fetched), the kind's stored items are kept, and the peer's
last_error (admin, dashboard, health) and the log say why.
"""

from __future__ import annotations

from unittest import mock

from django.test import override_settings

from federation.models import CatalogKind
from federation.services import SyncReport, peer_sync_catalog
from tests.base import AsgiTestCase, register_peer
from tests.federation.test_catalog_sync import FakeUpstream, reload, stored


def tools(count: int, *, description: str = "") -> list[dict]:
    return [{"name": f"t{i}", "description": description, "inputSchema": {"type": "object"}} for i in range(count)]


@override_settings(
    FEDERATION_ALLOW_LOOPBACK=True, FEDERATION_MAX_CATALOG_ENTRIES=5, FEDERATION_MAX_CATALOG_ITEM_BYTES=2000, FEDERATION_MAX_CATALOG_BYTES=8000
)
class HostileCatalogTests(AsgiTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.peer = register_peer("fake", "http://127.0.0.1:9/mcp", sync=False)
        self.upstream = FakeUpstream()

    async def sync(self) -> SyncReport:
        with mock.patch("federation.upstream.streamable_http.outbound_client", self.upstream.client):
            return await peer_sync_catalog(peer=self.peer)

    async def assert_refused_and_kept(self, report: SyncReport, words: str) -> None:
        self.assertIn(CatalogKind.TOOL, report.errors)
        self.assertIn(words, report.errors[CatalogKind.TOOL])
        self.assertEqual(await stored(self.peer, CatalogKind.TOOL), ["add", "echo"])
        self.assertIn(words, (await reload(self.peer)).last_error)
        # The other kinds were listed and stored as usual.
        self.assertEqual(await stored(self.peer, CatalogKind.PROMPT), ["greet", "farewell"])

    async def test_an_unpaginated_catalog_over_the_entry_bound_is_refused_and_the_stored_one_kept(self) -> None:
        self.assertTrue((await self.sync()).ok)
        self.upstream.tools = tools(6)
        with self.assertLogs("federation.services", "WARNING") as logs:
            report = await self.sync()
        await self.assert_refused_and_kept(report, "more than 5 tool")
        self.assertIn("more than 5 tool", "\n".join(logs.output))

    async def test_a_paginated_catalog_over_the_entry_bound_stops_paging_and_is_refused(self) -> None:
        self.assertTrue((await self.sync()).ok)
        self.upstream.tools = tools(1000)
        self.upstream.page_size = 2
        self.upstream.received.clear()
        report = await self.sync()
        await self.assert_refused_and_kept(report, "more than 5 tool")
        # Three pages hold the sixth item: no page after that was asked for.
        self.assertEqual(len(self.upstream.cursors("tools/list")), 3)

    async def test_an_item_over_the_size_bound_is_refused(self) -> None:
        self.assertTrue((await self.sync()).ok)
        self.upstream.tools = tools(1, description="x" * 5000)
        report = await self.sync()
        await self.assert_refused_and_kept(report, "larger than 2000 bytes")

    async def test_a_catalog_over_the_total_size_bound_is_refused(self) -> None:
        self.assertTrue((await self.sync()).ok)
        self.upstream.tools = tools(5, description="x" * 1800)
        report = await self.sync()
        await self.assert_refused_and_kept(report, "more than 8000 bytes")

    async def test_a_catalog_within_the_bounds_is_stored(self) -> None:
        self.upstream.tools = tools(5, description="x" * 100)
        self.upstream.page_size = 2
        report = await self.sync()
        self.assertTrue(report.ok, report.errors)
        self.assertEqual(await stored(self.peer, CatalogKind.TOOL), [f"t{i}" for i in range(5)])
