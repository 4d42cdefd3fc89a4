import asyncio
from typing import Any

from asgiref.sync import SyncToAsync, async_to_sync
from django.apps import AppConfig
from django.db import transaction
from django.db.models.signals import post_delete, post_save


def _announce(peer_id: int) -> None:
    # After the commit, so no worker reconnects to what the transaction still shows.
    transaction.on_commit(lambda: _publish_retired(peer_id))


def _publish_retired(peer_id: int) -> None:
    """Send `peer.retired` without holding up the save: handed to the server's event loop when this
    thread runs for it (a view, a sync_to_async call), else sent on a loop of its own (a command)."""
    from federation.events import publish_peer_retired

    loop = getattr(SyncToAsync.threadlocal, "main_event_loop", None)
    if loop is not None and loop.is_running():
        asyncio.run_coroutine_threadsafe(publish_peer_retired(peer_id), loop)
    else:
        async_to_sync(publish_peer_retired)(peer_id)


def _peer_retired(sender: Any, instance: Any, **kwargs: Any) -> None:
    _announce(instance.pk)


def _peer_saved(sender: Any, instance: Any, created: bool = False, **kwargs: Any) -> None:
    if not created and not instance.enabled:
        _announce(instance.pk)


class FederationConfig(AppConfig):
    name = "federation"
    verbose_name = "Peers and catalog"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from federation.health import circuit_states_metric
        from federation.models import CatalogEntry, Peer
        from federation.pool import pool
        from federation.upkeep import on_upstream_event
        from fedmcp_lib import metrics
        from fedmcp_lib.caching import bump_on_change

        bump_on_change(Peer, "catalog")
        bump_on_change(CatalogEntry, "catalog")
        metrics.register_scrape("fedmcp_circuit_state", circuit_states_metric)
        # A removed or disabled peer's connections close in every worker (federation/upkeep.py).
        post_delete.connect(_peer_retired, sender=Peer, weak=False, dispatch_uid="fedmcp.peer.retired.delete")
        post_save.connect(_peer_saved, sender=Peer, weak=False, dispatch_uid="fedmcp.peer.retired.save")

        if on_upstream_event not in pool.event_handlers:
            pool.event_handlers.append(on_upstream_event)
