"""Handshake-era host sessions: create, load, update and close, from async code.

Each worker keeps the open sessions it served in memory (fedmcp_lib/caching.py, domain
"sessions"); every change below publishes a new generation, so the next message on any worker
reads the row again. Creating a session changes nothing cached: a new id is simply a miss.

Nothing is left open for ever. A WebSocket or legacy SSE session lives as long as its
connection: the worker holding it renews its lease (`lease_until`) every third of
`MCP_SESSION_LEASE`, and closes it when the connection ends or the worker drains. A worker that
is killed, or that cannot write the close (database down), stops renewing, and any worker's
upkeep closes the session once the lease has run out. Streamable HTTP sessions close on DELETE
or after `MCP_SESSION_IDLE_TIMEOUT` idle; a DELETE the database could not record is retried by
the upkeep. Closed rows are deleted after `MCP_SESSION_RETENTION`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import Error as DatabaseError
from django.db.models import Q
from django.utils import timezone
from prometheus_client.core import GaugeMetricFamily

from fedmcp_lib import caching
from identity.hostauth.tokens import Identity
from mcp_endpoint.models import McpSession, ResourceSubscription

logger = logging.getLogger(__name__)

TOUCH_INTERVAL = timedelta(seconds=60)
_open: caching.GenerationCache[McpSession] = caching.GenerationCache("sessions", ("sessions",))
"""Session id -> the open session's row, as last read by this worker."""


class SessionLimitError(Exception):
    """The caller holds MCP_MAX_SESSIONS_PER_USER open sessions (or streams on this worker) already."""

    def __init__(self, limit: int, what: str = "sessions") -> None:
        super().__init__(f"too many open {what} (limit {limit}); close one and retry")
        self.limit = limit


def _owner(identity: Identity) -> Q:
    """Whose sessions count together: the token's user, or for a client-only token its client."""
    if identity.user_id is not None:
        return Q(user_id=identity.user_id)
    return Q(user__isnull=True, client_id=identity.client_id)


def session_group(session_id: str) -> str:
    """Channel-layer group of everything addressed to one host session."""
    return f"fedmcp.session.{session_id}"


HELD_TRANSPORTS = frozenset({"websocket", "sse"})
"""Transports whose sessions live as long as one connection to one worker (leased)."""


@database_sync_to_async
def session_create(
    *, transport: str, scope: str, identity: Identity, protocol_version: str = "", client_capabilities: Any = None, client_info: Any = None
) -> McpSession:
    """Open a session for `identity`, within its bound of open sessions.

    Open means not closed and seen within MCP_SESSION_IDLE_TIMEOUT. Two workers may each let
    one more in at the same moment: the bound holds within a few sessions, which is its purpose.
    A WebSocket or SSE session starts held by this worker (`session_release` when its connection ends).

    Raises:
        SessionLimitError: the caller holds MCP_MAX_SESSIONS_PER_USER open sessions already.
    """
    limit = settings.MCP_MAX_SESSIONS_PER_USER
    if limit > 0:
        fresh = timezone.now() - timedelta(seconds=settings.MCP_SESSION_IDLE_TIMEOUT)
        if McpSession.objects.live().filter(_owner(identity), last_seen_at__gte=fresh).count() >= limit:
            raise SessionLimitError(limit)
    lease_until = timezone.now() + timedelta(seconds=settings.MCP_SESSION_LEASE) if transport in HELD_TRANSPORTS else None
    session = McpSession.objects.create(
        lease_until=lease_until,
        transport=transport,
        scope=scope,
        user_id=identity.user_id,
        client_id=identity.client_id,
        protocol_version=protocol_version,
        client_capabilities=client_capabilities or {},
        client_info=client_info or {},
    )
    if lease_until is not None:
        _held.add(session.id)
    return session


async def session_load(session_id: str, identity: Identity) -> McpSession | None:
    """Return the open session with this id if `identity` owns it; refresh its last-seen time now and then.

    A session of another user or client is reported as absent, so its existence leaks nothing.
    Served from this worker's cache while it is fresh: the database is read when the session
    changed anywhere, and when its last-seen time is due a refresh (or it looks idle).
    """
    session = _open.get(session_id)
    if session is not caching.MISSING and timezone.now() - session.last_seen_at <= TOUCH_INTERVAL:
        return session if session.belongs_to(identity.user_id, identity.client_id) else None
    stamp = _open.stamp()
    session = await _session_load(session_id, identity)
    if session is not None:
        _open.put(session_id, session, stamp)
    return session


