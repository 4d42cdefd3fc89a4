"""Upstream connection kinds, one module each, behind `UpstreamConnection`."""

from __future__ import annotations

from federation.upstream.base import UpstreamConnection
from federation.upstream.sse import SseConnection
from federation.upstream.stdio import StdioConnection
from federation.upstream.streamable_http import StreamableHttpConnection
from federation.upstream.websocket import WebSocketConnection

CONNECTION_KINDS: dict[str, type[UpstreamConnection]] = {
    StreamableHttpConnection.transport: StreamableHttpConnection,
    StdioConnection.transport: StdioConnection,
    SseConnection.transport: SseConnection,
    WebSocketConnection.transport: WebSocketConnection,
}
"""Transport name -> connection class. Peers whose transport is missing here cannot connect."""
