"""Keeping peers current in each worker: upstream notifications, and the periodic health checks and catalog refreshes.

The worker's first MCP connection starts the loops (`ensure_background_tasks`); the pool hands
notifications an upstream sends outside any request to `on_upstream_event` (federation/apps.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings

from federation.events import LIST_CHANGED_KINDS, PEERS_GROUP, publish_catalog_changed, publish_resource_updated
from federation.health import check_peer
from federation.models import Peer
from federation.naming import canonical_uri
from federation.pool import pool
from federation.router import peer_config
from federation.services import peer_sync_catalog
from federation.upstream.base import JsonDict, PeerConfig, UpstreamError
from fedmcp_lib.layers import listen

logger = logging.getLogger(__name__)


@database_sync_to_async
def _load_peer(peer_id: int) -> Peer | None:
    return Peer.objects.filter(pk=peer_id).first()


async def on_upstream_event(peer: PeerConfig, message: JsonDict, user_id: int | None = None) -> None:
    """Handle a notification an upstream sent outside any request.

    `user_id`: the notification came on that user's own connection to a per-user OAuth peer,
    so it is about their account and only their sessions hear of a resource update.
    """
    method = message.get("method")
    params: Any = message.get("params") or {}
    if method in LIST_CHANGED_KINDS:
        row = await _load_peer(peer.id)
        if row is None:
            return
        connection = await pool.get(peer, prefer="modern")
        report = await peer_sync_catalog(peer=row, connection=connection)
        if report.errors:
            logger.warning("peer %s: re-sync after %s incomplete: %s", peer.name, method, report.errors)
        await publish_catalog_changed(peer.name, LIST_CHANGED_KINDS[method])
    elif method == "notifications/resources/updated" and isinstance(params.get("uri"), str):
        if peer.user_oauth and user_id is None:
            # The catalog account's connection subscribes to nothing for anyone else.
            logger.debug("peer %s: ignoring a resource update on the catalog connection", peer.name)
            return
        # Subscriptions are kept under the canonical URI (federation/router.py resolve).
        await publish_resource_updated(peer.name, canonical_uri(params["uri"]), user_id)
    else:
        logger.debug("peer %s: ignoring unrelated %s", peer.name, method)


@database_sync_to_async
def _enabled_peers() -> list[PeerConfig]:
    # As routes build them, so the pool keeps one connection per peer (federation/pool.py).
    return [peer_config(p) for p in Peer.objects.enabled()]


async def refresh_peer(peer: PeerConfig) -> None:
    """Re-sync one peer's catalog on its warm connection and tell hosts what changed."""
    row = await _load_peer(peer.id)
    if row is None:
        return
    try:
        connection = await pool.get(peer, prefer="modern")
    except UpstreamError as exc:
        logger.info("peer %s: refresh skipped: %s", peer.name, exc)
        return
    report = await peer_sync_catalog(peer=row, connection=connection)
    if report.changed:
        await publish_catalog_changed(peer.name, report.changed)


async def _every(interval: float, job: Any) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            peers = await _enabled_peers()
            results = await asyncio.gather(*(job(p) for p in peers), return_exceptions=True)
            for peer, result in zip(peers, results, strict=True):
                if isinstance(result, Exception):
                    logger.error("peer %s: periodic %s failed: %r", peer.name, getattr(job, "__name__", "job"), result)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("periodic %s round failed", getattr(job, "__name__", "job"))


_started: dict[int, list[asyncio.Task[None]]] = {}


async def _on_retired(message: dict[str, Any]) -> None:
    if message.get("type") == "peer.retired" and isinstance(message.get("peer"), int):
        await pool.drop(message["peer"])
        logger.info("peer #%s: removed or disabled; this worker's connections to it are closed", message["peer"])


async def listen_for_retired_peers(layer: Any) -> None:
    """Close this worker's connections to each peer another process removed or disabled (`publish_peer_retired`)."""
    await listen(layer, (PEERS_GROUP,), _on_retired, what="retired-peers")


def ensure_background_tasks() -> None:
    """Start this worker's health-check and refresh loops (0 = disabled) and its retired-peers listener, once per event loop."""
    loop = asyncio.get_running_loop()
    if id(loop) in _started:
        return
    tasks = []
    layer = get_channel_layer()
    if layer is not None:
        tasks.append(loop.create_task(listen_for_retired_peers(layer)))
    if settings.FEDERATION_HEALTH_INTERVAL > 0:
        tasks.append(loop.create_task(_every(settings.FEDERATION_HEALTH_INTERVAL, check_peer)))
    if settings.FEDERATION_REFRESH_INTERVAL > 0:
        tasks.append(loop.create_task(_every(settings.FEDERATION_REFRESH_INTERVAL, refresh_peer)))
    _started[id(loop)] = tasks