@database_sync_to_async
def _session_load(session_id: str, identity: Identity) -> McpSession | None:
    session = McpSession.objects.filter(pk=session_id, closed_at__isnull=True).first()
    if session is None or not session.belongs_to(identity.user_id, identity.client_id):
        return None
    idle = timezone.now() - session.last_seen_at
    if idle > timedelta(seconds=settings.MCP_SESSION_IDLE_TIMEOUT):
        McpSession.objects.filter(pk=session.pk).update(closed_at=timezone.now())
        caching.bump("sessions")
        return None
    if idle > TOUCH_INTERVAL:
        session.last_seen_at = timezone.now()
        McpSession.objects.filter(pk=session.pk).update(last_seen_at=session.last_seen_at)
    return session


@database_sync_to_async
def session_initialize(*, session: McpSession, protocol_version: str, client_capabilities: Any, client_info: Any) -> None:
    session.protocol_version = protocol_version
    session.client_capabilities = client_capabilities or {}
    session.client_info = client_info or {}
    session.save(update_fields=["protocol_version", "client_capabilities", "client_info"])  # signals bump "sessions"


@database_sync_to_async
def session_mark_initialized(*, session: McpSession) -> None:
    session.initialized = True
    # Nothing reads `initialized` on the call path: cached copies elsewhere need not be dropped.
    McpSession.objects.filter(pk=session.pk).update(initialized=True)


@database_sync_to_async
def session_set_log_level(*, session: McpSession, level: str) -> None:
    session.log_level = level
    McpSession.objects.filter(pk=session.pk).update(log_level=level)
    caching.bump("sessions")


@database_sync_to_async
def session_close(*, session_id: str) -> bool:
    """Close a session; returns False if it was not open."""
    closed = bool(McpSession.objects.filter(pk=session_id, closed_at__isnull=True).update(closed_at=timezone.now()))
    if closed:
        caching.bump("sessions")
    return closed


def _subscribers(session: McpSession, peer_name: str, upstream_uri: str, per_user: bool) -> Any:
    rows = ResourceSubscription.objects.filter(session__closed_at__isnull=True, peer_name=peer_name, upstream_uri=upstream_uri)
    # At a per-user OAuth peer each user subscribes upstream on their own connection.
    return rows.filter(session__user_id=session.user_id) if per_user else rows


async def session_release(*, session_id: str) -> None:
    """The connection of a held session ended: stop renewing its lease and close it.

    If the database cannot record the close, the lease (no longer renewed) runs out and the
    upkeep of some worker closes it.
    """
    _held.discard(session_id)
    try:
        await session_close(session_id=session_id)
    except DatabaseError:
        logger.warning("session %s… not closed now (database unreachable); its lease will expire", session_id[:8], exc_info=True)


def session_close_later(*, session_id: str, identity: Identity) -> None:
    """Remember a DELETE the database could not record; the upkeep closes the session (if the caller owns it)."""
    _close_later[session_id] = (identity.user_id, identity.client_id)


# --- upkeep: leases, expiry, retention -----------------------------------------------------------

_held: set[str] = set()
"""Ids of the WebSocket and SSE sessions whose connection this worker holds."""
_close_later: dict[str, tuple[int | None, str]] = {}
"""Session id -> owner (user id, client id) of DELETEs to record once the database is back."""
_upkeep_started: set[int] = set()


@database_sync_to_async
def session_upkeep() -> dict[str, int]:
    """Renew this worker's leases, close expired and idle sessions, delete old closed rows.

    Returns how many rows each step changed (for tests and the log).
    """
    now = timezone.now()
    held = list(_held)
    renewed = McpSession.objects.live().filter(pk__in=held).update(lease_until=now + timedelta(seconds=settings.MCP_SESSION_LEASE)) if held else 0
    deferred = 0
    for session_id, (user_id, client_id) in list(_close_later.items()):
        deferred += McpSession.objects.live().filter(pk=session_id, user_id=user_id, client_id=client_id).update(closed_at=now)
        _close_later.pop(session_id, None)
    expired = McpSession.objects.lease_expired().update(closed_at=now)
    idle = McpSession.objects.unleased_idle_since(settings.MCP_SESSION_IDLE_TIMEOUT).update(closed_at=now)
    pruned, _ = McpSession.objects.closed_before(settings.MCP_SESSION_RETENTION).delete()
    if deferred or expired or idle:
        caching.bump("sessions")
    report = {"renewed": renewed, "deferred": deferred, "expired": expired, "idle": idle, "pruned": pruned}
    if deferred or expired or idle or pruned:
        logger.info("session upkeep: %s", report)
    return report


