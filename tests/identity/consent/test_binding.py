"""A consent approval covers the exact call the user was shown, and nothing the user did not allow.

Found by an adversarial review on a running gateway (issue 15, "Trust boundaries"):

* a 2026-07-28 host was asked about `add {"a": 1, "b": 2}`, the user approved it, and the host
  retried with `{"a": 1000, "b": 337}` and the same `requestState`: the tool ran with the new
  arguments, audited `approved`. The retry was also accepted from another OAuth client of the
  same user;
* with the shipped default `ask-new-peers`, the `input_required` answer was audited `ok`, so
  the next plain call ran unasked, also after the user clicked Deny;
* `completion/complete` for a prompt, and `resources/subscribe` to a resource, that a policy
  denies reached the upstream.

The host is `McpClient` on the in-process app with the fixture server as peer `everything`;
the user answers on /consent with a signed-in Django `AsyncClient`. What reaches the upstream
is watched at the pipeline's exchange step (mcp_endpoint/pipeline/flow.py), the one place a consented call leaves for its peer.
"""

from __future__ import annotations

import json
from typing import Any
from unittest import mock

from asgiref.sync import sync_to_async
from django.test import AsyncClient, override_settings
from oauth2_provider.models import Application

from identity.audit import audit_flush
from identity.models import AuditEvent, ConsentGrant, ConsentPolicy, ConsentPrompt
from mcp_endpoint import handlers, jsonrpc
from mcp_endpoint.models import ResourceSubscription
from mcp_endpoint.pipeline import flow
from mcp_endpoint.pipeline.asking import INPUT_KEY
from tests.base import MODERN, SHOWS_URLS, FixturePeerTestCase, HttpExchange, McpClient, mint_token, modern_meta, request
from tests.identity.consent.test_flow import CALL_TIMEOUT, final_message

ADD = "everything__add"
SHOWN = {"a": 1, "b": 2}
CHANGED = {"a": 1000, "b": 337}
ANSWERED = {INPUT_KEY: {"action": "accept"}}


def other_client_token() -> str:
    """A token of alice's for another host application (OAuth client) than her usual one."""
    application = Application.objects.create(
        name="another host",
        client_type=Application.CLIENT_PUBLIC,
        authorization_grant_type=Application.GRANT_AUTHORIZATION_CODE,
        redirect_uris="http://127.0.0.1/callback",
    )
    return mint_token(application=application)


class BindingTestCase(FixturePeerTestCase):
    def setUp(self) -> None:
        super().setUp()
        # The shipped default (tests/conftest.py allows): asked on a peer alice has not used. The
        # 2026-07-28 hosts here show URLs (sent to /consent); the handshake-era ones do not, and
        # FEDMCP_CONSENT_HOLD=all has them wait for the page's answer.
        self.enterContext(override_settings(
            FEDMCP_CONSENT_DEFAULT="ask-new-peers", FEDMCP_CONSENT_HOLD="all", FEDMCP_CONSENT_TIMEOUT=CALL_TIMEOUT, FEDMCP_CONSENT_POLL_INTERVAL=0.2
        ))
        self.forwarded = self.enterContext(mock.patch.object(flow, "exchange", wraps=flow.exchange))

    def upstream_arguments(self) -> list[Any]:
        """The arguments of every tools/call that went on to the upstream."""
        return [c.args[3].get("arguments") for c in self.forwarded.call_args_list if c.args[2].method == "tools/call"]

    async def call(self, arguments: dict[str, Any], *, token: str | None = None, **extra: Any) -> dict[str, Any]:
        client = McpClient(token=token, capabilities=SHOWS_URLS)
        return final_message(await client.call_modern("tools/call", {"name": ADD, "arguments": arguments, **extra}, name=ADD, timeout=CALL_TIMEOUT))

    async def asked(self, arguments: dict[str, Any], *, token: str | None = None, **extra: Any) -> dict[str, Any]:
        """Call `add`; assert the host is pointed at /consent; return the input_required result."""
        message = await self.call(arguments, token=token, **extra)
        self.assertIn("result", message, message)
        result = message["result"]
        self.assertEqual(result["resultType"], "input_required", result)
        self.assertEqual(list(result["inputRequests"]), [INPUT_KEY])
        return result

    async def answer(self, action: str, **extra: str) -> ConsentPrompt:
        prompt = await ConsentPrompt.objects.filter(status=ConsentPrompt.Status.PENDING).order_by("-created_at").afirst()
        assert prompt is not None, "no pending prompt"
        browser = AsyncClient()
        await browser.aforce_login(self.alice)
        self.assertEqual((await browser.post(f"/consent/{prompt.id}", {"action": action, **extra})).status_code, 302)
        return prompt

    async def audit_rows(self, method: str = "tools/call") -> list[tuple[str, str, int | None]]:
        await audit_flush()
        rows = AuditEvent.objects.filter(method=method).order_by("at", "id").values_list("decision", "outcome", "error_code")
        return [tuple(r) async for r in rows]

    def text(self, message: dict[str, Any]) -> str:
        return message["result"]["content"][0]["text"]


