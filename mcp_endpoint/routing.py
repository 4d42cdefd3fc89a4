"""URL routes of the MCP transports."""

from __future__ import annotations

from django.urls import path, re_path

from federation.models import PEER_NAME_WORD
from mcp_endpoint.auth import authenticated
from mcp_endpoint.consumers.sse import McpSseConsumer, McpSseMessageConsumer
from mcp_endpoint.consumers.streamable_http import McpStreamableHttpConsumer
from mcp_endpoint.consumers.websocket import McpWebSocketConsumer

PEER = rf"(?P<peer>{PEER_NAME_WORD})"

http_urlpatterns = [
    re_path(r"^mcp/?$", authenticated(McpStreamableHttpConsumer.as_asgi())),
    re_path(r"^sse/?$", authenticated(McpSseConsumer.as_asgi())),
    path("messages/", authenticated(McpSseMessageConsumer.as_asgi())),
    re_path(rf"^peers/{PEER}/mcp/?$", authenticated(McpStreamableHttpConsumer.as_asgi())),
    re_path(rf"^peers/{PEER}/sse/?$", authenticated(McpSseConsumer.as_asgi())),
    re_path(rf"^peers/{PEER}/messages/$", authenticated(McpSseMessageConsumer.as_asgi())),
]

websocket_urlpatterns = [
    re_path(r"^ws/?$", authenticated(McpWebSocketConsumer.as_asgi())),
    re_path(rf"^peers/{PEER}/ws/?$", authenticated(McpWebSocketConsumer.as_asgi())),
]
