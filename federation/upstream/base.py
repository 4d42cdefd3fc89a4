"""The contract every upstream connection kind fulfils.

An upstream connection is one warm MCP client session to one peer, shared by the host sessions
that call that peer from this worker (every user's, or one user's: federation/pool.py
`connection_owner`). It speaks one protocol era, chosen when it
starts. Messages are plain JSON-RPC dicts: the gateway passes upstream JSON through verbatim
and only rewrites what it must (ids, progress tokens, names).
"""

from __future__ import annotations

import abc
import itertools
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, LATEST_HANDSHAKE_VERSION, LATEST_MODERN_VERSION

from federation.client import AuthProvider
from federation.tls import PeerTls
from fedmcp_lib.json_types import JsonDict

logger = logging.getLogger(__name__)

Era = Literal["legacy", "modern"]

OnMessage = Callable[[JsonDict], Awaitable[JsonDict | None]]
"""Receives what the upstream sends in the context of one request.

Notifications (progress, log messages) return None. Server->client requests (sampling,
elicitation, roots) return the JSON-RPC reply body to send back: ``{"result": ...}`` or
``{"error": {...}}``.
"""

OnEvent = Callable[[JsonDict], Awaitable[None]]
"""Receives notifications that belong to no request (list_changed, resources/updated)."""

GATEWAY_CLIENT_INFO: JsonDict = {"name": "fedmcp", "version": "0.1.0"}

# Capabilities the gateway declares upstream in the handshake era. The connection is shared by
# many hosts, so it declares everything a host might answer; a request for something the
# calling host did not declare is refused back to the upstream.
LEGACY_CLIENT_CAPABILITIES: JsonDict = {
    "roots": {"listChanged": True},
    "sampling": {},
    "elicitation": {"form": {}, "url": {}},
}


class UpstreamError(Exception):
    """An upstream could not be used; the message is safe to show to hosts."""


class UpstreamUnavailableError(UpstreamError):
    """The upstream cannot be reached, its process died, or its session broke."""


class UpstreamRestartingError(UpstreamUnavailableError):
    """The upstream's process died and the gateway is restarting it.

    `incident` is the same for every call that one death failed, so they count once against the
    peer's circuit breaker.
    """

    def __init__(self, message: str, *, incident: object) -> None:
        super().__init__(message)
        self.incident = incident


class UpstreamTimeoutError(UpstreamError):
    """The upstream did not answer within the peer's timeout."""


class UpstreamProtocolError(UpstreamError):
    """The upstream answered with something that is not valid MCP."""


@dataclass(frozen=True)
class PeerConfig:
    """A snapshot of the peer fields a connection needs (no ORM objects in long-lived tasks)."""

    id: int
    name: str
    transport: str
    url: str = ""
    command: str = ""
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # often API keys
    connect_timeout: float = 10.0
    call_timeout: float = 60.0
    is_gateway: bool = False
    """The operator made it a gateway: calls carry this gateway's hop record and user assertion."""
    remote_gateway: str = ""
    """Its gateway name while this gateway believes it (`trusted_gateway`), else ""."""
    per_identity: bool = False
    max_processes: int = 8
    client_id: str = ""
    """Client-credentials identity this gateway has at the peer (peer gateways); "" for none."""
    client_secret: str = field(default="", repr=False)
    token_url: str = ""
    user_oauth: bool = False
    """Calls carry the acting user's own token at the upstream's authorization server."""
    tls_ca_bundle: str = field(default="", repr=False)
    tls_client_cert: str = field(default="", repr=False)
    tls_client_key: str = field(default="", repr=False)

    @property
    def trusted_gateway(self) -> bool:
        """A peer gateway whose assertions this gateway believes: marked by the operator and trusted (identity/trust/gateways.py).

        Routes carry it only while the trust holds (federation/router.py); `remote_gateway` is then its name.
        """
        return self.is_gateway and bool(self.remote_gateway)

    @property
    def tls(self) -> PeerTls:
        """The peer's TLS settings (federation/tls.py)."""
        return PeerTls(self.tls_ca_bundle, self.tls_client_cert, self.tls_client_key)

    @classmethod
    def from_peer(cls, peer: Any) -> PeerConfig:
        return cls(
            id=peer.id,
            name=peer.name,
            transport=peer.transport,
            url=peer.url,
            command=peer.command,
            args=tuple(str(a) for a in peer.args or ()),
            env=tuple(sorted((str(k), str(v)) for k, v in (peer.env or {}).items())),
            connect_timeout=peer.connect_timeout,
            call_timeout=peer.call_timeout,
            is_gateway=peer.is_gateway,
            remote_gateway=peer.remote_gateway,
            per_identity=peer.per_identity,
            max_processes=peer.max_processes,
            client_id=peer.client_id,
            client_secret=peer.client_secret,
            token_url=peer.token_url,
            user_oauth=peer.user_oauth,
            tls_ca_bundle=peer.tls_ca_bundle,
            tls_client_cert=peer.tls_client_cert,
            tls_client_key=peer.tls_client_key,
        )


