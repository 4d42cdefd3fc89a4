"""The channel layer of the embedded (single-process) setup.

Channels' `InMemoryChannelLayer` sweeps every channel and every group membership for expired
entries on each `receive()` and `group_send()`. Every consumer receives on its own channel and
every open stream (WebSocket, SSE, GET stream) holds two channels and three group memberships,
so with N open sessions each new request or session pays O(N): 6,500 idle WebSockets took a
worker 150 s to open, slower with each one (`make bench`, docs/PERFORMANCE.md). Sweeping at
most once a second keeps the same expiry rules (messages after `expiry`, memberships after
`group_expiry`), at most a second late.
"""

from __future__ import annotations

import time

from channels.layers import InMemoryChannelLayer as ChannelsInMemoryChannelLayer

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
