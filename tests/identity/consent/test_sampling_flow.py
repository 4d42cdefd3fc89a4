"""Consent for an upstream's sampling request, in-process: held until the user answers on /consent.

The fixture server is peer `everything`; its tool `test_sampling` sends sampling/createMessage
during tools/call. The host is a handshake-era Streamable HTTP client reading the call's SSE
stream (it declares `sampling` and `elicitation.url`), or a 2026-07-28 client; the user is a
Django `AsyncClient` signed in as alice. Every wait is bounded.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model
from django.test import AsyncClient, TestCase, override_settings
from django.utils import timezone

from identity.audit import audit_flush
from identity.consent.upstream_requests import request_summary
from identity.models import AuditEvent, ConsentGrant, ConsentPolicy, ConsentPrompt
from mcp_endpoint import jsonrpc
from tests.base import HOST, MODERN, FixturePeerTestCase, HttpExchange, McpClient, modern_meta, request
from tests.identity.consent.test_flow import CALL_TIMEOUT, final_message, wait_for_prompt

TOOL = "everything__test_sampling"
QUESTION = "<script>alert(1)</script> What is the capital of France?"
CAPABILITIES = {"sampling": {}, "elicitation": {"url": {}}}
SAMPLED = {"role": "assistant", "content": {"type": "text", "text": "Paris"}, "model": "test-model", "stopReason": "endTurn"}


@database_sync_to_async
def prompt_status(prompt_id: str) -> str:
    return ConsentPrompt.objects.get(pk=prompt_id).status


async def sampling_events() -> list[AuditEvent]:
    await audit_flush()
    return [e async for e in AuditEvent.objects.filter(method="sampling/createMessage").order_by("at")]


class SamplingConsentTests:
    """Shared helpers; the test classes below run them with the gateway's settings."""

    alice: Any

    async def browser(self) -> AsyncClient:
        client = AsyncClient()
        await client.aforce_login(self.alice)
        return client

    async def answer(self, prompt: ConsentPrompt, action: str, **extra: str) -> int:
        response = await (await self.browser()).post(f"/consent/{prompt.id}", {"action": action, **extra})
        return response.status_code


