from django.apps import AppConfig


class McpEndpointConfig(AppConfig):
    name = "mcp_endpoint"
    verbose_name = "MCP sessions"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.core.signals import request_finished

        from fedmcp_lib import metrics
        from fedmcp_lib.caching import bump_on_change, clear_on_setting_change
        from fedmcp_lib.request_connections import close_request_connections
        from mcp_endpoint.models import McpSession
        from mcp_endpoint.sessions import host_sessions_metric

        # Every process (workers, manage.py, the admin) publishes the changes it makes; the
        # other apps wire their own models likewise.
        bump_on_change(McpSession, "sessions", skip_created=True)
        clear_on_setting_change()
        metrics.register_scrape("fedmcp_host_sessions", host_sessions_metric)
        request_finished.connect(close_request_connections, dispatch_uid="fedmcp.close_request_connections")
