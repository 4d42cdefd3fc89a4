"""One consent per call for 2026-07-28 hosts, however many input_required rounds the upstream asks.

The user approves a tool call on /consent; the fixture server (peer `everything`) then answers
the approved call with its own `input_required` rounds. The host's retries carry the gateway's
continuation `requestState` and are not asked about again, but only for the same user, tool and
arguments, once each, before the continuation expires, and never past a deny policy. The host is
`McpClient` speaking 2026-07-28 in-process; the user is a Django `AsyncClient` signed in as alice.
"""

from __future__ import annotations

from typing import Any

from django.test import AsyncClient, override_settings

from identity.audit import audit_flush
from identity.models import AuditEvent, ConsentPolicy, ConsentPrompt
from mcp_endpoint import jsonrpc
from mcp_endpoint.pipeline.asking import INPUT_KEY
from mcp_endpoint.pipeline.continuation import CONTINUE_SEPARATOR, continue_prefix
from tests.base import MODERN, FixturePeerTestCase, McpClient, amint_token, modern_meta, request
from tests.identity.consent.test_flow import CALL_TIMEOUT, final_message

MULTI_ROUND = "everything__test_input_required_result_multi_round"
ONE_QUESTION = "everything__test_input_required_result_elicitation"
ECHOED_STATE = "everything__test_input_required_result_request_state"
SAMPLING = "everything__test_input_required_result_sampling"
SAMPLED = {"role": "assistant", "content": {"type": "text", "text": "Paris"}, "model": "test-model", "stopReason": "endTurn"}


def accept(**content: Any) -> dict[str, Any]:
    return {"action": "accept", "content": content}


