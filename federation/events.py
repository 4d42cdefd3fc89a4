"""Upstream events: re-sync on list_changed and publish changes to connected hosts.

Host-facing transports subscribe to these channel-layer groups and turn the events into
`notifications/*/list_changed` and `notifications/resources/updated` in each host's terms.
"""

from __future__ import annotations

import logging

from channels.layers import get_channel_layer

from federation.models import CatalogKind
from fedmcp_lib import caching

logger = logging.getLogger(__name__)

CATALOG_GROUP = "fedmcp.catalog"
RESOURCES_GROUP = "fedmcp.resources"
PEERS_GROUP = "fedmcp.peers"
"""Every worker listens here (federation/upkeep.py `listen_for_retired_peers`): a removed or disabled peer's connections close."""

LIST_CHANGED_KINDS = {
    "notifications/tools/list_changed": [CatalogKind.TOOL],
    "notifications/prompts/list_changed": [CatalogKind.PROMPT],
    "notifications/resources/list_changed": [CatalogKind.RESOURCE, CatalogKind.RESOURCE_TEMPLATE],
}


async def publish_catalog_changed(peer_name: str, kinds: list[str]) -> None:
    """Tell connected hosts that `peer_name`'s lists of `kinds` changed (list_changed), if the layer can.

    The change itself is made already: an unreachable channel layer (Redis down) costs the
    hosts only the notification, so it is logged, never raised to the caller (a CLI command,
    the API or a sync).
    """
    # Also for changes made with QuerySet.update(), which no signal reports: every worker's
    # cached routes and lists must go (fedmcp_lib/caching.py).
    caching.bump("catalog")
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        await layer.group_send(CATALOG_GROUP, {"type": "catalog.changed", "peer": peer_name, "kinds": list(kinds)})
    except Exception as exc:  # the layer's own errors (redis-py's) have no common base worth naming
        logger.warning("peer %s: hosts were not told its %s changed (channel layer unreachable: %s)", peer_name, ", ".join(kinds), exc)


async def publish_resource_updated(peer_name: str, uri: str, user_id: int | None = None) -> None:
    """Tell hosts subscribed to `uri` at `peer_name` that it changed; only `user_id`'s sessions, if given."""
    layer = get_channel_layer()
    if layer is not None:
        await layer.group_send(RESOURCES_GROUP, {"type": "resource.updated", "peer": peer_name, "uri": uri, "user": user_id})


async def publish_peer_retired(peer_id: int) -> None:
    """Tell every worker to close its connections to a peer that was removed or disabled.

    Logged, never raised, when the layer is unreachable: each worker's pool also retires such
    connections itself (federation/upkeep.py).
    """
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        await layer.group_send(PEERS_GROUP, {"type": "peer.retired", "peer": peer_id})
    except Exception as exc:
        logger.warning("peer #%s: workers were not told to close its connections (channel layer unreachable: %s)", peer_id, exc)

