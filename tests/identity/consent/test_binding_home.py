"""At the user's home gateway, too, an approval on /consent covers the exact call it was shown.

This gateway is A; alice calls a tool of peer gateway B (faked at the connection seam, as in
tests/identity/consent/test_remote_flow.py `HomeFlowTests`), B challenges, alice approves
on A's page, and her 2026-07-28 host retries with A's `requestState`. A retry with other
arguments, or from another OAuth client of alice's, must not carry her signed decision to B:
it is sent as a new call, so B asks afresh (issue 15, "Trust boundaries").
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import jwt
from channels.db import database_sync_to_async
from django.test import override_settings

from identity.consent.prompts import consent_prompt_answer
from identity.consent.remote import CHALLENGE_TYPE, DECISION_META_KEY, arguments_hash
from identity.hostauth.tokens import authenticate
from identity.models import ConsentPrompt
from identity.trust import gateways
from identity.trust.gateways import gateway_trust
from mcp_endpoint import jsonrpc
from mcp_endpoint.context import HostContext
from mcp_endpoint.pipeline.home_consent import peer_request
from tests.base import AsgiTestCase, audience, verdict_of
from tests.identity.consent.test_remote_flow import WAIT, A, B, FakeConnection, NoOutbound
from tests.identity.test_assertions import Signer

SHOWN = {"query": "weather"}
CHANGED = {"query": "payroll"}


@override_settings(FEDMCP_PUBLIC_URL=A, FEDMCP_ISSUER=A, FEDMCP_GATEWAY_NAME="a", FEDMCP_CONSENT_TIMEOUT=WAIT, FEDMCP_CONSENT_POLL_INTERVAL=0.2)
class HomeBindingTests(AsgiTestCase):
    def setUp(self) -> None:
        super().setUp()
        gateways._jwks_cache.clear()
        self.b = Signer()
        gateway_trust(name="b", issuer=B, jwks=self.b.jwks)

    def challenge(self, arguments: dict[str, Any], nonce: str) -> dict[str, Any]:
        now = int(time.time())
        claims = {
            "iss": B, "aud": A, "sub": "alice", "iat": now, "exp": now + 90, "jti": nonce, "gateway": "b", "peer": "web",
            "kind": "tool", "name": "search", "arguments": arguments, "arguments_hash": arguments_hash(arguments), "path": ["a", "b"],
        }
        raw = jwt.encode(claims, self.b.key, algorithm="EdDSA", headers={"kid": self.b.kid, "typ": CHALLENGE_TYPE})
        return {"error": {"code": jsonrpc.CONSENT_REQUIRED_AT_HOME, "message": "ask home", "data": {"challenge": raw}}}

    async def context(self, **changes: Any) -> HostContext:
        identity = await authenticate(self.token, await database_sync_to_async(audience)())
        return HostContext(
            era="modern", protocol_version="2026-07-28", transport="test", scope="", outbound=NoOutbound(),  # type: ignore[arg-type]
            identity=replace(identity, **changes),
        )

    async def approved_state(self, connection: FakeConnection) -> tuple[str, ConsentPrompt]:
        """Call with SHOWN, approve on the page: return the host's requestState and the prompt."""
        first = await verdict_of(peer_request(await self.context(), connection, "tools/call", {"name": "x", "arguments": SHOWN}, None))  # type: ignore[arg-type]
        self.assertEqual(first["result"]["resultType"], "input_required")
        prompt = await ConsentPrompt.objects.aget(status=ConsentPrompt.Status.PENDING)
        await database_sync_to_async(consent_prompt_answer)(prompt_id=prompt.id, user=self.alice, approve=True)
        return first["result"]["requestState"], prompt

    def decisions_sent(self, connection: FakeConnection) -> list[Any]:
        return [s["arguments"] for s in connection.sent if DECISION_META_KEY in (s.get("_meta") or {})]

    async def test_a_retry_with_other_arguments_is_asked_afresh(self) -> None:
        connection = FakeConnection([self.challenge(SHOWN, "n1"), self.challenge(CHANGED, "n2"), {"result": {"content": []}}])
        state, prompt = await self.approved_state(connection)

        retry = {"name": "x", "arguments": CHANGED, "requestState": state, "inputResponses": {}}
        again = await asyncio.wait_for(verdict_of(peer_request(await self.context(), connection, "tools/call", retry, None)), WAIT)  # type: ignore[arg-type]

        self.assertEqual(again["result"]["resultType"], "input_required")
        self.assertEqual(self.decisions_sent(connection), [])
        self.assertNotIn("requestState", connection.sent[-1])
        new_prompt = await ConsentPrompt.objects.aget(status=ConsentPrompt.Status.PENDING)
        self.assertEqual(new_prompt.arguments, CHANGED)
        await prompt.arefresh_from_db()
        self.assertIsNone(prompt.used_at)  # still there for the call it was given to

        # The approved call itself still goes to B with alice's decision.
        retry = {"name": "x", "arguments": SHOWN, "requestState": state, "inputResponses": {}}
        done = await asyncio.wait_for(verdict_of(peer_request(await self.context(), connection, "tools/call", retry, None)), WAIT)  # type: ignore[arg-type]
        self.assertEqual(done, {"result": {"content": []}})
        self.assertEqual(self.decisions_sent(connection), [SHOWN])

    async def test_a_retry_from_another_client_is_asked_afresh(self) -> None:
        connection = FakeConnection([self.challenge(SHOWN, "n1"), self.challenge(SHOWN, "n2")])
        state, _ = await self.approved_state(connection)

        retry = {"name": "x", "arguments": SHOWN, "requestState": state, "inputResponses": {}}
        again = await asyncio.wait_for(
            verdict_of(peer_request(await self.context(client_id="another-host"), connection, "tools/call", retry, None)), WAIT  # type: ignore[arg-type]
        )

        self.assertEqual(again["result"]["resultType"], "input_required")
        self.assertEqual(self.decisions_sent(connection), [])
