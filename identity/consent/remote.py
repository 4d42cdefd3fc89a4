"""Distributed consent: the gateway that owns a call asks the user's home gateway, and trusts its answer.

A call that reaches gateway B from peer gateway A acts for `alice@A` (identity/trust/gateways.py). When
B's policy says "ask", nobody at B can answer, so B asks A:

1. B (the *owner*) keeps a pending `RemoteConsent` (who, which call, a hash of its arguments,
   a random nonce, an expiry) and answers the call with a **challenge**: a JWT signed with B's
   key, addressed to alice's issuer (`remote_consent_open`).
2. A (alice's *home*) checks the challenge against B's published keys (`challenge_verify`),
   asks alice on its own /consent page, and signs her answer, the **decision**, addressed to
   B and naming the challenge's nonce (`decision_create`).
3. A sends the call again with the decision; B checks it was signed by alice's own home
   gateway, for B, recently, for this very call, and that the nonce is B's, pending and unused,
   and spends it (`remote_consent_settle`). "Approve and remember" becomes a `ConsentGrant` for
   the federated identity at B.

Across more hops (A -> B -> C, the ask at C) each gateway only trusts its neighbours, so every
hop answers for itself: C challenges B (alice is `alice@A` as B asserted her), B keeps a
*relay* record and challenges A with the details of C's question, and once A's decision reaches
B, B signs its own decision for C's nonce.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from channels.db import database_sync_to_async
from django.conf import settings
from django.utils import timezone

from identity.call_digest import arguments_hash
from identity.consent.policy import KIND_FOR_METHOD, REMEMBER_CHOICES
from identity.hostauth.tokens import Identity
from identity.models import ConsentGrant, RemoteConsent
from identity.trust import gateways
from identity.trust.signing import ACCEPTED_ALGORITHMS, JwtRejectedError, issuer, jwt_verify, signing_key

CHALLENGE_TYPE = "fedmcp-consent-challenge+jwt"
"""`typ` of a challenge, so no other JWT of the same key passes for one (and vice versa)."""
DECISION_TYPE = "fedmcp-consent-decision+jwt"
DECISION_META_KEY = "io.fedmcp/consent-decision"
"""Where a home gateway puts its signed decision when it sends the call again."""
DECISION_LIFETIME = 60
"""Longest accepted decision lifetime (exp - iat), seconds: it is used at once."""
CHALLENGE_GRACE = 30
"""Seconds a challenge outlives the consent timeout, for the answer's trip back to the owner."""
LEEWAY = gateways.LEEWAY
KINDS = frozenset(KIND_FOR_METHOD.values())


class RemoteConsentError(Exception):
    """A challenge or decision is not acceptable; `reason` is a short code for `data.reason`."""

    def __init__(self, reason: str, description: str) -> None:
        super().__init__(description)
        self.reason = reason
        self.description = description


@dataclass(frozen=True)
class Question:
    """What the user is asked about, as the owner gateway sees it."""

    owner: str
    """The owner gateway's name (FEDMCP_GATEWAY_NAME)."""
    peer: str
    kind: str
    name: str
    arguments: Any
    """Redacted by the owner's policies."""
    path: list[str]
    """The gateways from the user's home to the owner, e.g. ["a", "b"]."""


def _sign(claims: dict[str, Any], typ: str) -> str:
    key = signing_key()
    return jwt.encode(claims, key.private_key, algorithm=key.algorithm, headers={"kid": key.kid, "typ": typ})


def _header(raw: Any, typ: str) -> dict[str, Any]:
    if not isinstance(raw, str) or not raw:
        raise RemoteConsentError("malformed", "must be a JWT string")
    try:
        header = jwt.get_unverified_header(raw)
    except jwt.PyJWTError as exc:
        raise RemoteConsentError("malformed", "is not a valid JWT") from exc
    if header.get("alg") not in ACCEPTED_ALGORITHMS:
        raise RemoteConsentError("algorithm", f"must be signed with {' or '.join(ACCEPTED_ALGORITHMS)}")
    if header.get("typ") != typ:
        raise RemoteConsentError("malformed", f"must have typ {typ}")
    return header


