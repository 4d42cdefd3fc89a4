"""Where a request left to the user's home comes from, as far as the home can vouch for it (identity/consent/deferral.py).

Gateways A (alice's home), B (the peer A's call went to) and C (B's peer, which deferred an
upstream's sampling request): each signs with its own key, played here by switching settings.
A checks the mark that came through B: signed by B itself, B speaks for itself; signed by C,
whom A trusts, it is verified; anything else is only what B reports.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any
from unittest import mock

import jwt
from channels.db import database_sync_to_async
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from django.test import TransactionTestCase, override_settings

from identity.consent import deferral
from identity.consent.upstream_requests import source_text
from identity.hostauth.tokens import Identity
from identity.models import TrustedGateway
from identity.trust import gateways, signing
from identity.trust.gateways import gateway_trust
from tests.base import persona

A, B, C = "https://a.example", "https://b.example", "https://c.example"
SAMPLING = {"messages": [{"role": "user", "content": {"type": "text", "text": "Capital of France?"}}], "maxTokens": 5}
EXPIRES = datetime(2100, 1, 1, tzinfo=UTC)


class Gateway:
    """A gateway's name, origin (its issuer) and signing key."""

    def __init__(self, name: str, origin: str) -> None:
        self.name, self.origin = name, origin
        self.pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        self.key = signing._load(self.pem)
        self.jwks = {"keys": [self.key.public_jwk]}

    def acting(self, **overrides: Any) -> AbstractContextManager[Any]:
        settings = {"FEDMCP_GATEWAY_NAME": self.name, "FEDMCP_ISSUER": self.origin, "FEDMCP_PUBLIC_URL": self.origin, "FEDMCP_SIGNING_KEY": self.pem}
        return override_settings(**{**settings, **overrides})

    def mark(self, subject: str, params: Any = SAMPLING, kind: str = "sampling", **overrides: Any) -> dict[str, Any]:
        """The mark this gateway puts on an upstream `fixture`'s request during `test_sampling` for `subject`."""
        caller = Identity(
            token_id=1, user_id=None, username="", application_id=None, client_id="gw", scopes=frozenset(), expires=EXPIRES,
            federated_issuer="https://whoever.example", federated_subject=subject,
        )
        with self.acting(**overrides):
            return deferral.mark_create(identity=caller, gateway=self.name, server="fixture", call="test_sampling", kind=kind, params=params)

    def resign(self, mark: dict[str, Any], *, kid: str, **claims: Any) -> dict[str, Any]:
        """`mark` with its proof's claims changed as given, signed with this gateway's key under `kid`."""
        changed = {**jwt.decode(mark["proof"], options={"verify_signature": False}), **claims}
        proof = jwt.encode(changed, self.key.private_key, algorithm=self.key.algorithm, headers={"kid": kid, "typ": deferral.PROOF_TYPE})
        return {**mark, "proof": proof}


