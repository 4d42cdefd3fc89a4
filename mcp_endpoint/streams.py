"""Messages addressed to a host session outside any request, from any worker.

Every transport that keeps a stream open for a session (the Streamable HTTP GET stream, a
WebSocket, a legacy SSE stream) reads `SessionEvents`: messages sent to the session's group
by whichever worker produced them, plus catalog and resource events turned into notifications
for that session.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from channels.layers import get_channel_layer

from federation.events import CATALOG_GROUP, RESOURCES_GROUP
from fedmcp_site.layers import Memberships
from mcp_endpoint import jsonrpc
from mcp_endpoint.handlers import host_notifications_for
from mcp_endpoint.sessions import session_group, subscribed_uris

JsonDict = dict[str, Any]


async def send_to_session(session_id: str, message: JsonDict) -> None:
    """Deliver a message to the stream of a session, wherever it is held."""
    layer = get_channel_layer()
    await layer.group_send(session_group(session_id), {"type": "mcp.message", "message": message})


async def close_session_streams(session_id: str) -> None:
    layer = get_channel_layer()
    await layer.group_send(session_group(session_id), {"type": "mcp.close"})


class SessionGroupOutbound:
    """Outbound for transports whose replies travel on the session's stream (legacy SSE)."""

    can_request = True

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id

    async def send(self, message: JsonDict) -> None:
        await send_to_session(self.session_id, message)


class SessionEvents:
    """Messages for one session; join (``async with``) before telling the host where to write.

    Iterating yields messages, and None after every `keepalive` seconds of silence.
    """

    def __init__(self, session_id: str, scope: str, *, keepalive: float) -> None:
        self.session_id = session_id
        self.scope = scope
        self.keepalive = keepalive
        self.groups = (session_group(session_id), CATALOG_GROUP, RESOURCES_GROUP)
        self.layer = get_channel_layer()
        self.channel = ""

    async def __aenter__(self) -> SessionEvents:
        # The default prefix on purpose: channels-redis reads all of a process's channels from
        # one Redis key per prefix under one lock, so a custom prefix waits (up to its 5 s
        # BZPOPMIN timeout, again and again) while another channel of the process holds the lock.
        self.channel = await self.layer.new_channel()
        self.memberships = Memberships(self.layer, self.channel, self.groups)
        await self.memberships.join()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.memberships.leave()

    async def __aiter__(self) -> AsyncIterator[JsonDict | None]:
        # One receive stays pending across keepalives instead of being cancelled and restarted:
        # the in-memory layer scans every channel and group on each receive(), so restarting
        # it every `keepalive` seconds in every open stream costs O(streams^2) CPU (0.39 of a
        # core for 2,000 idle WebSockets, 0.01 with this; see docs/PERFORMANCE.md).
        pending: asyncio.Future[JsonDict] | None = None
        try:
            while True:
                # A stream may stay open for days; its memberships must outlive group_expiry.
                await self.memberships.renew_if_due()
                if pending is None:
                    pending = asyncio.ensure_future(self.layer.receive(self.channel))
                done, _ = await asyncio.wait({pending}, timeout=self.keepalive)
                if not done:
                    yield None
                    continue
                event, pending = pending.result(), None
                kind = event.get("type")
                if kind == "mcp.message":
                    yield event["message"]
                elif kind == "mcp.close":
                    return
                elif kind == "catalog.changed":
                    for note in host_notifications_for(self.scope, event):
                        yield note
                elif kind == "resource.updated" and (not self.scope or event.get("peer") == self.scope):
                    uris = await subscribed_uris(session_id=self.session_id, peer_name=event["peer"], upstream_uri=event["uri"])
                    for uri in uris:
                        yield jsonrpc.notification("notifications/resources/updated", {"uri": uri})
        finally:
            if pending is not None:
                pending.cancel()
