"""The gateway's rules on top of django-oauth-toolkit's validator: redirect URIs and audiences.

DOT does the OAuth 2.1 work (PKCE, codes, rotation, DCR, CIMD). What it leaves open, and the
MCP authorization spec closes, is decided here:

* Redirect URIs must match a registered one **exactly** (also the port on loopback, which
  RFC 8252 would let vary) and be either `https` or `http` on a loopback host.
* Tokens are only minted for this gateway: every RFC 8707 `resource` must be on the gateway's
  own origin (`invalid_target` otherwise), and a request that names none gets the gateway's
  origin, so no token leaves the token endpoint without an audience (identity/hostauth/tokens.py refuses
  those).
* A token carries only the scopes its user and client may have *when it is issued*
  (identity/hostauth/tokens.py `scopes_allowed`): `admin` only for an active staff user, never for a
  token without a user (client credentials), and a trusted gateway only what peer gateways
  need. Every grant type ends in `_save_bearer_token`, so the rule is applied there once: a
  scope the client asks for in this request and may not have is `invalid_scope`; one carried
  over from a grant or an earlier token (a code, a refresh) is dropped from the new token.
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.http import HttpRequest
from oauth2_provider.oauth2_validators import OAuth2Validator
from oauthlib.common import Request as OauthlibRequest
from oauthlib.oauth2.rfc6749 import errors

from identity.hostauth.tokens import audience_error, gateway_audience, same_origin, scopes_allowed

LOOPBACK_NAMES = ("localhost",)


def is_loopback_host(hostname: str | None) -> bool:
    """Whether `hostname` is `localhost` or a loopback IP literal (127.0.0.0/8, ::1)."""
    if not hostname:
        return False
    if hostname.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def redirect_uri_acceptable(uri: str) -> bool:
    """Whether `uri` may be a redirect URI at all: https anywhere, or http on loopback.

    No fragment and no userinfo (RFC 6749 §3.1.2, and a userinfo part could disguise the host).
    """
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return False
    if "#" in uri or "@" in parts.netloc or not parts.hostname:
        return False
    if parts.scheme == "https":
        return True
    return parts.scheme == "http" and is_loopback_host(parts.hostname)


def gateway_origin(request: HttpRequest | OauthlibRequest) -> str:
    """This gateway's public origin as seen by `request`: FEDMCP_PUBLIC_URL, else scheme://Host.

    The same rule as mcp_endpoint.auth.public_base_url, so the audience the authorization
    server stamps on a token is the one the MCP endpoints check.
    """
    if settings.FEDMCP_PUBLIC_URL:
        return gateway_audience("")
    if not isinstance(request, HttpRequest):
        # oauthlib requests carry Django's META as their headers (DOT's OAuthLibCore), and DOT
        # marks a secure request with X_DJANGO_OAUTH_TOOLKIT_SECURE; rebuild enough of the
        # Django request to ask it for the host (validated against ALLOWED_HOSTS) as usual.
        meta = request.headers
        request = _MetaRequest("https" if meta.get("X_DJANGO_OAUTH_TOOLKIT_SECURE") else "http", meta)
    return gateway_audience(f"{request.scheme}://{request.get_host()}")


def token_fits_gateway(request_uri: str, audiences: list[str]) -> bool:
    """DOT's RFC 8707 resource validator (RESOURCE_SERVER_TOKEN_RESOURCE_VALIDATOR) for /api/.

    Applies `audience_error`, the rule of the MCP endpoints, to the origin of the URL the
    request came to (its Host, port included), instead of DOT's prefix match of that URL:
    behind a proxy that drops the port, or with FEDMCP_PUBLIC_URL set, the two would disagree.
    """
    parts = urlsplit(request_uri)
    return audience_error(list(audiences), gateway_audience(f"{parts.scheme}://{parts.netloc}")) is None


class _MetaRequest(HttpRequest):
    def __init__(self, scheme: str, meta: Any) -> None:
        super().__init__()
        self._fixed_scheme = scheme
        self.META = meta

    def _get_scheme(self) -> str:
        return self._fixed_scheme


def foreign_resources(resources: list[str], origin: str) -> list[str]:
    """Return the resource indicators in `resources` that are not on `origin`."""
    return [resource for resource in resources if not same_origin(resource, origin)]


class GatewayOAuth2Validator(OAuth2Validator):
    """DOT's validator with exact loopback/https redirect URIs and gateway-only audiences."""

    def validate_redirect_uri(
        self, client_id: str, redirect_uri: str, request: OauthlibRequest, *args: Any, **kwargs: Any
    ) -> bool:
        registered = request.client.redirect_uris.split()
        return (
            redirect_uri in registered
            and redirect_uri_acceptable(redirect_uri)
            and super().validate_redirect_uri(client_id, redirect_uri, request, *args, **kwargs)
        )

    def get_default_redirect_uri(
        self, client_id: str, request: OauthlibRequest, *args: Any, **kwargs: Any
    ) -> str | None:
        uri = super().get_default_redirect_uri(client_id, request, *args, **kwargs)
        return uri if uri and redirect_uri_acceptable(uri) else None

    def validate_bearer_token(self, token: str, scopes: list[str], request: OauthlibRequest) -> bool:
        # DOT lets a token that names no audience through anywhere; the MCP endpoints refuse it
        # (identity.hostauth.tokens.audience_error), and so does the API. Named audiences are checked by
        # DOT through `token_fits_gateway`.
        access_token = self._load_access_token(token) if token else None
        if access_token is not None and not access_token.resource:
            request.oauth2_error = {"error": "invalid_token", "error_description": audience_error([], "")}
            return False
        return super().validate_bearer_token(token, scopes, request)

    def _check_and_set_request_resource(self, request: OauthlibRequest) -> None:
        # Runs in the token endpoint just before the token rows are written (DOT's RFC 8707
        # hook): after DOT's own checks, default and confine the audience to this gateway.
        super()._check_and_set_request_resource(request)
        origin = gateway_origin(request)
        if not request.resource:
            request.resource = [origin]
        foreign = foreign_resources(request.resource, origin)
        if foreign:
            raise errors.CustomOAuth2Error(
                error="invalid_target",
                description=f"This authorization server issues tokens for {origin} only, not for {foreign[0]}",
                request=request,
            )

    def _save_bearer_token(self, token: dict[str, Any], request: OauthlibRequest, *args: Any, **kwargs: Any) -> Any:
        # The last step of every grant before DOT writes the token rows (and, on a refresh,
        # retires the old ones): narrow the scope to what this token may carry, or refuse.
        user = None if request.grant_type == "client_credentials" else request.user
        allowed = scopes_allowed(user=user, application=request.client)
        issued = str(token.get("scope") or "").split()
        asked = set(str(request.scope or "").split()) if request.grant_type in ("client_credentials", "refresh_token") else set()
        refused = (asked & set(issued)) - allowed
        if refused:
            raise errors.InvalidScopeError(
                description=f"This client may not have the {' '.join(sorted(refused))} scope: "
                "the admin scope is only for tokens acting for an active staff user",
                request=request,
            )
        kept = [scope for scope in issued if scope in allowed]
        if issued and not kept:
            raise errors.InvalidScopeError(description="None of the granted scopes is still allowed", request=request)
        if kept != issued:
            token["scope"] = " ".join(kept)
            request.scopes = kept
        return super()._save_bearer_token(token, request, *args, **kwargs)
