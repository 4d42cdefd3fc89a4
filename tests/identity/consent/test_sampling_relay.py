"""`upstream_request_relay` on its own: what reaches the host, what the upstream is answered, the audit.

The host is a recording stand-in for `pipeline/host.py ask_host`; the decisions come from the database.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from channels.db import database_sync_to_async
from django.test import TransactionTestCase, override_settings

from identity.audit import audit_flush
from identity.hostauth.tokens import Identity
from identity.models import AuditEvent, ConsentPolicy, ConsentPrompt
from mcp_endpoint import jsonrpc
from mcp_endpoint.context import HostContext
from mcp_endpoint.pipeline.upstream_requests import UpstreamCall, ask_upstreams_request, upstream_input_gate, upstream_request_relay
from tests.base import persona, verdict_of

FEDERATED = Identity(
    token_id=3, user_id=None, username="", application_id=None, client_id="peer-gw", scopes=frozenset(),
    expires=datetime(2100, 1, 1, tzinfo=UTC), federated_issuer="https://eu.example", federated_subject="carol", via=("eu",),
)
CALL = UpstreamCall("web", "tools/call", "summarize")
SAMPLING = {"messages": [{"role": "user", "content": {"type": "text", "text": "hi"}}], "maxTokens": 5}


class Outbound:
    can_request = True

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)


class Host:
    """Records what would have been sent to the host and answers it."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, Any]] = []

    async def __call__(self, ctx: HostContext, method: str, params: Any) -> dict[str, Any]:
        self.asked.append((method, params))
        return {"result": {"role": "assistant", "content": {"type": "text", "text": "ok"}, "model": "m"}}


def context(era: str = "legacy", identity: Identity | None = FEDERATED) -> HostContext:
    return HostContext(era=era, protocol_version="2025-11-25", transport="streamable-http", scope="", outbound=Outbound(), identity=identity)  # type: ignore[arg-type]


class RelayTests(TransactionTestCase):
    async def audited(self) -> list[tuple[str, str, str, int | None]]:
        await audit_flush()
        return [(e.method, e.name, e.decision, e.error_code) async for e in AuditEvent.objects.order_by("at")]

    async def test_an_allowed_request_reaches_the_host(self) -> None:
        host = Host()
        with override_settings(FEDMCP_CONSENT_SAMPLING_DEFAULT="allow"):
            reply = await upstream_request_relay(context(), CALL, "sampling/createMessage", SAMPLING, host)
        self.assertIn("result", reply)
        self.assertEqual(host.asked, [("sampling/createMessage", SAMPLING)])
        self.assertEqual(await self.audited(), [("sampling/createMessage", "summarize", "allow", None)])

    async def test_a_policy_deny_answers_the_upstream_and_never_asks_the_host(self) -> None:
        await ConsentPolicy.objects.acreate(peer="web", kind="elicitation", name_pattern="summ*", decision="deny")
        host = Host()
        reply = await upstream_request_relay(context(), CALL, "elicitation/create", {"message": "x", "requestedSchema": {}}, host)
        self.assertEqual(reply["error"]["code"], jsonrpc.CONSENT_DENIED)
        self.assertEqual(host.asked, [])
        self.assertEqual(await self.audited(), [("elicitation/create", "summarize", "deny", jsonrpc.CONSENT_DENIED)])

    async def test_ask_without_a_local_user_is_refused_at_once(self) -> None:
        host = Host()
        with override_settings(FEDMCP_CONSENT_SAMPLING_DEFAULT="ask"):
            reply = await upstream_request_relay(context(), CALL, "sampling/createMessage", SAMPLING, host)
        self.assertEqual((reply["error"]["code"], reply["error"]["data"]["reason"]), (jsonrpc.CONSENT_DENIED, "no local user to ask"))
        self.assertEqual(host.asked, [])
        self.assertFalse(await ConsentPrompt.objects.aexists())

    async def test_roots_and_other_requests_are_not_gated(self) -> None:
        host = Host()
        with override_settings(FEDMCP_CONSENT_SAMPLING_DEFAULT="deny", FEDMCP_CONSENT_ELICITATION_DEFAULT="deny"):
            await upstream_request_relay(context(), CALL, "roots/list", None, host)
        self.assertEqual(host.asked, [("roots/list", None)])
        self.assertEqual(await self.audited(), [])

    async def test_a_modern_result_without_gated_requests_passes_unchanged(self) -> None:
        result = {"resultType": "input_required", "inputRequests": {"r": {"method": "roots/list"}}, "requestState": "s"}
        with override_settings(FEDMCP_CONSENT_SAMPLING_DEFAULT="deny"):
            self.assertIs(await verdict_of(upstream_input_gate(context("modern"), CALL, result)), result)
            complete = {"resultType": "complete", "content": []}
            self.assertIs(await verdict_of(upstream_input_gate(context("modern"), CALL, complete)), complete)

    async def test_a_modern_result_with_a_request_nobody_can_approve_is_refused(self) -> None:
        result = {"resultType": "input_required", "inputRequests": {"q": {"method": "sampling/createMessage", "params": SAMPLING}}}
        with override_settings(FEDMCP_CONSENT_SAMPLING_DEFAULT="ask"):
            with self.assertRaises(jsonrpc.ConsentDeniedError):
                await verdict_of(upstream_input_gate(context("modern"), CALL, result))
        self.assertEqual(await self.audited(), [("sampling/createMessage", "summarize", "deny", jsonrpc.CONSENT_DENIED)])

    async def test_elicitations_from_a_peer_gateway_pass_but_its_sampling_is_gated(self) -> None:
        # The far gateway gated its upstreams' elicitations and sends its own consent pointers.
        from_gateway = UpstreamCall("partner", "tools/call", "partner__summarize", from_gateway=True)
        host = Host()
        pointer = {"mode": "url", "message": "approve at the partner", "url": "https://partner.example/consent/x", "elicitationId": "x"}
        with override_settings(FEDMCP_CONSENT_SAMPLING_DEFAULT="deny", FEDMCP_CONSENT_ELICITATION_DEFAULT="deny"):
            passed = await upstream_request_relay(context(), from_gateway, "elicitation/create", pointer, host)
            refused = await upstream_request_relay(context(), from_gateway, "sampling/createMessage", SAMPLING, host)
        self.assertIn("result", passed)
        self.assertEqual(refused["error"]["code"], jsonrpc.CONSENT_DENIED)
        self.assertEqual(host.asked, [("elicitation/create", pointer)])

    async def test_nobody_is_asked_about_what_the_host_could_not_receive(self) -> None:
        alice = await database_sync_to_async(persona)("alice")
        local = Identity(token_id=1, user_id=alice.pk, username="alice", application_id=None, client_id="c", scopes=frozenset(), expires=FEDERATED.expires)
        without_sampling = context(identity=local)
        with override_settings(FEDMCP_CONSENT_SAMPLING_DEFAULT="ask"):
            reply = await ask_upstreams_request(without_sampling, CALL, "sampling/createMessage", SAMPLING)
            modern = context("modern", identity=local)
            modern.client_capabilities = {"sampling": {}}
            from_modern = await ask_upstreams_request(modern, CALL, "sampling/createMessage", SAMPLING)
        self.assertEqual((reply["error"]["code"], from_modern["error"]["code"]), (jsonrpc.METHOD_NOT_FOUND, jsonrpc.METHOD_NOT_FOUND))
        self.assertFalse(await ConsentPrompt.objects.aexists())
        self.assertEqual(await self.audited(), [])
