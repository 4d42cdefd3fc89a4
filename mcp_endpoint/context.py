"""What a handler knows about the message it is answering."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from fedmcp_lib.json_types import JsonDict
from mcp_endpoint.models import McpSession

Era = Literal["legacy", "modern"]

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

    @classmethod
    def of_session(
        cls, session: McpSession, *, transport: str, scope: str, outbound: Outbound, identity: Any, headers: dict[str, str] | None = None
    ) -> HostContext:
        """A handshake-era message on `session`: what the host declared at initialize (and setLevel) comes from the session row."""
        return cls(
            era="legacy",
            protocol_version=session.protocol_version,
            transport=transport,
            scope=scope,
            outbound=outbound,
            session=session,
            client_capabilities=session.client_capabilities,
            client_info=session.client_info,
            log_level=session.log_level,
            headers=headers or {},
            identity=identity,
        )

    @classmethod
    def of_envelope(
        cls, *, protocol_version: str, capabilities: Any, client_info: Any, meta: JsonDict, transport: str, scope: str,
        outbound: Outbound, identity: Any, headers: dict[str, str],
    ) -> HostContext:
        """A 2026-07-28 request: what the host declares travels in its `_meta` envelope."""
        return cls(
            era="modern",
            protocol_version=protocol_version,
            transport=transport,
            scope=scope,
            outbound=outbound,
            client_capabilities=capabilities if isinstance(capabilities, dict) else {},
            client_info=client_info if isinstance(client_info, dict) else {},
            log_level=meta.get("io.modelcontextprotocol/logLevel") or "",
            headers=headers,
            identity=identity,
        )

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
