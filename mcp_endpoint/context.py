"""What a handler knows about the message it is answering."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from mcp_endpoint.models import McpSession

Era = Literal["legacy", "modern"]
JsonDict = dict[str, Any]

LOG_LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")


class Outbound(Protocol):
    """Where a transport delivers messages related to the request being handled."""

    can_request: bool
    """True when the host can receive server->client requests on this exchange."""

    async def send(self, message: JsonDict) -> None:
        """Send a notification or server->client request to the host."""


@dataclass
class HostContext:
    """One incoming message: the era, the session (handshake era) and the transport's outlet."""

    era: Era
    protocol_version: str
    transport: str
    scope: str
    """Peer name for /peers/<name>/…, or "" for the aggregated endpoints."""
    outbound: Outbound
    session: McpSession | None = None
    client_capabilities: JsonDict = field(default_factory=dict)
    client_info: JsonDict = field(default_factory=dict)
    log_level: str = ""
    request_id: Any = None
    meta: JsonDict = field(default_factory=dict)
    """The request's params._meta as the host sent it."""
    headers: dict[str, str] = field(default_factory=dict)
    """Lower-cased HTTP request headers (empty for WebSocket frames)."""
    identity: Any = None
    """The authenticated caller; filled in by the authentication middleware."""

    def wants_log(self, level: str) -> bool:
        """Whether a log message at `level` should reach this host."""
        threshold = self.log_level
        if not threshold:
            # The 2026 era sends no log messages unless the request asked for them.
            return self.era == "legacy"
        try:
            return LOG_LEVELS.index(level) >= LOG_LEVELS.index(threshold)
        except ValueError:
            return True

    def has_capability(self, *path: str) -> bool:
        node: Any = self.client_capabilities
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return False
            node = node[key]
        return node is not None
