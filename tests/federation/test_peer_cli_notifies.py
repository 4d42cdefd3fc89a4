"""`manage.py peer add|refresh|remove` tell connected hosts what changed, as the REST API does.

Hosts' streams listen on the channel layer's catalog group (federation.events.CATALOG_GROUP)
and turn each `catalog.changed` event into `notifications/*/list_changed`. Here a channel joins
that group the way a host's stream does, and the commands run as an operator types them.
"""

from __future__ import annotations

import asyncio
import shlex
from io import StringIO
from typing import Any
from unittest import mock

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.core.management import call_command

from federation.events import CATALOG_GROUP
from federation.models import CatalogKind, Peer, Transport
from tests.e2e import harness


def run(*args: str) -> None:
    call_command("peer", *args, stdout=StringIO(), stderr=StringIO())


class Listener:
    """A channel in the catalog group, as each host stream has."""

    def __init__(self) -> None:
        self.layer = get_channel_layer()
        self.channel = async_to_sync(self.layer.new_channel)()
        async_to_sync(self.layer.group_add)(CATALOG_GROUP, self.channel)

    def events(self) -> list[dict[str, Any]]:
        async def drain() -> list[dict[str, Any]]:
            received = []
            while True:
                try:
                    received.append(await asyncio.wait_for(self.layer.receive(self.channel), 0.5))
                except TimeoutError:
                    return received

        return async_to_sync(drain)()


@pytest.mark.django_db(transaction=True)
def test_add_and_refresh_announce_the_new_catalog() -> None:
    listener = Listener()

    run("add", "local", "--command", shlex.join(harness.fixture_command(stdio=True, name="local")))

    events = listener.events()
    assert [e["type"] for e in events] == ["catalog.changed"]
    assert events[0]["peer"] == "local"
    assert set(events[0]["kinds"]) >= {CatalogKind.TOOL, CatalogKind.PROMPT}


@pytest.mark.django_db(transaction=True)
def test_remove_announces_that_everything_of_the_peer_is_gone() -> None:
    Peer.objects.create(name="gone", transport=Transport.STREAMABLE_HTTP, url="http://127.0.0.1:9/mcp")
    listener = Listener()

    run("remove", "gone")

    events = listener.events()
    assert [(e["type"], e["peer"], sorted(e["kinds"])) for e in events] == [("catalog.changed", "gone", sorted(CatalogKind.values))]


@pytest.mark.django_db(transaction=True)
def test_remove_works_while_the_channel_layer_is_unreachable(caplog: pytest.LogCaptureFixture) -> None:
    # Redis down: the peer is removed all the same; hosts miss only the notification, and the log says so.
    Peer.objects.create(name="gone", transport=Transport.STREAMABLE_HTTP, url="http://127.0.0.1:9/mcp")
    layer = get_channel_layer()

    async def unreachable(*args: Any, **kwargs: Any) -> None:
        raise ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 6379)")

    with mock.patch.object(layer, "group_send", unreachable), caplog.at_level("WARNING", logger="federation.events"):
        run("remove", "gone")

    assert not Peer.objects.filter(name="gone").exists()
    assert "hosts were not told" in caplog.text
