"""Bearer tokens as the MCP transports see them: look-up, audience, scopes, and minting."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.utils import timezone
from oauth2_provider.models import AccessToken, Application, set_token_value

from fedmcp_lib import caching
from identity.hostauth import scopes as scope_names
from identity.models import TrustedGateway

OPERATOR_APPLICATION = "fedmcp operator tokens"


@dataclass(frozen=True)
class Identity:
    """Who is calling: the token's user and client, and what it may do."""

    token_id: int
    user_id: int | None
    username: str
    application_id: int | None
    client_id: str
    scopes: frozenset[str]
    expires: datetime
    federated_issuer: str = ""
    """Set when a peer gateway asserted the acting user: that user's home gateway."""
    federated_subject: str = ""
    via: tuple[str, ...] = field(default=())
    """Gateways the call came through, oldest first."""

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes

    @property
    def is_local_user(self) -> bool:
        """A user with an account here (possibly a federated identity linked to one)."""
        return self.user_id is not None

    @property
    def is_federated_guest(self) -> bool:
        """A user a trusted peer gateway asserted, with no account here: their home gateway speaks for them."""
        return self.user_id is None and bool(self.federated_issuer)

    def subject_key(self) -> str:
        """One stable key for who acts: `user:<id>`, `<issuer>#<subject>` for a guest, or `client:<id>` for no user.

        What consent approvals, per-identity upstream processes and per-user counters are keyed by.
        """
        if self.user_id is not None:
            return f"user:{self.user_id}"
        if self.federated_issuer:
            return f"{self.federated_issuer}#{self.federated_subject}"
        return f"client:{self.client_id}"


class TokenError(Exception):
    """The bearer token cannot be used; `error` is the RFC 6750 error code."""

    def __init__(self, description: str, error: str = "invalid_token") -> None:
        super().__init__(description)
        self.error = error
        self.description = description


def same_origin(uri: str, base: str) -> bool:
    """Whether two absolute URIs share scheme, host and port (the audience of this gateway)."""
    a, b = urlsplit(uri), urlsplit(base)
    if not a.scheme or not a.hostname or a.username or a.password:
        return False
    default = {"http": 80, "https": 443, "ws": 80, "wss": 443}

    def port(parts: object) -> int | None:
        return parts.port or default.get(parts.scheme)  # type: ignore[attr-defined]

    return (a.scheme, a.hostname, port(a)) == (b.scheme, b.hostname, port(b))


def scopes_allowed(*, user: AbstractBaseUser | None, application: Application | None) -> frozenset[str]:
    """Return the scopes a token of `application` acting for `user` may carry, as things are now.

    The one place the rule of identity/hostauth/scopes.py `allowed_scopes` meets the database: the token
    endpoint narrows what it issues with it, and every use of a token (MCP endpoints, /api/)
    narrows what the token holds with it, so a user who lost staff loses `admin` at once.
    """
    staff = bool(user is not None and user.is_active and user.is_staff)
    trusted = application is not None and TrustedGateway.objects.filter(application_id=application.pk).exists()
    return scope_names.allowed_scopes(staff_user=staff, trusted_gateway=trusted)


def effective_scopes(token: AccessToken) -> frozenset[str]:
    """Return the scopes `token` holds at this moment: those it was issued with that are still allowed."""
    return frozenset(token.scope.split()) & scopes_allowed(user=token.user, application=token.application)


def gateway_audience(request_origin: str) -> str:
    """Return the audience this gateway's tokens must name, for a request to `request_origin`.

    FEDMCP_PUBLIC_URL when set, whatever Host the request came with (a proxy may drop the
    port); else the request's own `scheme://host[:port]`.
    """
    return (settings.FEDMCP_PUBLIC_URL or request_origin).rstrip("/")


def audience_error(audiences: list[str], gateway: str) -> str | None:
    """Return why a token naming `audiences` cannot be used at `gateway` (its audience), or None.

    The one audience rule of every endpoint: the MCP transports (mcp_endpoint/auth.py) and the
    REST API (identity/hostauth/oauth_validators.py) both ask it, so a token is accepted or refused
    the same way on /mcp, /ws, /sse, /peers/* and /api/.
    """
    if not audiences:
        return "The access token names no audience; request it with resource=<this gateway's URL>"
    if not any(same_origin(aud, gateway) for aud in audiences):
        return "The access token was issued for another audience"
    return None


