"""ASGI entry point: MCP transports on Channels, everything else on Django."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fedmcp_site.settings")
# Django must be set up before consumers (and the models they import) are imported.
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.urls import re_path  # noqa: E402

from fedmcp_site.runtime import access_log, gc_tuning, lifecycle, request_guard, websocket_close  # noqa: E402
from identity.consent.consumers import consent_websocket  # noqa: E402
from mcp_endpoint.routing import http_urlpatterns, websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": URLRouter([*http_urlpatterns, re_path(r"", django_asgi_app)]),
        # Host, Origin and the bearer token are checked per route (mcp_endpoint.auth).
        # /consent/ws is the consent page's live feed: browser session + Origin, not a token.
        "websocket": URLRouter([*websocket_urlpatterns, re_path(r"^consent/ws/?$", consent_websocket())]),
    }
)
# Under daphne: drain on SIGTERM, then cancel what is left and close upstream connections.
lifecycle.install()
# Under daphne: 408 for request heads and bodies that arrive too slowly (slowloris).
request_guard.install()
# Under daphne: the application's WebSocket close codes (1003, 1008, 1009) reach the host.
websocket_close.install()
# Under daphne: no credentials from query strings in the access log (fedmcp_site/runtime/access_log.py).
access_log.install()
# Under daphne: startup objects frozen, fewer young collections (fedmcp_site/runtime/gc_tuning.py).
gc_tuning.install()
