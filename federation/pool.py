"""The per-worker pool of warm upstream connections.

Each worker keeps at most one connection per peer and era, created on first use and reused by
every host session: no handshake and no process spawn per call. Host sessions never own
upstream connections, so a host request may land on any worker.

When an upstream speaks both eras, the pool gives each host the era it speaks itself, so
nothing has to be translated. When it speaks one era only, that connection serves every host
and the router bridges.

An upstream's `server/discover` does not tell the whole story: the SDK's `MCPServer` lists only
2026-07-28 there, yet accepts `initialize`, and its tools that ask the client mid-call
(`ctx.elicit`, sampling) work only on a handshake-era connection. So for a handshake-era host
the pool tries the handshake with such an upstream too; one that refuses is bridged, and asked
again only after `LEGACY_PROBE_RETRY_SECONDS`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from federation.upstream import CONNECTION_KINDS
from federation.upstream.base import Era, JsonDict, PeerConfig, UpstreamConnection, UpstreamError, UpstreamUnavailableError
from identity.upstream_oauth import UpstreamAuthorizationRequiredError, upstream_auth

logger = logging.getLogger(__name__)

EventHandler = Callable[[PeerConfig, JsonDict, "int | None"], Awaitable[None]]
"""Called with the peer, the notification, and the user whose own connection it came on (per-user OAuth peers), else None."""
USER_CONNECTIONS = 64
"""Most per-user connections to one per-user OAuth peer a worker keeps (least recently used closed first)."""
CATALOG_OWNER = "catalog"
"""Owner of the connection to a per-user OAuth peer that lists its catalog and probes its health."""
LEGACY_PROBE_RETRY_SECONDS = 300.0
"""After an upstream that did not list a handshake version refused `initialize`, seconds before trying again."""


class UpstreamPool:
    def __init__(self) -> None:
        # (peer, era, owner) -> connection, least recently used first; owner is "" unless the
        # peer runs one process per identity or acts with each user's own token.
        self._connections: OrderedDict[tuple[PeerConfig, Era | None, str], UpstreamConnection] = OrderedDict()
        self._locks: dict[tuple[PeerConfig, Era | None, str], asyncio.Lock] = {}
        # (peer, owner) -> when an upstream that listed no handshake version last refused initialize.
        self._legacy_refused: dict[tuple[PeerConfig, str], float] = {}
        self.event_handlers: list[EventHandler] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    async def get(self, peer: PeerConfig, *, prefer: Era, identity_key: str = "", user_id: int | None = None) -> UpstreamConnection:
        """Return a warm connection to `peer`, in the host's era when the upstream offers it.

        `identity_key` names the acting user; it matters for stdio peers configured
        `per_identity`, which get one process per user (at most `max_processes`, least
        recently used stopped first). Per-user OAuth peers get one connection per local user
        (`user_id`), carrying that user's own token, because the upstream binds its sessions to
        the token's user; without a user, the catalog's connection. Every other peer shares one
        connection per era.

        Raises:
            UpstreamError: the upstream cannot be reached or refuses the handshake
                (`UpstreamAuthorizationRequiredError` when the user has no token there).
        """
        if peer.user_oauth:
            owner = f"user:{user_id}" if user_id is not None else CATALOG_OWNER
        else:
            owner = identity_key if peer.per_identity and peer.transport == "stdio" else ""
        primary = await self._ensure(peer, None, owner, user_id)
        if primary.era == prefer or peer.transport == "stdio" or prefer != "legacy":
            return primary
        if primary.description.supports_legacy:
            return await self._ensure(peer, "legacy", owner, user_id)
        return await self._probe_legacy(peer, primary, owner, user_id)

    async def _probe_legacy(self, peer: PeerConfig, primary: UpstreamConnection, owner: str, user_id: int | None) -> UpstreamConnection:
        """Return a handshake-era connection to an upstream that did not list the era, or `primary` if it refuses."""
        refused_at = self._legacy_refused.get((peer, owner))
        if refused_at is not None and time.monotonic() - refused_at < LEGACY_PROBE_RETRY_SECONDS:
            return primary
        try:
            connection = await self._ensure(peer, "legacy", owner, user_id)
        except UpstreamAuthorizationRequiredError:
            raise  # the user must connect again, whatever the era
        except UpstreamError as exc:
            self._legacy_refused[(peer, owner)] = time.monotonic()
            logger.info("peer %s: no handshake era (%s); handshake-era hosts are bridged to %s", peer.name, exc, primary.protocol_version)
            return primary
        self._legacy_refused.pop((peer, owner), None)
        return connection

    async def _ensure(self, peer: PeerConfig, era: Era | None, owner: str = "", user_id: int | None = None) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # Connections are bound to the loop that made them; a new loop (a test, a
            # management command) starts from an empty pool.
            self._connections.clear()
            self._locks.clear()
            self._legacy_refused.clear()
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
            sink = self._event_sink(peer, user_id if peer.user_oauth else None)
            connection = kind(peer, era=era, on_event=sink, auth=upstream_auth(peer, user_id=user_id))
            await connection.start()
            self._connections[key] = connection
            if owner:
                await self._evict_beyond(peer)
            logger.info("peer %s: connected (%s, %s %s)", peer.name, peer.transport, connection.era, connection.protocol_version)
            return connection

    async def _evict_beyond(self, peer: PeerConfig) -> None:
        """Stop the least recently used per-identity processes (or per-user connections) of `peer` beyond its bound."""
        owned = [k for k in self._connections if k[0] == peer and k[2]]
        bound = USER_CONNECTIONS if peer.user_oauth else peer.max_processes
        for key in owned[: max(0, len(owned) - bound)]:
            connection = self._connections.pop(key)
            self._locks.pop(key, None)
            await connection.close()

    async def _retire_stale(self, peer: PeerConfig) -> None:
        """Close connections made with an older configuration of the same peer."""
        for key in [k for k in self._connections if k[0].id == peer.id and k[0] != peer]:
            connection = self._connections.pop(key)
            self._locks.pop(key, None)
            await connection.close()

    def _event_sink(self, peer: PeerConfig, user_id: int | None) -> Callable[[JsonDict], Awaitable[None]]:
        async def sink(message: JsonDict) -> None:
            for handler in self.event_handlers:
                await handler(peer, message, user_id)

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
