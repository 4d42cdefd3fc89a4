"""Per-user upstream credentials: this gateway as the OAuth client of an upstream's authorization server.

A peer marked `user_oauth` is an MCP server that wants each user's own authorization. Each user
connects their account once in the browser (federation/connect_views.py); calls they make to the
peer then carry their own token there, never the host's token (no token passthrough).

    discovery     401 `WWW-Authenticate: Bearer resource_metadata=…` (or the well-known URI) ->
                  RFC 9728 protected-resource metadata (`resource`, `authorization_servers`) ->
                  RFC 8414 / OpenID metadata of that server (`issuer` must match exactly,
                  S256 PKCE must be offered)
    registration  an operator-supplied client, else a Client ID Metadata Document (https public
                  URL only), else RFC 7591 dynamic registration
    connect       /connect/<peer> -> authorization endpoint with PKCE S256, a single-use `state`
                  bound to the user and the browser session, and `resource` (RFC 8707) ->
                  /connect/callback checks state and `iss` (RFC 9207), exchanges the code
    use           `UserOAuthProvider` puts the user's token on each upstream request, refreshes
                  it shortly before expiry and once on a 401 (rotating refresh tokens; one
                  worker refreshes while the others wait), and asks the user to connect again
                  when the upstream refuses to refresh.

All HTTP goes through federation/client.py (`outbound_client`, `check_url_allowed`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import secrets
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import httpx
from channels.db import database_sync_to_async
from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from federation.client import OutboundAddressError, check_url_allowed, outbound_client
from federation.credentials import get_json_document
from federation.upstream.base import PeerConfig, UpstreamError, UpstreamUnavailableError
from identity.models import UpstreamAuthorizationRequest, UpstreamOAuthClient, UpstreamToken

logger = logging.getLogger(__name__)

TIMEOUT = 10.0
FLOW_LIFETIME = timedelta(minutes=10)
"""How long a started connect flow may take before its state is refused."""
REFRESH_MARGIN = 30.0
"""Seconds before expiry at which a token is refreshed instead of used."""
REFRESH_LEASE = timedelta(seconds=30)
"""How long one worker may hold the right to refresh a token before another may take over."""
LEASE_POLL = 0.25
CALLBACK_PATH = "/connect/callback"
METADATA_DOCUMENT_PATH = "/connect/client-metadata.json"
SESSION_KEY = "fedmcp_connect_states"
"""Session key holding the state hashes of the connect flows this browser started."""
MAX_SESSION_FLOWS = 10


class UpstreamOAuthError(Exception):
    """A connect flow or the discovery behind it failed; the message is safe to show the user."""


class UpstreamAuthorizationRequiredError(UpstreamError):
    """The acting user has no usable token at a per-user OAuth peer: they must connect (again)."""

    def __init__(self, peer_name: str, reason: str) -> None:
        self.peer_name = peer_name
        self.reason = reason
        super().__init__(f"peer '{peer_name}' needs your own authorization: {reason}")


# --- small helpers -----------------------------------------------------------------------------


def pkce_challenge(verifier: str) -> str:
    """The S256 code challenge of `verifier` (RFC 7636 §4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def pkce_pair() -> tuple[str, str]:
    """A new code verifier (43 characters of 32 random bytes) and its S256 challenge."""
    verifier = secrets.token_urlsafe(32)
    return verifier, pkce_challenge(verifier)


def state_hash(state: str) -> str:
    return hashlib.sha256(state.encode()).hexdigest()


def session_flows(session: dict[str, Any]) -> list[str]:
    """The state hashes of the connect flows a browser session started."""
    flows = session.get(SESSION_KEY, [])
    return [h for h in flows if isinstance(h, str)] if isinstance(flows, list) else []


def public_base(request_base: str = "") -> str:
    """This gateway's public origin: FEDMCP_PUBLIC_URL, else the origin a request came to."""
    return (settings.FEDMCP_PUBLIC_URL or request_base).rstrip("/")


def callback_url(base: str) -> str:
    return f"{base}{CALLBACK_PATH}"


def connect_page_url(base: str, peer_name: str) -> str:
    return f"{base}/connect/{peer_name}"


_CHALLENGE_PARAM = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


def parse_bearer_challenge(header: str) -> dict[str, str]:
    """Return the parameters of the `Bearer` challenge in a WWW-Authenticate header (RFC 6750 §3)."""
    match = re.search(r"(?:^|,\s*)Bearer\b(.*)", header, flags=re.I | re.S)
    if match is None:
        return {}
    params: dict[str, str] = {}
    for name, quoted, token in _CHALLENGE_PARAM.findall(match.group(1)):
        params.setdefault(name.lower(), re.sub(r"\\(.)", r"\1", quoted) if quoted else token)
    return params


def _http_url(url: str) -> str:
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, parts.path, parts.query, ""))


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "", "", ""))


