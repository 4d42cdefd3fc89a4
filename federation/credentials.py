"""The credentials this gateway presents to peer gateways: client-credentials access tokens.

The host's token never leaves this gateway. A peer gateway registered with a client id and
secret (`peer add … --gateway --client-id … --client-secret-file …`) is called with a token this
gateway obtains for itself from the peer's authorization server:

    grant_type=client_credentials, scope="gateway mcp:tools mcp:resources mcp:prompts",
    resource=<the peer's public origin> (RFC 8707: the token's audience)

The token endpoint is the peer's `--token-url`, or is discovered from the peer's RFC 9728
protected-resource metadata and its authorization server's RFC 8414 metadata (whose `issuer`
must be exactly the server named). Tokens are cached per worker until shortly before they
expire; a 401 from the peer drops the cached one and the request is retried once with a new one
(federation/client.py).

Discovery and token requests use the peer's TLS settings (its CA bundle and client certificate),
as its MCP traffic does: the authorization server of a peer gateway is that gateway.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import httpx

from federation.client import OutboundAddressError, check_url_allowed, describe_failure, outbound_client
from federation.tls import PeerTls, PeerTlsError
from federation.upstream.base import PeerConfig, UpstreamUnavailableError

logger = logging.getLogger(__name__)

TOKEN_SCOPE = "gateway mcp:tools mcp:resources mcp:prompts"
REFRESH_MARGIN = 30.0
"""Seconds before expiry at which a cached token is replaced."""
DEFAULT_LIFETIME = 300.0
"""Assumed lifetime of a token whose response names none."""
TIMEOUT = 10.0
MAX_DOCUMENT_BYTES = 256 * 1024


class PeerCredentialsError(UpstreamUnavailableError):
    """No token can be obtained for a peer; the message is safe to show (it holds no secret)."""


def peer_audience(url: str) -> str:
    """The public origin of the peer at `url`: the audience its tokens and assertions name."""
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, "", "", "")).rstrip("/")


# --- discovery ---------------------------------------------------------------------------------


async def get_json_document(client: httpx.AsyncClient, url: str) -> dict[str, Any] | None:
    """GET a JSON metadata document (RFC 8414 / RFC 9728) through the guard; None unless a small JSON object."""
    await check_url_allowed(url)
    response = await client.get(url, headers={"Accept": "application/json"})
    if response.status_code != 200 or len(response.content) > MAX_DOCUMENT_BYTES:
        return None
    try:
        document = response.json()
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def _well_known(base: str, name: str) -> list[str]:
    """Path-inserted then root form of a well-known URI for `base` (RFC 8414 §3.1, RFC 9728 §3.1)."""
    parts = urlsplit(base)
    origin = urlunsplit((parts.scheme, parts.netloc, "", "", ""))
    path = parts.path.rstrip("/")
    urls = [f"{origin}/.well-known/{name}{path}"] if path else []
    return [*urls, f"{origin}/.well-known/{name}"]


async def discover_token_url(peer_url: str, *, tls: PeerTls | None = None) -> str:
    """Find the token endpoint of the authorization server that protects `peer_url`.

    `tls` is the peer's TLS settings, used for every metadata request.

    Raises:
        PeerCredentialsError: the metadata is missing, inconsistent or not allowed.
    """
    parts = urlsplit(peer_url)
    http_url = urlunsplit(({"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme), parts.netloc, parts.path, "", ""))
    try:
        async with outbound_client(connect_timeout=TIMEOUT, read_timeout=TIMEOUT, tls=tls) as client:
            issuer = await _authorization_server(client, http_url)
            for url in [*_well_known(issuer, "oauth-authorization-server"), f"{issuer}/.well-known/openid-configuration"]:
                metadata = await get_json_document(client, url)
                if metadata is None:
                    continue
                # RFC 8414 §3.3: the metadata must be for exactly the server we asked about.
                if str(metadata.get("issuer", "")).rstrip("/") != issuer:
                    raise PeerCredentialsError(f"the authorization server metadata at {url} names another issuer")
                token_url = metadata.get("token_endpoint")
                if isinstance(token_url, str) and urlsplit(token_url).scheme in ("http", "https"):
                    return token_url
                raise PeerCredentialsError(f"the authorization server metadata at {url} names no token endpoint")
    except (OutboundAddressError, PeerTlsError, httpx.HTTPError) as exc:
        raise PeerCredentialsError(f"cannot discover the token endpoint of {peer_url}: {describe_failure(exc)}") from exc
    raise PeerCredentialsError(f"{issuer} publishes no RFC 8414 metadata; pass --token-url")


async def _authorization_server(client: httpx.AsyncClient, resource_url: str) -> str:
    """Return the first authorization server the RFC 9728 metadata of `resource_url` names."""
    for url in _well_known(resource_url, "oauth-protected-resource"):
        metadata = await get_json_document(client, url)
        servers = (metadata or {}).get("authorization_servers")
        if isinstance(servers, list) and servers and isinstance(servers[0], str):
            return servers[0].rstrip("/")
    raise PeerCredentialsError(f"{resource_url} publishes no RFC 9728 metadata naming an authorization server; pass --token-url")


# --- tokens ------------------------------------------------------------------------------------


@dataclass
class _CachedToken:
    value: str
    expires_at: float
    """time.monotonic() after which the token is not used."""


_tokens: dict[tuple[int, str, str, str], _CachedToken] = {}
"""This worker's tokens: (peer id, client id, token URL, audience) -> token."""
_token_urls: dict[str, str] = {}
"""Token endpoints discovered at run time, by peer URL (peers added with --no-sync)."""


