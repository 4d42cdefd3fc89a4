"""Sampling and elicitation consent left to the user's home gateway, in-process through /mcp.

Owner (`OwnerDefersFlowTests`): this gateway is B, with the fixture server as peer
`everything`; trusted gateway A (a `Signer`) calls its interactive tools for alice@A with A's
gateway token and assertions, as a handshake-era session or a 2026-07-28 client. B asks about
sampling and elicitation by default, and has nobody to ask: the requests reach A marked.

Home (`HomeGatesFlowTests`): this gateway is A; alice's host calls a tool of peer gateway B,
faked at the connection pool: during the call, B sends a server->client request (marked or
not) and records the answer it gets. Alice answers on A's /consent. Every wait is bounded.
"""

from __future__ import annotations

import html
import json
from typing import Any
from unittest import mock

import jwt
from channels.db import database_sync_to_async
from django.test import AsyncClient, override_settings

from federation.models import CatalogKind, Peer
from federation.upstream.base import PeerConfig
from identity.audit import audit_flush
from identity.consent.deferral import request_hash
from identity.consent.prompts import prompt_summary
from identity.models import AuditEvent, ConsentPolicy, ConsentPrompt
from identity.trust import gateways
from identity.trust.gateways import gateway_trust
from identity.trust.signing import signing_key
from mcp_endpoint import jsonrpc
from mcp_endpoint.pipeline.upstream_requests import DEFERRED_META_KEY
from tests.base import (
    MODERN,
    AsgiTestCase,
    FixturePeerTestCase,
    HttpExchange,
    McpClient,
    add_catalog_entry,
    audience,
    mint_token,
    modern_meta,
    register_peer,
    request,
)
from tests.identity.consent.test_deferral_source import Gateway
from tests.identity.consent.test_flow import CALL_TIMEOUT, final_message, wait_for_prompt
from tests.identity.consent.test_sampling_flow import SAMPLED
from tests.identity.test_assertions import Signer

A = "https://a.example"
ASK = {"FEDMCP_CONSENT_SAMPLING_DEFAULT": "ask", "FEDMCP_CONSENT_ELICITATION_DEFAULT": "ask"}
GATEWAY_CAPABILITIES = {"sampling": {}, "elicitation": {"form": {}, "url": {}}}
"""What a fedmcp gateway declares to its peers (federation/upstream/base.py)."""


async def events_of(method: str) -> list[AuditEvent]:
    await audit_flush()
    return [e async for e in AuditEvent.objects.filter(method=method).order_by("at")]


async def next_message(call: HttpExchange) -> dict[str, Any]:
    """The next message of a call's reply: an SSE event, or the whole reply when it is plain JSON."""
    if call.headers.get("content-type", "").startswith("application/json"):
        return (await call.read_all(CALL_TIMEOUT)).json()
    message = await call.next_event(CALL_TIMEOUT)
    assert message is not None, "the call's stream ended early"
    return message


# --- the owner (B) -----------------------------------------------------------------------------


