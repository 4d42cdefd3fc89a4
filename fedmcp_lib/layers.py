"""The channel layer of the embedded (single-process) setup, and group memberships that last.

Channels' `InMemoryChannelLayer` sweeps every channel and every group membership for expired
entries on each `receive()` and `group_send()`. Every consumer receives on its own channel and
every open stream (WebSocket, SSE, GET stream) holds two channels and three group memberships,
so with N open sessions each new request or session pays O(N): 6,500 idle WebSockets took a
worker 150 s to open, slower with each one (`make bench`, docs/PERFORMANCE.md). Sweeping at
most once a second keeps the same expiry rules (messages after `expiry`, memberships after
`group_expiry`), at most a second late.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from channels.layers import InMemoryChannelLayer as ChannelsInMemoryChannelLayer

logger = logging.getLogger(__name__)

SWEEP_INTERVAL = 1.0
"""Seconds between two sweeps for expired messages and group memberships."""


class InMemoryChannelLayer(ChannelsInMemoryChannelLayer):
    """Channels' in-memory layer, sweeping for expired entries at most once a second."""

    _swept_at = float("-inf")

    def _clean_expired(self) -> None:
        now = time.monotonic()
        if now - self._swept_at < SWEEP_INTERVAL:
            return
        self._swept_at = now
        super()._clean_expired()


def renew_interval(layer: Any) -> float:
    """Seconds after which a channel must renew its group memberships: half the layer's `group_expiry`.

    Both channels-redis and the in-memory layer drop a membership `group_expiry` seconds (a day
    by default) after it was added, whether or not the channel is still read. A stream, page or
    worker listening longer than that would silently stop hearing its groups.
    """
    return max(0.5, float(getattr(layer, "group_expiry", 86400)) / 2)


class Memberships:
    """One channel's group memberships, renewed before the layer expires them."""

    def __init__(self, layer: Any, channel: str, groups: Iterable[str]) -> None:
        self.layer = layer
        self.channel = channel
        self.groups = tuple(groups)
        self.every = renew_interval(layer)
        self._joined_at = float("-inf")

    async def join(self) -> None:
        for group in self.groups:
            await self.layer.group_add(group, self.channel)
        self._joined_at = time.monotonic()

    @property
    def renew_at(self) -> float:
        """When the memberships are next due for renewal (`time.monotonic()` clock)."""
        return self._joined_at + self.every

    async def renew_if_due(self) -> None:
        if time.monotonic() >= self.renew_at:
            await self.join()

    async def leave(self) -> None:
        for group in self.groups:
            await asyncio.shield(self.layer.group_discard(group, self.channel))

    async def keep(self) -> None:
        """Renew the memberships for as long as this runs (a task cancelled at disconnect)."""
        while True:
            await asyncio.sleep(max(0.0, self._joined_at + self.every - time.monotonic()))
            await self.renew_if_due()

    async def receive(self) -> dict[str, Any]:
        """The channel's next message, renewing the memberships while waiting for it.

        One receive stays pending across renewals: restarting it is costly on the in-memory
        layer and may lose a message on channels-redis.
        """
        pending = asyncio.ensure_future(self.layer.receive(self.channel))
        try:
            while True:
                done, _ = await asyncio.wait({pending}, timeout=self.every)
                await self.renew_if_due()
                if done:
                    return pending.result()
        finally:
            if not pending.done():
                pending.cancel()


async def listen(
    layer: Any, groups: Iterable[str], handle: Callable[[dict[str, Any]], Awaitable[None]], *, what: str, joined: asyncio.Event | None = None
) -> None:
    """A worker's listener: join `groups` on a channel of its own and hand each message to `handle`, for as long as this runs.

    The memberships are renewed while it waits (`Memberships.receive`); a receive that fails
    is logged and tried again a second later, so a layer outage does not end the listener.
    `joined` is set once the groups are joined.
    """
    channel = await layer.new_channel()
    memberships = Memberships(layer, channel, tuple(groups))
    await memberships.join()
    if joined is not None:
        joined.set()
    while True:
        try:
            message = await memberships.receive()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("%s channel failed; retrying", what)
            await asyncio.sleep(1)
            continue
        await handle(message)

