"""Trust between gateways: registering a peer gateway, and checking what it asserts.

A trusted gateway calls this one with its own client-credentials token (scope `gateway`),
never with its users' tokens. On every call it makes on a user's behalf it adds a signed
assertion in `_meta["io.fedmcp/assertion"]` (identity/trust/signing.py). `identity_for_call` is the
one place that checks it, called by the dispatcher for every request:

* a caller that is not a trusted gateway may not send an assertion;
* a trusted gateway must send one for methods that act for a user (`USER_ACTING_METHODS`);
  catalog methods (lists, discovery) work without, so catalog sync needs no user;
* the assertion must be signed with a key of that gateway's JWKS, name that gateway's own
  issuer (a gateway can only assert its own users), be addressed to this gateway, be fresh
  (at most `MAX_LIFETIME` seconds), carry the same gateway path as the request's hop record,
  and be used once (its `jti` is remembered until it expires);
* then the caller becomes the `FederatedIdentity` (issuer, subject).
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
from channels.db import database_sync_to_async
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone
from oauth2_provider.models import Application

from federation.client import OutboundAddressError, check_url_allowed, outbound_client
from fedmcp_lib.caching import GenerationCache, cached
from identity.hostauth import scopes
from identity.hostauth.tokens import Identity, same_origin
from identity.models import FederatedIdentity, TrustedGateway, UsedAssertion
from identity.trust.signing import ACCEPTED_ALGORITHMS, JWT_TYPE, JwtRejectedError, jwt_verify

logger = logging.getLogger(__name__)

ASSERTION_META_KEY = "io.fedmcp/assertion"
"""Where a peer gateway puts the signed identity assertion in a request's `_meta`."""
USER_ACTING_METHODS = frozenset(
    {"tools/call", "resources/read", "prompts/get", "completion/complete", "resources/subscribe", "resources/unsubscribe"}
)
"""Methods a trusted gateway may only call on behalf of an asserted user."""
MAX_LIFETIME = 60
"""Longest accepted assertion lifetime (exp - iat), seconds."""
LEEWAY = 5
"""Clock skew tolerated between gateways, seconds."""
JWKS_REFETCH_INTERVAL = 10.0
"""An unknown `kid` refetches the JWKS at most this often (key rotation, without a fetch per call)."""
JWKS_MAX_BYTES = 64 * 1024
PRUNE_INTERVAL = 60.0
GATEWAY_APPLICATION_PREFIX = "fedmcp gateway: "


class AssertionRejectedError(Exception):
    """An identity assertion (or its absence) is not acceptable; `reason` is a short code."""

    def __init__(self, reason: str, description: str) -> None:
        super().__init__(description)
        self.reason = reason
        self.description = description


class TrustConfigError(Exception):
    """The trust definition is invalid; the message says what to fix."""


# --- operator services --------------------------------------------------------------------------


