from django.apps import AppConfig


class McpEndpointConfig(AppConfig):
    name = "mcp_endpoint"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from fedmcp_site import caching

        # Every process (workers, manage.py, the admin) publishes the changes it makes.
        caching.connect_signals()