def resource_matches(resource: str, url: str) -> bool:
    """Whether the metadata's `resource` identifies the MCP endpoint at `url` (itself or a parent of it)."""
    res, target = urlsplit(resource), urlsplit(url)
    if not res.scheme or (res.scheme, res.netloc.lower()) != (target.scheme, target.netloc.lower()) or res.query or res.fragment:
        return False
    base = res.path.rstrip("/")
    return not base or target.path.rstrip("/") == base or target.path.startswith(base + "/")


def _well_known_urls(base: str, names: tuple[str, ...]) -> list[str]:
    """Path-inserted, then root, forms of well-known URIs for `base` (RFC 8414 §3.1, RFC 9728 §3.1)."""
    parts = urlsplit(base)
    origin = urlunsplit((parts.scheme, parts.netloc, "", "", ""))
    path = parts.path.rstrip("/")
    urls = []
    for name in names:
        if path:
            urls.append(f"{origin}/.well-known/{name}{path}")
        else:
            urls.append(f"{origin}/.well-known/{name}")
    if path and "openid-configuration" in names:
        urls.append(f"{origin}{path}/.well-known/openid-configuration")  # OpenID Connect Discovery's own form
    return urls


def _endpoint(metadata: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = metadata.get(key)
    if isinstance(value, str) and urlsplit(value).scheme in ("http", "https") and urlsplit(value).netloc:
        return value
    if required:
        raise UpstreamOAuthError(f"the authorization server's metadata has no usable {key}")
    return ""


# --- discovery ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Discovery:
    """What the upstream and its authorization server say about themselves."""

    resource: str
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    registration_endpoint: str
    revocation_endpoint: str
    iss_parameter_supported: bool
    metadata_document_supported: bool
    auth_methods: tuple[str, ...]
    scope: str


async def _challenge(client: httpx.AsyncClient, url: str) -> dict[str, str]:
    """Call the MCP endpoint without credentials and return its Bearer challenge (empty if none)."""
    await check_url_allowed(url)
    body = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    response = await client.post(url, json=body, headers=headers)
    if response.status_code != 401:
        return {}
    return parse_bearer_challenge(response.headers.get("www-authenticate", ""))


async def _protected_resource(client: httpx.AsyncClient, url: str, challenge: dict[str, str]) -> dict[str, Any]:
    candidates = [challenge["resource_metadata"]] if challenge.get("resource_metadata") else []
    candidates += _well_known_urls(url, ("oauth-protected-resource",))
    if urlsplit(url).path.strip("/"):
        candidates.append(f"{_origin(url)}/.well-known/oauth-protected-resource")
    for candidate in candidates:
        if urlsplit(candidate).scheme not in ("http", "https"):
            continue
        metadata = await get_json_document(client, candidate)
        if metadata is not None:
            resource = metadata.get("resource")
            if not isinstance(resource, str) or not resource_matches(resource, url):
                raise UpstreamOAuthError(f"the protected-resource metadata at {candidate} is for another resource ({resource!r})")
            return metadata
    raise UpstreamOAuthError(f"{url} publishes no protected-resource metadata (RFC 9728); it cannot be used with per-user OAuth")


async def _server_metadata(client: httpx.AsyncClient, issuer: str) -> dict[str, Any]:
    for url in _well_known_urls(issuer, ("oauth-authorization-server", "openid-configuration")):
        metadata = await get_json_document(client, url)
        if metadata is None:
            continue
        # RFC 8414 §3.3: the metadata must be for exactly the server that was named.
        if metadata.get("issuer") != issuer:
            raise UpstreamOAuthError(f"the authorization server metadata at {url} names another issuer")
        return metadata
    raise UpstreamOAuthError(f"the authorization server {issuer} publishes no RFC 8414 or OpenID metadata")


async def discover(peer_url: str) -> Discovery:
    """Find the authorization server protecting the MCP endpoint at `peer_url`, and what it supports.

    Raises:
        UpstreamOAuthError: the metadata is missing, inconsistent, unsafe (no S256), or not reachable.
    """
    url = _http_url(peer_url)
    try:
        async with outbound_client(connect_timeout=TIMEOUT, read_timeout=TIMEOUT) as client:
            challenge = await _challenge(client, url)
            resource_metadata = await _protected_resource(client, url, challenge)
            servers = resource_metadata.get("authorization_servers")
            if not isinstance(servers, list) or not servers or not isinstance(servers[0], str):
                raise UpstreamOAuthError(f"the protected-resource metadata of {url} names no authorization server")
            issuer = servers[0]
            metadata = await _server_metadata(client, issuer)
    except (OutboundAddressError, httpx.HTTPError) as exc:
        raise UpstreamOAuthError(f"cannot discover how {url} is authorized: {type(exc).__name__}: {exc}") from exc
    methods = metadata.get("code_challenge_methods_supported")
    if not isinstance(methods, list) or "S256" not in methods:
        # MCP: clients MUST refuse to proceed when the server does not offer S256 PKCE.
        raise UpstreamOAuthError(f"the authorization server {issuer} does not offer PKCE with S256")
    scopes = resource_metadata.get("scopes_supported")
    scope = challenge.get("scope") or (" ".join(s for s in scopes if isinstance(s, str)) if isinstance(scopes, list) else "")
    auth_methods = metadata.get("token_endpoint_auth_methods_supported")
    return Discovery(
        resource=resource_metadata["resource"],
        issuer=issuer,
        authorization_endpoint=_endpoint(metadata, "authorization_endpoint"),
        token_endpoint=_endpoint(metadata, "token_endpoint"),
        registration_endpoint=_endpoint(metadata, "registration_endpoint", required=False),
        revocation_endpoint=_endpoint(metadata, "revocation_endpoint", required=False),
        iss_parameter_supported=metadata.get("authorization_response_iss_parameter_supported") is True,
        metadata_document_supported=metadata.get("client_id_metadata_document_supported") is True,
        auth_methods=tuple(m for m in auth_methods if isinstance(m, str)) if isinstance(auth_methods, list) else ("client_secret_basic",),
        scope=scope,
    )


# --- registration ------------------------------------------------------------------------------


def client_metadata(base: str) -> dict[str, Any]:
    """This gateway's client metadata, as registered or published at METADATA_DOCUMENT_PATH."""
    return {
        "client_name": f"{settings.FEDMCP_GATEWAY_NAME} (fedmcp gateway)",
        "client_uri": base,
        "redirect_uris": [callback_url(base)],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "application_type": "web",
    }


async def _register(discovery: Discovery, base: str) -> tuple[str, str, str]:
    """Register at the server's RFC 7591 endpoint; return (client_id, client_secret, auth method).

    Raises:
        UpstreamOAuthError: the server refused or answered nonsense.
    """
    method = next((m for m in ("client_secret_basic", "client_secret_post", "none") if m in discovery.auth_methods), "none")
    body = {**client_metadata(base), "token_endpoint_auth_method": method}
    try:
        await check_url_allowed(discovery.registration_endpoint)
        async with outbound_client(connect_timeout=TIMEOUT, read_timeout=TIMEOUT) as client:
            response = await client.post(discovery.registration_endpoint, json=body, headers={"Accept": "application/json"})
    except (OutboundAddressError, httpx.HTTPError) as exc:
        raise UpstreamOAuthError(f"cannot reach the registration endpoint {discovery.registration_endpoint}: {type(exc).__name__}") from exc
    try:
        answer = response.json()
    except ValueError:
        answer = {}
    if response.status_code not in (200, 201) or not isinstance(answer, dict) or not isinstance(answer.get("client_id"), str):
        error = answer.get("error_description") or answer.get("error") if isinstance(answer, dict) else None
        raise UpstreamOAuthError(f"the authorization server refused to register this gateway: HTTP {response.status_code} {error or ''}".rstrip())
    secret = answer.get("client_secret") if isinstance(answer.get("client_secret"), str) else ""
    granted = answer.get("token_endpoint_auth_method") if isinstance(answer.get("token_endpoint_auth_method"), str) else method
    return answer["client_id"], secret, granted if secret else "none"


@database_sync_to_async
def _load_client(peer_id: int) -> UpstreamOAuthClient | None:
    return UpstreamOAuthClient.objects.select_related("peer").filter(peer_id=peer_id).first()


@database_sync_to_async
def _save_client(client: UpstreamOAuthClient) -> None:
    client.save()


async def oauth_client_ensure(*, peer: Any, base: str) -> UpstreamOAuthClient:
    """Return the peer's discovered and registered client, discovering and registering as needed.

    A client registered for another callback URL (the public URL changed) registers again;
    an operator-supplied client is kept as it is.

    Raises:
        UpstreamOAuthError: the upstream cannot be used with per-user OAuth.
    """
    client = await _load_client(peer.pk) or UpstreamOAuthClient(peer=peer)
    redirect_uri = callback_url(base)
    operator = client.registration == UpstreamOAuthClient.Registration.OPERATOR and bool(client.client_id)
    if client.is_registered() and (operator or client.redirect_uri == redirect_uri):
        return client
    discovery = await discover(peer.url)
    if client.issuer and client.issuer != discovery.issuer and not operator:
        client.client_id, client.client_secret = "", ""  # credentials are per issuer (SEP-2352)
    for name in ("resource", "issuer", "authorization_endpoint", "token_endpoint", "registration_endpoint", "revocation_endpoint", "iss_parameter_supported"):
        setattr(client, name, getattr(discovery, name))
    if not client.scope:
        client.scope = discovery.scope
    if operator:
        pass
    elif discovery.metadata_document_supported and base.startswith("https://"):
        client.client_id, client.client_secret = f"{base}{METADATA_DOCUMENT_PATH}", ""
        client.token_endpoint_auth_method, client.registration = "none", UpstreamOAuthClient.Registration.METADATA_DOCUMENT
    elif discovery.registration_endpoint:
        client.client_id, client.client_secret, client.token_endpoint_auth_method = await _register(discovery, base)
        client.registration = UpstreamOAuthClient.Registration.DYNAMIC
    else:
        raise UpstreamOAuthError(
            f"the authorization server {discovery.issuer} offers no way for this gateway to register; "
            f"register a client there and set it with `manage.py peer add {peer.name} … --oauth-client-id`"
        )
    client.redirect_uri = redirect_uri
    client.discovered_at = timezone.now()
    await _save_client(client)
    logger.info("peer %s: OAuth client %s at %s (%s)", peer.name, client.client_id, client.issuer, client.registration)
    return client


def oauth_client_configure(*, peer: Any, client_id: str = "", client_secret: str = "", scope: str = "") -> UpstreamOAuthClient:
    """Set what the operator knows about a per-user OAuth peer's client: a pre-registered client, the scopes."""
    client, _ = UpstreamOAuthClient.objects.get_or_create(peer=peer)
    if client_id:
        client.client_id, client.client_secret = client_id, client_secret
        client.token_endpoint_auth_method = "client_secret_basic" if client_secret else "none"
        client.registration = UpstreamOAuthClient.Registration.OPERATOR
    if scope:
        client.scope = scope
    client.save()
    return client


async def oauth_client_discover(*, peer: Any) -> UpstreamOAuthClient:
    """Discover the peer's authorization server now and store what it says (registration waits for the first connect).

    Raises:
        UpstreamOAuthError: the peer cannot be used with per-user OAuth.
    """
    discovery = await discover(peer.url)
    client = await _load_client(peer.pk) or UpstreamOAuthClient(peer=peer)
    for name in ("resource", "issuer", "authorization_endpoint", "token_endpoint", "registration_endpoint", "revocation_endpoint", "iss_parameter_supported"):
        setattr(client, name, getattr(discovery, name))
    client.scope = client.scope or discovery.scope
    client.discovered_at = timezone.now()
    await _save_client(client)
    return client


# --- the connect flow --------------------------------------------------------------------------


@database_sync_to_async
def _start_flow(client: UpstreamOAuthClient, user: Any, verifier: str, state: str) -> None:
    UpstreamAuthorizationRequest.objects.filter(expires_at__lte=timezone.now()).delete()
    UpstreamAuthorizationRequest.objects.create(
        state_hash=state_hash(state), user=user, peer_id=client.peer_id, code_verifier=verifier,
        issuer=client.issuer, redirect_uri=client.redirect_uri, expires_at=timezone.now() + FLOW_LIFETIME,
    )


async def connect_begin(*, user: Any, peer: Any, base: str, session: dict[str, Any]) -> str:
    """Start connecting `user`'s account at `peer`; return the authorization URL to send the browser to.

    The state is random, stored only as a hash, and that hash is also put in `session` (the
    browser session's data: `session_flows_*`), so only this user in this browser can finish.

    Raises:
        UpstreamOAuthError: discovery or registration failed.
    """
    client = await oauth_client_ensure(peer=peer, base=base)
    verifier, challenge = pkce_pair()
    state = secrets.token_urlsafe(32)
    await _start_flow(client, user, verifier, state)
    session[SESSION_KEY] = [*session_flows(session)[-(MAX_SESSION_FLOWS - 1) :], state_hash(state)]
    query = {
        "response_type": "code",
        "client_id": client.client_id,
        "redirect_uri": client.redirect_uri,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "state": state,
        "resource": client.resource,
    }
    if client.scope:
        query["scope"] = client.scope
    separator = "&" if urlsplit(client.authorization_endpoint).query else "?"
    return f"{client.authorization_endpoint}{separator}{urlencode(query)}"


@database_sync_to_async
def _claim_flow(state: str, user: Any, session_hashes: list[str]) -> UpstreamAuthorizationRequest:
    """Find and delete (single use) the flow `state` names, if it belongs to this user and session."""
    hashed = state_hash(state)
    if hashed not in session_hashes:
        raise UpstreamOAuthError("This sign-in was not started in this browser session (or was already used). Start again from the connect page.")
    with transaction.atomic():
        flow = UpstreamAuthorizationRequest.objects.select_related("peer").filter(state_hash=hashed).first()
        if flow is None or UpstreamAuthorizationRequest.objects.filter(pk=flow.pk).delete()[0] != 1:
            raise UpstreamOAuthError("This sign-in link was already used or is unknown. Start again from the connect page.")
    if flow.user_id != user.pk:
        raise UpstreamOAuthError("This sign-in was started by another user. Start again from the connect page.")
    if flow.expires_at <= timezone.now():
        raise UpstreamOAuthError("This sign-in took too long and expired. Start again from the connect page.")
    return flow


def _client_auth(client: UpstreamOAuthClient, data: dict[str, str]) -> httpx.BasicAuth | None:
    if client.token_endpoint_auth_method == "client_secret_basic" and client.client_secret:
        # RFC 6749 §2.3.1: id and secret are form-encoded before they go into Basic credentials.
        return httpx.BasicAuth(quote(client.client_id, safe=""), quote(client.client_secret, safe=""))
    data["client_id"] = client.client_id
    if client.token_endpoint_auth_method == "client_secret_post" and client.client_secret:
        data["client_secret"] = client.client_secret
    return None


class TokenEndpointRefusedError(UpstreamOAuthError):
    """The token endpoint answered an OAuth error (e.g. invalid_grant)."""


async def _token_request(client: UpstreamOAuthClient, data: dict[str, str]) -> dict[str, Any]:
    """POST to the token endpoint; return the token response.

    Raises:
        TokenEndpointRefusedError: the server answered an error.
        UpstreamOAuthError: it cannot be reached or answered nonsense.
    """
    data = {**data, "resource": client.resource}
    auth = _client_auth(client, data)
    try:
        await check_url_allowed(client.token_endpoint)
        async with outbound_client(connect_timeout=TIMEOUT, read_timeout=TIMEOUT) as http:
            response = await http.post(client.token_endpoint, data=data, auth=auth, headers={"Accept": "application/json"})
    except (OutboundAddressError, httpx.HTTPError) as exc:
        raise UpstreamOAuthError(f"cannot reach the token endpoint {client.token_endpoint}: {type(exc).__name__}") from exc
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    if response.status_code != 200:
        error = body.get("error") if isinstance(body.get("error"), str) else f"HTTP {response.status_code}"
        raise TokenEndpointRefusedError(f"the authorization server refused: {error}")
    if not isinstance(body.get("access_token"), str) or str(body.get("token_type", "")).lower() != "bearer":
        raise UpstreamOAuthError("the authorization server answered without a bearer access token")
    return body


def _token_fields(body: dict[str, Any], refresh_token: str = "") -> dict[str, Any]:
    lifetime = body.get("expires_in")
    expires = timezone.now() + timedelta(seconds=lifetime) if isinstance(lifetime, int | float) and lifetime > 0 else None
    refresh = body.get("refresh_token")
    return {
        "access_token": body["access_token"],
        "refresh_token": refresh if isinstance(refresh, str) else refresh_token,
        "expires_at": expires,
        "scope": body["scope"] if isinstance(body.get("scope"), str) else "",
    }


@database_sync_to_async
def _store_token(user: Any, peer_id: int, issuer: str, fields: dict[str, Any]) -> tuple[UpstreamToken, bool]:
    with transaction.atomic():
        token, created = UpstreamToken.objects.select_for_update().get_or_create(
            user=user, peer_id=peer_id, defaults={"issuer": issuer, **fields}
        )
        if not created:
            for name, value in {"issuer": issuer, **fields}.items():
                setattr(token, name, value)
            token.generation += 1
            token.refreshing_until = None
            token.save()
    return token, created


async def connect_finish(*, user: Any, session: dict[str, Any], params: dict[str, str]) -> UpstreamToken:
    """Finish a connect flow from the authorization server's redirect (`params` is its query).

    Checks, in order: the state (known, unused, this user's, from this browser, not expired),
    an error the server reported, the `iss` of the response (RFC 9207), then exchanges the code
    with the PKCE verifier and the same `resource`, and stores the tokens encrypted.

    Raises:
        UpstreamOAuthError: any check failed or the exchange was refused; the message says what.
    """
    state = params.get("state", "")
    if not state:
        raise UpstreamOAuthError("The authorization server's answer has no state. Start again from the connect page.")
    hashes = session_flows(session)
    flow = await _claim_flow(state, user, hashes)
    session[SESSION_KEY] = [h for h in hashes if h != state_hash(state)]
    client = await _load_client(flow.peer_id)
    if client is None or client.issuer != flow.issuer:
        raise UpstreamOAuthError("The peer's authorization server changed during sign-in. Start again from the connect page.")
    iss = params.get("iss")
    # RFC 9207 §2.4: a server that promises `iss` must send it; when sent it must be the issuer (mix-up defence).
    if (iss is None and client.iss_parameter_supported) or (iss is not None and iss != client.issuer):
        raise UpstreamOAuthError(f"The answer did not come from {client.issuer} (issuer mismatch); nothing was stored.")
    if params.get("error"):
        description = params.get("error_description") or params["error"]
        raise UpstreamOAuthError(f"The authorization server did not authorize the connection: {description[:200]}")
    code = params.get("code", "")
    if not code:
        raise UpstreamOAuthError("The authorization server's answer has no authorization code.")
    body = await _token_request(
        client,
        {"grant_type": "authorization_code", "code": code, "redirect_uri": flow.redirect_uri, "code_verifier": flow.code_verifier},
    )
    token, created = await _store_token(user, flow.peer_id, client.issuer, _token_fields(body))
    logger.info("user %s connected their account at peer %s", user.pk, flow.peer.name)
    return token


@database_sync_to_async
def _remove_token(user: Any, peer_id: int) -> UpstreamToken | None:
    token = UpstreamToken.objects.filter(user=user, peer_id=peer_id).first()
    if token is not None:
        token.delete()
    return token


async def connection_remove(*, user: Any, peer_id: int) -> bool:
    """Forget `user`'s tokens at a peer (disconnect); return whether there were any.

    The refresh token (else the access token) is also revoked at the server when it offers RFC
    7009 revocation; that is best effort: the tokens are gone here whatever it answers.
    """
    token = await _remove_token(user, peer_id)
    if token is None:
        return False
    client = await _load_client(peer_id)
    if client is not None and client.revocation_endpoint and client.client_id:
        value, hint = (token.refresh_token, "refresh_token") if token.refresh_token else (token.access_token, "access_token")
        data = {"token": value, "token_type_hint": hint}
        auth = _client_auth(client, data)
        try:
            await check_url_allowed(client.revocation_endpoint)
            async with outbound_client(connect_timeout=TIMEOUT, read_timeout=TIMEOUT) as http:
                await http.post(client.revocation_endpoint, data=data, auth=auth)
        except (OutboundAddressError, httpx.HTTPError) as exc:
            logger.info("peer %s: revoking a disconnected user's token failed: %s", client.peer.name, exc)
    return True


async def has_connection(*, user_id: int, peer_id: int) -> bool:
    return await UpstreamToken.objects.filter(user_id=user_id, peer_id=peer_id).aexists()


# --- using and refreshing tokens ---------------------------------------------------------------


@dataclass(frozen=True)
class _Token:
    id: int
    user_id: int
    access_token: str
    refresh_token: str
    expires_at: Any
    generation: int

    def usable(self, rejected: str | None) -> bool:
        if self.access_token == rejected:
            return False
        margin = timezone.now() + timedelta(seconds=REFRESH_MARGIN)
        return self.expires_at is None or self.expires_at > margin


@database_sync_to_async
def _load_token(peer_id: int, user_id: int | None) -> _Token | None:
    if user_id is None:
        row = UpstreamToken.objects.for_catalog(peer_id)
    else:
        row = UpstreamToken.objects.filter(peer_id=peer_id, user_id=user_id).first()
    if row is None:
        return None
    return _Token(row.pk, row.user_id, row.access_token, row.refresh_token, row.expires_at, row.generation)


@database_sync_to_async
def _take_lease(token: _Token) -> bool:
    """Claim the right to refresh `token` (one worker at a time; rotation forbids two refreshes of one refresh token)."""
    now = timezone.now()
    free = Q(refreshing_until__isnull=True) | Q(refreshing_until__lte=now)
    return UpstreamToken.objects.filter(free, pk=token.id, generation=token.generation).update(refreshing_until=now + REFRESH_LEASE) == 1


@database_sync_to_async
def _release_lease(token: _Token) -> None:
    UpstreamToken.objects.filter(pk=token.id, generation=token.generation).update(refreshing_until=None)


@database_sync_to_async
def _store_refreshed(token: _Token, fields: dict[str, Any]) -> None:
    UpstreamToken.objects.filter(pk=token.id, generation=token.generation).update(
        **fields, generation=token.generation + 1, refreshing_until=None, updated_at=timezone.now()
    )


@database_sync_to_async
def _forget(token: _Token) -> None:
    UpstreamToken.objects.filter(pk=token.id).delete()


_locks: dict[tuple[int, int], asyncio.Lock] = {}


async def _wait_for_other_refresh(peer: PeerConfig, token: _Token) -> _Token:
    deadline = time.monotonic() + REFRESH_LEASE.total_seconds() + 5
    while time.monotonic() < deadline:
        await asyncio.sleep(LEASE_POLL)
        current = await _load_token(peer.id, token.user_id)
        if current is None:
            raise UpstreamAuthorizationRequiredError(peer.name, "the connection was removed; connect again")
        if current.generation != token.generation:
            return current
    raise UpstreamUnavailableError(f"peer '{peer.name}': refreshing the user's token took too long")


async def token_refresh(peer: PeerConfig, token: _Token) -> _Token:
    """Replace `token` using its refresh token; return the new one.

    Raises:
        UpstreamAuthorizationRequiredError: there is no refresh token, or the server refused it
            (the connection is removed: the user must connect again).
        UpstreamUnavailableError: the server could not be reached.
    """
    if not token.refresh_token:
        await _forget(token)
        raise UpstreamAuthorizationRequiredError(peer.name, "your authorization expired; connect again")
    if not await _take_lease(token):
        return await _wait_for_other_refresh(peer, token)
    try:
        client = await _load_client(peer.id)
        if client is None or not client.is_registered():
            raise UpstreamAuthorizationRequiredError(peer.name, "the gateway is not registered there any more; connect again")
        body = await _token_request(client, {"grant_type": "refresh_token", "refresh_token": token.refresh_token})
    except TokenEndpointRefusedError as exc:
        await _forget(token)
        logger.info("peer %s: refreshing user %s's token was refused: %s", peer.name, token.user_id, exc)
        raise UpstreamAuthorizationRequiredError(peer.name, "the authorization server refused to renew your authorization; connect again") from exc
    except UpstreamOAuthError as exc:
        await _release_lease(token)
        raise UpstreamUnavailableError(f"peer '{peer.name}': {exc}") from exc
    except BaseException:
        await _release_lease(token)
        raise
    fields = _token_fields(body, refresh_token=token.refresh_token)
    await _store_refreshed(token, fields)
    logger.info("peer %s: refreshed user %s's token", peer.name, token.user_id)
    return _Token(token.id, token.user_id, fields["access_token"], fields["refresh_token"], fields["expires_at"], token.generation + 1)


class UserOAuthProvider:
    """`AuthProvider` (federation/client.py) with one user's own token at a per-user OAuth peer.

    `user_id` None means the catalog's connection (`UpstreamToken.objects.for_catalog`): the
    background catalog refresh and health probe use it.
    """

    def __init__(self, peer: PeerConfig, user_id: int | None) -> None:
        self.peer = peer
        self.user_id = user_id
        self._rejected: str | None = None

    async def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {await self.access_token()}"}

    async def access_token(self) -> str:
        """Return a usable token, refreshing it first when it expires soon or the upstream refused it.

        Raises:
            UpstreamAuthorizationRequiredError: the user has not connected, or must connect again.
            UpstreamUnavailableError: the authorization server cannot be reached to refresh.
        """
        token = await self._load()
        if token.usable(self._rejected):
            return token.access_token
        lock = _locks.setdefault((self.peer.id, token.user_id), asyncio.Lock())
        async with lock:
            token = await self._load()
            if not token.usable(self._rejected):
                token = await token_refresh(self.peer, token)
            self._rejected = None
            return token.access_token

    async def _load(self) -> _Token:
        token = await _load_token(self.peer.id, self.user_id)
        if token is None:
            reason = "you have not connected your account there yet" if self.user_id is not None else "no user has connected an account there yet"
            raise UpstreamAuthorizationRequiredError(self.peer.name, reason)
        return token

    async def refresh(self, rejected: dict[str, str]) -> None:
        """Remember the token the upstream refused, so the next `headers()` refreshes it."""
        self._rejected = rejected.get("Authorization", "").removeprefix("Bearer ") or None


def upstream_auth(peer: PeerConfig, *, user_id: int | None = None) -> Any:
    """The credentials provider for calls to `peer`: the user's own token, the gateway's, or none."""
    if peer.user_oauth:
        return UserOAuthProvider(peer, user_id)
    from federation.credentials import auth_for

    return auth_for(peer)