@transaction.atomic
def gateway_trust(*, name: str, issuer: str, jwks_url: str = "", jwks: dict[str, Any] | None = None) -> tuple[TrustedGateway, str]:
    """Trust the gateway `issuer` under `name`: create its client-credentials application.

    Returns the trusted gateway and the application's client secret, which is stored hashed
    and cannot be shown again.

    Raises:
        TrustConfigError: a field is invalid, or the name or issuer is already trusted.
    """
    issuer = issuer.rstrip("/")
    if TrustedGateway.objects.filter(name=name).exists():
        raise TrustConfigError(f"a gateway named {name!r} is already trusted")
    if TrustedGateway.objects.filter(issuer=issuer).exists():
        raise TrustConfigError(f"the issuer {issuer} is already trusted")
    secret = secrets.token_urlsafe(32)
    application = Application(
        name=f"{GATEWAY_APPLICATION_PREFIX}{name}",
        client_type=Application.CLIENT_CONFIDENTIAL,
        authorization_grant_type=Application.GRANT_CLIENT_CREDENTIALS,
        client_secret=secret,
        skip_authorization=True,
    )
    gateway = TrustedGateway(name=name, issuer=issuer, jwks_url=jwks_url, jwks=jwks or {})
    try:
        gateway.full_clean(exclude=["application"])
    except ValidationError as exc:
        raise TrustConfigError("; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())) from exc
    if jwks is not None and not _is_jwk_set(jwks):
        raise TrustConfigError("the inline JWKS must be a JWK Set: {\"keys\": [...]}")
    application.save()
    gateway.application = application
    gateway.save()
    return gateway, secret


def gateway_untrust(*, gateway: TrustedGateway) -> None:
    """Stop trusting a gateway: its application and every token it holds are deleted."""
    pk, application = gateway.pk, gateway.application
    with transaction.atomic():
        gateway.delete()
        application.delete()
    _jwks_cache.pop(pk, None)


def _is_jwk_set(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("keys"), list)


# --- peers that say they are gateways -------------------------------------------------------------


@dataclass(frozen=True)
class GatewayStanding:
    """What this gateway believes of a peer that names itself a fedmcp gateway.

    `name` is the gateway name its assertions are believed under (the homes of its catalog,
    its consent challenges, the deferral marks on its requests), "" when none is believed;
    `reason` says why not, for the operator.
    """

    name: str = ""
    reason: str = ""

    @property
    def trusted(self) -> bool:
        return bool(self.name)


def peer_gateway_standing(*, is_gateway: bool, url: str, claimed: str | None) -> GatewayStanding:
    """Decide whether to believe a peer that calls itself fedmcp gateway `claimed`.

    Believed only when all three hold (docs/IDENTITY.md "Trust between gateways"):

    * an operator made the peer a gateway (`peer add --gateway`, the admin, the API); what a
      peer says about itself (`capabilities.experimental["io.fedmcp/gateway"]`) never does;
    * this gateway trusts the peer's origin as a gateway: an enabled `TrustedGateway` whose
      issuer is the origin the calls go to (`gateway trust NAME --issuer ORIGIN`, the second
      half of the mutual trust procedure);
    * the peer calls itself by the name that trust record gives it, so it cannot take another
      gateway's homes.

    Reads the database (call it from synchronous code).
    """
    from federation.credentials import peer_audience

    if not claimed:
        return GatewayStanding()
    if not is_gateway:
        return GatewayStanding(
            reason=f"it says it is fedmcp gateway '{claimed}'; only an operator makes a peer a gateway "
            "(`peer add --gateway`, the admin or the API), so it is used as a plain MCP server"
        )
    origin = peer_audience(url) if url else ""
    record = TrustedGateway.objects.filter(issuer=origin, enabled=True).first() if origin else None
    if record is None:
        return GatewayStanding(
            reason=f"this gateway does not trust {origin or 'it'} as a gateway yet, so its names, consent questions and "
            f"marks are not believed: complete the mutual trust with `manage.py gateway trust {claimed} --issuer {origin}`"
        )
    if record.name != claimed:
        return GatewayStanding(
            reason=f"it calls itself '{claimed}', but this gateway trusts {origin} as '{record.name}'; trust it under "
            "the name it uses, or it could take another gateway's names"
        )
    return GatewayStanding(name=claimed)


# --- keys of trusted gateways ---------------------------------------------------------------------


class _KeySet:
    def __init__(self, source: str, keys: jwt.PyJWKSet, fetched_at: float) -> None:
        self.source = source
        self.keys = keys
        self.fetched_at = fetched_at

    def find(self, kid: Any) -> jwt.PyJWK | None:
        usable = [k for k in self.keys.keys if k.public_key_use in (None, "sig")]
        if kid is None:
            return usable[0] if len(usable) == 1 else None
        return next((k for k in usable if k.key_id == kid), None)


_jwks_cache: dict[int | str, _KeySet] = {}
"""This worker's JWKS per trusted gateway (by id), or per JWKS URL for peers we call (`peer_gateway_key`)."""


def _parse_jwks(document: Any) -> jwt.PyJWKSet:
    if not _is_jwk_set(document):
        raise AssertionRejectedError("keys_unavailable", "the trusted gateway's JWKS is not a JWK Set")
    # Only asymmetric signing keys: a symmetric key in the set would turn verification into
    # "anyone who knows this JWKS can sign".
    usable = [k for k in document["keys"] if isinstance(k, dict) and k.get("kty") in ("OKP", "EC")]
    try:
        return jwt.PyJWKSet(usable)
    except jwt.PyJWKSetError as exc:
        raise AssertionRejectedError("keys_unavailable", "the trusted gateway's JWKS has no usable key") from exc


async def _fetch_jwks(url: str) -> Any:
    try:
        await check_url_allowed(url)
        async with outbound_client(connect_timeout=5.0, read_timeout=10.0) as client:
            response = await client.get(url, headers={"Accept": "application/json"})
    except (OutboundAddressError, httpx.HTTPError) as exc:
        logger.warning("cannot fetch JWKS %s: %s", url, exc)
        raise AssertionRejectedError("keys_unavailable", "the trusted gateway's keys cannot be fetched") from exc
    if response.status_code != 200 or len(response.content) > JWKS_MAX_BYTES:
        raise AssertionRejectedError("keys_unavailable", f"the trusted gateway's JWKS answered HTTP {response.status_code}")
    try:
        return response.json()
    except ValueError as exc:
        raise AssertionRejectedError("keys_unavailable", "the trusted gateway's JWKS is not JSON") from exc


async def _key_for(gateway: TrustedGateway, kid: Any) -> jwt.PyJWK:
    if _is_jwk_set(gateway.jwks):
        key = _KeySet("inline", _parse_jwks(gateway.jwks), 0.0).find(kid)
        if key is None:
            raise AssertionRejectedError("signature", "the assertion's key is not in the trusted gateway's JWKS")
        return key
    return await _cached_key(gateway.pk, gateway.keys_url(), kid)


async def _cached_key(cache_key: int | str, url: str, kid: Any) -> jwt.PyJWK:
    now = time.monotonic()
    cached = _jwks_cache.get(cache_key)
    if cached is not None and (cached.source != url or now - cached.fetched_at > settings.FEDMCP_JWKS_CACHE_SECONDS):
        cached = None
    key = cached.find(kid) if cached is not None else None
    if key is None and (cached is None or now - cached.fetched_at > JWKS_REFETCH_INTERVAL):
        cached = _KeySet(url, _parse_jwks(await _fetch_jwks(url)), now)
        _jwks_cache[cache_key] = cached
        key = cached.find(kid)
    if key is None:
        raise AssertionRejectedError("signature", "the signing key is not in the gateway's JWKS")
    return key


async def trusted_gateway_key(issuer: str, kid: Any) -> jwt.PyJWK:
    """Return the key `kid` of the enabled trusted gateway whose issuer is `issuer`.

    Raises:
        AssertionRejectedError: no such gateway (`issuer`), or the key is unknown or unavailable.
    """
    gateway = await TrustedGateway.objects.filter(issuer=issuer, enabled=True).afirst()
    if gateway is None:
        raise AssertionRejectedError("issuer", "the issuer is not a gateway this one trusts")
    return await _key_for(gateway, kid)


async def peer_gateway_key(issuer: str, peer_origin: str, kid: Any) -> jwt.PyJWK:
    """Return the key `kid` of the peer gateway at `peer_origin`, which signed as `issuer`.

    `issuer` must be the peer's own origin, the one this gateway sent the call to: only the
    peer we talk to may sign what it answers. Its keys come from its trust record if this
    gateway trusts it too (an inline JWKS or another JWKS URL), otherwise from
    `<origin>/.well-known/jwks.json`, cached like a trusted gateway's.

    Raises:
        AssertionRejectedError: the issuer is not the peer's, or the key is unknown or unavailable.
    """
    if issuer.rstrip("/") != peer_origin.rstrip("/"):
        raise AssertionRejectedError("issuer", "the signer is not the peer gateway this call went to")
    gateway = await TrustedGateway.objects.filter(issuer=issuer, enabled=True).afirst()
    if gateway is not None:
        return await _key_for(gateway, kid)
    url = f"{peer_origin.rstrip('/')}/.well-known/jwks.json"
    return await _cached_key(url, url, kid)


# --- checking a request ---------------------------------------------------------------------------


_ASSERTION_REJECTIONS = {
    "expired": "the assertion expired",
    "not_yet_valid": "the assertion was issued in the future; check the gateways' clocks",
    "issuer": "the assertion's issuer is not the trusted gateway's: a gateway can only assert its own users",
    "signature": "the assertion's signature does not verify",
    "malformed": "the assertion is not a valid JWT",
}


def _decode(raw: str, key: jwt.PyJWK, algorithm: str, gateway: TrustedGateway, audience: str) -> dict[str, Any]:
    try:
        # The audience is compared by origin below (an assertion may name the gateway's URL with a path).
        claims = jwt_verify(raw, key, algorithm, issuer=gateway.issuer, required=["iss", "sub", "aud", "iat", "exp", "jti"], leeway=LEEWAY)
    except JwtRejectedError as exc:
        if exc.reason == "claims":
            raise AssertionRejectedError("claims", f"the assertion lacks the '{exc.claim}' claim") from exc
        raise AssertionRejectedError(exc.reason, _ASSERTION_REJECTIONS.get(exc.reason, _ASSERTION_REJECTIONS["malformed"])) from exc
    audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
    if not audience or not any(isinstance(a, str) and same_origin(a, audience) for a in audiences):
        raise AssertionRejectedError("audience", "the assertion is addressed to another gateway")
    iat, exp = claims["iat"], claims["exp"]
    if not isinstance(iat, int | float) or not isinstance(exp, int | float) or exp - iat > MAX_LIFETIME:
        raise AssertionRejectedError("lifetime", f"the assertion must expire within {MAX_LIFETIME}s of being issued")
    for claim in ("sub", "jti"):
        if not isinstance(claims[claim], str) or not claims[claim] or len(claims[claim]) > 255:
            raise AssertionRejectedError("claims", f"the assertion's '{claim}' must be a non-empty string")
    return claims


_last_prune = 0.0


@database_sync_to_async
def _remember(issuer: str, jti: str, exp: float) -> None:
    """Record a used jti, or raise if it was used before; prune expired ones now and then."""
    global _last_prune
    now = time.monotonic()
    if now - _last_prune > PRUNE_INTERVAL:
        _last_prune = now
        UsedAssertion.objects.filter(expires_at__lt=timezone.now()).delete()
    expires_at = datetime.fromtimestamp(exp, tz=UTC) + timedelta(seconds=LEEWAY)
    try:
        with transaction.atomic():
            UsedAssertion.objects.create(issuer=issuer, jti=jti, expires_at=expires_at)
    except IntegrityError as exc:
        raise AssertionRejectedError("replayed", "the assertion was already used") from exc


@database_sync_to_async
def _federated_identity(gateway: TrustedGateway, issuer: str, subject: str) -> FederatedIdentity:
    identity, created = FederatedIdentity.objects.select_related("user").get_or_create(
        issuer=issuer, subject=subject, defaults={"trusted_gateway": gateway}
    )
    if not created:
        identity.save(update_fields=["last_seen_at"])
    return identity


_trusted_gateways: GenerationCache[TrustedGateway | None] = GenerationCache("trusted gateways", ("tokens",), maxsize=1_000)
"""Application id → its enabled trusted gateway, or None. A gateway's trust is a credential: any
change of a `TrustedGateway` (signals, and `TrustedGatewayQuerySet.update`) bumps "tokens"."""


async def _trusted_gateway(application_id: int | None) -> TrustedGateway | None:
    if application_id is None:
        return None
    return await cached(
        _trusted_gateways, application_id, lambda: TrustedGateway.objects.filter(application_id=application_id, enabled=True).afirst()
    )


async def home_gateway(identity: Identity | None) -> TrustedGateway | None:
    """Return the enabled trusted gateway that asserted `identity` in this call, or None.

    That gateway is the federated user's home (or the next gateway towards it): a fedmcp
    gateway that gates the sampling and elicitation requests it receives with its own users'
    consent, so a question this gateway cannot ask may be left to it (mcp_endpoint/pipeline/upstream_requests.py).
    A user linked to a local account is asked here, and has no home to defer to.
    """
    if identity is None or identity.user_id is not None or not identity.federated_issuer:
        return None
    gateway = await _trusted_gateway(identity.application_id)
    # identity_for_call only names users of the token's own gateway; check it anyway, so no
    # other path to a federated Identity can borrow a gateway's standing.
    return gateway if gateway is not None and gateway.issuer == identity.federated_issuer else None


def own_audience() -> str:
    """This gateway's public origin, which assertions addressed to it must name."""
    return settings.FEDMCP_PUBLIC_URL.rstrip("/")


async def identity_for_call(*, caller: Identity | None, method: str, meta: dict[str, Any], hops: Any) -> Identity | None:
    """Return who acts in this request: the caller, or the user a trusted gateway asserts.

    `hops` is the request's hop record (`_meta["io.fedmcp/hops"]`), which the assertion's
    `via` must repeat.

    Raises:
        AssertionRejectedError: the assertion is missing where required, or not acceptable.
    """
    raw = meta.get(ASSERTION_META_KEY)
    if caller is None or (raw is None and not caller.has_scope(scopes.GATEWAY)):
        if raw is not None:
            raise AssertionRejectedError("not_trusted", "only a trusted gateway may assert a user's identity")
        return caller
    gateway = await _trusted_gateway(caller.application_id) if caller.has_scope(scopes.GATEWAY) else None
    if gateway is None:
        if raw is not None:
            raise AssertionRejectedError("not_trusted", "only a trusted gateway may assert a user's identity")
        return caller
    if raw is None:
        if method in USER_ACTING_METHODS:
            raise AssertionRejectedError("missing", f"a peer gateway must assert the acting user for {method}")
        return caller
    if not isinstance(raw, str):
        raise AssertionRejectedError("malformed", "the assertion must be a JWT string")
    try:
        header = jwt.get_unverified_header(raw)
    except jwt.PyJWTError as exc:
        raise AssertionRejectedError("malformed", "the assertion is not a valid JWT") from exc
    algorithm = header.get("alg")
    if algorithm not in ACCEPTED_ALGORITHMS:
        raise AssertionRejectedError("algorithm", f"assertions must be signed with {' or '.join(ACCEPTED_ALGORITHMS)}")
    if header.get("typ") != JWT_TYPE:
        raise AssertionRejectedError("malformed", f"the assertion's typ must be {JWT_TYPE}")
    key = await _key_for(gateway, header.get("kid"))
    if key.algorithm_name != algorithm:
        raise AssertionRejectedError("signature", "the assertion's algorithm does not fit its key")
    claims = _decode(raw, key, algorithm, gateway, own_audience())
    via = claims.get("via", [])
    if not isinstance(via, list) or not all(isinstance(h, str) for h in via) or via != (hops if isinstance(hops, list) else []):
        raise AssertionRejectedError("via", "the assertion's gateway path does not match the request's hop record")
    await _remember(claims["iss"], claims["jti"], claims["exp"])
    federated = await _federated_identity(gateway, claims["iss"], claims["sub"])
    return replace(
        caller,
        # The user acts with what the gateway's token allows, but is no gateway themselves.
        scopes=caller.scopes - {scopes.GATEWAY},
        user_id=federated.user_id,
        username=federated.user.get_username() if federated.user else "",
        federated_issuer=claims["iss"],
        federated_subject=claims["sub"],
        via=tuple(via),
    )


def assertion_subject(identity: Identity) -> str:
    """How this gateway names the acting user to a peer gateway (the assertion's `sub`).

    Local users by username; users asserted to us by another gateway as `subject@issuer`
    (we vouch only for what that gateway told us); clients acting for no user as
    `client:<client_id>`. Empty when nobody can be named.
    """
    if identity.federated_issuer:
        return f"{identity.federated_subject}@{identity.federated_issuer}"
    if identity.username:
        return identity.username
    if identity.client_id:
        return f"client:{identity.client_id}"
    return ""
