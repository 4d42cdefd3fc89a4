"""Consent end to end in-process: a host calls a tool, the user answers on /consent, the call ends.

The host is `McpClient` on the ASGI app with the fixture server as peer `everything`; the user
is a Django `AsyncClient` signed in as alice, posting the page's forms. Waits are bounded
(polling the database for the prompt; the call itself has its own timeout).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.test import AsyncClient, override_settings

from federation.events import CATALOG_GROUP
from identity.audit import audit_flush
from identity.models import AuditEvent, ConsentGrant, ConsentPolicy, ConsentPrompt
from mcp_endpoint import jsonrpc
from tests.base import (
    SHOWS_URLS,
    TIMEOUT,
    FixturePeerTestCase,
    HttpExchange,
    McpClient,
    Reply,
    request,
)

TOOL = "everything__test_simple_text"
CALL_TIMEOUT = 20.0


def final_message(reply: Reply) -> dict[str, Any]:
    """The JSON-RPC response in a reply, whether sent as JSON or as the last SSE event."""
    if reply.headers.get("content-type", "").startswith("text/event-stream"):
        return [m for m in reply.events() if "method" not in m][-1]
    return reply.json()


@database_sync_to_async
def pending_prompts() -> list[ConsentPrompt]:
    return list(ConsentPrompt.objects.filter(status=ConsentPrompt.Status.PENDING))


async def wait_for_prompt(count: int = 1) -> ConsentPrompt:
    """Poll (bounded) until `count` prompts were created; return the newest pending one."""
    for _ in range(200):
        prompts = await pending_prompts()
        total = await database_sync_to_async(ConsentPrompt.objects.count)()
        if prompts and total >= count:
            return prompts[0]
        await asyncio.sleep(0.05)
    raise AssertionError("no consent prompt was created")


class ConsentFlowTests(FixturePeerTestCase):
    def setUp(self) -> None:
        super().setUp()
        # tests/conftest.py allows by default; here the shipped default applies. The hosts here
        # show no URLs: FEDMCP_CONSENT_HOLD=all has their calls wait for the page's answer (the
        # shipped url-hosts refuses them at once with the URL: tests/identity/test_first_call.py).
        self.enterContext(override_settings(
            FEDMCP_CONSENT_DEFAULT="ask-new-peers", FEDMCP_CONSENT_HOLD="all", FEDMCP_CONSENT_TIMEOUT=CALL_TIMEOUT, FEDMCP_CONSENT_POLL_INTERVAL=0.2
        ))

    async def browser(self) -> AsyncClient:
        client = AsyncClient()
        await client.aforce_login(self.alice)
        return client

    async def answer(self, prompt: ConsentPrompt, action: str, **extra: str) -> int:
        browser = await self.browser()
        response = await browser.post(f"/consent/{prompt.id}", {"action": action, **extra})
        return response.status_code

    async def start_call(self, client: McpClient, name: str = TOOL, arguments: dict[str, Any] | None = None) -> asyncio.Task[Reply]:
        return asyncio.create_task(client.call("tools/call", {"name": name, "arguments": arguments or {}}, timeout=CALL_TIMEOUT))

    async def test_ask_approve_once_completes_the_waiting_call(self) -> None:
        client = McpClient()
        await client.initialize()
        call = await self.start_call(client)
        prompt = await wait_for_prompt()
        self.assertEqual((prompt.peer, prompt.kind, prompt.name, prompt.username), ("everything", "tool", "test_simple_text", "alice"))
        page = await (await self.browser()).get("/consent")
        self.assertEqual(page.status_code, 200)
        self.assertIn(prompt.id.encode(), page.content)
        self.assertEqual(await self.answer(prompt, "approve"), 302)
        message = final_message(await asyncio.wait_for(call, CALL_TIMEOUT))
        self.assertIn("result", message)
        self.assertFalse(message["result"].get("isError"))
        # Single use: answering again changes nothing.
        self.assertEqual(await self.answer(prompt, "deny"), 409)
        await audit_flush()
        event = await AuditEvent.objects.aget(method="tools/call")
        self.assertEqual((event.outcome, event.decision), ("ok", "approved"))
        self.assertFalse(await ConsentGrant.objects.aexists())

    async def test_deny_answers_consent_denied(self) -> None:
        client = McpClient()
        await client.initialize()
        call = await self.start_call(client, arguments={})
        prompt = await wait_for_prompt()
        self.assertEqual(await self.answer(prompt, "deny"), 302)
        message = final_message(await asyncio.wait_for(call, CALL_TIMEOUT))
        self.assertEqual(message["error"]["code"], jsonrpc.CONSENT_DENIED)
        await audit_flush()
        event = await AuditEvent.objects.aget(method="tools/call")
        self.assertEqual((event.outcome, event.error_code, event.decision), ("error", jsonrpc.CONSENT_DENIED, "denied"))

    async def test_unanswered_prompt_times_out(self) -> None:
        with override_settings(FEDMCP_CONSENT_TIMEOUT=0.5):
            client = McpClient()
            await client.initialize()
            reply = await client.call("tools/call", {"name": TOOL, "arguments": {}}, timeout=CALL_TIMEOUT)
        self.assertEqual(final_message(reply)["error"]["code"], jsonrpc.CONSENT_TIMEOUT)
        prompt = await ConsentPrompt.objects.aget()
        self.assertEqual(prompt.status, ConsentPrompt.Status.EXPIRED)
        self.assertEqual(await self.answer(prompt, "approve"), 409)
        await audit_flush()
        event = await AuditEvent.objects.aget(method="tools/call")
        self.assertEqual((event.error_code, event.decision), (jsonrpc.CONSENT_TIMEOUT, "timeout"))

    async def test_remember_then_revoke(self) -> None:
        # A policy that always asks, so a used peer is asked again without a grant.
        await ConsentPolicy.objects.acreate(peer="everything", decision="ask")
        client = McpClient()
        await client.initialize()
        call = await self.start_call(client)
        prompt = await wait_for_prompt()
        self.assertEqual(await self.answer(prompt, "remember", duration="3600"), 302)
        self.assertIn("result", final_message(await asyncio.wait_for(call, CALL_TIMEOUT)))
        grant = await ConsentGrant.objects.aget()
        self.assertEqual((grant.peer, grant.name), ("everything", "test_simple_text"))

        # Remembered: the next call passes without a prompt.
        reply = await client.call("tools/call", {"name": TOOL, "arguments": {}}, timeout=CALL_TIMEOUT)
        self.assertIn("result", final_message(reply))
        self.assertEqual(await ConsentPrompt.objects.acount(), 1)

        grants_page = await (await self.browser()).get("/consent/grants")
        self.assertIn(f"grant-{grant.pk}".encode(), grants_page.content)
        revoked = await (await self.browser()).post(f"/consent/grants/{grant.pk}/revoke")
        self.assertEqual(revoked.status_code, 302)

        # Revoked: asked again on the next call.
        call = await self.start_call(client)
        second = await wait_for_prompt(count=2)
        self.assertNotEqual(second.id, prompt.id)
        self.assertEqual(await self.answer(second, "deny"), 302)
        self.assertEqual(final_message(await asyncio.wait_for(call, CALL_TIMEOUT))["error"]["code"], jsonrpc.CONSENT_DENIED)

    async def test_remember_refuses_unoffered_durations(self) -> None:
        client = McpClient()
        await client.initialize()
        call = await self.start_call(client)
        prompt = await wait_for_prompt()
        self.assertEqual(await self.answer(prompt, "remember", duration="999999999"), 400)
        self.assertEqual(await self.answer(prompt, "approve"), 302)
        await asyncio.wait_for(call, CALL_TIMEOUT)
        self.assertFalse(await ConsentGrant.objects.aexists())

    async def test_deny_policy_hides_and_refuses(self) -> None:
        await ConsentPolicy.objects.acreate(peer="everything", kind="tool", name_pattern="test_simple_*", decision="deny")
        client = McpClient()
        await client.initialize()
        names = [t["name"] for t in final_message(await client.call("tools/list"))["result"]["tools"]]
        self.assertNotIn(TOOL, names)
        self.assertIn("everything__test_image_content", names)
        scoped = McpClient("/peers/everything/mcp")
        await scoped.initialize()
        scoped_names = [t["name"] for t in final_message(await scoped.call("tools/list"))["result"]["tools"]]
        self.assertNotIn("test_simple_text", scoped_names)
        self.assertIn("test_image_content", scoped_names)
        reply = await client.call("tools/call", {"name": TOOL, "arguments": {}})
        self.assertEqual(final_message(reply)["error"]["code"], jsonrpc.CONSENT_DENIED)
        self.assertFalse(await ConsentPrompt.objects.aexists())
        await audit_flush()
        self.assertEqual((await AuditEvent.objects.aget()).decision, "deny")

    async def test_policy_change_announces_list_changed(self) -> None:
        layer = get_channel_layer()
        channel = await layer.new_channel()
        await layer.group_add(CATALOG_GROUP, channel)
        await ConsentPolicy.objects.acreate(peer="everything", kind="tool", decision="deny")
        event = await asyncio.wait_for(layer.receive(channel), TIMEOUT)
        self.assertEqual((event["type"], event["peer"], event["kinds"]), ("catalog.changed", "everything", ["tool"]))

    async def test_resources_and_prompts_allowed_by_default(self) -> None:
        client = McpClient()
        await client.initialize()
        prompts = final_message(await client.call("prompts/list"))["result"]["prompts"]
        reply = await client.call("prompts/get", {"name": prompts[0]["name"], "arguments": {}}, timeout=CALL_TIMEOUT)
        self.assertNotEqual(final_message(reply).get("error", {}).get("code"), jsonrpc.CONSENT_DENIED)
        self.assertFalse(await ConsentPrompt.objects.aexists())

    async def test_sensitive_arguments_are_redacted_on_the_prompt(self) -> None:
        await ConsentPolicy.objects.acreate(peer="everything", decision="ask", redact_fields=["message"])
        client = McpClient()
        await client.initialize()
        call = await self.start_call(client, name="everything__test_tool_with_logging", arguments={"message": "s3cret"})
        prompt = await wait_for_prompt()
        self.assertEqual(prompt.arguments, {"message": "[redacted]"})
        page = await (await self.browser()).get(f"/consent/{prompt.id}")
        self.assertNotIn(b"s3cret", page.content)
        await self.answer(prompt, "deny")
        await asyncio.wait_for(call, CALL_TIMEOUT)

    async def test_progress_and_url_elicitation_while_waiting(self) -> None:
        client = McpClient()
        await client.initialize(capabilities={"elicitation": {"url": {}}})
        body = json.dumps(request("tools/call", {"name": TOOL, "arguments": {}, "_meta": {"progressToken": "p1"}}, 7)).encode()
        async with HttpExchange("POST", "/mcp", client.headers(), body) as exchange:
            self.assertEqual(await exchange.start(CALL_TIMEOUT), 200)
            seen: dict[str, dict[str, Any]] = {}
            while not {"elicitation/create", "notifications/progress"} <= seen.keys():
                message = await exchange.next_event(CALL_TIMEOUT)
                assert message is not None
                seen.setdefault(message.get("method", ""), message)
            prompt = await wait_for_prompt()
            elicitation = seen["elicitation/create"]["params"]
            self.assertEqual(elicitation["mode"], "url")
            self.assertTrue(elicitation["url"].endswith(f"/consent/{prompt.id}"))
            self.assertEqual(seen["notifications/progress"]["params"]["progressToken"], "p1")
            await self.answer(prompt, "approve")
            while True:
                message = await exchange.next_event(CALL_TIMEOUT)
                assert message is not None
                if message.get("id") == 7:
                    break
        self.assertIn("result", message)

    async def test_host_disconnect_expires_the_prompt(self) -> None:
        client = McpClient()
        await client.initialize()
        body = json.dumps(request("tools/call", {"name": TOOL, "arguments": {}}, 9)).encode()
        async with HttpExchange("POST", "/mcp", client.headers(), body):
            prompt = await wait_for_prompt()
        for _ in range(200):
            await prompt.arefresh_from_db()
            if prompt.status != ConsentPrompt.Status.PENDING:
                break
            await asyncio.sleep(0.05)
        self.assertEqual(prompt.status, ConsentPrompt.Status.EXPIRED)

    async def test_websocket_transport_waits_and_keeps_serving_other_requests(self) -> None:
        from tests.base import HANDSHAKE, ws_communicator

        socket = ws_communicator()
        connected, _ = await socket.connect(TIMEOUT)
        self.assertTrue(connected)
        try:
            init = {"protocolVersion": HANDSHAKE, "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}
            await socket.send_json_to(request("initialize", init, 1))
            await socket.receive_json_from(TIMEOUT)
            await socket.send_json_to({"jsonrpc": "2.0", "method": "notifications/initialized"})
            await socket.send_json_to(request("tools/call", {"name": TOOL, "arguments": {}}, 2))
            prompt = await wait_for_prompt()
            # The waiting call does not block the connection.
            await socket.send_json_to(request("ping", None, 3))
            self.assertEqual((await socket.receive_json_from(TIMEOUT))["id"], 3)
            self.assertEqual(await self.answer(prompt, "approve"), 302)
            reply = await socket.receive_json_from(CALL_TIMEOUT)
            self.assertEqual(reply["id"], 2)
            self.assertIn("result", reply)
        finally:
            await socket.disconnect()

    async def test_a_user_whose_home_is_not_trusted_is_refused_at_once(self) -> None:
        """Nobody here can answer, and no trusted home gateway can be asked: refused, no prompt.

        (A user asserted by a trusted gateway is asked at their home instead:
        tests/identity/consent/test_remote_flow.py.)
        """
        from dataclasses import replace

        from federation.router import resolve
        from identity.hostauth.tokens import authenticate
        from mcp_endpoint.context import HostContext
        from mcp_endpoint.pipeline.decide import decide
        from mcp_endpoint.pipeline.values import CallSubject
        from tests.base import audience

        identity = await authenticate(self.token, await database_sync_to_async(audience)())
        remote = replace(identity, user_id=None, username="", federated_issuer="https://eu.example", federated_subject="carol")
        ctx = HostContext(era="legacy", protocol_version="2025-11-25", transport="test", scope="", outbound=None, identity=remote)  # type: ignore[arg-type]
        route = await resolve("", "tool", TOOL)
        params = {"name": "test_simple_text", "arguments": {}}
        verdict = await decide(ctx, route, CallSubject.of("tools/call", params), params)
        self.assertIsInstance(verdict.refusal, jsonrpc.ConsentDeniedError)
        self.assertEqual(verdict.word, "deny")
        self.assertFalse(await ConsentPrompt.objects.aexists())

    async def test_modern_input_required_then_retry_with_signed_state(self) -> None:
        client = McpClient(capabilities=SHOWS_URLS)
        first = final_message(await client.call_modern("tools/call", {"name": TOOL, "arguments": {}}, name=TOOL))
        result = first["result"]
        self.assertEqual(result["resultType"], "input_required")
        (input_request,) = result["inputRequests"].values()
        self.assertEqual((input_request["method"], input_request["params"]["mode"]), ("elicitation/create", "url"))
        prompt = await wait_for_prompt()
        self.assertTrue(input_request["params"]["url"].endswith(f"/consent/{prompt.id}"))

        forged = result["requestState"][:-4] + "AAAA"
        bad = final_message(await client.call_modern("tools/call", {"name": TOOL, "arguments": {}, "requestState": forged}, name=TOOL))
        self.assertEqual(bad["error"]["code"], jsonrpc.INVALID_PARAMS)

        self.assertEqual(await self.answer(prompt, "approve"), 302)
        retry = {"name": TOOL, "arguments": {}, "requestState": result["requestState"], "inputResponses": {"fedmcp-consent": {"action": "accept"}}}
        done = final_message(await client.call_modern("tools/call", retry, name=TOOL, timeout=CALL_TIMEOUT))
        self.assertEqual(done["result"]["resultType"], "complete")
        # The approval was spent: replaying the state is refused.
        again = final_message(await client.call_modern("tools/call", retry, name=TOOL, timeout=CALL_TIMEOUT))
        self.assertEqual(again["error"]["code"], jsonrpc.INVALID_PARAMS)


class ConsentPageTests(FixturePeerTestCase):
    """The page's protections: login, owner only, CSRF, no framing."""

    def setUp(self) -> None:
        super().setUp()
        # A waiting handshake-era call (FEDMCP_CONSENT_HOLD=all) makes the prompt these tests look at.
        self.enterContext(override_settings(
            FEDMCP_CONSENT_DEFAULT="ask", FEDMCP_CONSENT_HOLD="all", FEDMCP_CONSENT_TIMEOUT=CALL_TIMEOUT, FEDMCP_CONSENT_POLL_INTERVAL=0.2
        ))

    async def test_protections(self) -> None:
        client = McpClient()
        await client.initialize()
        call = asyncio.create_task(client.call("tools/call", {"name": TOOL, "arguments": {}}, timeout=CALL_TIMEOUT))
        prompt = await wait_for_prompt()
        anonymous = await AsyncClient().get("/consent")
        self.assertEqual(anonymous.status_code, 302)
        self.assertTrue(anonymous["Location"].startswith("/accounts/login/"))

        bob = await sync_to_async(self.make_user)("bob")
        other = AsyncClient()
        await other.aforce_login(bob)
        self.assertEqual((await other.get(f"/consent/{prompt.id}")).status_code, 404)
        self.assertEqual((await other.post(f"/consent/{prompt.id}", {"action": "approve"})).status_code, 404)

        strict = AsyncClient(enforce_csrf_checks=True)
        await strict.aforce_login(self.alice)
        self.assertEqual((await strict.post(f"/consent/{prompt.id}", {"action": "approve"})).status_code, 403)
        page = await strict.get("/consent")
        self.assertEqual(page["X-Frame-Options"], "DENY")
        self.assertIn("frame-ancestors 'none'", page["Content-Security-Policy"])

        owner = AsyncClient()
        await owner.aforce_login(self.alice)
        self.assertEqual((await owner.post(f"/consent/{prompt.id}", {"action": "deny", "next": "https://evil.example/"}))["Location"], "/consent")
        self.assertEqual(final_message(await asyncio.wait_for(call, CALL_TIMEOUT))["error"]["code"], jsonrpc.CONSENT_DENIED)

    def make_user(self, name: str) -> Any:
        from tests.base import persona

        return persona(name)