@dataclass
class ServerDescription:
    """What the upstream told us about itself during the handshake or discovery."""

    protocol_version: str = ""
    capabilities: JsonDict = field(default_factory=dict)
    server_info: JsonDict = field(default_factory=dict)
    instructions: str | None = None
    supported_versions: tuple[str, ...] = ()

    @property
    def supports_legacy(self) -> bool:
        return any(v in HANDSHAKE_PROTOCOL_VERSIONS for v in self.supported_versions)


def modern_meta(client_capabilities: JsonDict | None = None, extra: JsonDict | None = None) -> JsonDict:
    """Return the per-request `_meta` envelope of the 2026-07-28 era."""
    meta: JsonDict = dict(extra or {})
    meta["io.modelcontextprotocol/protocolVersion"] = LATEST_MODERN_VERSION
    meta.setdefault("io.modelcontextprotocol/clientCapabilities", client_capabilities or {})
    meta.setdefault("io.modelcontextprotocol/clientInfo", GATEWAY_CLIENT_INFO)
    return meta


def listen_filter(capabilities: JsonDict) -> JsonDict:
    """Return the subscriptions/listen filter for what an upstream says can change."""
    wanted: JsonDict = {}
    for key, flag in (("tools", "toolsListChanged"), ("prompts", "promptsListChanged"), ("resources", "resourcesListChanged")):
        if isinstance(capabilities.get(key), dict) and capabilities[key].get("listChanged"):
            wanted[flag] = True
    return wanted


def initialize_params(version: str = LATEST_HANDSHAKE_VERSION) -> JsonDict:
    return {
        "protocolVersion": version,
        "capabilities": LEGACY_CLIENT_CAPABILITIES,
        "clientInfo": GATEWAY_CLIENT_INFO,
    }


def describe_initialize(result: JsonDict) -> ServerDescription:
    """Turn an InitializeResult into a ServerDescription.

    Raises:
        UpstreamProtocolError: the result is not an InitializeResult we can use.
    """
    version = result.get("protocolVersion")
    if version not in HANDSHAKE_PROTOCOL_VERSIONS:
        raise UpstreamProtocolError(f"upstream offered unsupported protocol version {version!r}")
    return ServerDescription(
        protocol_version=version,
        capabilities=result.get("capabilities") or {},
        server_info=result.get("serverInfo") or {},
        instructions=result.get("instructions"),
        supported_versions=(version,),
    )


def describe_discover(result: JsonDict) -> ServerDescription | None:
    """Turn a DiscoverResult into a ServerDescription, or None if it offers no modern version."""
    supported = result.get("supportedVersions")
    if not isinstance(supported, list) or LATEST_MODERN_VERSION not in supported:
        return None
    meta = result.get("_meta") or {}
    return ServerDescription(
        protocol_version=LATEST_MODERN_VERSION,
        capabilities=result.get("capabilities") or {},
        server_info=meta.get("io.modelcontextprotocol/serverInfo") or result.get("serverInfo") or {},
        instructions=result.get("instructions"),
        supported_versions=tuple(v for v in supported if isinstance(v, str)),
    )


