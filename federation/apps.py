from django.apps import AppConfig


class FederationConfig(AppConfig):
    name = "federation"
    verbose_name = "Peers and catalog"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from federation.events import on_upstream_event
        from federation.pool import pool

        if on_upstream_event not in pool.event_handlers:
            pool.event_handlers.append(on_upstream_event)
