"""Sampling and elicitation consent left to the user's home gateway, at the consent seam.

This gateway is B when the caller is trusted gateway A acting for alice@A (she has no account
here): a request B's policy would ask about goes on to A marked `io.fedmcp/consent-deferred`
(audit word `home`) instead of being refused. It is A when the request comes *from* a peer
gateway: marked elicitations are gated with the user's policy, unmarked ones pass as before,
and the mark never reaches the host. The host is a recording stand-in for `pipeline/host.py ask_host`.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from channels.db import database_sync_to_async
from django.test import TransactionTestCase, override_settings

from identity.audit import audit_flush
from identity.consent.deferral import PROOF_TYPE, request_hash
from identity.hostauth.tokens import Identity
from identity.models import AuditEvent, ConsentPolicy, ConsentPrompt, TrustedGateway
from identity.trust import gateways
from identity.trust.gateways import gateway_trust
from identity.trust.signing import signing_key
from mcp_endpoint import jsonrpc
from mcp_endpoint.pipeline.upstream_requests import (
    DEFERRED_META_KEY,
    UpstreamCall,
    upstream_input_gate,
    upstream_input_resume,
    upstream_request_relay,
)
from tests.base import persona, verdict_of
from tests.identity.consent.test_sampling_relay import SAMPLING, Host, context
from tests.identity.test_assertions import Signer

A = "https://a.example"
B = "https://b.example"
CALL = UpstreamCall("web", "tools/call", "summarize")
FROM_GATEWAY = UpstreamCall("c", "tools/call", "web__summarize", from_gateway=True)
ELICITATION = {"message": "Your name?", "requestedSchema": {"type": "object", "properties": {"name": {"type": "string"}}}}
MARKED = {**ELICITATION, "_meta": {DEFERRED_META_KEY: "c", "other": 1}}
EXPIRES = datetime.now(UTC) + timedelta(days=1)
ASK = {"FEDMCP_CONSENT_SAMPLING_DEFAULT": "ask", "FEDMCP_CONSENT_ELICITATION_DEFAULT": "ask"}
"""The shipped defaults (tests/conftest.py allows everything unless a test says otherwise)."""


B_MARK = {"gateway": "b", "issuer": "", "server": "web", "call": "summarize"}
"""B's mark for a request of its upstream `web` during `summarize`; unsigned, as B has no issuer here."""


def marked(params: dict[str, Any]) -> dict[str, Any]:
    return {**params, "_meta": {DEFERRED_META_KEY: B_MARK}}


class Answers(Host):
    """A host (gateway A) that answers with a fixed reply."""

    def __init__(self, reply: dict[str, Any]) -> None:
        super().__init__()
        self.reply = reply

    async def __call__(self, ctx: Any, method: str, params: Any) -> dict[str, Any]:
        self.asked.append((method, params))
        return self.reply


class Audited(TransactionTestCase):
    async def audited(self) -> list[tuple[str, str, str, int | None]]:
        await audit_flush()
        return [(e.method, e.name, e.decision, e.error_code) async for e in AuditEvent.objects.order_by("at")]


