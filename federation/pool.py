"""The per-worker pool of warm upstream connections.

Each worker keeps its connections warm, created on first use and reused: no handshake and no
process spawn per call. Host sessions never own upstream connections, so a host request may
land on any worker.

Who shares a connection (`connection_owner`, the one place that decides): a 2026-07-28
connection keeps nothing between requests (each carries its client's capabilities, and what the
upstream asks comes back in the same request), so every user shares one per peer. A
handshake-era connection is a session the upstream may keep client state in: the roots it asked
for (server-everything's `get-roots-list` answers from the first `roots/list` it got), its
logging level, anything it keys by session. So each user gets their own handshake-era session
(stdio: their own process); the unowned one lists the catalog, probes health and serves calls
without an identity. A peer configured `per_identity` gives each user their own connection in
either era; a per-user OAuth peer, one carrying that user's token.

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
from federation.upstream_oauth import UpstreamAuthorizationRequiredError, upstream_auth

logger = logging.getLogger(__name__)

EventHandler = Callable[[PeerConfig, JsonDict, "int | None"], Awaitable[None]]
"""Called with the peer, the notification, and the user whose own connection it came on (per-user OAuth peers), else None."""
USER_CONNECTIONS = 64
"""Most per-user connections to one network peer a worker keeps (least recently used idle one closed first);
a stdio peer's bound is its `max_processes`."""
CATALOG_OWNER = "catalog"
"""Owner of the connection to a per-user OAuth peer that lists its catalog and probes its health."""
LEGACY_PROBE_RETRY_SECONDS = 300.0
"""After an upstream that did not list a handshake version refused `initialize`, seconds before trying again."""


