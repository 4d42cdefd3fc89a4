"""Identity assertions: what this gateway signs and publishes, and what it accepts from a trusted gateway.

B (this gateway, `B`) trusts gateway A (issuer `A`) whose public key is given inline or fetched
from its JWKS URL through the outbound HTTP seam. A calls with its client-credentials token and
asserts alice in `_meta["io.fedmcp/assertion"]`.
"""

from __future__ import annotations

import base64
import json
import secrets
import stat
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from django.test import Client, TestCase, TransactionTestCase, override_settings
from jwt.algorithms import OKPAlgorithm

from identity.hostauth.tokens import Identity
from identity.models import FederatedIdentity, TrustedGateway, UsedAssertion
from identity.trust import gateways
from identity.trust.gateways import AssertionRejectedError, gateway_trust, identity_for_call
from identity.trust.signing import JWT_TYPE, assertion_create, jwk_thumbprint, jwks, signing_key
from mcp_endpoint import dispatcher, jsonrpc
from mcp_endpoint.context import HostContext
from tests.identity.oauth import FAST_HASHERS

A = "https://a.example"
B = "https://b.example"
C = "https://c.example"
META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}


def pem(key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()


class Signer:
    """A's signing key and the JWKS it publishes."""

    def __init__(self) -> None:
        self.key = ed25519.Ed25519PrivateKey.generate()
        public = json.loads(OKPAlgorithm.to_jwk(self.key.public_key()))
        self.kid = jwk_thumbprint(public)
        self.jwks = {"keys": [{**public, "kid": self.kid, "alg": "EdDSA", "use": "sig"}]}

    def sign(self, *, headers: dict[str, Any] | None = None, key: Any = None, algorithm: str = "EdDSA", **overrides: Any) -> str:
        now = int(time.time())
        claims = {"iss": A, "sub": "alice", "aud": B, "iat": now, "exp": now + 60, "jti": secrets.token_urlsafe(12), "client_id": "desk", "via": ["a"]}
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        return jwt.encode(claims, key or self.key, algorithm=algorithm, headers={"kid": self.kid, "typ": JWT_TYPE, **(headers or {})})


def caller_for(gateway: TrustedGateway | None, scopes: tuple[str, ...] = ("gateway", "mcp:tools")) -> Identity:
    return Identity(
        token_id=7, user_id=None, username="", application_id=gateway.application_id if gateway else 99,
        client_id=gateway.application.client_id if gateway else "someone", scopes=frozenset(scopes),
        expires=datetime.now(UTC) + timedelta(hours=1),
    )


def meta_with(assertion: str | None, hops: list[str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"io.fedmcp/hops": ["a"] if hops is None else hops}
    if assertion is not None:
        meta["io.fedmcp/assertion"] = assertion
    return meta


@override_settings(FEDMCP_PUBLIC_URL=B, PASSWORD_HASHERS=FAST_HASHERS)
class AcceptingAssertionsTests(TransactionTestCase):
    def setUp(self) -> None:
        gateways._jwks_cache.clear()
        self.signer = Signer()
        self.gateway, _ = gateway_trust(name="a", issuer=A, jwks=self.signer.jwks)
        self.caller = caller_for(self.gateway)

    async def check(
        self, assertion: str | None, *, method: str = "tools/call", hops: list[str] | None = None, caller: Identity | None = None
    ) -> Identity | None:
        meta = meta_with(assertion, hops)
        return await identity_for_call(caller=caller or self.caller, method=method, meta=meta, hops=meta["io.fedmcp/hops"])

    async def rejected(self, assertion: str | None, **kwargs: Any) -> str:
        with pytest.raises(AssertionRejectedError) as caught:
            await self.check(assertion, **kwargs)
        return caught.value.reason

    async def test_a_valid_assertion_makes_the_caller_the_federated_user(self) -> None:
        identity = await self.check(self.signer.sign())

        assert identity is not None
        assert (identity.federated_issuer, identity.federated_subject, identity.via) == (A, "alice", ("a",))
        assert (identity.user_id, identity.username, identity.client_id) == (None, "", self.caller.client_id)
        assert identity.scopes == frozenset({"mcp:tools"})  # alice is no gateway
        row = await FederatedIdentity.objects.aget(issuer=A, subject="alice")
        assert row.trusted_gateway_id == self.gateway.pk

    async def test_the_same_assertion_is_refused_the_second_time(self) -> None:
        assertion = self.signer.sign()
        await self.check(assertion)

        assert await self.rejected(assertion) == "replayed"

    async def test_an_assertion_for_another_gateway_is_refused(self) -> None:
        assert await self.rejected(self.signer.sign(aud=C)) == "audience"

    async def test_a_gateway_cannot_assert_users_of_another_issuer(self) -> None:
        assert await self.rejected(self.signer.sign(iss=C)) == "issuer"

    async def test_an_assertion_signed_by_another_key_is_refused(self) -> None:
        assert await self.rejected(self.signer.sign(key=ed25519.Ed25519PrivateKey.generate())) == "signature"

    async def test_an_expired_assertion_is_refused(self) -> None:
        now = int(time.time())
        assert await self.rejected(self.signer.sign(iat=now - 120, exp=now - 60)) == "expired"

    async def test_an_assertion_from_the_future_is_refused(self) -> None:
        now = int(time.time())
        assert await self.rejected(self.signer.sign(iat=now + 600, exp=now + 630)) == "not_yet_valid"

    async def test_a_long_lived_assertion_is_refused(self) -> None:
        now = int(time.time())
        assert await self.rejected(self.signer.sign(iat=now, exp=now + 3600)) == "lifetime"

    async def test_a_symmetric_algorithm_is_refused(self) -> None:
        forged = self.signer.sign(key="shared-secret-of-sufficient-length-for-hmac-256", algorithm="HS256")
        assert await self.rejected(forged) == "algorithm"

    async def test_an_assertion_without_a_jti_is_refused(self) -> None:
        assert await self.rejected(self.signer.sign(jti=None)) == "claims"

    async def test_garbage_is_refused(self) -> None:
        assert await self.rejected("not.a.jwt") == "malformed"

    async def test_a_path_that_differs_from_the_hop_record_is_refused(self) -> None:
        assert await self.rejected(self.signer.sign(via=["a"]), hops=["x", "a"]) == "via"

    async def test_a_trusted_gateway_must_assert_someone_to_call_a_tool(self) -> None:
        for method in gateways.USER_ACTING_METHODS:
            assert await self.rejected(None, method=method) == "missing"

    async def test_a_trusted_gateway_lists_without_an_assertion(self) -> None:
        assert await self.check(None, method="tools/list") is self.caller

    async def test_only_a_trusted_gateway_may_send_an_assertion(self) -> None:
        stranger = caller_for(None)
        host = caller_for(None, scopes=("mcp:tools",))

        assert await self.rejected(self.signer.sign(), caller=stranger) == "not_trusted"
        assert await self.rejected(self.signer.sign(), caller=host) == "not_trusted"

    async def test_a_host_without_an_assertion_stays_itself(self) -> None:
        host = caller_for(None, scopes=("mcp:tools",))

        assert await self.check(None, caller=host) is host

    async def test_a_disabled_trust_accepts_nothing(self) -> None:
        await TrustedGateway.objects.filter(pk=self.gateway.pk).aupdate(enabled=False)

        assert await self.rejected(self.signer.sign()) == "not_trusted"

    async def test_used_assertions_are_pruned_after_they_expire(self) -> None:
        await UsedAssertion.objects.acreate(issuer=A, jti="old", expires_at=datetime.now(UTC) - timedelta(minutes=5))
        gateways._last_prune = 0.0

        await self.check(self.signer.sign())

        assert not await UsedAssertion.objects.filter(jti="old").aexists()
        assert await UsedAssertion.objects.acount() == 1


class FakeJwks:
    """A trusted gateway's JWKS endpoint behind the outbound HTTP seam."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.fetches = 0

    def client(self, **_: Any) -> httpx.AsyncClient:
        def handle(request: httpx.Request) -> httpx.Response:
            self.fetches += 1
            assert str(request.url) == "http://127.0.0.1:9/.well-known/jwks.json"
            return httpx.Response(200, json=self.document)

        return httpx.AsyncClient(transport=httpx.MockTransport(handle))


@override_settings(FEDMCP_PUBLIC_URL=B, PASSWORD_HASHERS=FAST_HASHERS)
class FetchedKeysTests(TransactionTestCase):
    def setUp(self) -> None:
        gateways._jwks_cache.clear()
        self.signer = Signer()
        self.gateway, _ = gateway_trust(name="a", issuer="http://127.0.0.1:9")
        self.caller = caller_for(self.gateway)
        self.jwks = FakeJwks(self.signer.jwks)
        patcher = mock.patch("identity.trust.gateways.outbound_client", self.jwks.client)
        patcher.start()
        self.addCleanup(patcher.stop)

    async def check(self, assertion: str) -> Identity | None:
        return await identity_for_call(caller=self.caller, method="tools/call", meta=meta_with(assertion), hops=["a"])

    async def test_keys_are_fetched_from_the_issuer_once_and_cached(self) -> None:
        for _ in range(3):
            identity = await self.check(self.signer.sign(iss="http://127.0.0.1:9"))
            assert identity is not None and identity.federated_subject == "alice"

        assert self.jwks.fetches == 1

    async def test_a_new_key_is_picked_up_by_refetching(self) -> None:
        await self.check(self.signer.sign(iss="http://127.0.0.1:9"))
        rotated = Signer()
        self.jwks.document = rotated.jwks
        gateways._jwks_cache[self.gateway.pk].fetched_at -= gateways.JWKS_REFETCH_INTERVAL + 1

        identity = await self.check(rotated.sign(iss="http://127.0.0.1:9"))

        assert identity is not None and self.jwks.fetches == 2

    async def test_a_symmetric_key_in_the_jwks_does_not_let_anyone_sign(self) -> None:
        shared = "s" * 40
        k = base64.urlsafe_b64encode(shared.encode()).rstrip(b"=").decode()
        self.jwks.document = {"keys": [*self.signer.jwks["keys"], {"kty": "oct", "k": k, "kid": "shared", "alg": "HS256"}]}
        forged = self.signer.sign(iss="http://127.0.0.1:9", key=shared, algorithm="HS256", headers={"kid": "shared"})

        with pytest.raises(AssertionRejectedError) as caught:
            await self.check(forged)

        assert caught.value.reason == "algorithm"


@override_settings(FEDMCP_PUBLIC_URL=A, FEDMCP_ISSUER=A)
class SigningTests(TestCase):
    def test_assertions_are_short_lived_single_use_and_name_the_path(self) -> None:
        first = assertion_create(subject="alice", audience=B, client_id="desk", via=["a"])
        second = assertion_create(subject="alice", audience=B, client_id="desk", via=["a"])
        key = signing_key()

        claims = jwt.decode(first, key.private_key.public_key(), algorithms=[key.algorithm], audience=B)
        header = jwt.get_unverified_header(first)

        assert (claims["iss"], claims["sub"], claims["aud"], claims["client_id"], claims["via"]) == (A, "alice", B, "desk", ["a"])
        assert 0 < claims["exp"] - claims["iat"] <= 60
        assert claims["jti"] != jwt.decode(second, options={"verify_signature": False})["jti"]
        assert (header["alg"], header["typ"], header["kid"]) == ("EdDSA", JWT_TYPE, key.kid)

    def test_the_jwks_endpoint_publishes_the_public_key_only(self) -> None:
        response = Client().get("/.well-known/jwks.json")

        assert response.status_code == 200
        (published,) = response.json()["keys"]
        assert published == jwks()["keys"][0]
        assert "d" not in published and published["kid"] == signing_key().kid and published["alg"] == "EdDSA"

    def test_a_p256_key_from_the_environment_signs_es256(self) -> None:
        with override_settings(FEDMCP_SIGNING_KEY=pem(ec.generate_private_key(ec.SECP256R1()))):
            token = assertion_create(subject="alice", audience=B, client_id="desk", via=["a"])
            assert jwt.get_unverified_header(token)["alg"] == "ES256"
            assert jwks()["keys"][0]["kty"] == "EC"

    def test_without_an_issuer_no_assertion_is_made(self) -> None:
        from identity.trust.signing import AssertionConfigError

        with override_settings(FEDMCP_ISSUER="", FEDMCP_PUBLIC_URL=""), pytest.raises(AssertionConfigError):
            assertion_create(subject="alice", audience=B, client_id="desk", via=["a"])


def test_without_configuration_a_signing_key_is_generated_once_into_var_with_mode_0600(tmp_path: Path) -> None:
    with override_settings(FEDMCP_SIGNING_KEY="", BASE_DIR=tmp_path):
        first, second = signing_key(), signing_key()

    key_file = tmp_path / "var" / "signing_key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert first.kid == second.kid


class NullOutbound:
    can_request = False

    async def send(self, message: dict[str, Any]) -> None:  # pragma: no cover - nothing is sent here
        raise AssertionError(message)


@override_settings(FEDMCP_PUBLIC_URL=B, PASSWORD_HASHERS=FAST_HASHERS)
class DispatcherTests(TransactionTestCase):
    def setUp(self) -> None:
        gateways._jwks_cache.clear()
        self.signer = Signer()
        self.gateway, _ = gateway_trust(name="a", issuer=A, jwks=self.signer.jwks)

    async def ask(self, meta: dict[str, Any]) -> dict[str, Any]:
        ctx = HostContext(
            era="modern", protocol_version="2026-07-28", transport="streamable-http", scope="", outbound=NullOutbound(),
            identity=caller_for(self.gateway),
        )
        message = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "x__y", "arguments": {}, "_meta": {**META, **meta}}}
        return await dispatcher.handle_request(ctx, message)

    async def test_a_rejected_assertion_is_answered_32015_with_its_reason(self) -> None:
        reply = await self.ask(meta_with(self.signer.sign(aud=C)))

        assert reply["error"]["code"] == jsonrpc.INVALID_ASSERTION
        assert reply["error"]["data"] == {"reason": "audience"}

    async def test_a_missing_assertion_is_answered_32015(self) -> None:
        reply = await self.ask(meta_with(None))

        assert reply["error"]["code"] == jsonrpc.INVALID_ASSERTION
        assert reply["error"]["data"] == {"reason": "missing"}

    async def test_an_accepted_assertion_reaches_the_handler(self) -> None:
        reply = await self.ask(meta_with(self.signer.sign()))

        # Past the identity check, the unknown tool is the handler's business.
        assert reply["error"]["code"] == jsonrpc.INVALID_PARAMS