async def close_held_sessions() -> None:
    """Close every session this worker holds (it is shutting down; their connections end with it)."""
    held = list(_held)
    _held.clear()
    if held:
        await _close_many(held)


@database_sync_to_async
def _close_many(session_ids: list[str]) -> None:
    if McpSession.objects.live().filter(pk__in=session_ids).update(closed_at=timezone.now()):
        caching.bump("sessions")


async def _upkeep_loop() -> None:
    while True:
        await asyncio.sleep(settings.MCP_SESSION_LEASE / 3)
        try:
            await session_upkeep()
        except asyncio.CancelledError:
            raise
        except DatabaseError:
            logger.warning("session upkeep skipped: database unreachable", exc_info=True)
        except Exception:
            logger.exception("session upkeep failed")


def ensure_upkeep() -> None:
    """Start this worker's session upkeep once per event loop."""
    loop = asyncio.get_running_loop()
    if id(loop) not in _upkeep_started:
        _upkeep_started.add(id(loop))
        loop.create_task(_upkeep_loop())


@database_sync_to_async
def subscription_add(*, session: McpSession, uri: str, peer_name: str, upstream_uri: str, per_user: bool = False) -> bool:
    """Record a subscription; returns True if it is the first for that upstream resource (of that user, if `per_user`)."""
    first = not _subscribers(session, peer_name, upstream_uri, per_user).exists()
    ResourceSubscription.objects.get_or_create(session=session, uri=uri, defaults={"peer_name": peer_name, "upstream_uri": upstream_uri})
    return first


@database_sync_to_async
def subscription_remove(*, session: McpSession, uri: str, per_user: bool = False) -> tuple[str, str, bool] | None:
    """Drop a subscription; returns (peer, upstream uri, was it the last one (of that user, if `per_user`)) or None."""
    sub = ResourceSubscription.objects.filter(session=session, uri=uri).first()
    if sub is None:
        return None
    sub.delete()
    last = not _subscribers(session, sub.peer_name, sub.upstream_uri, per_user).exists()
    return sub.peer_name, sub.upstream_uri, last


@database_sync_to_async
def subscribed_uris(*, session_id: str, peer_name: str, upstream_uri: str, user_id: int | None = None) -> list[str]:
    """Return the URIs under which a session subscribed to an upstream resource.

    `user_id`: the update is about that user's account (per-user OAuth peer): other users' sessions get none.
    """
    rows = ResourceSubscription.objects.filter(session_id=session_id, peer_name=peer_name, upstream_uri=upstream_uri)
    if user_id is not None:
        rows = rows.filter(session__user_id=user_id)
    return list(rows.values_list("uri", flat=True))


_open_streams: Counter[str] = Counter()
"""Open Streamable HTTP GET and subscriptions/listen streams on this worker, per caller."""


@contextmanager
def stream_slot(identity: Identity | None) -> Iterator[None]:
    """Hold one of the caller's MCP_MAX_SESSIONS_PER_USER stream places on this worker while open.

    These streams hold no session of their own (a GET stream hangs off one, a listen stream
    has none), so they are counted here, per worker, rather than in the database.

    Raises:
        SessionLimitError: the caller holds that many streams on this worker already.
    """
    limit = settings.MCP_MAX_SESSIONS_PER_USER
    key = "" if identity is None else (f"user:{identity.user_id}" if identity.user_id is not None else f"client:{identity.client_id}")
    if limit > 0 and _open_streams[key] >= limit:
        raise SessionLimitError(limit, "streams")
    _open_streams[key] += 1
    try:
        yield
    finally:
        _open_streams[key] -= 1
        if _open_streams[key] <= 0:
            del _open_streams[key]


def host_sessions_metric() -> Iterable[GaugeMetricFamily]:
    """`fedmcp_host_sessions` at scrape time (registered in McpEndpointConfig.ready)."""
    from django.db.models import Count
    family = GaugeMetricFamily(
        "fedmcp_host_sessions",
        "Open handshake-era host sessions in the database, by transport (cluster-wide: every worker reports the same).",
        labels=["transport"],
    )
    rows = McpSession.objects.live().order_by().values("transport").annotate(n=Count("id"))
    counts = {row["transport"]: row["n"] for row in rows}
    for transport, _label in McpSession.TRANSPORTS:
        family.add_metric([transport], counts.get(transport, 0))
    yield family

