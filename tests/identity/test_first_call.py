"""A new user's first call, with the shipped defaults, from hosts that cannot show a URL.

The handshake-era host here declares no capabilities at all; the 2026-07-28 one sends the
envelope the SDK's default client sends (no elicitation). Both learn at once that approval is
needed and where (-32032 with the page's URL), the person approves on that page, and the same
call sent again goes through (issue 18: before, the first waited 120 s for -32018 and the second
got an elicitation it could not show).
"""

from __future__ import annotations

from typing import Any

from django.test import AsyncClient, override_settings

from identity.audit import audit_flush
from identity.models import AuditEvent, ConsentPolicy, ConsentPrompt
from mcp_endpoint import jsonrpc
from tests.base import FixturePeerTestCase, McpClient
from tests.identity.consent.test_flow import CALL_TIMEOUT, TOOL, final_message

ARGUMENTS = {"a": 2, "b": 3}
ADD = "everything__add"


class FirstCallTests(FixturePeerTestCase):
    def setUp(self) -> None:
        super().setUp()
        # tests/conftest.py allows by default; here the shipped defaults apply (FEDMCP_CONSENT_HOLD too).
        self.enterContext(override_settings(FEDMCP_CONSENT_DEFAULT="ask-new-peers", FEDMCP_CONSENT_TIMEOUT=CALL_TIMEOUT))

    async def approve_on_the_page(self, url: str) -> None:
        browser = AsyncClient()
        await browser.aforce_login(self.alice)
        path = "/" + url.split("/", 3)[3]
        page = await browser.get(path)
        self.assertEqual(page.status_code, 200)
        self.assertEqual((await browser.post(path, {"action": "approve"})).status_code, 302)

    def refusal(self, message: dict[str, Any]) -> dict[str, Any]:
        error = message["error"]
        self.assertEqual(error["code"], jsonrpc.CONSENT_REQUIRED, error)
        data = error["data"]
        self.assertIn(data["url"], error["message"])  # in words a person reads
        self.assertEqual(data["authorization"]["remediation"], [{"type": "url", "url": data["url"]}])
        return data

    async def audited(self) -> list[tuple[str, str, int | None]]:
        await audit_flush()
        return [(e.decision, e.outcome, e.error_code) async for e in AuditEvent.objects.filter(method="tools/call").order_by("at")]

    async def test_a_handshake_era_host_without_url_elicitation_gets_the_url_at_once_and_its_retry_goes_through(self) -> None:
        client = McpClient()
        await client.initialize()  # no capabilities
        params = {"name": ADD, "arguments": ARGUMENTS}

        first = self.refusal(final_message(await client.call("tools/call", params, timeout=CALL_TIMEOUT)))
        prompt = await ConsentPrompt.objects.aget()
        self.assertEqual((prompt.id, prompt.status), (first["consentId"], ConsentPrompt.Status.PENDING))  # answered before anyone decided
        # Sent again before the person answered: the same page, no second question.
        again = self.refusal(final_message(await client.call("tools/call", params, timeout=CALL_TIMEOUT)))
        self.assertEqual(again["consentId"], first["consentId"])
        self.assertEqual(await ConsentPrompt.objects.acount(), 1)

        await self.approve_on_the_page(first["url"])
        done = final_message(await client.call("tools/call", params, timeout=CALL_TIMEOUT))

        self.assertEqual(done["result"]["content"][0]["text"], "5")
        self.assertEqual(await self.audited(), [("ask", "error", jsonrpc.CONSENT_REQUIRED)] * 2 + [("approved", "ok", None)])

    async def test_the_sdk_default_2026_client_gets_the_url_at_once_and_its_retry_goes_through(self) -> None:
        client = McpClient()
        params = {"name": ADD, "arguments": ARGUMENTS}

        first = self.refusal(final_message(await client.call_modern("tools/call", params, name=ADD, timeout=CALL_TIMEOUT)))
        await self.approve_on_the_page(first["url"])
        done = final_message(await client.call_modern("tools/call", params, name=ADD, timeout=CALL_TIMEOUT))

        self.assertEqual(done["result"]["content"][0]["text"], "5")
        self.assertEqual(await self.audited(), [("ask", "error", jsonrpc.CONSENT_REQUIRED), ("approved", "ok", None)])

    async def test_an_approval_is_for_the_call_shown_once_and_no_other(self) -> None:
        client = McpClient()
        await client.initialize()
        shown = self.refusal(final_message(await client.call("tools/call", {"name": ADD, "arguments": ARGUMENTS})))
        await self.approve_on_the_page(shown["url"])

        other = self.refusal(final_message(await client.call("tools/call", {"name": ADD, "arguments": {"a": 1000, "b": 337}})))
        self.assertNotEqual(other["consentId"], shown["consentId"])
        self.assertIn("result", final_message(await client.call("tools/call", {"name": ADD, "arguments": ARGUMENTS})))
        # The approval is spent; the peer is used now, so the shipped default allows what follows.
        self.assertIn("result", final_message(await client.call("tools/call", {"name": TOOL, "arguments": {}})))

    async def test_a_host_that_can_show_the_page_is_still_sent_there(self) -> None:
        client = McpClient()
        params = {"name": ADD, "arguments": ARGUMENTS}
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {**params, "_meta": {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {"elicitation": {"url": {}}},
            "io.modelcontextprotocol/clientInfo": {"name": "fedmcp-tests", "version": "0"},
        }}}
        reply = await client.post(body, {"mcp-protocol-version": "2026-07-28", "mcp-method": "tools/call", "mcp-name": ADD})

        self.assertEqual(final_message(reply)["result"]["resultType"], "input_required")

    async def test_a_2026_refusal_is_a_json_rpc_error_at_http_200_without_an_authentication_challenge(self) -> None:
        # A consent refusal is a decided request, not a malformed one: the SDK's status table
        # gives it 200, and a 401/403 would start the SDK client's OAuth step-up instead of
        # showing the refusal (docs/CONSENT.md "Outcomes").
        await ConsentPolicy.objects.acreate(peer="everything", kind="tool", name_pattern="add", decision="deny")
        reply = await McpClient().call_modern("tools/call", {"name": ADD, "arguments": ARGUMENTS}, name=ADD, timeout=CALL_TIMEOUT)

        self.assertEqual(reply.status, 200)
        self.assertNotIn("www-authenticate", {k.lower() for k in reply.headers})
        self.assertEqual(final_message(reply)["error"]["code"], jsonrpc.CONSENT_DENIED)
        self.assertEqual(await self.audited(), [("deny", "error", jsonrpc.CONSENT_DENIED)])