class ApprovalBindingTests(BindingTestCase):
    async def test_approval_does_not_cover_a_retry_with_other_arguments(self) -> None:
        asked = await self.asked(SHOWN)
        prompt = await self.answer("approve")
        self.assertEqual(prompt.arguments, SHOWN)

        replay = await self.asked(CHANGED, requestState=asked["requestState"], inputResponses=ANSWERED)
        self.assertNotIn(CHANGED, self.upstream_arguments())
        new_prompt = await ConsentPrompt.objects.filter(status=ConsentPrompt.Status.PENDING).aget()
        self.assertEqual(new_prompt.arguments, CHANGED)
        self.assertNotEqual(replay["requestState"], asked["requestState"])

        # The call the user approved still goes ahead, once.
        done = await self.call(SHOWN, requestState=asked["requestState"], inputResponses=ANSWERED)
        self.assertEqual(self.text(done), "3")
        self.assertEqual(self.upstream_arguments(), [SHOWN])
        self.assertEqual(
            await self.audit_rows(), [("ask", "input", None), ("ask", "input", None), ("approved", "ok", None)]
        )

    async def test_approval_does_not_cover_a_retry_from_another_client_of_the_same_user(self) -> None:
        asked = await self.asked(SHOWN)
        await self.answer("approve")
        other = await sync_to_async(other_client_token)()

        await self.asked(SHOWN, token=other, requestState=asked["requestState"], inputResponses=ANSWERED)
        self.assertEqual(self.upstream_arguments(), [])
        self.assertEqual(await self.audit_rows(), [("ask", "input", None), ("ask", "input", None)])
        client_ids = [c async for c in AuditEvent.objects.order_by("at", "id").values_list("client_id", flat=True)]
        self.assertNotEqual(client_ids[0], client_ids[1])

    async def test_a_remembered_approval_covers_the_tool_for_the_same_client_only(self) -> None:
        # docs/CONSENT.md "Grants": "approve and remember" is per user, peer, tool and client.
        asked = await self.asked(SHOWN)
        await self.answer("remember", duration="3600")

        other = await sync_to_async(other_client_token)()
        await self.asked(CHANGED, token=other, requestState=asked["requestState"], inputResponses=ANSWERED)
        self.assertEqual(self.upstream_arguments(), [])

        done = await self.call(CHANGED, requestState=asked["requestState"], inputResponses=ANSWERED)
        self.assertEqual(self.text(done), "1337")
        self.assertEqual(
            await self.audit_rows(), [("ask", "input", None), ("ask", "input", None), ("grant", "ok", None)]
        )
        self.assertEqual(await ConsentGrant.objects.acount(), 1)


