"""This gateway's signing key, its published JWKS, and the identity assertions it signs.

When a call goes to a peer gateway, the peer needs to know on whose behalf. The host's token
never leaves this gateway (no token passthrough); instead each forwarded call carries a
short-lived JWT signed with this gateway's own key:

    iss  this gateway's issuer (FEDMCP_ISSUER, by default FEDMCP_PUBLIC_URL)
    sub  the acting user as this gateway knows them
    aud  the peer gateway's public origin
    iat, exp (at most 60 s later), jti (random, single use)
    client_id  the client the user called this gateway with
    via  the gateways the call has passed through, this one last

The key is Ed25519 (EdDSA) or P-256 (ES256), from FEDMCP_SIGNING_KEY(_FILE) as PEM, or
generated on first use into var/signing_key.pem (0600). Its public half is served at
/.well-known/jwks.json so peers can verify.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from jwt.algorithms import ECAlgorithm, OKPAlgorithm

ACCEPTED_ALGORITHMS = ("EdDSA", "ES256")
"""Assertion algorithms this gateway signs with and accepts; asymmetric only."""
JWT_TYPE = "fedmcp-assertion+jwt"
"""`typ` header of assertions, so no other JWT signed with the same key passes for one."""


class AssertionConfigError(Exception):
    """This gateway cannot sign assertions (no issuer configured); the message says what to set."""


@dataclass(frozen=True)
class SigningKey:
    private_key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
    algorithm: str
    kid: str
    public_jwk: dict[str, str]


def _local_key_pem() -> str:
    """Return the key kept in var/signing_key.pem, creating it (0600) on first use."""
    path = settings.BASE_DIR / "var" / "signing_key.pem"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it first; use theirs
        else:
            with os.fdopen(fd, "wb") as handle:
                handle.write(pem)
    return path.read_text()


def jwk_thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638 thumbprint of a public JWK (its `kid` here)."""
    required = {"OKP": ("crv", "kty", "x"), "EC": ("crv", "kty", "x", "y")}[jwk["kty"]]
    canonical = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


@functools.lru_cache(maxsize=4)
def _load(pem: str) -> SigningKey:
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise ImproperlyConfigured("FEDMCP_SIGNING_KEY must be an unencrypted PEM private key (Ed25519 or P-256)") from exc
    if isinstance(key, ed25519.Ed25519PrivateKey):
        algorithm, jwk = "EdDSA", json.loads(OKPAlgorithm.to_jwk(key.public_key()))
    elif isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        algorithm, jwk = "ES256", json.loads(ECAlgorithm.to_jwk(key.public_key()))
    else:
        raise ImproperlyConfigured("FEDMCP_SIGNING_KEY must be an Ed25519 or P-256 (ES256) private key")
    public = {k: v for k, v in jwk.items() if k in ("kty", "crv", "x", "y")}
    kid = jwk_thumbprint(public)
    return SigningKey(key, algorithm, kid, {**public, "kid": kid, "use": "sig", "alg": algorithm})


def signing_key() -> SigningKey:
    return _load(settings.FEDMCP_SIGNING_KEY or _local_key_pem())


def jwks() -> dict[str, Any]:
    """The JWK Set peers verify this gateway's assertions with."""
    return {"keys": [signing_key().public_jwk]}


def issuer() -> str:
    """This gateway's issuer.

    Raises:
        AssertionConfigError: neither FEDMCP_ISSUER nor FEDMCP_PUBLIC_URL is set.
    """
    value = settings.FEDMCP_ISSUER or settings.FEDMCP_PUBLIC_URL.rstrip("/")
    if not value:
        raise AssertionConfigError("this gateway has no issuer: set FEDMCP_PUBLIC_URL (or FEDMCP_ISSUER) to call peer gateways")
    return value


def assertion_create(*, subject: str, audience: str, client_id: str, via: list[str]) -> str:
    """Sign an assertion that `subject` acts through this gateway, for the gateway at `audience`.

    Raises:
        AssertionConfigError: this gateway has no issuer configured.
    """
    key = signing_key()
    now = int(time.time())
    claims = {
        "iss": issuer(),
        "sub": subject,
        "aud": audience,
        "iat": now,
        "exp": now + settings.FEDMCP_ASSERTION_LIFETIME,
        "jti": secrets.token_urlsafe(18),
        "client_id": client_id,
        "via": via,
    }
    return jwt.encode(claims, key.private_key, algorithm=key.algorithm, headers={"kid": key.kid, "typ": JWT_TYPE})


class JwtRejectedError(Exception):
    """A gateway JWT that does not verify; `reason` is one word for it, `claim` the missing claim's name."""

    def __init__(self, reason: str, claim: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.claim = claim


def jwt_verify(raw: str, key: jwt.PyJWK, algorithm: str, *, issuer: str, required: list[str], leeway: float, audience: str | None = None) -> dict[str, Any]:
    """Verify a JWT another gateway signed: signature, issuer, the `required` claims, time, and `audience` if given.

    The one place gateway JWTs (assertions, consent challenges and decisions, deferral proofs)
    are verified; each caller words the reasons for its own readers.

    Raises:
        JwtRejectedError: reason `signature` (also an algorithm that does not fit the key),
            `expired`, `not_yet_valid`, `audience`, `issuer`, `claims` (`claim` names it) or `malformed`.
    """
    if key.algorithm_name != algorithm:
        raise JwtRejectedError("signature")
    options: dict[str, Any] = {"require": required}
    if audience is None:
        options["verify_aud"] = False
    try:
        return jwt.decode(raw, key=key.key, algorithms=[algorithm], issuer=issuer, audience=audience, leeway=leeway, options=options)
    except jwt.ExpiredSignatureError as exc:
        raise JwtRejectedError("expired") from exc
    except jwt.ImmatureSignatureError as exc:
        raise JwtRejectedError("not_yet_valid") from exc
    except jwt.InvalidAudienceError as exc:
        raise JwtRejectedError("audience") from exc
    except jwt.InvalidIssuerError as exc:
        raise JwtRejectedError("issuer") from exc
    except jwt.InvalidSignatureError as exc:
        raise JwtRejectedError("signature") from exc
    except jwt.MissingRequiredClaimError as exc:
        raise JwtRejectedError("claims", exc.claim) from exc
    except jwt.PyJWTError as exc:
        raise JwtRejectedError("malformed") from exc