class UpstreamConnection(abc.ABC):
    """One warm session to one peer in one era.

    Subclasses implement `_open`, `_send_request`, `_send_notification` and `_close`. The base
    class keeps the bookkeeping every kind shares: the era, the description, progress-token
    rewriting and the unrelated-event callback. `auth`, when given, supplies the credentials
    every request to the upstream carries (federation/client.py `AuthProvider`).
    """

    transport: ClassVar[str]

    def __init__(
        self, peer: PeerConfig, *, era: Era | None = None, on_event: OnEvent | None = None, auth: AuthProvider | None = None
    ) -> None:
        self.peer = peer
        self.auth = auth
        self.requested_era = era
        self.on_event = on_event
        self.description = ServerDescription()
        self.era: Era = era or "legacy"
        self._ids = itertools.count(1)
        self._progress: dict[str, tuple[Any, OnMessage]] = {}
        self.closed = False
        self.in_flight = 0
        """Requests sent and not yet answered: the pool does not close a connection while it has any."""
        self.tool_headers: dict[str, Mapping[tuple[str, ...], str]] = {}
        """Per upstream tool name, its `x-mcp-header` declarations (SEP-2243), as the catalog has them:
        the caller sets them before a `tools/call` (`declare_tool_headers`); transports with HTTP
        requests per call mirror the arguments into `Mcp-Param-*` headers, the others ignore them."""

    @property
    def protocol_version(self) -> str:
        return self.description.protocol_version

    def client_options(self) -> dict[str, Any]:
        """`outbound_client` keyword arguments for this peer's credentials and TLS settings (none without)."""
        options: dict[str, Any] = {"auth": self.auth} if self.auth is not None else {}
        if not self.peer.tls.is_default():
            options["tls"] = self.peer.tls
        return options

    def next_id(self) -> int:
        return next(self._ids)

    def declare_tool_headers(self, name: str, headers: Mapping[tuple[str, ...], str] | None) -> None:
        """Remember which arguments of tool `name` go into `Mcp-Param-*` headers (none: forget)."""
        if headers:
            self.tool_headers[name] = headers
        else:
            self.tool_headers.pop(name, None)

    def diagnostics(self) -> str:
        """What the upstream said about itself when it failed, for the operator (a child's
        stderr); "" when the kind has nothing. Never part of an error a host sees."""
        return ""

    async def start(self) -> None:
        """Connect and handshake (or discover).

        Raises:
            UpstreamError: the upstream cannot be used.
        """
        await self._open()

    async def request(
        self,
        method: str,
        params: JsonDict | None,
        *,
        on_message: OnMessage | None = None,
        timeout: float | None = None,
    ) -> JsonDict:
        """Send one request and return the upstream's JSON-RPC response message.

        The returned dict has either "result" or "error". Cancelling the awaiting task cancels
        the request upstream.

        Raises:
            UpstreamError: transport failure, timeout or a malformed answer.
        """
        if self.closed:
            raise UpstreamUnavailableError(f"connection to peer '{self.peer.name}' is closed")
        token = None
        meta = (params or {}).get("_meta")
        if isinstance(meta, dict) and "progressToken" in meta and on_message is not None:
            # Hosts choose their own progress tokens, and many hosts share this connection:
            # give the upstream a token unique to it and map progress back to the caller.
            token = f"fedmcp-{self.next_id()}"
            self._progress[token] = (meta["progressToken"], on_message)
            params = {**(params or {}), "_meta": {**meta, "progressToken": token}}
            on_message = self._restore_progress(on_message)
        self.in_flight += 1
        try:
            return await self._send_request(method, params, on_message, timeout or self.peer.call_timeout)
        finally:
            self.in_flight -= 1
            if token is not None:
                self._progress.pop(token, None)

    def _restore_progress(self, on_message: OnMessage) -> OnMessage:
        async def restore(message: JsonDict) -> JsonDict | None:
            if message.get("method") == "notifications/progress":
                entry = self._progress.get((message.get("params") or {}).get("progressToken"))
                if entry is None:
                    return None
                message = {**message, "params": {**message["params"], "progressToken": entry[0]}}
            return await on_message(message)

        return restore

    async def _route_unrelated(self, message: JsonDict) -> None:
        """Deliver a notification that arrived outside any request's stream."""
        if message.get("method") == "notifications/progress":
            token = (message.get("params") or {}).get("progressToken")
            entry = self._progress.get(token) if isinstance(token, str) else None
            if entry is not None:
                await entry[1]({**message, "params": {**message["params"], "progressToken": entry[0]}})
            return
        await self._dispatch_event(message)

    async def notify(self, method: str, params: JsonDict | None = None) -> None:
        if not self.closed:
            await self._send_notification(method, params)

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await self._close()

    async def _dispatch_event(self, message: JsonDict) -> None:
        if self.on_event is not None:
            try:
                await self.on_event(message)
            except Exception:
                logger.exception("event handler failed for peer %s", self.peer.name)

    def is_healthy(self) -> bool:
        return not self.closed

    async def probe(self) -> None:
        """Check the upstream answers: `ping` in the handshake era, `server/discover` in 2026-07-28, within the connect timeout.

        Raises:
            UpstreamError: no answer in time, or an error answered.
        """
        if self.era == "modern":
            reply = await self.request("server/discover", {"_meta": modern_meta()}, timeout=self.peer.connect_timeout)
        else:
            reply = await self.request("ping", None, timeout=self.peer.connect_timeout)
        if "error" in reply:
            raise UpstreamError(f"health probe answered an error: {reply['error'].get('message', '')}")

    @abc.abstractmethod
    async def _open(self) -> None: ...

    @abc.abstractmethod
    async def _send_request(
        self, method: str, params: JsonDict | None, on_message: OnMessage | None, timeout: float
    ) -> JsonDict: ...

    @abc.abstractmethod
    async def _send_notification(self, method: str, params: JsonDict | None) -> None: ...

    @abc.abstractmethod
    async def _close(self) -> None: ...