class ConsentLiveFeedTests(FixturePeerTestCase):
    """/consent/ws: signed-in users only, same-origin only, pushes new and answered prompts."""

    def setUp(self) -> None:
        super().setUp()
        # A waiting handshake-era call (FEDMCP_CONSENT_HOLD=all) makes the prompt these tests look at.
        self.enterContext(override_settings(
            FEDMCP_CONSENT_DEFAULT="ask", FEDMCP_CONSENT_HOLD="all", FEDMCP_CONSENT_TIMEOUT=CALL_TIMEOUT, FEDMCP_CONSENT_POLL_INTERVAL=0.2
        ))

    def feed(self, *, cookie: str = "", origin: str = "http://127.0.0.1") -> Any:
        from channels.testing import WebsocketCommunicator

        from fedmcp_site.asgi import application

        headers = [(b"host", b"127.0.0.1"), (b"origin", origin.encode())]
        if cookie:
            headers.append((b"cookie", cookie.encode()))
        return WebsocketCommunicator(application, "/consent/ws", headers=headers)

    async def test_anonymous_and_cross_origin_are_refused(self) -> None:
        anonymous = self.feed()
        connected, _ = await anonymous.connect(TIMEOUT)
        self.assertFalse(connected)
        browser = AsyncClient()
        await browser.aforce_login(self.alice)
        cookie = f"sessionid={browser.cookies['sessionid'].value}"
        foreign = self.feed(cookie=cookie, origin="http://evil.example")
        connected, _ = await foreign.connect(TIMEOUT)
        self.assertFalse(connected)

    async def test_new_and_answered_prompts_are_pushed(self) -> None:
        browser = AsyncClient()
        await browser.aforce_login(self.alice)
        feed = self.feed(cookie=f"sessionid={browser.cookies['sessionid'].value}")
        connected, _ = await feed.connect(TIMEOUT)
        self.assertTrue(connected)
        try:
            client = McpClient()
            await client.initialize()
            call = asyncio.create_task(client.call("tools/call", {"name": TOOL, "arguments": {}}, timeout=CALL_TIMEOUT))
            pushed = await feed.receive_json_from(CALL_TIMEOUT)
            self.assertEqual((pushed["type"], pushed["prompt"]["name"]), ("prompt", "test_simple_text"))
            response = await browser.post(f"/consent/{pushed['prompt']['id']}", {"action": "approve"})
            self.assertEqual(response.status_code, 302)
            decided = await feed.receive_json_from(CALL_TIMEOUT)
            self.assertEqual((decided["type"], decided["id"], decided["status"]), ("decided", pushed["prompt"]["id"], "approved"))
            self.assertIn("result", final_message(await asyncio.wait_for(call, CALL_TIMEOUT)))
        finally:
            await feed.disconnect()
