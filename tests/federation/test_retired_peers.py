"""A removed or disabled peer's upstream connections close in every worker, within moments.

Before, `UpstreamPool.drop()` was never called: a stdio child lived on until the worker
restarted, an HTTP stream for minutes (issue 18). Here the worker's listener
(`federation/upkeep.py`) is started as the first MCP request starts it, a connection is made
through a real call, and the peer is then disabled or removed the ways an operator does.
"""

from __future__ import annotations

import asyncio

from channels.db import database_sync_to_async

from federation.models import Peer
from federation.pool import pool
from federation.services import peer_remove, peer_set_enabled
from federation.upkeep import ensure_background_tasks
from tests.base import FixturePeerTestCase, McpClient

WAIT = 10.0


class RetiredPeerTests(FixturePeerTestCase):
    async def connected(self) -> None:
        ensure_background_tasks()
        client = McpClient()
        await client.initialize()
        reply = await client.call("tools/call", {"name": "everything__add", "arguments": {"a": 1, "b": 1}})
        self.assertIn("result", reply.json())
        self.assertTrue(self.peer_connections())

    def peer_connections(self) -> list[object]:
        return [c for c in pool.connections() if c.peer.id == self.peer.pk]

    async def closed(self) -> bool:
        """Wait (bounded) for the pool to hold no connection to the peer."""
        async with asyncio.timeout(WAIT):
            while self.peer_connections():
                await asyncio.sleep(0.05)
        return True

    async def test_disabling_a_peer_closes_its_connections(self) -> None:
        await self.connected()
        await peer_set_enabled(peer_ids=[self.peer.pk], enabled=False)
        self.assertTrue(await self.closed())

    async def test_removing_a_peer_closes_its_connections(self) -> None:
        await self.connected()
        await database_sync_to_async(peer_remove)(peer=self.peer)
        self.assertTrue(await self.closed())

    async def test_switching_it_off_in_the_admin_closes_its_connections(self) -> None:
        await self.connected()

        def switch_off() -> None:
            peer = Peer.objects.get(pk=self.peer.pk)
            peer.enabled = False
            peer.save()

        await database_sync_to_async(switch_off)()
        self.assertTrue(await self.closed())