class UpstreamPool:
    def __init__(self) -> None:
        # (peer, era, owner) -> connection, least recently used first; owner is "" for a shared
        # connection, else its user (`connection_owner`).
        self._connections: OrderedDict[tuple[PeerConfig, Era | None, str], UpstreamConnection] = OrderedDict()
        self._locks: dict[tuple[PeerConfig, Era | None, str], asyncio.Lock] = {}
        # (peer, owner) -> when an upstream that listed no handshake version last refused initialize.
        self._legacy_refused: dict[tuple[PeerConfig, str], float] = {}
        # peer -> when its connection last came up in the handshake era (users then open only their own).
        self._handshake_only: dict[PeerConfig, float] = {}
        self.event_handlers: list[EventHandler] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    async def get(self, peer: PeerConfig, *, prefer: Era, identity_key: str = "", user_id: int | None = None) -> UpstreamConnection:
        """Return a warm connection to `peer` for the user `identity_key`, in the host's era when the upstream offers it.

        Whose connection it is follows `connection_owner`: the user's own for a handshake-era
        session, a shared one for 2026-07-28. Per-user OAuth peers get one connection per local
        user (`user_id`), carrying that user's own token; without a user, the catalog's. Owned
        connections are bounded per worker and peer (`max_processes` for stdio,
        `USER_CONNECTIONS` otherwise): the least recently used idle one is closed beyond it.

        Raises:
            UpstreamError: the upstream cannot be reached or refuses the handshake
                (`UpstreamAuthorizationRequiredError` when the user has no token there).
        """
        shared = connection_owner(peer, "modern", identity_key, user_id)
        own = connection_owner(peer, "legacy", identity_key, user_id)
        seen = self._handshake_only.get(peer)
        if own != shared and seen is not None and time.monotonic() - seen < LEGACY_PROBE_RETRY_SECONDS:
            # Known to answer in the handshake era: the user's own session, nothing shared to open.
            return await self._ensure(peer, "legacy", own, user_id)
        opened = (peer, None, shared) not in self._connections
        primary = await self._ensure(peer, None, shared, user_id)
        if primary.era == "legacy":
            # A handshake-era upstream (or a stdio one that answered the handshake): the user's own session.
            self._handshake_only[peer] = time.monotonic()
            if own == shared:
                return primary
            if opened and self._connections.get((peer, None, shared)) is primary and (peer, "legacy", own) not in self._connections:
                # Opened for this user and used by nobody yet: it becomes theirs (one session, not two).
                del self._connections[(peer, None, shared)]
                self._connections[(peer, "legacy", own)] = primary
                await self._evict_beyond(peer, keep=(peer, "legacy", own))
                return primary
            return await self._ensure(peer, "legacy", own, user_id)
        if prefer != "legacy" or peer.transport == "stdio":
            return primary
        if primary.description.supports_legacy:
            return await self._ensure(peer, "legacy", own, user_id)
        return await self._probe_legacy(peer, primary, shared, own, user_id)

    async def _probe_legacy(self, peer: PeerConfig, primary: UpstreamConnection, shared: str, own: str, user_id: int | None) -> UpstreamConnection:
        """Return `own`'s handshake-era connection to an upstream that did not list the era, or `primary` if it refuses.

        A refusal is remembered for everyone who shares `primary`.
        """
        refused_at = self._legacy_refused.get((peer, shared))
        if refused_at is not None and time.monotonic() - refused_at < LEGACY_PROBE_RETRY_SECONDS:
            return primary
        try:
            connection = await self._ensure(peer, "legacy", own, user_id)
        except UpstreamAuthorizationRequiredError:
            raise  # the user must connect again, whatever the era
        except UpstreamError as exc:
            self._legacy_refused[(peer, shared)] = time.monotonic()
            logger.info("peer %s: no handshake era (%s); handshake-era hosts are bridged to %s", peer.name, exc, primary.protocol_version)
            return primary
        self._legacy_refused.pop((peer, shared), None)
        return connection

    async def _ensure(self, peer: PeerConfig, era: Era | None, owner: str = "", user_id: int | None = None) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # Connections are bound to the loop that made them; a new loop (a test, a
            # management command) starts from an empty pool.
            self._connections.clear()
            self._locks.clear()
            self._legacy_refused.clear()
            self._handshake_only.clear()
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
                await self._evict_beyond(peer, keep=key)
            logger.info("peer %s: connected (%s, %s %s)", peer.name, peer.transport, connection.era, connection.protocol_version)
            return connection

    async def _evict_beyond(self, peer: PeerConfig, keep: tuple[PeerConfig, Era | None, str]) -> None:
        """Close the least recently used idle connections `peer` has owned by a user beyond its bound.

        One with a request in flight is kept (the bound is passed for a while): closing it
        would fail that user's call. `keep` (the one just made for the caller) is never closed.
        """
        owned = [k for k in self._connections if k[0] == peer and k[2]]
        bound = peer.max_processes if peer.transport == "stdio" and not peer.user_oauth else USER_CONNECTIONS
        excess = len(owned) - bound
        for key in owned:
            if excess <= 0:
                return
            connection = self._connections[key]
            if key == keep or connection.in_flight:
                continue
            del self._connections[key]
            self._locks.pop(key, None)
            excess -= 1
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

    async def notify_owner(self, owner: str, method: str, params: JsonDict | None = None) -> int:
        """Send a host's notification (`notifications/roots/list_changed`) to the handshake-era
        sessions `owner` has on this worker; return how many got it.

        Only this worker's: the user's sessions on other workers keep what they learned until
        they ask again.
        """
        sessions = [c for (_, _, who), c in self._connections.items() if who and who == owner and c.era == "legacy"]
        for connection in sessions:
            await connection.notify(method, params)
        return len(sessions)

    async def drop(self, peer_id: int) -> None:
        """Close every connection to a peer (removed or disabled), side by side.

        Each stays listed until its close has finished, so `connections()` never reports a peer
        gone while its streams and child processes are still being shut down.
        """
        doomed = [(k, c) for k, c in self._connections.items() if k[0].id == peer_id]
        await asyncio.gather(*(c.close() for _, c in doomed), return_exceptions=True)
        for key, connection in doomed:
            if self._connections.get(key) is connection:
                del self._connections[key]

    async def close(self) -> None:
        connections, self._connections = list(self._connections.values()), OrderedDict()
        await asyncio.gather(*(c.close() for c in connections), return_exceptions=True)

    def connections(self) -> list[UpstreamConnection]:
        return list(self._connections.values())


def connection_owner(peer: PeerConfig, era: Era, identity_key: str, user_id: int | None) -> str:
    """Who a connection to `peer` in `era` belongs to: "" when every user shares it, else its user.

    * per-user OAuth peer: the local user whose token it carries (`CATALOG_OWNER` without one);
    * `per_identity` peer: the acting user, in either era;
    * otherwise a handshake-era session is the acting user's own, because the upstream may keep
      what one client told it (roots above all) for the whole session; a 2026-07-28 connection,
      which keeps nothing between requests, is shared.

    Without an identity (the catalog sync, health probes) the connection is the shared one.
    """
    if peer.user_oauth:
        return f"user:{user_id}" if user_id is not None else CATALOG_OWNER
    if peer.per_identity or era == "legacy":
        return identity_key
    return ""


pool = UpstreamPool()
"""This worker's pool."""