class PeerUsedTests(BindingTestCase):
    """`ask-new-peers`: a peer counts as used only once a call the user allowed completed on it."""

    async def test_an_unanswered_question_does_not_unlock_the_peer(self) -> None:
        await self.asked(SHOWN)
        await self.asked(CHANGED)
        self.assertEqual(self.upstream_arguments(), [])
        self.assertEqual(await self.audit_rows(), [("ask", "input", None), ("ask", "input", None)])

    async def test_a_denial_does_not_unlock_the_peer(self) -> None:
        asked = await self.asked(SHOWN)
        await self.answer("deny")
        denied = await self.call(SHOWN, requestState=asked["requestState"], inputResponses=ANSWERED)
        self.assertEqual(denied["error"]["code"], jsonrpc.CONSENT_DENIED)

        await self.asked(CHANGED)
        self.assertEqual(self.upstream_arguments(), [])
        self.assertEqual(
            await self.audit_rows(), [("ask", "input", None), ("denied", "error", jsonrpc.CONSENT_DENIED), ("ask", "input", None)]
        )

    async def test_a_completed_approved_call_unlocks_the_peer(self) -> None:
        # The documented default: asked once per peer, then allowed.
        asked = await self.asked(SHOWN)
        await self.answer("approve")
        await self.call(SHOWN, requestState=asked["requestState"], inputResponses=ANSWERED)
        self.assertEqual(self.text(await self.call(CHANGED)), "1337")
        self.assertEqual(
            await self.audit_rows(), [("ask", "input", None), ("approved", "ok", None), ("allow", "ok", None)]
        )


class HandshakeEraTests(BindingTestCase):
    async def test_a_denied_call_does_not_unlock_the_peer(self) -> None:
        # Handshake era: the call waits for the page; the prompt is its own, with its own arguments.
        import asyncio

        client = McpClient()
        await client.initialize()
        call = asyncio.create_task(client.call("tools/call", {"name": ADD, "arguments": SHOWN}, timeout=CALL_TIMEOUT))
        for _ in range(200):
            if await ConsentPrompt.objects.filter(status=ConsentPrompt.Status.PENDING).aexists():
                break
            await asyncio.sleep(0.05)
        await self.answer("deny")
        self.assertEqual(final_message(await call)["error"]["code"], jsonrpc.CONSENT_DENIED)
        await self.asked(CHANGED)
        self.assertEqual(self.upstream_arguments(), [])