def _authenticate(raw: str, base_url: str) -> Identity:
    checksum = _token_checksum(raw)
    token = AccessToken.objects.select_related("user", "application").filter(token_checksum=checksum).first()
    if token is None:
        raise TokenError("The access token is unknown or was revoked")
    if token.is_expired():
        raise TokenError("The access token expired")
    problem = audience_error(list(token.resource or []), base_url)
    if problem is not None:
        raise TokenError(problem)
    if token.user is not None and not token.user.is_active:
        raise TokenError("The access token's user is deactivated")
    return Identity(
        token_id=token.pk,
        user_id=token.user_id,
        username=token.user.get_username() if token.user else "",
        application_id=token.application_id,
        client_id=token.application.client_id if token.application else "",
        scopes=effective_scopes(token),
        expires=token.expires,
    )


_identities: caching.GenerationCache[Identity] = caching.GenerationCache("tokens", ("tokens",))
"""Token checksum and audience -> identity, valid until a token, application or user changes."""
_live_tokens: caching.GenerationCache[bool] = caching.GenerationCache("live tokens", ("tokens",))
"""Token ids known to exist (the revocation check of open WebSockets)."""


def _token_checksum(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def _check_expiry(identity: Identity) -> None:
    # The cache never outlives a token: its expiry is checked on every use, as DOT does.
    if timezone.now() >= identity.expires:
        raise TokenError("The access token expired")


async def authenticate(raw: str, base_url: str) -> Identity:
    """Return the identity behind a bearer token presented to this gateway at `base_url`.

    Served from this worker's cache while no token, application or user changed anywhere
    (fedmcp_lib/caching.py); the expiry is checked every time.

    Raises:
        TokenError: unknown, revoked, expired, or for another audience.
    """
    key = (_token_checksum(raw), base_url)
    identity = _identities.get(key)
    if identity is caching.MISSING:
        stamp = _identities.stamp()
        identity = await database_sync_to_async(_authenticate)(raw, base_url)
        _identities.put(key, identity, stamp)
        _live_tokens.put(identity.token_id, True, stamp)
    _check_expiry(identity)
    return identity


async def still_valid(identity: Identity) -> bool:
    """Whether the token behind `identity` still exists and has not expired (revocation check).

    Reads the shared cache generations first, so a revocation in any process is seen here.
    """
    if timezone.now() >= identity.expires:
        return False
    await caching.refresh()
    if _live_tokens.get(identity.token_id) is True:
        return True
    stamp = _live_tokens.stamp()
    alive = await _token_exists(identity.token_id)
    if alive:
        _live_tokens.put(identity.token_id, True, stamp)
    return alive


@database_sync_to_async
def _token_exists(token_id: int) -> bool:
    return AccessToken.objects.filter(pk=token_id, expires__gt=timezone.now()).exists()


def gateway_application(name: str) -> Application:
    """The gateway's own OAuth application called `name` (a confidential client it never hands out), created on first use."""
    app, _ = Application.objects.get_or_create(
        name=name,
        defaults={
            "client_type": Application.CLIENT_CONFIDENTIAL,
            "authorization_grant_type": Application.GRANT_CLIENT_CREDENTIALS,
            "skip_authorization": True,
        },
    )
    return app


def operator_application() -> Application:
    """The application operator tokens (`manage.py token`) belong to."""
    return gateway_application(OPERATOR_APPLICATION)


def token_create(*, user: AbstractBaseUser, scope: str, expires_in: timedelta, resource: str, application: Application | None = None) -> str:
    """Mint an access token for `user` with `scope`, valid for `resource`; return the raw token."""
    unknown = set(scope.split()) - set(scope_names.SCOPES)
    if unknown:
        raise ValueError(f"unknown scope(s): {', '.join(sorted(unknown))}; known: {', '.join(scope_names.SCOPES)}")
    application = application or operator_application()
    refused = set(scope.split()) - scopes_allowed(user=user, application=application)
    if refused:
        raise ValueError(f"{user.get_username()} may not hold {', '.join(sorted(refused))}: the admin scope is for active staff users only")
    raw = secrets.token_urlsafe(32)
    token = AccessToken(
        user=user,
        application=application,
        expires=timezone.now() + expires_in,
        scope=scope,
        resource=[resource],
    )
    # As DOT does when it issues a token: only the checksum is stored (RFC 9700 token storage).
    set_token_value(token, raw)
    token.save()
    return raw


def user_for_token_command(username: str, *, create: bool) -> AbstractBaseUser:
    User = get_user_model()
    if create:
        user, _ = User.objects.get_or_create(username=username)
        return user
    return User.objects.get(username=username)
