from django.apps import AppConfig


class McpEndpointConfig(AppConfig):
    name = "mcp_endpoint"
    verbose_name = "MCP sessions"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.core.signals import request_finished

        from fedmcp_site import caching
        from fedmcp_site.request_connections import close_request_connections

        # Every process (workers, manage.py, the admin) publishes the changes it makes.
        caching.connect_signals()
        request_finished.connect(close_request_connections, dispatch_uid="fedmcp.close_request_connections")
