"""The per-worker pool of warm upstream connections.

Each worker keeps at most one connection per peer and era, created on first use and reused by
every host session: no handshake and no process spawn per call. Host sessions never own
upstream connections, so a host request may land on any worker.

When an upstream speaks both eras, the pool gives each host the era it speaks itself, so
nothing has to be translated. When it speaks one era only, that connection serves every host
and the router bridges.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from federation.credentials import auth_for
from federation.upstream import CONNECTION_KINDS
from federation.upstream.base import Era, JsonDict, PeerConfig, UpstreamConnection, UpstreamUnavailableError

logger = logging.getLogger(__name__)

EventHandler = Callable[[PeerConfig, JsonDict], Awaitable[None]]


class UpstreamPool:
    def __init__(self) -> None:
        # (peer, era, owner) -> connection, least recently used first; owner is "" unless the
        # peer runs one process per identity.
        self._connections: OrderedDict[tuple[PeerConfig, Era | None, str], UpstreamConnection] = OrderedDict()
        self._locks: dict[tuple[PeerConfig, Era | None, str], asyncio.Lock] = {}
        self.event_handlers: list[EventHandler] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    async def get(self, peer: PeerConfig, *, prefer: Era, identity_key: str = "") -> UpstreamConnection:
        """Return a warm connection to `peer`, in the host's era when the upstream offers it.

        `identity_key` names the acting user; it matters only for stdio peers configured
        `per_identity`, which get one process per user (at most `max_processes`, least
        recently used stopped first). Every other peer shares one connection per era.

        Raises:
            UpstreamError: the upstream cannot be reached or refuses the handshake.
        """
        owner = identity_key if peer.per_identity and peer.transport == "stdio" else ""
        primary = await self._ensure(peer, None, owner)
        if primary.era == prefer or peer.transport == "stdio":
            return primary
        if prefer == "legacy" and primary.description.supports_legacy:
            return await self._ensure(peer, "legacy", owner)
        return primary

    async def _ensure(self, peer: PeerConfig, era: Era | None, owner: str = "") -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # Connections are bound to the loop that made them; a new loop (a test, a
            # management command) starts from an empty pool.
            self._connections.clear()
            self._locks.clear()
            self._loop = loop
        key = (peer, era, owner)
        connection = self._connections.get(key)
        if connection is not None and connection.is_healthy():
            self._connections.move_to_end(key)
            return connection
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            connection = self._connections.get(key)
            if connection is not None and connection.is_healthy():
                return connection
            await self._retire_stale(peer)
            kind = CONNECTION_KINDS.get(peer.transport)
            if kind is None:
                raise UpstreamUnavailableError(f"peer '{peer.name}': transport {peer.transport!r} is not supported")
            connection = kind(peer, era=era, on_event=self._event_sink(peer), auth=auth_for(peer))
            await connection.start()
            self._connections[key] = connection
            if owner:
                await self._evict_beyond(peer)
            logger.info("peer %s: connected (%s, %s %s)", peer.name, peer.transport, connection.era, connection.protocol_version)
            return connection

    async def _evict_beyond(self, peer: PeerConfig) -> None:
        """Stop the least recently used per-identity processes of `peer` beyond its bound."""
        owned = [k for k in self._connections if k[0] == peer and k[2]]
        for key in owned[: max(0, len(owned) - peer.max_processes)]:
            connection = self._connections.pop(key)
            self._locks.pop(key, None)
            await connection.close()

    async def _retire_stale(self, peer: PeerConfig) -> None:
        """Close connections made with an older configuration of the same peer."""
        for key in [k for k in self._connections if k[0].id == peer.id and k[0] != peer]:
            connection = self._connections.pop(key)
            self._locks.pop(key, None)
            await connection.close()

    def _event_sink(self, peer: PeerConfig) -> Callable[[JsonDict], Awaitable[None]]:
        async def sink(message: JsonDict) -> None:
            for handler in self.event_handlers:
                await handler(peer, message)

        return sink

    async def drop(self, peer_id: int) -> None:
        """Close every connection to a peer (removed or disabled)."""
        for key in [k for k in self._connections if k[0].id == peer_id]:
            connection = self._connections.pop(key)
            await connection.close()

    async def close(self) -> None:
        connections, self._connections = list(self._connections.values()), OrderedDict()
        await asyncio.gather(*(c.close() for c in connections), return_exceptions=True)

    def connections(self) -> list[UpstreamConnection]:
        return list(self._connections.values())


pool = UpstreamPool()
"""This worker's pool."""