class HandshakeHostTests(SamplingConsentTests, FixturePeerTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.enterContext(override_settings(FEDMCP_CONSENT_SAMPLING_DEFAULT="ask", FEDMCP_CONSENT_TIMEOUT=CALL_TIMEOUT, FEDMCP_CONSENT_POLL_INTERVAL=0.2))

    async def open_call(self, client: McpClient) -> HttpExchange:
        body = json.dumps(request("tools/call", {"name": TOOL, "arguments": {"prompt": QUESTION}}, client.next_id())).encode()
        return HttpExchange("POST", "/mcp", client.headers(), body)

    async def next_message(self, call: HttpExchange) -> dict[str, Any]:
        if call.headers.get("content-type", "").startswith("application/json"):
            reply = await call.read_all(CALL_TIMEOUT)
            return reply.json()
        message = await call.next_event(CALL_TIMEOUT)
        assert message is not None, "the call's stream ended early"
        return message

    async def test_ask_holds_the_request_until_the_user_approves(self) -> None:
        client = McpClient()
        await client.initialize(capabilities=CAPABILITIES)
        async with await self.open_call(client) as call:
            self.assertEqual(await call.start(CALL_TIMEOUT), 200)
            prompt = await wait_for_prompt()
            self.assertEqual((prompt.peer, prompt.kind, prompt.name), ("everything", "sampling", "test_sampling"))
            shown = prompt.request["messages"]
            self.assertEqual([(m["role"], m["content"][0]["text"]) for m in shown], [("user", QUESTION)])
            self.assertEqual(prompt.request["maxTokens"], 100)

            # The first thing the host hears is the gateway pointing it at the page, not the request.
            pointer = await self.next_message(call)
            self.assertEqual(pointer["method"], "elicitation/create")
            self.assertEqual(pointer["params"]["mode"], "url")
            self.assertTrue(pointer["params"]["url"].endswith(f"/consent/{prompt.id}"))

            page = await (await self.browser()).get("/consent")
            self.assertContains(page, "What is the capital of France?")
            self.assertContains(page, "&lt;script&gt;alert(1)&lt;/script&gt;")
            self.assertNotContains(page, "<script>alert(1)</script>")
            self.assertEqual(await self.answer(prompt, "approve"), 302)

            asked = await self.next_message(call)
            self.assertEqual(asked["method"], "sampling/createMessage")
            self.assertEqual(await prompt_status(prompt.id), ConsentPrompt.Status.APPROVED)
            self.assertEqual(asked["params"]["messages"][0]["content"]["text"], QUESTION)
            reply = await client.post({"jsonrpc": "2.0", "id": asked["id"], "result": SAMPLED})
            self.assertEqual(reply.status, 202)
            done = await self.next_message(call)
        self.assertEqual(done["result"]["content"][0]["text"], "LLM response: Paris")
        [event] = await sampling_events()
        self.assertEqual((event.peer, event.name, event.decision, event.outcome, event.username), ("everything", "test_sampling", "approved", "ok", "alice"))

    async def test_deny_keeps_the_request_from_the_host_and_fails_the_tool(self) -> None:
        client = McpClient()
        await client.initialize(capabilities=CAPABILITIES)
        async with await self.open_call(client) as call:
            self.assertEqual(await call.start(CALL_TIMEOUT), 200)
            prompt = await wait_for_prompt()
            self.assertEqual((await self.next_message(call))["method"], "elicitation/create")
            self.assertEqual(await self.answer(prompt, "deny"), 302)
            done = await self.next_message(call)
            rest = [m async for m in _drain(call)]
        # The next message is the call's end: the host never saw sampling/createMessage.
        self.assertNotIn("method", done)
        self.assertEqual(rest, [])
        self.assertTrue("error" in done or done["result"].get("isError"), done)
        self.assertNotIn("Paris", json.dumps(done))
        [event] = await sampling_events()
        self.assertEqual((event.decision, event.outcome, event.error_code), ("denied", "error", jsonrpc.CONSENT_DENIED))

    async def test_a_deny_policy_refuses_without_asking(self) -> None:
        await ConsentPolicy.objects.acreate(peer="everything", kind="sampling", name_pattern="test_sampl*", decision="deny")
        client = McpClient()
        await client.initialize(capabilities=CAPABILITIES)
        async with await self.open_call(client) as call:
            self.assertEqual(await call.start(CALL_TIMEOUT), 200)
            done = await self.next_message(call)
        self.assertNotIn("method", done)
        self.assertFalse(await ConsentPrompt.objects.aexists())
        [event] = await sampling_events()
        self.assertEqual((event.decision, event.error_code), ("deny", jsonrpc.CONSENT_DENIED))

    async def test_an_allow_policy_for_the_tool_relays_at_once(self) -> None:
        await ConsentPolicy.objects.acreate(peer="everything", kind="sampling", name_pattern="test_sampling", decision="allow")
        client = McpClient()
        await client.initialize(capabilities=CAPABILITIES)
        async with await self.open_call(client) as call:
            self.assertEqual(await call.start(CALL_TIMEOUT), 200)
            asked = await self.next_message(call)
            self.assertEqual(asked["method"], "sampling/createMessage")
            await client.post({"jsonrpc": "2.0", "id": asked["id"], "result": SAMPLED})
            done = await self.next_message(call)
        self.assertEqual(done["result"]["content"][0]["text"], "LLM response: Paris")
        self.assertFalse(await ConsentPrompt.objects.aexists())
        [event] = await sampling_events()
        self.assertEqual((event.decision, event.outcome), ("allow", "ok"))

    async def test_remember_grants_later_sampling_from_the_same_tool(self) -> None:
        client = McpClient()
        await client.initialize(capabilities={"sampling": {}})
        for round_ in (1, 2):
            async with await self.open_call(client) as call:
                if round_ == 1:
                    # No elicitation.url: nothing reaches the host until the user answers.
                    prompt = await wait_for_prompt()
                    self.assertEqual(await self.answer(prompt, "remember", duration="3600"), 302)
                self.assertEqual(await call.start(CALL_TIMEOUT), 200)
                asked = await self.next_message(call)
                self.assertEqual(asked["method"], "sampling/createMessage")
                await client.post({"jsonrpc": "2.0", "id": asked["id"], "result": SAMPLED})
                self.assertIn("result", await self.next_message(call))
        grant = await ConsentGrant.objects.aget()
        self.assertEqual((grant.peer, grant.kind, grant.name), ("everything", "sampling", "test_sampling"))
        self.assertEqual(await ConsentPrompt.objects.acount(), 1)
        self.assertEqual([e.decision for e in await sampling_events()], ["approved", "grant"])

    async def test_nobody_answering_refuses_the_request(self) -> None:
        with override_settings(FEDMCP_CONSENT_TIMEOUT=0.5):
            client = McpClient()
            await client.initialize(capabilities={"sampling": {}})
            reply = await client.call("tools/call", {"name": TOOL, "arguments": {"prompt": "hi"}}, timeout=CALL_TIMEOUT)
        messages = reply.events()
        self.assertEqual([m.get("method") for m in messages if "method" in m], [])
        self.assertEqual((await ConsentPrompt.objects.aget()).status, ConsentPrompt.Status.EXPIRED)
        [event] = await sampling_events()
        self.assertEqual((event.decision, event.error_code), ("timeout", jsonrpc.CONSENT_TIMEOUT))

    async def test_the_gateways_own_consent_elicitation_is_never_gated(self) -> None:
        # Tool consent asks; upstream elicitation is denied outright; the pointer still arrives.
        with override_settings(FEDMCP_CONSENT_DEFAULT="ask", FEDMCP_CONSENT_ELICITATION_DEFAULT="deny"):
            client = McpClient()
            await client.initialize(capabilities=CAPABILITIES)
            body = json.dumps(request("tools/call", {"name": "everything__test_simple_text", "arguments": {}}, client.next_id())).encode()
            async with HttpExchange("POST", "/mcp", client.headers(), body) as call:
                self.assertEqual(await call.start(CALL_TIMEOUT), 200)
                prompt = await wait_for_prompt()
                pointer = await self.next_message(call)
                self.assertEqual((pointer["method"], pointer["params"]["elicitationId"]), ("elicitation/create", prompt.id))
                self.assertEqual(await self.answer(prompt, "approve"), 302)
                self.assertIn("result", await self.next_message(call))
        await audit_flush()
        self.assertFalse(await AuditEvent.objects.filter(method="elicitation/create").aexists())


async def _drain(call: HttpExchange) -> Any:
    while True:
        message = await call.next_event(CALL_TIMEOUT)
        if message is None:
            return
        yield message


class ModernHostTests(SamplingConsentTests, FixturePeerTestCase):
    """A 2026-07-28 host gets upstream input requests inside input_required results."""

    def setUp(self) -> None:
        super().setUp()
        self.enterContext(override_settings(FEDMCP_CONSENT_SAMPLING_DEFAULT="ask", FEDMCP_CONSENT_TIMEOUT=CALL_TIMEOUT, FEDMCP_CONSENT_POLL_INTERVAL=0.2))

    async def call(self, client: McpClient, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        meta = modern_meta({"sampling": {}, "elicitation": {"url": {}}})
        params = {"name": TOOL, "arguments": {"prompt": QUESTION}, **(extra or {}), "_meta": meta}
        headers = {"mcp-protocol-version": MODERN, "mcp-method": "tools/call", "mcp-name": TOOL}
        return final_message(await client.post(request("tools/call", params, client.next_id()), headers, timeout=CALL_TIMEOUT))

    async def test_the_upstreams_request_is_held_until_approved(self) -> None:
        client = McpClient()
        first = (await self.call(client))["result"]
        self.assertEqual(first["resultType"], "input_required")
        [(key, pointer)] = first["inputRequests"].items()
        # Only the gateway's pointer to the page: the sampling request itself is held back.
        self.assertEqual((pointer["method"], pointer["params"]["mode"]), ("elicitation/create", "url"))
        self.assertNotIn("capital", json.dumps(first))
        prompt = await ConsentPrompt.objects.aget()
        self.assertEqual((prompt.kind, prompt.name, prompt.request["messages"][0]["content"][0]["text"]), ("sampling", "test_sampling", QUESTION))
        self.assertEqual(await self.answer(prompt, "approve"), 302)

        retry = {"requestState": first["requestState"], "inputResponses": {key: {"action": "accept"}}}
        held = (await self.call(client, retry))["result"]
        self.assertEqual(held["resultType"], "input_required")
        [(upstream_key, asked)] = held["inputRequests"].items()
        self.assertEqual(asked["method"], "sampling/createMessage")
        self.assertEqual(asked["params"]["messages"][0]["content"]["text"], QUESTION)

        answered: dict[str, Any] = {"inputResponses": {upstream_key: SAMPLED}}
        if "requestState" in held:
            answered["requestState"] = held["requestState"]
        done = (await self.call(client, answered))["result"]
        self.assertEqual((done["resultType"], done["content"][0]["text"]), ("complete", "LLM response: Paris"))
        # The approval is spent: replaying the gateway's state is refused.
        self.assertEqual((await self.call(client, retry))["error"]["code"], jsonrpc.INVALID_PARAMS)
        events = [(e.decision, e.error_code) for e in await sampling_events()]
        self.assertEqual(events, [("ask", None), ("approved", None), ("", jsonrpc.INVALID_PARAMS)])

    async def test_deny_fails_the_call_and_the_host_never_sees_the_request(self) -> None:
        client = McpClient()
        first = (await self.call(client))["result"]
        prompt = await ConsentPrompt.objects.aget()
        self.assertEqual(await self.answer(prompt, "deny"), 302)
        refused = await self.call(client, {"requestState": first["requestState"], "inputResponses": {}})
        self.assertEqual(refused["error"]["code"], jsonrpc.CONSENT_DENIED)
        self.assertNotIn("capital", json.dumps(refused))
        self.assertEqual([(e.decision, e.error_code) for e in await sampling_events()], [("ask", None), ("denied", jsonrpc.CONSENT_DENIED)])

    async def test_a_deny_policy_fails_the_first_round(self) -> None:
        await ConsentPolicy.objects.acreate(kind="sampling", decision="deny")
        refused = await self.call(McpClient())
        self.assertEqual(refused["error"]["code"], jsonrpc.CONSENT_DENIED)
        self.assertFalse(await ConsentPrompt.objects.aexists())
        self.assertEqual([e.decision for e in await sampling_events()], ["deny"])

    async def test_an_allowed_request_passes_through_unchanged(self) -> None:
        with override_settings(FEDMCP_CONSENT_SAMPLING_DEFAULT="allow"):
            first = (await self.call(McpClient()))["result"]
        [asked] = first["inputRequests"].values()
        self.assertEqual(asked["method"], "sampling/createMessage")
        self.assertFalse(await ConsentPrompt.objects.aexists())

    async def test_a_forged_or_foreign_state_is_refused(self) -> None:
        client = McpClient()
        first = (await self.call(client))["result"]
        forged = first["requestState"][:-4] + "AAAA"
        self.assertEqual((await self.call(client, {"requestState": forged}))["error"]["code"], jsonrpc.INVALID_PARAMS)
        other_tool = {"name": "everything__test_simple_text", "arguments": {}, "requestState": first["requestState"], "_meta": modern_meta()}
        headers = {"mcp-protocol-version": MODERN, "mcp-method": "tools/call", "mcp-name": "everything__test_simple_text"}
        reply = final_message(await client.post(request("tools/call", other_tool, client.next_id()), headers, timeout=CALL_TIMEOUT))
        self.assertEqual(reply["error"]["code"], jsonrpc.INVALID_PARAMS)


class RequestPageTests(TestCase):
    """The server-rendered pages show an upstream request's content as text, folded when long."""

    def setUp(self) -> None:
        self.alice = get_user_model().objects.create_user("alice")
        self.client.force_login(self.alice)

    def prompt(self, kind: str, method: str, params: dict[str, Any]) -> ConsentPrompt:
        return ConsentPrompt.objects.create(
            id=f"{kind}-prompt", user=self.alice, username="alice", peer="web", kind=kind, name="signup",
            request=request_summary(method, params), expires_at=timezone.now() + timedelta(minutes=5),
        )

    def test_an_elicitation_shows_its_message_and_requested_fields(self) -> None:
        schema = {"type": "object", "properties": {"password": {"type": "string", "description": "<i>yours</i>"}}}
        prompt = self.prompt("elicitation", "elicitation/create", {"message": "Enter your <b>password</b>", "requestedSchema": schema})

        page = self.client.get(f"/consent/{prompt.id}", headers={"host": HOST})

        self.assertContains(page, "Elicitation request from <code>web</code> during <code>signup</code>", html=False)
        self.assertContains(page, "Enter your &lt;b&gt;password&lt;/b&gt;")
        self.assertContains(page, "&lt;i&gt;yours&lt;/i&gt;")
        self.assertContains(page, "Requested fields")
        self.assertNotContains(page, "<dt>Arguments</dt>", html=False)

    def test_images_are_named_and_long_text_is_folded(self) -> None:
        long = "x" * 1000
        messages = [{"role": "user", "content": [{"type": "image", "mimeType": "image/png", "data": "AAAA"}, {"type": "text", "text": long}]}]
        preferences = {"hints": [{"name": "small"}], "speedPriority": 1}
        params = {"messages": messages, "systemPrompt": "Be brief", "maxTokens": 7, "modelPreferences": preferences}
        prompt = self.prompt("sampling", "sampling/createMessage", params)

        page = self.client.get("/consent", headers={"host": HOST})

        self.assertContains(page, f'data-prompt-id="{prompt.id}"')
        self.assertContains(page, "[image (image/png, 3 bytes), not shown]")
        self.assertContains(page, "Show all 1000 characters")
        self.assertContains(page, long)  # in full behind the fold, once
        self.assertContains(page, "Be brief")
        self.assertContains(page, "hints: small; speed priority 1")
        self.assertContains(page, '<dd class="request-max-tokens">7</dd>', html=False)
