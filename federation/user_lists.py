"""The lists that are an account's own at a per-user OAuth peer: each user's, from their own connection.

At a per-user OAuth peer (`Peer.user_oauth`) every user connects their own upstream account,
and what `resources/list` and `resources/templates/list` answer is that account's data (its
files, its repositories). The catalog is synced with one account's token, so it never stores
those two kinds for such a peer (federation/services.py `fetch_catalog`); hosts get them here,
listed live on the caller's own connection, the one their calls use (federation/pool.py). A
user who has not connected, or whose connection fails, gets none of that peer's items: a list
result cannot carry an error, and the first call there points them to the connect page.

Tools and prompts stay in the catalog: they are what the server offers, not what an account
holds, and a user must see a tool before connecting to be asked to connect when calling it
(docs/IDENTITY.md "The catalog").

A user's list is kept per worker for `TTL` seconds (and until the catalog changes), keyed by the
user, so paging through it asks the upstream once; no user is ever given another's entry.
"""

from __future__ import annotations

import asyncio
import logging
import time

from channels.db import database_sync_to_async
from django.conf import settings

from federation import naming
from federation.models import Peer
from federation.pool import pool
from federation.router import peer_config
from federation.services import LISTINGS, PER_USER_KINDS, CatalogBudget, _list_all
from federation.upstream.base import PeerConfig, UpstreamError
from federation.upstream_oauth import UpstreamAuthorizationRequiredError
from fedmcp_lib import caching
from fedmcp_lib.json_types import JsonDict
from identity.consent.policy import consent_denied_among
from identity.hostauth.tokens import Identity

logger = logging.getLogger(__name__)


TTL = 10.0
"""Seconds a user's own list is reused (paging, repeated lists) before it is asked for again."""

_LISTING = {kind: (method, key, field, capability) for kind, method, key, field, capability in LISTINGS}


def _per_user_peers(scope: str) -> list[PeerConfig]:
    rows = Peer.objects.filter(enabled=True, user_oauth=True)
    if scope:
        rows = rows.filter(name=scope)
    return [peer_config(peer) for peer in rows.order_by("name")]


_peers: caching.GenerationCache[list[PeerConfig]] = caching.GenerationCache("per-user peers", ("catalog",), maxsize=1000)
_lists: caching.GenerationCache[tuple[float, list[JsonDict]]] = caching.GenerationCache("per-user lists", ("catalog",), maxsize=4096)


async def user_items(*, identity: Identity | None, scope: str, kind: str, era: str, skip_peers: frozenset[int] = frozenset()) -> list[JsonDict]:
    """Return the caller's own items of `kind` at the per-user OAuth peers an endpoint serves.

    Named as the endpoint lists them: `fedmcp://<peer>/<uri>` on /mcp, verbatim per peer;
    without what a consent policy denies the caller. Empty for other kinds, for a caller
    without a local user, and for peers the user has not connected to (or that fail).
    """
    user_id = identity.user_id if identity is not None else None
    if kind not in PER_USER_KINDS or user_id is None:
        return []
    peers = await caching.cached(_peers, scope, lambda: database_sync_to_async(_per_user_peers)(scope))
    wanted = [peer for peer in peers if peer.id not in skip_peers]
    lists = await asyncio.gather(*(_own_list(peer, user_id, kind, era) for peer in wanted))
    field = _LISTING[kind][2]
    pairs = [(peer.name, item[field]) for peer, listed in zip(wanted, lists, strict=True) for item in listed]
    denied = await consent_denied_among(identity=identity, scope=scope, kind=kind, items=pairs)
    items: list[JsonDict] = []
    for peer, listed in zip(wanted, lists, strict=True):
        for item in listed:
            if (peer.name, item[field]) in denied:
                continue
            items.append(item if scope else {**item, field: naming.qualify_uri(peer.name, item[field])})
    return items


async def _own_list(peer: PeerConfig, user_id: int, kind: str, era: str) -> list[JsonDict]:
    key = (user_id, peer.id, kind)
    cached = _lists.get(key)
    if cached is not caching.MISSING and cached[0] > time.monotonic():
        return cached[1]
    stamp = _lists.stamp()
    try:
        items = await _fetch(peer, user_id, kind, era)
    except UpstreamAuthorizationRequiredError:
        return []  # not connected (or must connect again): nothing of theirs to show yet
    except UpstreamError as exc:
        logger.info("peer %s: listing %s for user %s failed: %s", peer.name, kind, user_id, exc)
        return []
    _lists.put(key, (time.monotonic() + TTL, items), stamp)
    return items


async def _fetch(peer: PeerConfig, user_id: int, kind: str, era: str) -> list[JsonDict]:
    """List one kind on the user's own connection, within the catalog's bounds, in canonical URIs."""
    method, key, field, capability = _LISTING[kind]
    connection = await pool.get(peer, prefer=era, user_id=user_id)  # type: ignore[arg-type]
    if capability not in connection.description.capabilities:
        return []
    listed = await _list_all(connection, method, key, kind, CatalogBudget(settings.FEDERATION_MAX_CATALOG_BYTES))
    items: list[JsonDict] = []
    seen: set[str] = set()
    for item in listed:
        name = item.get(field)
        if not isinstance(name, str) or not name:
            continue
        # Listed in the one form requests are routed in (naming.canonical_uri), as the catalog does.
        name = naming.canonical_uri(name)
        if name not in seen:
            seen.add(name)
            items.append({**item, field: name})
    return items
