"""Where a sampling or elicitation request left to the user's home gateway comes from, and who vouches for it.

A gateway that leaves an upstream's request to the user's home gateway (docs/CONSENT.md
"Across gateways") marks it `_meta["io.fedmcp/consent-deferred"]` with what it knows
(`mark_create`): its own name and issuer, the upstream server (its peer) that sent the request,
the call during which it came, and a **proof**: the same, signed with its assertion key
(`typ: fedmcp-consent-deferral+jwt`), bound to the request's content (`request_hash`, the
SHA-256 of its canonical JSON without `_meta`), the kind, and the user as that gateway knows them.
Gateways on the way pass the mark on unchanged.

The home can vouch only for its own peer: anything further along is that peer's word. So when
it asks its user, it names the source as far as it can check it (`source_of`):

* `peer`: the proof is signed by the peer gateway the call went to (keys as for a consent
  challenge: its trust record, else its origin's JWKS). The peer deferred the request itself.
* `signature`: the proof is signed by another gateway, one this gateway trusts (an enabled
  `TrustedGateway`, identity/trust/gateways.py; shown by the name the administrator gave it). It came
  through the peer, which could not have forged it.
* `reported`: anything else (no proof, one signed by a gateway this one does not trust, one
  that does not verify, or a bare name from an older gateway): the mark's claims are shown as
  the peer's report, "not verified", with the reason.

The source is shown, never obeyed: consent is still decided by the policy for the peer the
call went to (its grants and policies name that peer).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jwt

from identity.call_digest import arguments_hash
from identity.hostauth.tokens import Identity
from identity.models import TrustedGateway
from identity.trust import gateways
from identity.trust.signing import ACCEPTED_ALGORITHMS, AssertionConfigError, JwtRejectedError, issuer, jwt_verify, signing_key

logger = logging.getLogger(__name__)

PROOF_TYPE = "fedmcp-consent-deferral+jwt"
"""`typ` of a deferral proof, so no other JWT of the same key passes for one."""
PROOF_LIFETIME = 60
"""Seconds a proof is good for: the home checks it as the request arrives."""
PEER = "peer"
SIGNATURE = "signature"
REPORTED = "reported"
"""How far the home vouches for a source (module docstring); identity/consent/upstream_requests.py `source_text` says it in words."""
UNTRUSTED = "signed by a gateway this one does not trust"
NOT_SIGNED = "not signed"
LIMITS = {"gateway": 48, "issuer": 2000, "server": 48, "call": 2000}
"""What of a mark's claims is kept, and how long each may be (the prompt's own field sizes)."""


class DeferralProofError(Exception):
    """A deferral proof cannot be used; `note` says why, for the consent page."""

    def __init__(self, note: str) -> None:
        super().__init__(note)
        self.note = note


def request_hash(params: Any) -> str:
    """SHA-256 (hex) of a request's params without `_meta`, which gateways on the way change."""
    content = {k: v for k, v in params.items() if k != "_meta"} if isinstance(params, dict) else {}
    return arguments_hash(content)


def mark_create(*, identity: Identity | None, gateway: str, server: str, call: str, kind: str, params: Any) -> dict[str, Any]:
    """Return this gateway's deferral mark for an upstream request, signed where it can sign.

    A gateway without an issuer (no FEDMCP_PUBLIC_URL) cannot sign: its mark is a plain report.
    """
    mark: dict[str, Any] = {"gateway": gateway, "issuer": "", "server": server, "call": call}
    try:
        mark["issuer"] = issuer()
    except AssertionConfigError:
        return mark
    now = int(time.time())
    claims = {
        "iss": mark["issuer"],
        "sub": identity.federated_subject if identity is not None else "",
        "iat": now,
        "exp": now + PROOF_LIFETIME,
        "gateway": gateway,
        "server": server,
        "call": call,
        "kind": kind,
        "request_hash": request_hash(params),
    }
    key = signing_key()
    mark["proof"] = jwt.encode(claims, key.private_key, algorithm=key.algorithm, headers={"kid": key.kid, "typ": PROOF_TYPE})
    return mark


def _text(value: Any, limit: int) -> str:
    return value[:limit] if isinstance(value, str) else ""


def _names_our_user(subject: Any, identity: Identity | None) -> bool:
    """Whether `subject` is our user as a gateway further along knows them.

    We assert them as `assertion_subject`; each gateway after the next one knows them as its
    neighbour asserted them, `<subject>@<issuer>` once per hop (identity/trust/gateways.py).
    """
    if identity is None or not isinstance(subject, str):
        return False
    ours = gateways.assertion_subject(identity)
    try:
        qualified = f"{ours}@{issuer()}"
    except AssertionConfigError:
        return subject == ours
    return bool(ours) and (subject in (ours, qualified) or subject.startswith(qualified + "@"))