class UngovernedMethodsTests(BindingTestCase):
    """completion/complete and resources/subscribe pass the same policy as prompts/get and resources/read."""

    async def test_completion_for_a_denied_prompt_is_refused(self) -> None:
        await ConsentPolicy.objects.acreate(peer="everything", kind="prompt", name_pattern="test_prompt_with_arguments", decision="deny")
        client = McpClient()
        await client.initialize()
        params = {"ref": {"type": "ref/prompt", "name": "everything__test_prompt_with_arguments"}, "argument": {"name": "arg1", "value": ""}}
        reply = final_message(await client.call("completion/complete", params))
        self.assertEqual(reply["error"]["code"], jsonrpc.CONSENT_DENIED, reply)
        self.assertEqual([c for c in self.forwarded.call_args_list if c.args[2].method == "completion/complete"], [])
        self.assertEqual(await self.audit_rows("completion/complete"), [("deny", "error", jsonrpc.CONSENT_DENIED)])

        # Another prompt of the peer completes as before.
        params["ref"]["name"] = "everything__test_simple_prompt"
        self.assertIn("result", final_message(await client.call("completion/complete", params)))

    async def test_subscribe_to_a_denied_resource_is_refused(self) -> None:
        await ConsentPolicy.objects.acreate(peer="everything", kind="resource", name_pattern="test://watched-resource", decision="deny")
        client = McpClient()
        await client.initialize()
        with mock.patch.object(handlers, "_upstream_subscription", wraps=handlers._upstream_subscription) as upstream:
            reply = final_message(await client.call("resources/subscribe", {"uri": "fedmcp://everything/test://watched-resource"}))
            self.assertEqual(reply["error"]["code"], jsonrpc.CONSENT_DENIED, reply)
            self.assertFalse(upstream.called)
            # Another resource of the peer is subscribed to as before.
            other = final_message(await client.call("resources/subscribe", {"uri": "fedmcp://everything/test://static-text"}))
            self.assertIn("result", other, other)
            self.assertTrue(upstream.called)
        self.assertEqual([u async for u in ResourceSubscription.objects.values_list("upstream_uri", flat=True)], ["test://static-text"])
        self.assertEqual(await self.audit_rows("resources/subscribe"), [("deny", "error", jsonrpc.CONSENT_DENIED)])


    async def test_listen_leaves_out_a_denied_resource(self) -> None:
        # The 2026-07-28 counterpart of resources/subscribe.
        await ConsentPolicy.objects.acreate(peer="everything", kind="resource", name_pattern="test://watched-resource", decision="deny")
        client = McpClient()
        wanted = {"resourceSubscriptions": ["fedmcp://everything/test://watched-resource", "fedmcp://everything/test://static-text"]}
        body = request("subscriptions/listen", {"notifications": wanted, "_meta": modern_meta()}, client.next_id())
        headers = client.headers({"mcp-protocol-version": MODERN, "mcp-method": "subscriptions/listen"})
        async with HttpExchange("POST", "/mcp", headers, json.dumps(body).encode()) as listen:
            self.assertEqual(await listen.start(), 200)
            acknowledged = await listen.next_event()
        assert acknowledged is not None
        self.assertEqual(acknowledged["method"], "notifications/subscriptions/acknowledged")
        self.assertEqual(acknowledged["params"]["notifications"], {"resourceSubscriptions": ["fedmcp://everything/test://static-text"]})


class HeldRequestBindingTests(BindingTestCase):
    """An upstream's sampling request held for consent goes back only to the call it came from."""

    SAMPLING = "everything__test_sampling"

    async def sampling_call(self, arguments: dict[str, Any], *, token: str | None = None, **extra: Any) -> dict[str, Any]:
        client = McpClient(token=token)
        params = {"name": self.SAMPLING, "arguments": arguments, **extra, "_meta": modern_meta({"sampling": {}, "elicitation": {"url": {}}})}
        headers = {"mcp-protocol-version": MODERN, "mcp-method": "tools/call", "mcp-name": self.SAMPLING}
        return final_message(await client.post(request("tools/call", params, client.next_id()), headers, timeout=CALL_TIMEOUT))

    async def test_the_held_request_is_not_handed_to_another_call(self) -> None:
        shown = {"prompt": "What is the capital of France?"}
        with override_settings(FEDMCP_CONSENT_DEFAULT="allow", FEDMCP_CONSENT_SAMPLING_DEFAULT="ask"):
            first = (await self.sampling_call(shown))["result"]
            [key] = first["inputRequests"]
            prompt = await self.answer("approve")
            self.assertEqual(prompt.kind, "sampling")
            retry = {"requestState": first["requestState"], "inputResponses": {key: {"action": "accept"}}}

            other_arguments = await self.sampling_call({"prompt": "Something else"}, **retry)
            self.assertEqual(other_arguments["error"]["code"], jsonrpc.INVALID_PARAMS)
            other = await sync_to_async(other_client_token)()
            other_client = await self.sampling_call(shown, token=other, **retry)
            self.assertEqual(other_client["error"]["code"], jsonrpc.INVALID_PARAMS)
            self.assertNotIn("capital", json.dumps([other_arguments, other_client]))

            held = (await self.sampling_call(shown, **retry))["result"]
        [asked] = held["inputRequests"].values()
        self.assertEqual(asked["method"], "sampling/createMessage")
        self.assertEqual(await self.audit_rows("sampling/createMessage"), [("ask", "input", None), ("approved", "ok", None)])

