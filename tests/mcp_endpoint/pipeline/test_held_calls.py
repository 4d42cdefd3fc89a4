"""A 2026-07-28 host calling a handshake-era-only upstream that asks it something mid-call.

The upstream is the fixture server over legacy HTTP+SSE (handshake era only), whose
`test_elicitation` and `test_input_required_result_multi_round` tools send `elicitation/create`
to the client in the middle of the call and wait. The host is a 2026-07-28 client: it gets the
upstream's requests as `input_required` rounds and answers them with its retry, which resumes
the same upstream call (pipeline/held_calls.py). Before, the upstream's request was refused and
the tool failed.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.test import AsyncClient, override_settings

from federation.models import Transport
from identity.audit import audit_flush
from identity.models import AuditEvent, ConsentPrompt
from mcp_endpoint import jsonrpc
from mcp_endpoint.correlation import _Correlator
from mcp_endpoint.pipeline import held_calls
from tests.base import AsgiTestCase, McpClient, mint_token, persona, register_peer

PEER = "legacy"
ELICIT = f"{PEER}__test_elicitation"
ELICITING = {"elicitation": {"form": {}}}
ANSWER = {"action": "accept", "content": {"username": "ann", "email": "ann@example.org"}}


@pytest.mark.usefixtures("handshake_only_on_class")
class HeldCallTests(AsgiTestCase):
    handshake_only_url: str

    def setUp(self) -> None:
        super().setUp()
        self.peer = register_peer(PEER, self.handshake_only_url, transport=Transport.SSE, connect_timeout=10.0, call_timeout=20.0)

    async def call(self, client: McpClient, name: str, arguments: dict[str, Any], **extra: Any) -> dict[str, Any]:
        reply = await client.call_modern("tools/call", {"name": name, "arguments": arguments, **extra}, name=name, timeout=15)
        return reply.json()

    def round_of(self, message: dict[str, Any]) -> tuple[str, dict[str, Any], str]:
        """The only request of an input_required round: its key, the request, and the round's state."""
        result = message["result"]
        self.assertEqual(result["resultType"], "input_required", message)
        [(key, request)] = result["inputRequests"].items()
        return key, request, result["requestState"]

    async def test_the_upstreams_elicitation_comes_back_as_a_round_and_the_retry_completes_the_same_call(self) -> None:
        client = McpClient(capabilities=ELICITING)
        arguments = {"message": "Who are you?"}

        key, request, state = self.round_of(await self.call(client, ELICIT, arguments))
        self.assertEqual(request["method"], "elicitation/create")
        self.assertEqual(request["params"]["message"], "Who are you?")

        done = await self.call(client, ELICIT, arguments, inputResponses={key: ANSWER}, requestState=state)
        self.assertEqual(done["result"]["resultType"], "complete")
        self.assertEqual(done["result"]["content"][0]["text"], f"User response: action=accept, content={json.dumps(ANSWER['content'])}")

    async def test_an_upstream_asking_twice_is_two_rounds_of_one_call(self) -> None:
        client = McpClient(capabilities={**ELICITING, "sampling": {}, "roots": {}})
        name = f"{PEER}__test_input_required_result_multi_round"

        first_key, _, state = self.round_of(await self.call(client, name, {}))
        step1 = {"action": "accept", "content": {"value": "one"}}
        second_key, _, second_state = self.round_of(await self.call(client, name, {}, inputResponses={first_key: step1}, requestState=state))
        self.assertNotEqual(second_state, state)
        # The first round's state is spent: answering it again is refused, the call goes on.
        replayed = await self.call(client, name, {}, inputResponses={first_key: step1}, requestState=state)
        self.assertEqual(replayed["error"]["code"], jsonrpc.INVALID_PARAMS, replayed)

        step2 = {"action": "accept", "content": {"value": "two"}}
        done = await self.call(client, name, {}, inputResponses={second_key: step2}, requestState=second_state)
        self.assertEqual(done["result"]["resultType"], "complete", done)

    async def test_a_state_for_another_call_or_altered_is_refused_and_the_held_call_waits_on(self) -> None:
        client = McpClient(capabilities=ELICITING)
        key, _, state = self.round_of(await self.call(client, ELICIT, {"message": "a"}))

        other_arguments = await self.call(client, ELICIT, {"message": "b"}, inputResponses={key: ANSWER}, requestState=state)
        self.assertEqual(other_arguments["error"]["code"], jsonrpc.INVALID_PARAMS)
        self.assertIn("does not belong to this call", other_arguments["error"]["message"])
        altered = await self.call(client, ELICIT, {"message": "a"}, inputResponses={key: ANSWER}, requestState=state[:-4] + "AAAA")
        self.assertEqual(altered["error"]["code"], jsonrpc.INVALID_PARAMS)
        bob = McpClient(token=await database_sync_to_async(lambda: mint_token(persona("bob")))(), capabilities=ELICITING)
        theirs = await self.call(bob, ELICIT, {"message": "a"}, inputResponses={key: ANSWER}, requestState=state)
        self.assertEqual(theirs["error"]["code"], jsonrpc.INVALID_PARAMS)

        done = await self.call(client, ELICIT, {"message": "a"}, inputResponses={key: ANSWER}, requestState=state)
        self.assertEqual(done["result"]["resultType"], "complete", done)

    async def test_a_retry_landing_on_another_worker_is_carried_to_the_one_holding_the_call(self) -> None:
        client = McpClient(capabilities=ELICITING)
        arguments = {"message": "Who are you?"}
        key, _, state = self.round_of(await self.call(client, ELICIT, arguments))
        [held_id] = list(held_calls._held)
        # Another worker: its own correlator, which holds nothing and asks over the channel layer.
        elsewhere = _Correlator()
        answer = await elsewhere.resume(held_id, {"round": 1, "responses": {key: ANSWER}}, timeout=20)
        self.assertIn("User response: action=accept", answer["result"]["content"][0]["text"])
        self.assertEqual(held_calls._held, {})
        # Once the call has ended, a retry is told so.
        gone = await self.call(client, ELICIT, arguments, inputResponses={key: ANSWER}, requestState=state)
        self.assertEqual(gone["error"]["code"], jsonrpc.UPSTREAM_ERROR)
        self.assertEqual(gone["error"]["data"]["reason"], "held_call_gone")

    async def test_a_host_without_the_capability_is_not_asked_and_the_upstream_hears_why(self) -> None:
        done = await self.call(McpClient(), ELICIT, {"message": "Who are you?"})
        # The fixture passes the refusal of its request on as the call's error.
        self.assertEqual(done["error"]["message"], "the host did not declare the 'elicitation' capability", done)
        self.assertEqual(held_calls._held, {})

    async def test_with_the_shipped_consent_defaults_the_user_approves_the_request_before_the_host_sees_it(self) -> None:
        client = McpClient(capabilities=ELICITING)
        arguments = {"message": "Who are you?"}
        with override_settings(FEDMCP_CONSENT_ELICITATION_DEFAULT="ask"):
            # The gateway's own round first: the consent page, where the user sees the request.
            _, pointer, held_state = self.round_of(await self.call(client, ELICIT, arguments))
            self.assertEqual(pointer["params"]["mode"], "url")
            prompt = await ConsentPrompt.objects.aget()
            self.assertEqual((prompt.kind, prompt.request["method"]), ("elicitation", "elicitation/create"))
            browser = AsyncClient()
            await browser.aforce_login(await database_sync_to_async(persona)("alice"))
            self.assertEqual((await browser.post(f"/consent/{prompt.id}", {"action": "approve"})).status_code, 302)

            key, request, state = self.round_of(await self.call(client, ELICIT, arguments, requestState=held_state))
            self.assertEqual(request["method"], "elicitation/create")
            done = await self.call(client, ELICIT, arguments, inputResponses={key: ANSWER}, requestState=state)

        self.assertEqual(done["result"]["resultType"], "complete", done)
        await audit_flush()
        requests = [(e.decision, e.outcome) async for e in AuditEvent.objects.filter(method="elicitation/create").order_by("at")]
        self.assertIn(("approved", "ok"), requests)

