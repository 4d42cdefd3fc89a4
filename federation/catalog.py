"""Read the catalog as hosts see it: namespaced on the aggregated endpoints, verbatim per peer.

The built lists are kept per worker until the catalog or a peer changes in any process
(fedmcp_lib/caching.py, domain "catalog"), so paging through 10,000 tools reads them once.
The items are shared between requests: callers slice the list, never change an item.
"""

from __future__ import annotations

from channels.db import database_sync_to_async

from federation.models import CatalogEntry, CatalogKind, Peer
from federation.services import PER_USER_KINDS
from fedmcp_lib import caching
from fedmcp_lib.json_types import JsonDict

# The field of each kind that carries its name.
NAME_FIELDS = {
    CatalogKind.TOOL: "name",
    CatalogKind.PROMPT: "name",
    CatalogKind.RESOURCE: "uri",
    CatalogKind.RESOURCE_TEMPLATE: "uriTemplate",
}


def _entries(scope: str, kind: str, skip_peers: frozenset[int]) -> list[JsonDict]:
    rows = CatalogEntry.objects.visible().filter(kind=kind).exclude(peer_id__in=skip_peers)
    if kind in PER_USER_KINDS:
        # Never one account's resources for everyone, even stored by an older sync (federation/user_lists.py).
        rows = rows.exclude(peer__user_oauth=True)
    if scope:
        rows = rows.filter(peer__name=scope).order_by("position")
        return [payload for payload in rows.values_list("payload", flat=True)]
    field = NAME_FIELDS[kind]  # type: ignore[index]
    items: list[JsonDict] = []
    seen: set[str] = set()
    for name, payload in rows.order_by("peer__name", "position").values_list("name", "payload"):
        # The same thing may be listed by two peer gateways; hosts see it once.
        if name not in seen:
            seen.add(name)
            items.append({**payload, field: name})
    return items


async def list_items(scope: str, kind: str, *, skip_peers: frozenset[int] = frozenset()) -> list[JsonDict]:
    """Return every visible item of `kind` for the endpoint `scope`, in a stable order.

    `skip_peers` leaves out peers known to be down, so hosts get the partial list that works.
    The list is shared: do not change it or its items.
    """
    key = (scope, kind, skip_peers)
    return await caching.cached(_lists, key, lambda: database_sync_to_async(_entries)(scope, kind, skip_peers))


_lists: caching.GenerationCache[list[JsonDict]] = caching.GenerationCache("catalog lists", ("catalog",), maxsize=256)


def _capabilities(scope: str) -> JsonDict | None:
    peer = Peer.objects.filter(name=scope, enabled=True).first()
    return dict(peer.capabilities) if peer else None


async def peer_capabilities(scope: str) -> JsonDict | None:
    return await database_sync_to_async(_capabilities)(scope)


def _peers_with(path: tuple[str, ...]) -> list[str]:
    names = []
    for name, capabilities in Peer.objects.filter(enabled=True).order_by("name").values_list("name", "capabilities"):
        node = capabilities
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None:
            names.append(name)
    return names


async def peers_with_capability(*path: str) -> list[str]:
    """Return the enabled peers whose stored capabilities have `path` (e.g. "tasks", "list"), by name."""
    return await caching.cached(_capable, path, lambda: database_sync_to_async(_peers_with)(path))


_capable: caching.GenerationCache[list[str]] = caching.GenerationCache("peers by capability", ("catalog",), maxsize=64)


def _instructions(scope: str) -> str:
    peer = Peer.objects.filter(name=scope).first()
    return peer.instructions if peer else ""


async def peer_instructions(scope: str) -> str:
    return await database_sync_to_async(_instructions)(scope)