def error_reply(code: int, message: str, data: JsonDict | None = None) -> JsonDict:
    """Return a JSON-RPC reply body carrying an error (for answering upstream requests)."""
    error: JsonDict = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"error": error}


UNROUTED_REQUEST_CODES = {"no-host-call": -32601, "ambiguous-host-call": -32603}
"""What an upstream's request gets when no single host call can take it (docs/INTEROP.md), by
`data.reason`: outside any call, "method not available" (-32601); on a stream several calls
share, an internal error (-32603), as the gateway fails to attribute it."""


def unrouted_request_reply(peer: str, method: Any, reason: str) -> JsonDict:
    """Refuse a server->client request the gateway cannot put before one host (docs/INTEROP.md).

    `reason`: "no-host-call" (it came outside any call, e.g. on the standalone GET stream) or
    "ambiguous-host-call" (several calls share the stream that carried it). Requests (sampling,
    elicitation, roots) are relayed only to the host whose call is in flight on the upstream;
    one outside a call is never sent to a host: no host asked, and the gateway cannot know
    which of the user's sessions, if any, should be asked.
    """
    logger.info("peer %s: refused %s from the upstream (%s)", peer, method, reason)
    why = (
        "it came outside any call, and fedmcp relays server-to-client requests only during the host call they belong to"
        if reason == "no-host-call"
        else "several host calls share the stream it came on, and fedmcp will not guess which host to ask"
    )
    return error_reply(UNROUTED_REQUEST_CODES[reason], f"{method} is not available through the gateway here: {why}", {"method": method, "reason": reason})