class ContinuationTests(FixturePeerTestCase):
    def setUp(self) -> None:
        super().setUp()
        # Every tool call is asked about; the upstream's own elicitations pass (tests/conftest.py).
        self.enterContext(override_settings(FEDMCP_CONSENT_DEFAULT="ask", FEDMCP_CONSENT_TIMEOUT=CALL_TIMEOUT, FEDMCP_CONSENT_POLL_INTERVAL=0.2))

    async def call(self, tool: str, arguments: dict[str, Any] | None = None, token: str | None = None, **extra: Any) -> dict[str, Any]:
        client = McpClient(token=token)
        meta = modern_meta({"elicitation": {"form": {}, "url": {}}, "sampling": {}})
        params = {"name": tool, "arguments": arguments or {}, **extra, "_meta": meta}
        headers = {"mcp-protocol-version": MODERN, "mcp-method": "tools/call", "mcp-name": tool}
        return final_message(await client.post(request("tools/call", params, client.next_id()), headers, timeout=CALL_TIMEOUT))

    async def approve_newest(self) -> None:
        prompt = await ConsentPrompt.objects.filter(status=ConsentPrompt.Status.PENDING).order_by("-created_at").afirst()
        assert prompt is not None, "no pending prompt"
        browser = AsyncClient()
        await browser.aforce_login(self.alice)
        self.assertEqual((await browser.post(f"/consent/{prompt.id}", {"action": "approve"})).status_code, 302)

    async def approved_call(self, tool: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """Call `tool`, approve on /consent, retry: return the upstream's first input_required."""
        asked = (await self.call(tool, arguments))["result"]
        self.assertEqual(list(asked["inputRequests"]), [INPUT_KEY])
        await self.approve_newest()
        answer = {"requestState": asked["requestState"], "inputResponses": {INPUT_KEY: {"action": "accept"}}}
        first_round = (await self.call(tool, arguments, **answer))["result"]
        self.assertEqual(first_round["resultType"], "input_required")
        self.assertNotIn(INPUT_KEY, first_round["inputRequests"])
        return first_round

    async def decisions(self) -> list[tuple[str, int | None]]:
        await audit_flush()
        return [e async for e in AuditEvent.objects.filter(method="tools/call").order_by("at", "pk").values_list("decision", "error_code")]

    # --- one consent per call ---------------------------------------------------------------

    async def test_the_upstreams_rounds_continue_without_asking_again(self) -> None:
        first = await self.approved_call(MULTI_ROUND)
        self.assertEqual(list(first["inputRequests"]), ["step1"])
        self.assertTrue(first["requestState"].startswith(continue_prefix()))

        second = (await self.call(MULTI_ROUND, requestState=first["requestState"], inputResponses={"step1": accept(name="Alice")}))["result"]
        self.assertEqual((second["resultType"], list(second["inputRequests"])), ("input_required", ["step2"]))
        done = (await self.call(MULTI_ROUND, requestState=second["requestState"], inputResponses={"step2": accept(color="green")}))["result"]

        # The upstream's round-2 state (which carries the name) reached it unchanged.
        self.assertEqual((done["resultType"], done["content"][0]["text"]), ("complete", "Alice's favorite color is green"))
        self.assertEqual(await ConsentPrompt.objects.acount(), 1)
        self.assertEqual(await self.decisions(), [("ask", None), ("approved", None), ("continued", None), ("continued", None)])

    async def test_an_upstream_round_without_its_own_state_continues_too(self) -> None:
        first = await self.approved_call(ONE_QUESTION)
        self.assertNotIn(CONTINUE_SEPARATOR, first["requestState"])  # the fixture sent no state of its own

        done = (await self.call(ONE_QUESTION, requestState=first["requestState"], inputResponses={"user_name": accept(name="Alice")}))["result"]

        self.assertEqual(done["content"][0]["text"], "Hello, Alice!")
        self.assertEqual(await ConsentPrompt.objects.acount(), 1)

    async def test_the_upstream_gets_back_exactly_the_state_it_sent(self) -> None:
        first = await self.approved_call(ECHOED_STATE)

        done = (await self.call(ECHOED_STATE, requestState=first["requestState"], inputResponses={"confirm": accept(ok=True)}))["result"]

        self.assertEqual(done["content"][0]["text"], "state-ok: action=accept, ok=True")

    async def test_a_round_held_for_sampling_consent_continues_after_it(self) -> None:
        with override_settings(FEDMCP_CONSENT_SAMPLING_DEFAULT="ask"):
            pointer = await self.approved_call(SAMPLING)
            # The upstream's sampling request is itself asked about first (a second, different question).
            self.assertEqual(list(pointer["inputRequests"]), [f"{INPUT_KEY}-0"])
            await self.approve_newest()
            pointed = {f"{INPUT_KEY}-0": {"action": "accept"}}
            held = (await self.call(SAMPLING, requestState=pointer["requestState"], inputResponses=pointed))["result"]
            self.assertEqual(list(held["inputRequests"]), ["capital_question"])

            done = (await self.call(SAMPLING, requestState=held["requestState"], inputResponses={"capital_question": SAMPLED}))["result"]

        self.assertEqual(done["content"][0]["text"], "The model answered: Paris")
        self.assertEqual([p.kind async for p in ConsentPrompt.objects.order_by("created_at")], ["tool", "sampling"])

    # --- what a continuation does not allow --------------------------------------------------

    async def test_a_replayed_continuation_is_refused(self) -> None:
        first = await self.approved_call(MULTI_ROUND)
        answer = {"requestState": first["requestState"], "inputResponses": {"step1": accept(name="Alice")}}
        self.assertEqual((await self.call(MULTI_ROUND, **answer))["result"]["resultType"], "input_required")

        replayed = await self.call(MULTI_ROUND, **answer)

        self.assertEqual(replayed["error"]["code"], jsonrpc.INVALID_PARAMS)
        self.assertEqual(await ConsentPrompt.objects.acount(), 1)

    async def test_a_tampered_continuation_is_refused(self) -> None:
        first = await self.approved_call(MULTI_ROUND)
        ours, theirs = first["requestState"].split(CONTINUE_SEPARATOR, 1)
        answers = {"step1": accept(name="Alice")}
        tampered = (
            ours[:-4] + "AAAA" + CONTINUE_SEPARATOR + theirs,  # our signature
            ours + CONTINUE_SEPARATOR + theirs[:-4] + "AAAA",  # the upstream's state
            ours,  # the upstream's state left out
            continue_prefix() + "made-up",
        )

        for state in tampered:
            with self.subTest(state=state):
                reply = await self.call(MULTI_ROUND, requestState=state, inputResponses=answers)
                self.assertEqual(reply["error"]["code"], jsonrpc.INVALID_PARAMS)
        self.assertEqual(await ConsentPrompt.objects.acount(), 1)
        # Refused by the gateway before any decision, so never forwarded.
        self.assertEqual((await self.decisions())[-len(tampered):], [("", jsonrpc.INVALID_PARAMS)] * len(tampered))
        # Still good for the call it belongs to.
        untouched = await self.call(MULTI_ROUND, requestState=first["requestState"], inputResponses=answers)
        self.assertEqual(list(untouched["result"]["inputRequests"]), ["step2"])

    async def test_a_continuation_for_another_call_is_refused(self) -> None:
        first = await self.approved_call(ONE_QUESTION)
        answers = {"user_name": accept(name="Alice")}
        bob = await amint_token("bob")

        others = ((ONE_QUESTION, {"extra": 1}, None), (MULTI_ROUND, {}, None), (ONE_QUESTION, {}, bob))
        for tool, arguments, token in others:
            with self.subTest(tool=tool, arguments=arguments, bob=token is not None):
                reply = await self.call(tool, arguments, token, requestState=first["requestState"], inputResponses=answers)
                self.assertEqual(reply["error"]["code"], jsonrpc.INVALID_PARAMS)
        self.assertEqual(await ConsentPrompt.objects.acount(), 1)
        self.assertEqual((await self.decisions())[-len(others):], [("", jsonrpc.INVALID_PARAMS)] * len(others))

    async def test_a_deny_policy_still_denies(self) -> None:
        first = await self.approved_call(ONE_QUESTION)
        await ConsentPolicy.objects.acreate(peer="everything", name_pattern="test_input_required_*", decision="deny")

        reply = await self.call(ONE_QUESTION, requestState=first["requestState"], inputResponses={"user_name": accept(name="Alice")})

        self.assertEqual(reply["error"]["code"], jsonrpc.CONSENT_DENIED)
        self.assertEqual((await self.decisions())[-1], ("deny", jsonrpc.CONSENT_DENIED))

    async def test_an_expired_continuation_asks_again(self) -> None:
        with override_settings(FEDMCP_CONSENT_CONTINUE_TIMEOUT=0):
            first = await self.approved_call(ONE_QUESTION)

        again = (await self.call(ONE_QUESTION, requestState=first["requestState"], inputResponses={"user_name": accept(name="Alice")}))["result"]

        self.assertEqual(list(again["inputRequests"]), [INPUT_KEY])
        self.assertEqual(await ConsentPrompt.objects.acount(), 2)
        # Approved again, the call starts over at the upstream.
        await self.approve_newest()
        restarted = (await self.call(ONE_QUESTION, requestState=again["requestState"], inputResponses={INPUT_KEY: {"action": "accept"}}))["result"]
        self.assertEqual(list(restarted["inputRequests"]), ["user_name"])

    async def test_a_call_allowed_by_policy_passes_the_upstreams_state_through(self) -> None:
        await ConsentPolicy.objects.acreate(peer="everything", decision="allow")

        first = (await self.call(MULTI_ROUND))["result"]
        self.assertNotIn("fedmcp", first["requestState"])  # the upstream's own, untouched
        second = await self.call(MULTI_ROUND, requestState=first["requestState"], inputResponses={"step1": accept(name="Alice")})

        self.assertEqual(list(second["result"]["inputRequests"]), ["step2"])
        self.assertFalse(await ConsentPrompt.objects.aexists())