def _unverified_issuer(raw: str) -> str:
    try:
        claims = jwt.decode(raw, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise RemoteConsentError("malformed", "is not a valid JWT") from exc
    value = claims.get("iss")
    if not isinstance(value, str) or not value:
        raise RemoteConsentError("claims", "names no issuer")
    return value


_REJECTIONS = {
    "expired": "it expired",
    "not_yet_valid": "it was issued in the future; check the gateways' clocks",
    "audience": "it is addressed to another gateway",
    "issuer": "its issuer is not the expected gateway",
    "signature": "its signature does not verify",
    "malformed": "it is not a valid JWT",
}


def _decode(raw: str, key: jwt.PyJWK, algorithm: str, *, iss: str, required: list[str]) -> dict[str, Any]:
    try:
        return jwt_verify(raw, key, algorithm, issuer=iss, audience=issuer(), leeway=LEEWAY, required=["iss", "sub", "aud", "iat", "exp", "jti", *required])
    except JwtRejectedError as exc:
        if exc.reason == "claims":
            raise RemoteConsentError("claims", f"it lacks the '{exc.claim}' claim") from exc
        raise RemoteConsentError(exc.reason, _REJECTIONS.get(exc.reason, _REJECTIONS["malformed"])) from exc


def _rejected(exc: gateways.AssertionRejectedError) -> RemoteConsentError:
    return RemoteConsentError(exc.reason, exc.description)


# --- the owner's side ------------------------------------------------------------------------


def owner_expiry(timeout: float) -> datetime:
    """When an owner's question lapses: the consent timeout, plus time for the answer's trip back."""
    return timezone.now() + timedelta(seconds=timeout + CHALLENGE_GRACE)


@database_sync_to_async
def _record_create(**fields: Any) -> RemoteConsent:
    # Expired questions are dead weight; drop them while adding one.
    RemoteConsent.objects.filter(expires_at__lt=timezone.now() - timedelta(days=1)).delete()
    return RemoteConsent.objects.create(nonce=secrets.token_urlsafe(24), **fields)


def challenge_for(record: RemoteConsent, question: Question) -> str:
    """Sign the challenge for `record`, addressed to the user's home gateway."""
    return _sign(
        {
            "iss": issuer(),
            "aud": record.federated_issuer,
            "sub": record.federated_subject,
            "iat": int(time.time()),
            "exp": int(record.expires_at.timestamp()),
            "jti": record.nonce,
            "gateway": question.owner,
            "peer": question.peer,
            "kind": question.kind,
            "name": question.name,
            "arguments": question.arguments,
            "arguments_hash": record.arguments_hash,
            "path": question.path,
        },
        CHALLENGE_TYPE,
    )


async def remote_consent_open(
    *, identity: Identity, peer: str, kind: str, name: str, arguments: Any, redacted: Any, expires_at: datetime,
    role: str = RemoteConsent.Role.OWNER, question: Question | None = None, upstream_claims: dict[str, Any] | None = None,
) -> str:
    """Record a pending question about this call for the user's home gateway; return the challenge.

    `arguments` are the call's real arguments (only their hash is kept and signed), `redacted`
    what the user may be shown. A relay passes the far gateway's `question` and verified
    `upstream_claims` on; an owner asks about itself (`owner_expiry()` is its deadline).
    """
    via = list(identity.via)
    record = await _record_create(
        role=role,
        federated_issuer=identity.federated_issuer,
        federated_subject=identity.federated_subject,
        client_id=identity.client_id,
        via=via,
        peer=peer,
        kind=kind,
        name=name[:2000],
        arguments_hash=arguments_hash(arguments),
        arguments=redacted if redacted is not None else {},
        upstream_claims=upstream_claims or {},
        expires_at=expires_at,
    )
    if question is None:
        question = Question(settings.FEDMCP_GATEWAY_NAME, peer, kind, name, record.arguments, [*via, settings.FEDMCP_GATEWAY_NAME])
    return challenge_for(record, question)


@dataclass(frozen=True)
class Settled:
    """A verified, spent decision."""

    approved: bool
    remember_seconds: int
    record: RemoteConsent


async def remote_consent_settle(
    *, raw: Any, identity: Identity, peer: str, kind: str, name: str, arguments: Any, role: str = RemoteConsent.Role.OWNER
) -> Settled:
    """Verify a home gateway's decision for this call and spend its nonce (once).

    Raises:
        RemoteConsentError: forged, expired, misaddressed, from another gateway than the
            user's home, for another user or call, unknown, or already used.
    """
    header = _header(raw, DECISION_TYPE)
    home = identity.federated_issuer
    if not home or _unverified_issuer(raw) != home:
        raise RemoteConsentError("issuer", "the decision was not signed by the user's home gateway")
    try:
        key = await gateways.trusted_gateway_key(home, header.get("kid"))
    except gateways.AssertionRejectedError as exc:
        raise _rejected(exc) from exc
    claims = _decode(raw, key, header["alg"], iss=home, required=["nonce", "decision"])
    if not isinstance(claims["iat"], int | float) or claims["exp"] - claims["iat"] > DECISION_LIFETIME:
        raise RemoteConsentError("lifetime", f"a decision must expire within {DECISION_LIFETIME}s of being issued")
    if claims["sub"] != identity.federated_subject:
        raise RemoteConsentError("subject", "the decision is about another user")
    if claims["decision"] not in ("approve", "deny") or not isinstance(claims["nonce"], str) or not isinstance(claims["jti"], str):
        raise RemoteConsentError("claims", "the decision must be 'approve' or 'deny' and name a challenge")
    remember = claims.get("remember") or 0
    if not isinstance(remember, int) or isinstance(remember, bool) or (remember and remember not in dict(REMEMBER_CHOICES)):
        raise RemoteConsentError("claims", "'remember' must be one of the offered durations")
    return await _spend(claims, identity, peer, kind, name, arguments_hash(arguments), role, remember)


@database_sync_to_async
def _spend(
    claims: dict[str, Any], identity: Identity, peer: str, kind: str, name: str, digest: str, role: str, remember: int
) -> Settled:
    record = RemoteConsent.objects.filter(pk=claims["nonce"], role=role).first()
    if record is None:
        raise RemoteConsentError("unknown_challenge", "the decision answers no question this gateway asked")
    if (record.federated_issuer, record.federated_subject) != (identity.federated_issuer, identity.federated_subject):
        raise RemoteConsentError("subject", "the decision answers a question about another user")
    if (record.peer, record.kind, record.name, record.arguments_hash, record.client_id) != (peer, kind, name[:2000], digest, identity.client_id):
        raise RemoteConsentError("other_call", "the decision answers a question about another call")
    now = timezone.now()
    if record.status != RemoteConsent.Status.PENDING:
        raise RemoteConsentError("replayed", "the decision was already used")
    if record.expires_at <= now:
        raise RemoteConsentError("expired", "the question expired before the answer came")
    approved = claims["decision"] == "approve"
    status = RemoteConsent.Status.APPROVED if approved else RemoteConsent.Status.DENIED
    # Single use even when two workers race with the same decision: only one update matches.
    spent = RemoteConsent.objects.filter(pk=record.pk, status=RemoteConsent.Status.PENDING).update(
        status=status, decided_at=now, decision_jti=claims["jti"][:255], remember_seconds=remember or None
    )
    if not spent:
        raise RemoteConsentError("replayed", "the decision was already used")
    if approved and remember and role == RemoteConsent.Role.OWNER:
        ConsentGrant.objects.create(
            user=None, federated_issuer=record.federated_issuer, federated_subject=record.federated_subject,
            peer=peer, kind=kind, name=record.name, client_id=record.client_id, expires_at=now + timedelta(seconds=remember),
        )
    record.refresh_from_db()
    return Settled(approved, remember, record)


@database_sync_to_async
def relay_record_for(raw: Any) -> RemoteConsent | None:
    """Return the relay record a decision names, if it names one (the decision is not verified here)."""
    if not isinstance(raw, str):
        return None
    try:
        nonce = jwt.decode(raw, options={"verify_signature": False}).get("nonce")
    except jwt.PyJWTError:
        return None
    if not isinstance(nonce, str):
        return None
    return RemoteConsent.objects.filter(pk=nonce, role=RemoteConsent.Role.RELAY).first()


# --- the home's side -------------------------------------------------------------------------


async def challenge_verify(*, raw: Any, peer_origin: str, subject: str, kind: str, arguments: Any) -> tuple[dict[str, Any], Question]:
    """Check a peer gateway's challenge about the call this gateway just sent it; return it.

    The challenge must be signed by that peer (keys from its trust record, or from its origin's
    JWKS), be addressed to this gateway, unexpired, about the user this gateway asserted
    (`subject`), and about this call (`kind` and the hash of `arguments`).

    Raises:
        RemoteConsentError: it is not acceptable (`reason` says why).
    """
    header = _header(raw, CHALLENGE_TYPE)
    iss = _unverified_issuer(raw)
    try:
        key = await gateways.peer_gateway_key(iss, peer_origin, header.get("kid"))
    except gateways.AssertionRejectedError as exc:
        raise _rejected(exc) from exc
    claims = _decode(raw, key, header["alg"], iss=iss, required=["gateway", "peer", "kind", "name", "arguments_hash", "path"])
    if claims["sub"] != subject:
        raise RemoteConsentError("subject", "the challenge is about another user")
    if claims["kind"] != kind or claims["kind"] not in KINDS or claims["arguments_hash"] != arguments_hash(arguments):
        raise RemoteConsentError("other_call", "the challenge is about another call")
    texts = [claims[k] for k in ("jti", "gateway", "peer", "name")]
    path = claims["path"]
    if not all(isinstance(t, str) and t for t in texts) or not isinstance(path, list) or not all(isinstance(h, str) for h in path):
        raise RemoteConsentError("claims", "the challenge's gateway, peer, name and path must be strings")
    question = Question(claims["gateway"][:48], claims["peer"][:48], claims["kind"], claims["name"][:2000], claims.get("arguments", {}), path[:32])
    return claims, question


def decision_create(*, challenge: dict[str, Any], approve: bool, remember_seconds: int = 0) -> str:
    """Sign the user's answer to a verified challenge, for the gateway that asked."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": issuer(),
        "aud": challenge["iss"],
        "sub": challenge["sub"],
        "iat": now,
        "exp": now + DECISION_LIFETIME,
        "jti": secrets.token_urlsafe(18),
        "nonce": challenge["jti"],
        "decision": "approve" if approve else "deny",
    }
    if approve and remember_seconds:
        claims["remember"] = remember_seconds
    return _sign(claims, DECISION_TYPE)


def expires_at_of(claims: dict[str, Any]) -> datetime:
    return datetime.fromtimestamp(claims["exp"], tz=UTC)