async def _signer(raw: str, peer_origin: str) -> tuple[str, TrustedGateway | None, jwt.PyJWK, dict[str, Any]]:
    """Find who signed `raw` and their key: the peer we called, or a gateway we trust.

    Raises:
        DeferralProofError: neither, or the key is unknown or cannot be fetched.
    """
    try:
        header = jwt.get_unverified_header(raw)
        unverified = jwt.decode(raw, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise DeferralProofError("its proof is not a valid JWT") from exc
    iss = unverified.get("iss")
    if header.get("typ") != PROOF_TYPE or header.get("alg") not in ACCEPTED_ALGORITHMS or not isinstance(iss, str) or not iss:
        raise DeferralProofError("its proof is not a deferral proof")
    gateway = None
    try:
        if peer_origin and iss.rstrip("/") == peer_origin.rstrip("/"):
            key = await gateways.peer_gateway_key(iss, peer_origin, header.get("kid"))
        else:
            gateway = await TrustedGateway.objects.filter(issuer=iss.rstrip("/"), enabled=True).afirst()
            if gateway is None:
                raise DeferralProofError(UNTRUSTED)
            key = await gateways.trusted_gateway_key(gateway.issuer, header.get("kid"))
    except gateways.AssertionRejectedError as exc:
        raise DeferralProofError(f"its signer's key cannot be checked ({exc.reason})") from exc
    return iss, gateway, key, header


async def _verified(raw: Any, *, identity: Identity | None, peer_origin: str, kind: str, params: Any) -> tuple[TrustedGateway | None, dict[str, Any]]:
    """Return the proof's signer (None: the peer we called) and its verified claims.

    Raises:
        DeferralProofError: it is missing, signed by nobody we can check, forged, expired,
            or about another request or user.
    """
    if not isinstance(raw, str) or not raw:
        raise DeferralProofError(NOT_SIGNED)
    iss, gateway, key, header = await _signer(raw, peer_origin)
    try:
        claims = jwt_verify(raw, key, header["alg"], issuer=iss, leeway=gateways.LEEWAY, required=["iss", "sub", "iat", "exp", "kind", "request_hash"])
    except JwtRejectedError as exc:
        raise DeferralProofError("its proof expired" if exc.reason == "expired" else "its signature does not verify") from exc
    if not isinstance(claims["iat"], int | float) or claims["exp"] - claims["iat"] > PROOF_LIFETIME:
        raise DeferralProofError(f"its proof lives longer than {PROOF_LIFETIME}s")
    if claims["kind"] != kind or claims["request_hash"] != request_hash(params):
        raise DeferralProofError("its proof is about another request")
    if not _names_our_user(claims["sub"], identity):
        raise DeferralProofError("its proof is about another user")
    return gateway, claims


async def source_of(*, mark: Any, identity: Identity | None, peer: str, peer_origin: str, kind: str, params: Any) -> dict[str, Any]:
    """Return where a request marked `mark` by a gateway further along comes from, as far as we can vouch.

    `peer` and `peer_origin` name the peer gateway the request came through (the call went to
    it); `identity` is our user, about to be asked. The result is kept on the prompt
    (`ConsentPrompt.deferred_by`): gateway, issuer, server, call, `vouched` (`peer`,
    `signature` or `reported`), and for the last two the peer it came through (`via_peer`),
    and for `reported` why it is not verified (`note`).
    """
    if not isinstance(mark, dict):
        # An older gateway's mark: its name, nothing else, unsigned.
        return {"gateway": _text(mark, LIMITS["gateway"]), "issuer": "", "server": "", "call": "", "vouched": REPORTED, "via_peer": peer, "note": NOT_SIGNED}
    reported = {field: _text(mark.get(field), limit) for field, limit in LIMITS.items()}
    try:
        gateway, claims = await _verified(mark.get("proof"), identity=identity, peer_origin=peer_origin, kind=kind, params=params)
    except DeferralProofError as exc:
        if exc.note not in (NOT_SIGNED, UNTRUSTED):
            # A proof we could check and that failed: a broken or lying gateway on the way.
            logger.warning("peer %s relayed a %s request whose deferral proof is not usable: %s", peer, kind, exc.note)
        return {**reported, "vouched": REPORTED, "via_peer": peer, "note": exc.note}
    signed = {field: _text(claims.get(field), limit) for field, limit in LIMITS.items() if field != "issuer"}
    if gateway is None:
        return {**signed, "gateway": peer, "issuer": claims["iss"], "vouched": PEER}
    return {**signed, "gateway": gateway.name, "issuer": gateway.issuer, "vouched": SIGNATURE, "via_peer": peer}

