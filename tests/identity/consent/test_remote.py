"""Distributed consent, the signed parts: challenges from the owner, decisions from the user's home.

This gateway plays B (the owner, `B`) for `RemoteConsent` and decisions, trusting gateway A
(issuer `A`, its key given inline); and plays A (the home) for challenges, where B is a gateway
it trusts or calls. A's and B's keys are `Signer`s (tests/identity/test_assertions.py).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from django.test import TransactionTestCase, override_settings
from django.utils import timezone

from identity.consent.policy import decision_load, redact
from identity.consent.remote import (
    CHALLENGE_TYPE,
    DECISION_TYPE,
    RemoteConsentError,
    arguments_hash,
    challenge_verify,
    decision_create,
    owner_expiry,
    remote_consent_open,
    remote_consent_settle,
)
from identity.hostauth.tokens import Identity
from identity.models import ConsentGrant, ConsentPolicy, RemoteConsent
from identity.trust import gateways
from identity.trust.gateways import gateway_trust
from identity.trust.signing import jwks, signing_key
from tests.identity.oauth import FAST_HASHERS
from tests.identity.test_assertions import Signer

A = "https://a.example"
B = "https://b.example"
C = "https://c.example"
ARGS = {"query": "weather", "token": "s3cret"}


def alice_at_a(client_id: str = "a-at-b") -> Identity:
    return Identity(
        token_id=1, user_id=None, username="", application_id=None, client_id=client_id, scopes=frozenset({"mcp:tools"}),
        expires=datetime.now(UTC) + timedelta(hours=1), federated_issuer=A, federated_subject="alice", via=("a",),
    )


def sign(signer: Signer, claims: dict[str, Any], typ: str = DECISION_TYPE, key: Any = None) -> str:
    return jwt.encode(claims, key or signer.key, algorithm="EdDSA", headers={"kid": signer.kid, "typ": typ})


@override_settings(FEDMCP_PUBLIC_URL=B, FEDMCP_ISSUER=B, FEDMCP_GATEWAY_NAME="b", PASSWORD_HASHERS=FAST_HASHERS)
class OwnerTests(TransactionTestCase):
    """B asks alice@A's home about a call of `search` on B's peer `web`, and checks the answer."""

    def setUp(self) -> None:
        gateways._jwks_cache.clear()
        self.a = Signer()
        gateway_trust(name="a", issuer=A, jwks=self.a.jwks)

    async def open(self, arguments: Any = ARGS, identity: Identity | None = None) -> dict[str, Any]:
        raw = await remote_consent_open(
            identity=identity or alice_at_a(), peer="web", kind="tool", name="search", arguments=arguments,
            redacted=redact(arguments, ["token"]), expires_at=owner_expiry(60),
        )
        public = jwt.PyJWK(signing_key().public_jwk).key
        assert jwt.get_unverified_header(raw)["typ"] == CHALLENGE_TYPE
        return jwt.decode(raw, public, algorithms=["EdDSA", "ES256"], audience=A, issuer=B)

    def decision(self, challenge: dict[str, Any], *, key: Any = None, typ: str = DECISION_TYPE, **overrides: Any) -> str:
        now = int(time.time())
        claims = {
            "iss": A, "aud": B, "sub": "alice", "iat": now, "exp": now + 60,
            "jti": f"d-{now}-{id(overrides)}", "nonce": challenge["jti"], "decision": "approve",
        }
        claims.update(overrides)
        return sign(self.a, {k: v for k, v in claims.items() if v is not None}, typ, key)

    async def settle(self, raw: str, *, arguments: Any = ARGS, identity: Identity | None = None, name: str = "search") -> Any:
        return await remote_consent_settle(raw=raw, identity=identity or alice_at_a(), peer="web", kind="tool", name=name, arguments=arguments)

    async def reason(self, raw: str, **kwargs: Any) -> str:
        with pytest.raises(RemoteConsentError) as caught:
            await self.settle(raw, **kwargs)
        return caught.value.reason

    async def test_the_challenge_asks_alices_home_about_this_call_with_secrets_redacted(self) -> None:
        challenge = await self.open()

        assert (challenge["aud"], challenge["sub"], challenge["gateway"], challenge["path"]) == (A, "alice", "b", ["a", "b"])
        assert (challenge["peer"], challenge["kind"], challenge["name"]) == ("web", "tool", "search")
        assert challenge["arguments"] == {"query": "weather", "token": "[redacted]"}
        assert challenge["arguments_hash"] == arguments_hash(ARGS)
        record = await RemoteConsent.objects.aget(pk=challenge["jti"])
        assert (record.status, record.federated_issuer, record.federated_subject, record.arguments_hash) == ("pending", A, "alice", arguments_hash(ARGS))
        assert "s3cret" not in str(record.arguments)

    async def test_an_approval_from_home_is_accepted_once(self) -> None:
        challenge = await self.open()
        decision = self.decision(challenge)

        settled = await self.settle(decision)

        assert settled.approved and settled.remember_seconds == 0
        assert (await RemoteConsent.objects.aget(pk=challenge["jti"])).status == "approved"
        assert await self.reason(decision) == "replayed"
        assert not await ConsentGrant.objects.aexists()

    async def test_a_denial_is_settled_as_denied(self) -> None:
        challenge = await self.open()

        settled = await self.settle(self.decision(challenge, decision="deny"))

        assert not settled.approved
        assert (await RemoteConsent.objects.aget(pk=challenge["jti"])).status == "denied"

    async def test_remember_keeps_a_grant_for_the_federated_identity(self) -> None:
        challenge = await self.open()

        await self.settle(self.decision(challenge, remember=3600))

        grant = await ConsentGrant.objects.aget()
        assert (grant.user_id, grant.federated_issuer, grant.federated_subject, grant.peer, grant.name) == (None, A, "alice", "web", "search")
        await ConsentPolicy.objects.acreate(peer="web", decision="ask")
        decided = await decision_load(identity=alice_at_a(), peer="web", kind="tool", name="search")
        assert (decided.action, decided.label) == ("allow", "grant")
        # Someone else of A's, or alice through another client, is still asked.
        other = Identity(**{**alice_at_a().__dict__, "federated_subject": "bob"})
        assert (await decision_load(identity=other, peer="web", kind="tool", name="search")).action == "ask"

    async def test_remember_must_be_an_offered_duration(self) -> None:
        assert await self.reason(self.decision(await self.open(), remember=10**9)) == "claims"

    async def test_a_decision_for_another_call_is_refused(self) -> None:
        challenge = await self.open()
        decision = self.decision(challenge)

        assert await self.reason(decision, arguments={**ARGS, "query": "rm -rf /"}) == "other_call"
        assert await self.reason(decision, name="delete") == "other_call"
        assert await self.reason(decision, identity=alice_at_a(client_id="someone-else")) == "other_call"
        # Refusals spend nothing: the right call still goes through.
        assert (await self.settle(decision)).approved

    async def test_a_decision_about_another_user_is_refused(self) -> None:
        bobs = await self.open(identity=Identity(**{**alice_at_a().__dict__, "federated_subject": "bob"}))

        assert await self.reason(self.decision(bobs)) == "subject"
        assert await self.reason(self.decision(bobs, sub="bob")) == "subject"

    async def test_a_decision_for_another_gateway_is_refused(self) -> None:
        assert await self.reason(self.decision(await self.open(), aud=C)) == "audience"

    async def test_an_expired_decision_is_refused(self) -> None:
        now = int(time.time())
        assert await self.reason(self.decision(await self.open(), iat=now - 200, exp=now - 100)) == "expired"

    async def test_a_long_lived_decision_is_refused(self) -> None:
        now = int(time.time())
        assert await self.reason(self.decision(await self.open(), iat=now, exp=now + 3600)) == "lifetime"

    async def test_a_decision_after_the_question_expired_is_refused(self) -> None:
        challenge = await self.open()
        await RemoteConsent.objects.filter(pk=challenge["jti"]).aupdate(expires_at=timezone.now() - timedelta(seconds=1))

        assert await self.reason(self.decision(challenge)) == "expired"

    async def test_a_forged_decision_is_refused(self) -> None:
        challenge = await self.open()

        assert await self.reason(self.decision(challenge, key=ed25519.Ed25519PrivateKey.generate())) == "signature"

    async def test_only_the_users_home_gateway_may_decide(self) -> None:
        # C is trusted too, and signs with its own key: still not alice's home.
        c = Signer()
        await gateway_trust_async(name="c", issuer=C, jwks=c.jwks)
        challenge = await self.open()
        now = int(time.time())
        claims = {"iss": C, "aud": B, "sub": "alice", "iat": now, "exp": now + 60, "jti": "x", "nonce": challenge["jti"], "decision": "approve"}

        assert await self.reason(sign(c, claims)) == "issuer"
        assert await self.reason(self.decision(challenge, iss=C)) == "issuer"

    async def test_an_unknown_nonce_or_a_challenge_passed_as_decision_is_refused(self) -> None:
        challenge = await self.open()

        assert await self.reason(self.decision(challenge, nonce="made-up")) == "unknown_challenge"
        assert await self.reason(self.decision(challenge, typ=CHALLENGE_TYPE)) == "malformed"
        assert await self.reason("not a jwt") == "malformed"


async def gateway_trust_async(**kwargs: Any) -> None:
    from channels.db import database_sync_to_async

    await database_sync_to_async(gateway_trust)(**kwargs)


@override_settings(FEDMCP_PUBLIC_URL=A, FEDMCP_ISSUER=A, FEDMCP_GATEWAY_NAME="a", PASSWORD_HASHERS=FAST_HASHERS)
class HomeTests(TransactionTestCase):
    """A checks B's challenge about the call A sent B for alice, and signs alice's answer."""

    def setUp(self) -> None:
        gateways._jwks_cache.clear()
        self.b = Signer()
        gateway_trust(name="b", issuer=B, jwks=self.b.jwks)

    def challenge(self, *, key: Any = None, **overrides: Any) -> str:
        now = int(time.time())
        claims = {
            "iss": B, "aud": A, "sub": "alice", "iat": now, "exp": now + 90, "jti": "nonce-1", "gateway": "b", "peer": "web",
            "kind": "tool", "name": "search", "arguments": {"query": "weather", "token": "[redacted]"},
            "arguments_hash": arguments_hash(ARGS), "path": ["a", "b"],
        }
        claims.update(overrides)
        return sign(self.b, claims, CHALLENGE_TYPE, key)

    async def verify(self, raw: str, *, subject: str = "alice", arguments: Any = ARGS, peer_origin: str = B) -> Any:
        return await challenge_verify(raw=raw, peer_origin=peer_origin, subject=subject, kind="tool", arguments=arguments)

    async def reason(self, raw: str, **kwargs: Any) -> str:
        with pytest.raises(RemoteConsentError) as caught:
            await self.verify(raw, **kwargs)
        return caught.value.reason

    async def test_a_good_challenge_gives_the_question_to_show(self) -> None:
        claims, question = await self.verify(self.challenge())

        assert claims["jti"] == "nonce-1"
        assert (question.owner, question.peer, question.kind, question.name, question.path) == ("b", "web", "tool", "search", ["a", "b"])
        assert question.arguments == {"query": "weather", "token": "[redacted]"}

    async def test_a_challenge_about_another_call_or_user_is_refused(self) -> None:
        assert await self.reason(self.challenge(), arguments={"query": "other"}) == "other_call"
        assert await self.reason(self.challenge(kind="prompt")) == "other_call"
        assert await self.reason(self.challenge(), subject="bob") == "subject"

    async def test_a_challenge_for_another_gateway_expired_or_forged_is_refused(self) -> None:
        now = int(time.time())
        assert await self.reason(self.challenge(aud=C)) == "audience"
        assert await self.reason(self.challenge(iat=now - 300, exp=now - 100)) == "expired"
        assert await self.reason(self.challenge(key=ed25519.Ed25519PrivateKey.generate())) == "signature"

    async def test_a_challenge_signed_as_someone_other_than_the_peer_is_refused(self) -> None:
        # C is neither trusted here nor the gateway the call went to.
        assert await self.reason(self.challenge(iss=C)) == "issuer"

    async def test_a_challenge_from_a_trusted_gateway_that_is_not_the_peer_is_refused(self) -> None:
        c = Signer()
        await gateway_trust_async(name="c", issuer=C, jwks=c.jwks)
        now = int(time.time())
        claims = jwt.decode(self.challenge(), options={"verify_signature": False}) | {"iss": C, "iat": now, "exp": now + 90}

        assert await self.reason(sign(c, claims, CHALLENGE_TYPE)) == "issuer"
        assert (await self.verify(sign(c, claims, CHALLENGE_TYPE), peer_origin=C))[1].owner == "b"

    async def test_the_decision_names_the_challenge_and_is_short_lived(self) -> None:
        claims, _ = await self.verify(self.challenge())

        raw = decision_create(challenge=claims, approve=True, remember_seconds=3600)

        assert jwt.get_unverified_header(raw)["typ"] == DECISION_TYPE
        decision = jwt.decode(raw, jwt.PyJWK(signing_key().public_jwk).key, algorithms=["EdDSA", "ES256"], audience=B, issuer=A)
        assert (decision["sub"], decision["nonce"], decision["decision"], decision["remember"]) == ("alice", "nonce-1", "approve", 3600)
        assert decision["exp"] - decision["iat"] <= 60
        denial = jwt.decode(decision_create(challenge=claims, approve=False, remember_seconds=3600), options={"verify_signature": False})
        assert denial["decision"] == "deny" and "remember" not in denial


@override_settings(PASSWORD_HASHERS=FAST_HASHERS)
class RoundTripTests(TransactionTestCase):
    """The same process signs as A and verifies as B: a real decision is accepted where it belongs."""

    async def test_a_decision_signed_at_home_settles_the_owners_question(self) -> None:
        gateways._jwks_cache.clear()
        await gateway_trust_async(name="a", issuer=A, jwks=jwks())  # A's key is this process's key
        with override_settings(FEDMCP_PUBLIC_URL=B, FEDMCP_ISSUER=B, FEDMCP_GATEWAY_NAME="b"):
            raw = await remote_consent_open(
                identity=alice_at_a(), peer="web", kind="tool", name="search", arguments=ARGS, redacted={}, expires_at=owner_expiry(60)
            )
        with override_settings(FEDMCP_PUBLIC_URL=A, FEDMCP_ISSUER=A, FEDMCP_GATEWAY_NAME="a"):
            # A does not trust B here: B's keys come from B's origin, which is not reachable in a
            # unit test, so take the verified claims as A would have them.
            claims = jwt.decode(raw, jwt.PyJWK(signing_key().public_jwk).key, algorithms=["EdDSA", "ES256"], audience=A)
            decision = decision_create(challenge=claims, approve=True)
        with override_settings(FEDMCP_PUBLIC_URL=B, FEDMCP_ISSUER=B, FEDMCP_GATEWAY_NAME="b"):
            settled = await remote_consent_settle(raw=decision, identity=alice_at_a(), peer="web", kind="tool", name="search", arguments=ARGS)
        assert settled.approved
