"""Group memberships outlive the channel layer's `group_expiry` while their listener lives.

Both channels-redis and the in-memory layer drop a membership `group_expiry` seconds after it
was added (a day by default). Streams, `subscriptions/listen`, the consent page and each
worker's correlation channel can all listen longer than that; fedmcp_lib.layers.Memberships
renews them. Here the expiry is one second, so the tests take a few seconds, not a day.
"""

from __future__ import annotations

import asyncio
from unittest import mock

from django.test import SimpleTestCase

from federation.events import CATALOG_GROUP
from fedmcp_lib.layers import InMemoryChannelLayer, Memberships, renew_interval
from mcp_endpoint.streams import SessionEvents

EXPIRY = 1
OUTLIVE = 2.6
"""Seconds to wait: past the expiry and past the layer's once-a-second sweep."""


def short_lived_layer() -> InMemoryChannelLayer:
    return InMemoryChannelLayer(group_expiry=EXPIRY)


class MembershipTests(SimpleTestCase):
    def test_renewal_is_due_at_half_the_expiry(self) -> None:
        self.assertEqual(renew_interval(short_lived_layer()), 0.5)
        self.assertEqual(renew_interval(InMemoryChannelLayer()), 43200)

    async def test_without_renewal_the_layer_forgets_the_membership(self) -> None:
        # The failure the renewal prevents (and proof that the expiry is really this short).
        layer = short_lived_layer()
        channel = await layer.new_channel()
        await layer.group_add("g", channel)
        await asyncio.sleep(OUTLIVE)
        await layer.group_send("g", {"type": "ping"})
        with self.assertRaises(TimeoutError):
            await asyncio.wait_for(layer.receive(channel), 0.3)

    async def test_a_listener_waiting_past_the_expiry_still_hears_its_group(self) -> None:
        layer = short_lived_layer()
        memberships = Memberships(layer, await layer.new_channel(), ("g", "h"))
        await memberships.join()
        waiting = asyncio.ensure_future(memberships.receive())

        async def send_later() -> None:
            await asyncio.sleep(OUTLIVE)
            await layer.group_send("h", {"type": "ping", "n": 1})

        await asyncio.gather(send_later(), asyncio.wait_for(asyncio.shield(waiting), OUTLIVE + 2))
        self.assertEqual(waiting.result(), {"type": "ping", "n": 1})
        await memberships.leave()
        await layer.group_send("h", {"type": "ping", "n": 2})
        with self.assertRaises(TimeoutError):
            await asyncio.wait_for(layer.receive(memberships.channel), 0.3)

    async def test_keep_renews_for_a_consumer_that_receives_elsewhere(self) -> None:
        layer = short_lived_layer()
        memberships = Memberships(layer, await layer.new_channel(), ("user.1",))
        await memberships.join()
        keeper = asyncio.create_task(memberships.keep())
        try:
            await asyncio.sleep(OUTLIVE)
            await layer.group_send("user.1", {"type": "consent.prompt"})
            self.assertEqual(await asyncio.wait_for(layer.receive(memberships.channel), 1), {"type": "consent.prompt"})
        finally:
            keeper.cancel()

    async def test_a_session_stream_open_past_the_expiry_still_gets_catalog_changes(self) -> None:
        layer = short_lived_layer()
        with mock.patch("mcp_endpoint.streams.get_channel_layer", return_value=layer):
            events = SessionEvents("s-1", "", keepalive=0.2)
        async with events:
            stream = events.__aiter__()
            deadline = asyncio.get_running_loop().time() + OUTLIVE
            while asyncio.get_running_loop().time() < deadline:
                self.assertIsNone(await asyncio.wait_for(anext(stream), 1))  # keepalives only
            await layer.group_send(CATALOG_GROUP, {"type": "catalog.changed", "peer": "p", "kinds": ["tool"]})
            notes = [await asyncio.wait_for(anext(stream), 1) for _ in range(5)]  # a second of events
            self.assertIn({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}, notes)
            await stream.aclose()
