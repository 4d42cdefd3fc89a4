"""Read the catalog as hosts see it: namespaced on the aggregated endpoints, verbatim per peer."""

from __future__ import annotations

from typing import Any

from channels.db import database_sync_to_async

from federation import naming
from federation.models import CatalogEntry, CatalogKind, Peer

JsonDict = dict[str, Any]

# The field of each kind that carries its name, and how to namespace it.
NAME_FIELDS = {
    CatalogKind.TOOL: ("name", naming.qualify_name),
    CatalogKind.PROMPT: ("name", naming.qualify_name),
    CatalogKind.RESOURCE: ("uri", naming.qualify_uri),
    CatalogKind.RESOURCE_TEMPLATE: ("uriTemplate", naming.qualify_uri),
}


def host_item(entry_peer: str, kind: str, payload: JsonDict, scope: str) -> JsonDict:
    """Return the item as a host on `scope` sees it."""
    if scope:
        return payload
    field, qualify = NAME_FIELDS[kind]  # type: ignore[index]
    item = dict(payload)
    item[field] = qualify(entry_peer, payload[field])
    return item


def _entries(scope: str, kind: str) -> list[JsonDict]:
    rows = CatalogEntry.objects.visible().filter(kind=kind)
    if scope:
        rows = rows.filter(peer__name=scope)
    rows = rows.order_by("peer__name", "position").values_list("peer__name", "payload")
    return [host_item(peer_name, kind, payload, scope) for peer_name, payload in rows]


async def list_items(scope: str, kind: str) -> list[JsonDict]:
    """Return every visible item of `kind` for the endpoint `scope`, in a stable order."""
    return await database_sync_to_async(_entries)(scope, kind)


def _capabilities(scope: str) -> JsonDict | None:
    peer = Peer.objects.filter(name=scope, enabled=True).first()
    return dict(peer.capabilities) if peer else None


async def peer_capabilities(scope: str) -> JsonDict | None:
    return await database_sync_to_async(_capabilities)(scope)


def _instructions(scope: str) -> str:
    peer = Peer.objects.filter(name=scope).first()
    return peer.instructions if peer else ""


async def peer_instructions(scope: str) -> str:
    return await database_sync_to_async(_instructions)(scope)