async def request_token(
    *, token_url: str, client_id: str, client_secret: str, audience: str, tls: PeerTls | None = None
) -> tuple[str, float]:
    """Obtain a client-credentials token for `audience`; return it and its lifetime (seconds).

    `tls` is the peer's TLS settings.

    Raises:
        PeerCredentialsError: the endpoint cannot be reached or refused.
    """
    # RFC 6749 §2.3.1: id and secret are form-encoded before they go into Basic credentials.
    auth = httpx.BasicAuth(quote(client_id, safe=""), quote(client_secret, safe=""))
    data = {"grant_type": "client_credentials", "scope": TOKEN_SCOPE, "resource": audience}
    try:
        await check_url_allowed(token_url)
        async with outbound_client(connect_timeout=TIMEOUT, read_timeout=TIMEOUT, tls=tls) as client:
            response = await client.post(token_url, data=data, auth=auth, headers={"Accept": "application/json"})
    except (OutboundAddressError, PeerTlsError, httpx.HTTPError) as exc:
        raise PeerCredentialsError(f"cannot reach the token endpoint {token_url}: {describe_failure(exc)}") from exc
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code != 200 or not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
        error = body.get("error") if isinstance(body, dict) else None
        raise PeerCredentialsError(f"the token endpoint {token_url} refused the client credentials: HTTP {response.status_code} {error or ''}".rstrip())
    if str(body.get("token_type", "")).lower() != "bearer":
        raise PeerCredentialsError(f"the token endpoint {token_url} issued a non-bearer token")
    lifetime = body.get("expires_in")
    return body["access_token"], float(lifetime) if isinstance(lifetime, int | float) and lifetime > 0 else DEFAULT_LIFETIME


class ClientCredentials:
    """`AuthProvider` for one peer gateway: a cached client-credentials bearer token."""

    def __init__(self, peer: PeerConfig) -> None:
        self.peer = peer
        self.audience = peer_audience(peer.url)
        self._lock = asyncio.Lock()

    def _key(self, token_url: str) -> tuple[int, str, str, str]:
        return (self.peer.id, self.peer.client_id, token_url, self.audience)

    async def _token_url(self) -> str:
        if self.peer.token_url:
            return self.peer.token_url
        if self.peer.url not in _token_urls:
            _token_urls[self.peer.url] = await discover_token_url(self.peer.url, tls=self.peer.tls)
        return _token_urls[self.peer.url]

    async def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {await self.token()}"}

    async def token(self) -> str:
        """Return a token for the peer, from the cache or a new one.

        Raises:
            PeerCredentialsError: no token can be obtained (the message names the peer).
        """
        try:
            return await self._token()
        except PeerCredentialsError as exc:
            raise PeerCredentialsError(f"peer '{self.peer.name}': {exc}") from exc

    async def _token(self) -> str:
        token_url = await self._token_url()
        cached = _tokens.get(self._key(token_url))
        if cached is not None and time.monotonic() < cached.expires_at:
            return cached.value
        async with self._lock:
            cached = _tokens.get(self._key(token_url))
            if cached is not None and time.monotonic() < cached.expires_at:
                return cached.value
            value, lifetime = await request_token(
                token_url=token_url, client_id=self.peer.client_id, client_secret=self.peer.client_secret, audience=self.audience,
                tls=self.peer.tls,
            )
            # Replace it a little before the peer would refuse it, but never cache for less than half its life.
            _tokens[self._key(token_url)] = _CachedToken(value, time.monotonic() + max(lifetime - REFRESH_MARGIN, lifetime / 2))
            logger.info("peer %s: obtained a gateway token from %s", self.peer.name, token_url)
            return value

    async def refresh(self, rejected: dict[str, str]) -> None:
        """Drop the cached token if it is the one the peer refused (others may have replaced it already)."""
        token_url = await self._token_url()
        cached = _tokens.get(self._key(token_url))
        if cached is not None and rejected.get("Authorization") == f"Bearer {cached.value}":
            _tokens.pop(self._key(token_url), None)


def auth_for(peer: PeerConfig) -> ClientCredentials | None:
    """The credentials provider for `peer`, or None when this gateway holds none there."""
    return ClientCredentials(peer) if peer.client_id else None

