"""Distributed consent in-process: the owner's answers on /mcp, and the home's side of a peer call.

Owner (`OwnerFlowTests`): this gateway owns the fixture as peer `everything` and asks before
`test_simple_text`; trusted gateway A (a `Signer`) calls it for alice@A through the real
dispatcher, with A's gateway token and assertions, and answers B's challenge with decisions.

Home (`HomeFlowTests`): this gateway is A; alice calls a tool of peer gateway B, faked at the
connection seam: B first answers -32019 with a challenge signed by B's key (a `Signer`; B is
trusted here, so its keys are inline), then whatever the test wants.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import replace
from typing import Any

import jwt
from channels.db import database_sync_to_async
from django.test import override_settings

from federation.upstream.base import PeerConfig
from identity.audit import audit_flush
from identity.consent.prompts import consent_prompt_answer
from identity.consent.remote import CHALLENGE_TYPE, DECISION_META_KEY, DECISION_TYPE, arguments_hash
from identity.hostauth.tokens import authenticate
from identity.models import AuditEvent, ConsentGrant, ConsentPolicy, ConsentPrompt, RemoteConsent
from identity.trust import gateways
from identity.trust.gateways import gateway_trust
from identity.trust.signing import signing_key
from mcp_endpoint import jsonrpc
from mcp_endpoint.context import HostContext
from mcp_endpoint.pipeline.home_consent import peer_request
from tests.base import AsgiTestCase, FixturePeerTestCase, McpClient, audience, mint_token, modern_meta, request, verdict_of
from tests.identity.consent.test_flow import final_message
from tests.identity.test_assertions import Signer

TOOL = "everything__test_simple_text"
A = "https://a.example"
B = "https://b.example"
WAIT = 20.0


# --- the owner ---------------------------------------------------------------------------------


class OwnerFlowTests(FixturePeerTestCase):
    def setUp(self) -> None:
        super().setUp()
        origin = audience()
        self.enterContext(override_settings(FEDMCP_PUBLIC_URL=origin, FEDMCP_ISSUER=origin, FEDMCP_CONSENT_TIMEOUT=WAIT))
        gateways._jwks_cache.clear()
        self.a = Signer()
        gateway, _ = gateway_trust(name="a", issuer=A, jwks=self.a.jwks)
        self.gateway_token = mint_token("a-gateway", scope="gateway mcp:tools", application=gateway.application)
        ConsentPolicy.objects.create(peer="everything", kind="tool", name_pattern="test_simple_*", decision="ask", redact_fields=["secret"])

    async def call(self, arguments: dict[str, Any], decision: str | None = None, *, tool: str = TOOL, **extra: Any) -> dict[str, Any]:
        meta: dict[str, Any] = {"io.fedmcp/hops": ["a"], "io.fedmcp/assertion": self.a.sign(aud=audience())}
        if decision is not None:
            meta[DECISION_META_KEY] = decision
        client = McpClient(token=self.gateway_token)

        envelope = modern_meta({"elicitation": {"form": {}}})
        body = request("tools/call", {"name": tool, "arguments": arguments, **extra, "_meta": {**envelope, **meta}}, 1)
        reply = await client.post(body, {"mcp-protocol-version": "2026-07-28", "mcp-method": "tools/call", "mcp-name": tool}, timeout=WAIT)
        return final_message(reply)

    def decision(self, challenge: str, **overrides: Any) -> str:
        claims = jwt.decode(challenge, options={"verify_signature": False})
        now = int(time.time())
        decision = {
            "iss": A, "aud": claims["iss"], "sub": claims["sub"], "iat": now, "exp": now + 60,
            "jti": f"d{now}{len(overrides)}", "nonce": claims["jti"], "decision": "approve",
        }
        decision.update(overrides)
        return jwt.encode(decision, self.a.key, algorithm="EdDSA", headers={"kid": self.a.kid, "typ": DECISION_TYPE})

    async def challenge(self, arguments: dict[str, Any], tool: str = TOOL) -> str:
        reply = await self.call(arguments, tool=tool)
        self.assertEqual(reply["error"]["code"], jsonrpc.CONSENT_REQUIRED_AT_HOME, reply)
        return str(reply["error"]["data"]["challenge"])

    async def test_the_first_call_gets_a_challenge_for_alices_home(self) -> None:
        reply = await self.call({"secret": "hunter2"})

        error = reply["error"]
        self.assertEqual((error["code"], error["data"]["home"]), (jsonrpc.CONSENT_REQUIRED_AT_HOME, A))
        self.assertEqual(jwt.get_unverified_header(error["data"]["challenge"])["typ"], CHALLENGE_TYPE)
        claims = jwt.decode(error["data"]["challenge"], jwt.PyJWK(signing_key().public_jwk).key, algorithms=["EdDSA", "ES256"], audience=A)
        self.assertEqual((claims["sub"], claims["peer"], claims["name"]), ("alice", "everything", "test_simple_text"))
        self.assertEqual(claims["arguments"], {"secret": "[redacted]"})
        self.assertNotIn("hunter2", error["data"]["challenge"].split(".")[1])
        self.assertFalse(await ConsentPrompt.objects.aexists())  # nobody here to ask
        await audit_flush()
        event = await AuditEvent.objects.aget()
        self.assertEqual((event.federated_subject, event.decision, event.error_code), ("alice", "ask-home", jsonrpc.CONSENT_REQUIRED_AT_HOME))

    async def test_an_approval_from_home_runs_the_call_once(self) -> None:
        decision = self.decision(await self.challenge({}))

        done = await self.call({}, decision)
        replayed = await self.call({}, decision)

        self.assertFalse(done["result"].get("isError"), done)
        self.assertEqual((replayed["error"]["code"], replayed["error"]["data"]["reason"]), (jsonrpc.CONSENT_DENIED, "replayed"))
        await audit_flush()
        decisions = [e async for e in AuditEvent.objects.order_by("at").values_list("decision", "error_code", "federated_issuer")]
        self.assertEqual(decisions, [("ask-home", jsonrpc.CONSENT_REQUIRED_AT_HOME, A), ("approved", None, A), ("rejected", jsonrpc.CONSENT_DENIED, A)])

    async def test_the_upstreams_further_rounds_of_an_approved_call_are_not_asked_at_home_again(self) -> None:
        tool = "everything__test_input_required_result_elicitation"
        await ConsentPolicy.objects.acreate(peer="everything", kind="tool", name_pattern="test_input_required_*", decision="ask")
        first = (await self.call({}, self.decision(await self.challenge({}, tool)), tool=tool))["result"]
        self.assertEqual(list(first["inputRequests"]), ["user_name"])

        answer = {"user_name": {"action": "accept", "content": {"name": "Alice"}}}
        done = await self.call({}, tool=tool, requestState=first["requestState"], inputResponses=answer)
        replayed = await self.call({}, tool=tool, requestState=first["requestState"], inputResponses=answer)

        self.assertEqual(done["result"]["content"][0]["text"], "Hello, Alice!")
        self.assertEqual(replayed["error"]["code"], jsonrpc.INVALID_PARAMS)
        await audit_flush()
        decisions = [e async for e in AuditEvent.objects.filter(method="tools/call").order_by("at", "pk").values_list("decision", "error_code")]
        self.assertEqual(decisions, [("ask-home", jsonrpc.CONSENT_REQUIRED_AT_HOME), ("approved", None), ("continued", None), ("", jsonrpc.INVALID_PARAMS)])

    async def test_a_denial_from_home_refuses_the_call(self) -> None:
        reply = await self.call({}, self.decision(await self.challenge({}), decision="deny"))

        self.assertEqual((reply["error"]["code"], reply["error"]["data"]["home"]), (jsonrpc.CONSENT_DENIED, A))
        await audit_flush()
        self.assertTrue(await AuditEvent.objects.filter(decision="denied").aexists())

    async def test_a_remembered_approval_lets_the_next_call_through(self) -> None:
        await self.call({}, self.decision(await self.challenge({}), remember=3600))

        again = await self.call({"other": "arguments"})

        self.assertFalse(again["result"].get("isError"), again)
        grant = await ConsentGrant.objects.aget()
        self.assertEqual((grant.user_id, grant.federated_issuer, grant.federated_subject), (None, A, "alice"))

    async def test_a_decision_for_other_arguments_is_refused(self) -> None:
        decision = self.decision(await self.challenge({"x": 1}))

        reply = await self.call({"x": 2}, decision)

        self.assertEqual((reply["error"]["code"], reply["error"]["data"]["reason"]), (jsonrpc.CONSENT_DENIED, "other_call"))

    async def test_a_linked_federated_user_is_asked_here_as_before(self) -> None:
        from identity.models import FederatedIdentity

        await self.call({})  # alice@A is now known here
        await FederatedIdentity.objects.filter(issuer=A, subject="alice").aupdate(user=self.alice)
        task = asyncio.create_task(self.call({}))
        for _ in range(200):
            if await ConsentPrompt.objects.aexists():
                break
            await asyncio.sleep(0.05)
        prompt = await ConsentPrompt.objects.aget()
        self.assertEqual((prompt.user_id, prompt.owner_gateway), (self.alice.pk, ""))
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --- the home ----------------------------------------------------------------------------------


class FakeConnection:
    """Peer gateway B at the connection seam: answers each request with the next scripted reply."""

    def __init__(self, replies: list[dict[str, Any]]) -> None:
        # A gateway this one believes: marked by the operator and trusted in turn (identity/trust/gateways.py).
        self.peer = PeerConfig(id=1, name="b", transport="streamable_http", url=f"{B}/mcp", is_gateway=True, remote_gateway="b")
        self.era = "modern"
        self.replies = replies
        self.sent: list[dict[str, Any]] = []

    async def request(self, method: str, params: dict[str, Any], on_message: Any = None) -> dict[str, Any]:
        self.sent.append(params)
        return self.replies.pop(0)


class NoOutbound:
    can_request = False

    async def send(self, message: dict[str, Any]) -> None:
        raise AssertionError("nothing should be sent to the host")


@override_settings(FEDMCP_PUBLIC_URL=A, FEDMCP_ISSUER=A, FEDMCP_GATEWAY_NAME="a", FEDMCP_CONSENT_TIMEOUT=WAIT, FEDMCP_CONSENT_POLL_INTERVAL=0.2)
class HomeFlowTests(AsgiTestCase):
    ARGUMENTS = {"query": "weather"}

    def setUp(self) -> None:
        super().setUp()
        gateways._jwks_cache.clear()
        self.b = Signer()
        gateway_trust(name="b", issuer=B, jwks=self.b.jwks)

    def challenge(self, sub: str = "alice", aud: str = A) -> dict[str, Any]:
        now = int(time.time())
        claims = {
            "iss": B, "aud": aud, "sub": sub, "iat": now, "exp": now + 90, "jti": "nonce-at-b", "gateway": "b", "peer": "web",
            "kind": "tool", "name": "search", "arguments": self.ARGUMENTS, "arguments_hash": arguments_hash(self.ARGUMENTS), "path": ["a", "b"],
        }
        raw = jwt.encode(claims, self.b.key, algorithm="EdDSA", headers={"kid": self.b.kid, "typ": CHALLENGE_TYPE})
        return {"error": {"code": jsonrpc.CONSENT_REQUIRED_AT_HOME, "message": "ask home", "data": {"challenge": raw}}}

    async def context(self, era: str = "legacy", **changes: Any) -> HostContext:
        identity = await authenticate(self.token, await database_sync_to_async(audience)())
        version = "2025-11-25" if era == "legacy" else "2026-07-28"
        return HostContext(era=era, protocol_version=version, transport="test", scope="", outbound=NoOutbound(), identity=replace(identity, **changes))  # type: ignore[arg-type]

    async def prompt(self) -> ConsentPrompt:
        for _ in range(200):
            prompt = await ConsentPrompt.objects.filter(status=ConsentPrompt.Status.PENDING).afirst()
            if prompt is not None:
                return prompt
            await asyncio.sleep(0.05)
        raise AssertionError("no prompt")

    async def answer(self, prompt: ConsentPrompt, approve: bool, remember: int | None = None) -> None:
        await database_sync_to_async(consent_prompt_answer)(prompt_id=prompt.id, user=self.alice, approve=approve, remember_seconds=remember)

    def sent_decision(self, connection: FakeConnection) -> dict[str, Any]:
        raw = connection.sent[-1]["_meta"][DECISION_META_KEY]
        return jwt.decode(raw, jwt.PyJWK(signing_key().public_jwk).key, algorithms=["EdDSA", "ES256"], audience=B, issuer=A)

    async def test_alice_is_asked_here_and_her_approval_goes_to_b(self) -> None:
        connection = FakeConnection([self.challenge(), {"result": {"content": []}}])
        ctx = await self.context()
        task = asyncio.create_task(verdict_of(peer_request(ctx, connection, "tools/call", {"name": "web__search", "arguments": self.ARGUMENTS}, None)))  # type: ignore[arg-type]
        prompt = await self.prompt()
        self.assertEqual((prompt.owner_gateway, prompt.peer, prompt.name, prompt.via, prompt.user_id), ("b", "web", "search", ["a", "b"], self.alice.pk))
        await self.answer(prompt, approve=True, remember=3600)

        reply = await asyncio.wait_for(task, WAIT)

        self.assertEqual(reply, {"result": {"content": []}})
        decision = self.sent_decision(connection)
        self.assertEqual((decision["nonce"], decision["decision"], decision["remember"], decision["sub"]), ("nonce-at-b", "approve", 3600, "alice"))
        self.assertEqual(connection.sent[-1]["arguments"], self.ARGUMENTS)
        self.assertFalse(await ConsentGrant.objects.aexists())  # B keeps the grant

    async def test_the_home_audit_word_is_its_users_answer(self) -> None:
        connection = FakeConnection([self.challenge(), {"result": {"content": []}}])
        ctx = await self.context()

        async def call() -> str:
            # What the pipeline does with the exchange's word: our user's answer, else its own policy's.
            verdict = await peer_request(ctx, connection, "tools/call", {"name": "web__search", "arguments": self.ARGUMENTS}, None)  # type: ignore[arg-type]
            return verdict.word or "allow"

        task = asyncio.create_task(call())
        await self.answer(await self.prompt(), approve=True)
        self.assertEqual(await asyncio.wait_for(task, WAIT), "approved")

        async def unasked() -> str:
            verdict = await peer_request(ctx, FakeConnection([{"result": {"content": []}}]), "tools/call", {"name": "x", "arguments": {}}, None)  # type: ignore[arg-type]
            return verdict.word or "allow"

        self.assertEqual(await unasked(), "allow")

    async def test_a_denial_is_told_to_b_and_refused_here(self) -> None:
        b_refuses = {"error": {"code": jsonrpc.CONSENT_DENIED, "message": "denied at home"}}
        connection = FakeConnection([self.challenge(), b_refuses])
        task = asyncio.create_task(verdict_of(peer_request(await self.context(), connection, "tools/call", {"name": "x", "arguments": self.ARGUMENTS}, None)))  # type: ignore[arg-type]
        await self.answer(await self.prompt(), approve=False)

        with self.assertRaises(jsonrpc.ConsentDeniedError):
            await asyncio.wait_for(task, WAIT)
        self.assertEqual(self.sent_decision(connection)["decision"], "deny")

    async def test_a_2026_host_answers_on_the_page_and_retries_with_its_state(self) -> None:
        connection = FakeConnection([self.challenge(), {"result": {"content": []}}])
        ctx = await self.context("modern")
        first = await verdict_of(peer_request(ctx, connection, "tools/call", {"name": "x", "arguments": self.ARGUMENTS}, None))  # type: ignore[arg-type]
        result = first["result"]
        self.assertEqual(result["resultType"], "input_required")
        prompt = await self.prompt()
        self.assertTrue(result["inputRequests"]["fedmcp-consent"]["params"]["url"].endswith(f"/consent/{prompt.id}"))
        await self.answer(prompt, approve=True)

        retry = {"name": "x", "arguments": self.ARGUMENTS, "requestState": result["requestState"], "inputResponses": {}}
        done = await verdict_of(peer_request(await self.context("modern"), connection, "tools/call", retry, None))  # type: ignore[arg-type]

        self.assertEqual(done, {"result": {"content": []}})
        self.assertNotIn("requestState", connection.sent[-1])
        self.assertEqual(self.sent_decision(connection)["decision"], "approve")
        with self.assertRaises(jsonrpc.InvalidParamsError):  # spent
            await verdict_of(peer_request(await self.context("modern"), FakeConnection([]), "tools/call", retry, None))  # type: ignore[arg-type]

    async def test_a_challenge_about_someone_else_is_an_upstream_error(self) -> None:
        connection = FakeConnection([self.challenge(sub="bob")])

        with self.assertRaises(jsonrpc.UpstreamFailedError) as caught:
            await verdict_of(peer_request(await self.context(), connection, "tools/call", {"name": "x", "arguments": self.ARGUMENTS}, None))  # type: ignore[arg-type]
        self.assertEqual(caught.exception.data, {"reason": "subject"})
        self.assertFalse(await ConsentPrompt.objects.aexists())

    async def test_a_peer_asking_twice_gets_no_second_answer(self) -> None:
        connection = FakeConnection([self.challenge(), self.challenge()])
        task = asyncio.create_task(verdict_of(peer_request(await self.context(), connection, "tools/call", {"name": "x", "arguments": self.ARGUMENTS}, None)))  # type: ignore[arg-type]
        await self.answer(await self.prompt(), approve=True)

        with self.assertRaises(jsonrpc.UpstreamFailedError):
            await asyncio.wait_for(task, WAIT)

    async def test_a_client_without_a_user_cannot_be_asked(self) -> None:
        ctx = await self.context(user_id=None, username="")

        with self.assertRaises(jsonrpc.ConsentDeniedError) as caught:
            connection = FakeConnection([self.challenge(sub=f"client:{ctx.identity.client_id}")])
            await verdict_of(peer_request(ctx, connection, "tools/call", {"name": "x", "arguments": self.ARGUMENTS}, None))  # type: ignore[arg-type]
        self.assertEqual(caught.exception.data, {"reason": "no local user to ask"})

    async def test_a_user_of_another_gateway_is_relayed_to_their_home(self) -> None:
        home = "https://home.example"
        ctx = await self.context(user_id=None, username="", federated_issuer=home, federated_subject="carol", via=("home",))
        connection = FakeConnection([self.challenge(sub=f"carol@{home}")])

        with self.assertRaises(jsonrpc.ConsentRequiredAtHomeError) as caught:
            await verdict_of(peer_request(ctx, connection, "tools/call", {"name": "web__search", "arguments": self.ARGUMENTS}, None))  # type: ignore[arg-type]

        ours = jwt.decode(caught.exception.data["challenge"], jwt.PyJWK(signing_key().public_jwk).key, algorithms=["EdDSA", "ES256"], audience=home, issuer=A)
        self.assertEqual((ours["sub"], ours["gateway"], ours["path"], ours["name"]), ("carol", "b", ["a", "b"], "search"))
        record = await RemoteConsent.objects.aget(pk=ours["jti"])
        self.assertEqual((record.role, record.peer, record.name, record.upstream_claims["jti"]), ("relay", "b", "web__search", "nonce-at-b"))
        self.assertFalse(await ConsentPrompt.objects.aexists())