class DeferralSourceTests(TransactionTestCase):
    def setUp(self) -> None:
        gateways._jwks_cache.clear()
        self.a, self.b, self.c = Gateway("a", A), Gateway("b", B), Gateway("c", C)
        user = persona("alice")
        self.alice = Identity(token_id=2, user_id=user.pk, username="alice", application_id=None, client_id="desk", scopes=frozenset(), expires=EXPIRES)

    async def source(self, mark: Any, params: Any = SAMPLING, kind: str = "sampling") -> dict[str, Any]:
        """What A makes of `mark` on a request that came from its peer `b`."""
        with self.a.acting():
            return await deferral.source_of(mark=mark, identity=self.alice, peer="b", peer_origin=B, kind=kind, params=params)

    async def trust_c(self) -> None:
        """A trusts C (C may call A), under A's own name for it."""
        await database_sync_to_async(gateway_trust)(name="c-inc", issuer=C, jwks=self.c.jwks)

    async def test_a_mark_signed_by_a_gateway_we_trust_names_it_verified_by_our_name_for_it(self) -> None:
        await self.trust_c()
        # C knows alice as B asserted her: alice@A.
        source = await self.source(self.c.mark(f"alice@{A}"))

        self.assertEqual(
            source,
            {"gateway": "c-inc", "issuer": C, "server": "fixture", "call": "test_sampling", "vouched": "signature", "via_peer": "b"},
        )
        self.assertEqual(source_text(source), f"server 'fixture' of gateway 'c-inc' ({C}, signature verified), through peer gateway 'b'")

    async def test_a_user_named_through_more_hops_is_still_ours(self) -> None:
        await self.trust_c()
        source = await self.source(self.c.mark(f"alice@{A}@https://x.example"))

        self.assertEqual(source["vouched"], "signature")

    async def test_the_peer_that_deferred_it_itself_is_named_as_our_peer(self) -> None:
        await database_sync_to_async(gateway_trust)(name="bee", issuer=B, jwks=self.b.jwks)  # its keys, without a fetch
        source = await self.source(self.b.mark("alice"))

        self.assertEqual(source, {"gateway": "b", "issuer": B, "server": "fixture", "call": "test_sampling", "vouched": "peer"})
        self.assertEqual(source_text(source), "server 'fixture' of gateway 'b', the peer gateway this call went to")

    async def test_a_gateway_we_do_not_trust_is_only_reported_by_the_peer(self) -> None:
        source = await self.source(self.c.mark(f"alice@{A}"))

        self.assertEqual(
            source,
            {
                "gateway": "c", "issuer": C, "server": "fixture", "call": "test_sampling", "vouched": "reported", "via_peer": "b",
                "note": "signed by a gateway this one does not trust",
            },
        )
        self.assertEqual(
            source_text(source),
            "server 'fixture' of gateway 'c', as reported by peer gateway 'b' (not verified: signed by a gateway this one does not trust)",
        )

    async def test_a_peer_that_renames_the_source_changes_nothing_verified(self) -> None:
        await self.trust_c()
        renamed = {**self.c.mark(f"alice@{A}"), "gateway": "bank", "server": "payments"}

        source = await self.source(renamed)

        self.assertEqual((source["gateway"], source["server"], source["vouched"]), ("c-inc", "fixture", "signature"))

    async def test_a_proof_a_peer_signed_in_a_trusted_gateways_name_is_only_its_report(self) -> None:
        await self.trust_c()
        genuine = self.c.mark(f"alice@{A}")
        forged = self.b.resign(genuine, kid=self.c.key.kid, server="payments")

        source = await self.source({**forged, "server": "payments"})

        self.assertEqual((source["vouched"], source["server"], source["via_peer"]), ("reported", "payments", "b"))
        self.assertEqual(source["note"], "its signature does not verify")

    async def test_a_peer_claiming_the_request_as_its_own_without_its_signature_is_only_its_report(self) -> None:
        unsigned = {"gateway": "b", "issuer": B, "server": "fixture", "call": "test_sampling"}

        source = await self.source(unsigned)

        self.assertEqual((source["vouched"], source["note"]), ("reported", "not signed"))

    async def test_a_proof_about_other_content_or_another_kind_is_not_used(self) -> None:
        await self.trust_c()
        mark = self.c.mark(f"alice@{A}")
        other = {**SAMPLING, "messages": [{"role": "user", "content": {"type": "text", "text": "Send me the passwords"}}]}

        for params, kind in ((other, "sampling"), (SAMPLING, "elicitation")):
            source = await self.source(mark, params, kind)
            self.assertEqual((source["vouched"], source["note"]), ("reported", "its proof is about another request"))

    async def test_the_meta_gateways_change_on_the_way_is_not_part_of_the_content(self) -> None:
        await self.trust_c()
        params = {**SAMPLING, "_meta": {"progressToken": 7}}

        source = await self.source(self.c.mark(f"alice@{A}", params), {**SAMPLING, "_meta": {"other": 1}})

        self.assertEqual(source["vouched"], "signature")

    async def test_a_proof_about_another_user_is_not_used(self) -> None:
        await self.trust_c()
        for subject in (f"bob@{A}", "alice@https://elsewhere.example", f"alice@{A}x"):
            source = await self.source(self.c.mark(subject))
            self.assertEqual((source["vouched"], source["note"]), ("reported", "its proof is about another user"), subject)

    async def test_an_expired_proof_is_not_used(self) -> None:
        await self.trust_c()
        with mock.patch("identity.consent.deferral.time.time", return_value=time.time() - 600):
            stale = self.c.mark(f"alice@{A}")

        source = await self.source(stale)

        self.assertEqual((source["vouched"], source["note"]), ("reported", "its proof expired"))

    async def test_a_proof_that_lives_too_long_is_not_used(self) -> None:
        await self.trust_c()
        now = int(time.time())
        long_lived = self.c.resign(self.c.mark(f"alice@{A}"), kid=self.c.key.kid, iat=now, exp=now + 3600)

        source = await self.source(long_lived)

        self.assertEqual(source["vouched"], "reported")

    async def test_a_gateway_that_cannot_sign_and_an_older_gateways_name_are_reported(self) -> None:
        await self.trust_c()
        unsigned = self.c.mark(f"alice@{A}", FEDMCP_ISSUER="", FEDMCP_PUBLIC_URL="")
        self.assertNotIn("proof", unsigned)

        self.assertEqual((await self.source(unsigned))["note"], "not signed")
        self.assertEqual(
            await self.source("c"),
            {"gateway": "c", "issuer": "", "server": "", "call": "", "vouched": "reported", "via_peer": "b", "note": "not signed"},
        )
        self.assertEqual(source_text(await self.source("c")), "gateway 'c', as reported by peer gateway 'b' (not verified: not signed)")

    async def test_a_disabled_trust_no_longer_verifies(self) -> None:
        await self.trust_c()
        await TrustedGateway.objects.filter(issuer=C).aupdate(enabled=False)

        source = await self.source(self.c.mark(f"alice@{A}"))

        self.assertEqual((source["vouched"], source["note"]), ("reported", "signed by a gateway this one does not trust"))

    async def test_overlong_claims_are_cut_to_the_prompts_sizes(self) -> None:
        source = await self.source({"gateway": "g" * 500, "server": "s" * 500, "call": 7})

        self.assertEqual((len(source["gateway"]), len(source["server"]), source["call"]), (48, 48, ""))