class OwnerDefersTests(Audited):
    """This gateway is B; its caller is trusted gateway A, acting for alice@A."""

    def setUp(self) -> None:
        super().setUp()
        self.enterContext(override_settings(FEDMCP_GATEWAY_NAME="b", **ASK))
        self.gateway, _ = gateway_trust(name="a", issuer=A, jwks=Signer().jwks)
        self.alice_at_a = Identity(
            token_id=5, user_id=None, username="", application_id=self.gateway.application_id, client_id=self.gateway.application.client_id,
            scopes=frozenset({"mcp:tools"}), expires=EXPIRES, federated_issuer=A, federated_subject="alice", via=("a",),
        )

    async def test_an_ask_is_passed_to_the_home_gateway_marked(self) -> None:
        host = Host()

        reply = await upstream_request_relay(context(identity=self.alice_at_a), CALL, "sampling/createMessage", SAMPLING, host)

        self.assertIn("result", reply)
        self.assertEqual(host.asked, [("sampling/createMessage", marked(SAMPLING))])
        self.assertFalse(await ConsentPrompt.objects.aexists())
        self.assertEqual(await self.audited(), [("sampling/createMessage", "summarize", "home", None)])

    async def test_a_gateway_with_an_issuer_signs_its_mark_for_this_request_and_user(self) -> None:
        host = Host()
        with override_settings(FEDMCP_PUBLIC_URL=B, FEDMCP_ISSUER=B):
            await upstream_request_relay(context(identity=self.alice_at_a), CALL, "sampling/createMessage", SAMPLING, host)

        [(_, params)] = host.asked
        mark = params["_meta"][DEFERRED_META_KEY]
        self.assertEqual({k: v for k, v in mark.items() if k != "proof"}, {**B_MARK, "issuer": B})
        key = signing_key()
        claims = jwt.decode(mark["proof"], key.private_key.public_key(), algorithms=[key.algorithm], options={"verify_aud": False})
        self.assertEqual(
            {k: claims[k] for k in ("iss", "sub", "gateway", "server", "call", "kind", "request_hash")},
            {"iss": B, "sub": "alice", "gateway": "b", "server": "web", "call": "summarize", "kind": "sampling", "request_hash": request_hash(SAMPLING)},
        )
        self.assertEqual(jwt.get_unverified_header(mark["proof"])["typ"], PROOF_TYPE)

    async def test_an_elicitation_is_deferred_too(self) -> None:
        host = Host()

        await upstream_request_relay(context(identity=self.alice_at_a), CALL, "elicitation/create", ELICITATION, host)

        self.assertEqual(host.asked, [("elicitation/create", marked(ELICITATION))])
        self.assertEqual(await self.audited(), [("elicitation/create", "summarize", "home", None)])

    async def test_the_homes_refusal_is_the_upstreams_answer(self) -> None:
        refusal = {"error": {"code": jsonrpc.CONSENT_DENIED, "message": "The user denied it", "data": {"consentId": "x"}}}

        reply = await upstream_request_relay(context(identity=self.alice_at_a), CALL, "sampling/createMessage", SAMPLING, Answers(refusal))

        self.assertEqual(reply, refusal)
        self.assertEqual(await self.audited(), [("sampling/createMessage", "summarize", "home", jsonrpc.CONSENT_DENIED)])

    async def test_a_deny_policy_refuses_without_asking_anyone(self) -> None:
        await ConsentPolicy.objects.acreate(peer="web", kind="sampling", federated_issuer=A, decision="deny")
        host = Host()

        reply = await upstream_request_relay(context(identity=self.alice_at_a), CALL, "sampling/createMessage", SAMPLING, host)

        self.assertEqual(reply["error"]["code"], jsonrpc.CONSENT_DENIED)
        self.assertEqual(host.asked, [])
        self.assertEqual(await self.audited(), [("sampling/createMessage", "summarize", "deny", jsonrpc.CONSENT_DENIED)])

    async def test_an_allow_policy_relays_unmarked(self) -> None:
        await ConsentPolicy.objects.acreate(peer="web", kind="sampling", federated_issuer=A, decision="allow")
        host = Host()

        await upstream_request_relay(context(identity=self.alice_at_a), CALL, "sampling/createMessage", SAMPLING, host)

        self.assertEqual(host.asked, [("sampling/createMessage", SAMPLING)])
        self.assertEqual(await self.audited(), [("sampling/createMessage", "summarize", "allow", None)])

    async def test_a_user_whose_gateway_is_no_longer_trusted_is_refused_as_before(self) -> None:
        await TrustedGateway.objects.filter(pk=self.gateway.pk).aupdate(enabled=False)
        host = Host()

        reply = await upstream_request_relay(context(identity=self.alice_at_a), CALL, "sampling/createMessage", SAMPLING, host)

        self.assertEqual((reply["error"]["code"], reply["error"]["data"]["reason"]), (jsonrpc.CONSENT_DENIED, "no local user to ask"))
        self.assertEqual(host.asked, [])

    async def test_a_federated_identity_of_another_gateways_token_has_no_home_here(self) -> None:
        other, _ = await database_sync_to_async(gateway_trust)(name="z", issuer="https://z.example", jwks=Signer().jwks)
        borrowed = replace(self.alice_at_a, application_id=other.application_id)

        self.assertIsNone(await gateways.home_gateway(borrowed))
        self.assertEqual(await gateways.home_gateway(self.alice_at_a), self.gateway)

    async def test_a_linked_user_is_asked_here_not_at_home(self) -> None:
        alice = await database_sync_to_async(persona)("alice")
        linked = replace(self.alice_at_a, user_id=alice.pk, username="alice")

        self.assertIsNone(await gateways.home_gateway(linked))

    async def test_a_2026_result_goes_on_with_the_deferred_requests_marked(self) -> None:
        result = {
            "resultType": "input_required",
            "inputRequests": {"llm": {"method": "sampling/createMessage", "params": SAMPLING}, "roots": {"method": "roots/list"}},
            "requestState": "upstream-state",
        }

        passed = await verdict_of(upstream_input_gate(context("modern", self.alice_at_a), CALL, result))

        self.assertEqual(passed["inputRequests"]["llm"], {"method": "sampling/createMessage", "params": marked(SAMPLING)})
        self.assertEqual((passed["inputRequests"]["roots"], passed["requestState"]), ({"method": "roots/list"}, "upstream-state"))
        self.assertNotIn(DEFERRED_META_KEY, str(result))  # the upstream's own result is left alone
        self.assertFalse(await ConsentPrompt.objects.aexists())
        self.assertEqual(await self.audited(), [("sampling/createMessage", "summarize", "home", None)])

    async def test_a_2026_deny_policy_still_fails_the_call(self) -> None:
        await ConsentPolicy.objects.acreate(kind="elicitation", decision="deny")
        result = {"resultType": "input_required", "inputRequests": {"q": {"method": "elicitation/create", "params": ELICITATION}}}

        with self.assertRaises(jsonrpc.ConsentDeniedError):
            await verdict_of(upstream_input_gate(context("modern", self.alice_at_a), CALL, result))
        self.assertEqual(await self.audited(), [("elicitation/create", "summarize", "deny", jsonrpc.CONSENT_DENIED)])

    async def test_on_the_way_home_a_peer_gateways_mark_travels_on(self) -> None:
        # A -> B -> C: C deferred; B allows, and its caller is a gateway too, so A must still ask.
        host = Host()
        with override_settings(FEDMCP_CONSENT_ELICITATION_DEFAULT="allow"):
            await upstream_request_relay(context(identity=self.alice_at_a), FROM_GATEWAY, "elicitation/create", MARKED, host)
            await upstream_request_relay(context(identity=self.alice_at_a), CALL, "elicitation/create", MARKED, host)

        self.assertEqual(host.asked, [("elicitation/create", MARKED), ("elicitation/create", {**ELICITATION, "_meta": {"other": 1}})])
        self.assertEqual(await self.audited(), [("elicitation/create", "web__summarize", "allow", None), ("elicitation/create", "summarize", "allow", None)])


