from django.apps import AppConfig


class FederationConfig(AppConfig):
    name = "federation"
    verbose_name = "Peers and catalog"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from federation.health import circuit_states_metric
        from federation.models import CatalogEntry, Peer
        from federation.pool import pool
        from federation.upkeep import on_upstream_event
        from fedmcp_site import metrics
        from fedmcp_site.caching import bump_on_change

        bump_on_change(Peer, "catalog")
        bump_on_change(CatalogEntry, "catalog")
        metrics.register_scrape("fedmcp_circuit_state", circuit_states_metric)

        if on_upstream_event not in pool.event_handlers:
            pool.event_handlers.append(on_upstream_event)