class OwnerDefersFlowTests(FixturePeerTestCase):
    def setUp(self) -> None:
        super().setUp()
        origin = audience()
        self.enterContext(
            override_settings(FEDMCP_PUBLIC_URL=origin, FEDMCP_ISSUER=origin, FEDMCP_GATEWAY_NAME="b", FEDMCP_CONSENT_TIMEOUT=CALL_TIMEOUT, **ASK)
        )
        gateways._jwks_cache.clear()
        self.a = Signer()
        gateway, _ = gateway_trust(name="a", issuer=A, jwks=self.a.jwks)
        self.gateway_token = mint_token("a-gateway", scope="gateway mcp:tools", application=gateway.application)

    def params(self, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
        meta = {"io.fedmcp/hops": ["a"], "io.fedmcp/assertion": self.a.sign(aud=audience())}
        return {"name": f"everything__{tool}", "arguments": arguments, "_meta": meta}

    def assert_marked_by_b(self, params: dict[str, Any], kind: str, tool: str) -> None:
        """The request names B, its upstream `everything` and the tool, signed with B's key for alice and this content."""
        mark = params["_meta"][DEFERRED_META_KEY]
        self.assertEqual({k: v for k, v in mark.items() if k != "proof"}, {"gateway": "b", "issuer": audience(), "server": "everything", "call": tool})
        key = signing_key()
        claims = jwt.decode(mark["proof"], key.private_key.public_key(), algorithms=[key.algorithm])
        self.assertEqual((claims["iss"], claims["sub"], claims["server"], claims["kind"]), (audience(), "alice", "everything", kind))
        self.assertEqual(claims["request_hash"], request_hash(params))

    async def gateway_a(self) -> McpClient:
        client = McpClient(token=self.gateway_token)
        await client.initialize(capabilities=GATEWAY_CAPABILITIES)
        return client

    async def open_call(self, client: McpClient, tool: str, arguments: dict[str, Any]) -> HttpExchange:
        body = json.dumps(request("tools/call", self.params(tool, arguments), client.next_id())).encode()
        return HttpExchange("POST", "/mcp", client.headers(), body)

    async def test_sampling_is_left_to_alices_home_and_its_answer_used(self) -> None:
        client = await self.gateway_a()
        async with await self.open_call(client, "test_sampling", {"prompt": "Capital of France?"}) as call:
            self.assertEqual(await call.start(CALL_TIMEOUT), 200)
            asked = await next_message(call)
            self.assertEqual(asked["method"], "sampling/createMessage")
            self.assert_marked_by_b(asked["params"], "sampling", "test_sampling")
            await client.post({"jsonrpc": "2.0", "id": asked["id"], "result": SAMPLED})
            done = await next_message(call)
        self.assertEqual(done["result"]["content"][0]["text"], "LLM response: Paris")
        self.assertFalse(await ConsentPrompt.objects.aexists())
        [event] = await events_of("sampling/createMessage")
        self.assertEqual(
            (event.peer, event.name, event.decision, event.outcome, event.federated_issuer, event.federated_subject),
            ("everything", "test_sampling", "home", "ok", A, "alice"),
        )

    async def test_the_homes_refusal_reaches_the_upstream_as_32017(self) -> None:
        client = await self.gateway_a()
        async with await self.open_call(client, "test_elicitation", {"message": "Your name?"}) as call:
            self.assertEqual(await call.start(CALL_TIMEOUT), 200)
            asked = await next_message(call)
            self.assertEqual(asked["method"], "elicitation/create")
            self.assert_marked_by_b(asked["params"], "elicitation", "test_elicitation")
            refusal = {"code": jsonrpc.CONSENT_DENIED, "message": "The user denied the elicitation request", "data": {"consentId": "x"}}
            await client.post({"jsonrpc": "2.0", "id": asked["id"], "error": refusal})
            done = await next_message(call)
        # The fixture's tool fails with the error its elicitation got.
        self.assertEqual(done["error"]["code"], jsonrpc.CONSENT_DENIED, done)
        [event] = await events_of("elicitation/create")
        self.assertEqual((event.decision, event.outcome, event.error_code), ("home", "error", jsonrpc.CONSENT_DENIED))

    async def test_a_deny_policy_refuses_without_asking_anyone(self) -> None:
        await ConsentPolicy.objects.acreate(peer="everything", kind="sampling", federated_issuer=A, decision="deny")
        client = await self.gateway_a()
        async with await self.open_call(client, "test_sampling", {"prompt": "hi"}) as call:
            self.assertEqual(await call.start(CALL_TIMEOUT), 200)
            done = await next_message(call)
        self.assertNotIn("method", done)  # A was never sent the request
        self.assertFalse(await ConsentPrompt.objects.aexists())
        [event] = await events_of("sampling/createMessage")
        self.assertEqual((event.decision, event.error_code), ("deny", jsonrpc.CONSENT_DENIED))

    async def test_a_2026_caller_gets_the_request_marked_in_its_input_required(self) -> None:
        params = self.params("test_sampling", {"prompt": "hi"})
        params["_meta"].update(modern_meta(GATEWAY_CAPABILITIES))
        headers = {"mcp-protocol-version": MODERN, "mcp-method": "tools/call", "mcp-name": params["name"]}
        client = McpClient(token=self.gateway_token)

        reply = final_message(await client.post(request("tools/call", params, 1), headers, timeout=CALL_TIMEOUT))

        result = reply["result"]
        self.assertEqual(result["resultType"], "input_required")
        [asked] = result["inputRequests"].values()
        self.assertEqual(asked["method"], "sampling/createMessage")
        self.assert_marked_by_b(asked["params"], "sampling", "test_sampling")
        self.assertFalse(await ConsentPrompt.objects.aexists())
        self.assertEqual([e.decision for e in await events_of("sampling/createMessage")], ["home"])


# --- the home (A) ------------------------------------------------------------------------------


class PeerGatewayB:
    """Peer gateway B at the connection pool: during the call it sends one request and keeps the answer."""

    era = "legacy"

    def __init__(self, peer: PeerConfig, method: str, params: dict[str, Any]) -> None:
        self.peer = peer
        self.method = method
        self.params = params
        self.answers: list[dict[str, Any]] = []

    async def get(self, peer: PeerConfig, **kwargs: Any) -> PeerGatewayB:
        return self

    def declare_tool_headers(self, name: str, headers: Any) -> None:
        """The tools here declare no x-mcp-header (UpstreamConnection's contract)."""

    async def request(self, method: str, params: dict[str, Any], on_message: Any = None) -> dict[str, Any]:
        answer = await on_message({"jsonrpc": "2.0", "id": "b-1", "method": self.method, "params": self.params})
        self.answers.append(answer)
        return {"result": {"content": [{"type": "text", "text": "done at b"}]}}


QUESTION = {"message": "Your name?", "requestedSchema": {"type": "object", "properties": {"name": {"type": "string"}}}}
ACCEPTED = {"action": "accept", "content": {"name": "Alice"}}


class HomeWithPeerB(AsgiTestCase):
    """This gateway is A, alice's home, with peer gateway B faked at the pool (`peer_b`)."""

    def setUp(self) -> None:
        super().setUp()
        self.enterContext(override_settings(FEDMCP_GATEWAY_NAME="a", FEDMCP_CONSENT_TIMEOUT=CALL_TIMEOUT, FEDMCP_CONSENT_POLL_INTERVAL=0.2, **ASK))
        self.b = register_peer("b", "https://b.example/mcp", sync=False, is_gateway=True)
        # A trusts B in turn, and a sync found B calling itself "b": B is believed (identity/trust/gateways.py).
        gateway_trust(name="b", issuer="https://b.example")
        Peer.objects.filter(pk=self.b.pk).update(remote_gateway="b")
        self.b.refresh_from_db()
        add_catalog_entry(self.b, CatalogKind.TOOL, "web__summarize")

    def peer_b(self, method: str, params: dict[str, Any]) -> PeerGatewayB:
        fake = PeerGatewayB(PeerConfig.from_peer(self.b), method, params)
        patcher = mock.patch("mcp_endpoint.pipeline.exchange.pool", fake)
        patcher.start()
        self.addCleanup(patcher.stop)
        return fake

    async def host(self) -> McpClient:
        client = McpClient()
        await client.initialize(capabilities=GATEWAY_CAPABILITIES)
        return client

    async def open_call(self, client: McpClient) -> HttpExchange:
        body = json.dumps(request("tools/call", {"name": "b__web__summarize", "arguments": {}}, client.next_id())).encode()
        return HttpExchange("POST", "/mcp", client.headers(), body)

    async def answer(self, prompt: ConsentPrompt, action: str) -> int:
        browser = AsyncClient()
        await browser.aforce_login(self.alice)
        return (await browser.post(f"/consent/{prompt.id}", {"action": action})).status_code


class HomeGatesFlowTests(HomeWithPeerB):
    async def test_a_deferred_elicitation_is_asked_here_and_relayed_on_approval(self) -> None:
        b = self.peer_b("elicitation/create", {**QUESTION, "_meta": {DEFERRED_META_KEY: "b"}})
        client = await self.host()
        async with await self.open_call(client) as call:
            self.assertEqual(await call.start(CALL_TIMEOUT), 200)
            prompt = await wait_for_prompt()
            self.assertEqual((prompt.peer, prompt.kind, prompt.name, prompt.request["message"]), ("b", "elicitation", "web__summarize", "Your name?"))
            pointer = await next_message(call)
            self.assertEqual((pointer["method"], pointer["params"]["elicitationId"]), ("elicitation/create", prompt.id))
            self.assertEqual(await self.answer(prompt, "approve"), 302)
            asked = await next_message(call)
            self.assertEqual((asked["method"], asked["params"]), ("elicitation/create", QUESTION))  # without the mark
            await client.post({"jsonrpc": "2.0", "id": asked["id"], "result": ACCEPTED})
            done = await next_message(call)
        self.assertEqual(done["result"]["content"][0]["text"], "done at b")
        self.assertEqual(b.answers, [{"result": ACCEPTED}])
        [event] = await events_of("elicitation/create")
        self.assertEqual((event.peer, event.name, event.decision, event.outcome, event.username), ("b", "web__summarize", "approved", "ok", "alice"))

    async def test_a_denial_here_reaches_b_as_32017(self) -> None:
        messages = [{"role": "user", "content": {"type": "text", "text": "hi"}}]
        b = self.peer_b("sampling/createMessage", {"messages": messages, "maxTokens": 5, "_meta": {DEFERRED_META_KEY: "b"}})
        client = await self.host()
        async with await self.open_call(client) as call:
            self.assertEqual(await call.start(CALL_TIMEOUT), 200)
            prompt = await wait_for_prompt()
            self.assertEqual(prompt.kind, "sampling")
            self.assertEqual((await next_message(call))["params"]["elicitationId"], prompt.id)
            self.assertEqual(await self.answer(prompt, "deny"), 302)
            done = await next_message(call)  # the host never saw the sampling request
        self.assertEqual(done["result"]["content"][0]["text"], "done at b")
        [answer] = b.answers
        self.assertEqual(answer["error"]["code"], jsonrpc.CONSENT_DENIED)
        self.assertEqual([e.decision for e in await events_of("sampling/createMessage")], ["denied"])

    async def test_an_unmarked_elicitation_from_b_is_relayed_unasked(self) -> None:
        # B's own pointer to its consent page, say: B gated it already.
        pointer = {"mode": "url", "message": "approve at b", "url": "https://b.example/consent/x", "elicitationId": "x"}
        b = self.peer_b("elicitation/create", pointer)
        client = await self.host()
        with override_settings(FEDMCP_CONSENT_ELICITATION_DEFAULT="deny"):
            async with await self.open_call(client) as call:
                self.assertEqual(await call.start(CALL_TIMEOUT), 200)
                asked = await next_message(call)
                self.assertEqual((asked["method"], asked["params"]), ("elicitation/create", pointer))
                await client.post({"jsonrpc": "2.0", "id": asked["id"], "result": {"action": "accept"}})
                await next_message(call)
        self.assertEqual(b.answers, [{"result": {"action": "accept"}}])
        self.assertFalse(await ConsentPrompt.objects.aexists())
        self.assertEqual(await events_of("elicitation/create"), [])


class HomeNamesTheSourceFlowTests(HomeWithPeerB):
    """A -> B -> C: C deferred an elicitation of its upstream `fixture`; it reaches A through B, signed by C."""

    def setUp(self) -> None:
        super().setUp()
        # A has an issuer here, so it can recognise alice as C knows her: alice@<A's issuer>.
        self.enterContext(override_settings(FEDMCP_PUBLIC_URL=audience(), FEDMCP_ISSUER=audience()))
        gateways._jwks_cache.clear()
        self.c = Gateway("c", "https://c.example")
        self.peer_b("elicitation/create", {**QUESTION, "_meta": {DEFERRED_META_KEY: self.c.mark(f"alice@{audience()}", QUESTION, "elicitation")}})

    async def shown(self, call: HttpExchange) -> tuple[ConsentPrompt, str, str]:
        """Return the prompt alice's call made, the host's pointer to it, and her /consent page."""
        self.assertEqual(await call.start(CALL_TIMEOUT), 200)
        prompt = await wait_for_prompt()
        pointer = await next_message(call)
        browser = AsyncClient()
        await browser.aforce_login(self.alice)
        page = await browser.get("/consent")
        self.assertEqual(page.status_code, 200)
        return prompt, pointer["params"]["message"], html.unescape(page.content.decode())

    async def test_a_gateway_we_do_not_trust_is_named_as_the_peers_report(self) -> None:
        async with await self.open_call(await self.host()) as call:
            prompt, message, page = await self.shown(call)
            self.assertEqual(await self.answer(prompt, "deny"), 302)
            await next_message(call)

        said = "server 'fixture' of gateway 'c', as reported by peer gateway 'b' (not verified: signed by a gateway this one does not trust)"
        self.assertEqual(prompt_summary(prompt)["source_text"], said)  # what the live feed pushes too
        self.assertIn(f"elicitation request from {said} (during 'web__summarize')", message)
        self.assertIn(
            "Elicitation request from <code>fixture</code> of gateway <code>c</code>, as reported by <code>b</code> during <code>test_sampling</code>", page
        )
        self.assertIn(f'<dd class="source" data-vouched="reported">{said}</dd>', page)

    async def test_a_gateway_we_trust_is_named_verified_by_our_name_for_it(self) -> None:
        await database_sync_to_async(gateway_trust)(name="c-inc", issuer="https://c.example", jwks=self.c.jwks)

        async with await self.open_call(await self.host()) as call:
            prompt, message, page = await self.shown(call)
            self.assertEqual(await self.answer(prompt, "deny"), 302)
            await next_message(call)

        said = "server 'fixture' of gateway 'c-inc' (https://c.example, signature verified), through peer gateway 'b'"
        self.assertIn(f"elicitation request from {said} (during 'web__summarize')", message)
        self.assertIn("Elicitation request from <code>fixture</code> of gateway <code>c-inc</code> during <code>test_sampling</code>", page)
        self.assertIn(f'<dd class="source" data-vouched="signature">{said}</dd>', page)
        # Consent is still about the peer the call went to: its policies and grants name `b`.
        self.assertEqual((prompt.peer, prompt.name), ("b", "web__summarize"))