class HomeGatesTests(Audited):
    """This gateway is A: alice's own; her call went to peer gateway C, which sends requests back."""

    def setUp(self) -> None:
        super().setUp()
        self.enterContext(override_settings(FEDMCP_GATEWAY_NAME="a", **ASK))
        alice = persona("alice")
        self.alice = Identity(token_id=1, user_id=alice.pk, username="alice", application_id=None, client_id="desk", scopes=frozenset(), expires=EXPIRES)

    async def test_a_marked_elicitation_from_a_peer_gateway_is_gated(self) -> None:
        await ConsentPolicy.objects.acreate(peer="c", kind="elicitation", decision="deny")
        host = Host()

        reply = await upstream_request_relay(context(identity=self.alice), FROM_GATEWAY, "elicitation/create", MARKED, host)

        self.assertEqual(reply["error"]["code"], jsonrpc.CONSENT_DENIED)
        self.assertEqual(host.asked, [])
        self.assertEqual(await self.audited(), [("elicitation/create", "web__summarize", "deny", jsonrpc.CONSENT_DENIED)])

    async def test_an_allowed_one_reaches_the_host_without_the_mark(self) -> None:
        await ConsentPolicy.objects.acreate(peer="c", kind="elicitation", decision="allow")
        host = Host()

        await upstream_request_relay(context(identity=self.alice), FROM_GATEWAY, "elicitation/create", MARKED, host)

        self.assertEqual(host.asked, [("elicitation/create", {**ELICITATION, "_meta": {"other": 1}})])

    async def test_an_unmarked_elicitation_from_a_peer_gateway_is_relayed_unasked(self) -> None:
        host = Host()
        with override_settings(FEDMCP_CONSENT_ELICITATION_DEFAULT="deny"):
            reply = await upstream_request_relay(context(identity=self.alice), FROM_GATEWAY, "elicitation/create", ELICITATION, host)

        self.assertIn("result", reply)
        self.assertEqual(host.asked, [("elicitation/create", ELICITATION)])
        self.assertEqual(await self.audited(), [])

    async def test_a_plain_upstreams_mark_counts_for_nothing(self) -> None:
        # Its elicitations are gated anyway; the mark is not passed on to the host.
        host = Host()
        with override_settings(FEDMCP_CONSENT_ELICITATION_DEFAULT="allow"):
            await upstream_request_relay(context(identity=self.alice), CALL, "elicitation/create", MARKED, host)

        self.assertEqual(host.asked, [("elicitation/create", {**ELICITATION, "_meta": {"other": 1}})])
        self.assertEqual(await self.audited(), [("elicitation/create", "summarize", "allow", None)])

    async def test_a_2026_host_is_asked_about_a_marked_elicitation_and_gets_it_unmarked(self) -> None:
        result = {"resultType": "input_required", "inputRequests": {"q": {"method": "elicitation/create", "params": MARKED}}, "requestState": "c-state"}
        ctx = context("modern", self.alice)

        own = await verdict_of(upstream_input_gate(ctx, FROM_GATEWAY, result))

        prompt = await ConsentPrompt.objects.aget()
        self.assertEqual((prompt.peer, prompt.kind, prompt.name, prompt.request["message"]), ("c", "elicitation", "web__summarize", "Your name?"))
        # An older gateway's mark, a bare name: the page and the host's pointer say it is only the peer's word.
        self.assertEqual((prompt.deferred_by["gateway"], prompt.deferred_by["vouched"], prompt.deferred_by["via_peer"]), ("c", "reported", "c"))
        [pointer] = own["inputRequests"].values()
        self.assertIn("from gateway 'c', as reported by peer gateway 'c' (not verified: not signed)", pointer["params"]["message"])
        self.assertEqual([r["params"]["elicitationId"] for r in own["inputRequests"].values()], [prompt.id])
        await ConsentPrompt.objects.filter(pk=prompt.id).aupdate(status=ConsentPrompt.Status.APPROVED)
        held = await verdict_of(upstream_input_resume(ctx, FROM_GATEWAY, {"requestState": own["requestState"]}))
        self.assertEqual(held, {**result, "inputRequests": {"q": {"method": "elicitation/create", "params": {**ELICITATION, "_meta": {"other": 1}}}}})

    async def test_a_2026_unmarked_elicitation_from_a_peer_gateway_passes_unchanged(self) -> None:
        result = {"resultType": "input_required", "inputRequests": {"q": {"method": "elicitation/create", "params": ELICITATION}}}
        with override_settings(FEDMCP_CONSENT_ELICITATION_DEFAULT="deny"):
            self.assertIs(await verdict_of(upstream_input_gate(context("modern", self.alice), FROM_GATEWAY, result)), result)
