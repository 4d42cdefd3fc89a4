"""`run_call`, the pipeline's one function: each ending is one Outcome, and its decision is the audit row's.

Against the fixture server, with the gateway's real steps; where an ending is hard to cause
from outside (an upstream failure after consent, a cancellation), the exchange step is replaced.
"""

from __future__ import annotations

import asyncio
from unittest import mock

from channels.db import database_sync_to_async

from federation.router import resolve
from identity.audit import audit_flush
from identity.hostauth.tokens import authenticate
from identity.models import AuditEvent, ConsentPolicy
from mcp_endpoint import jsonrpc
from mcp_endpoint.context import HostContext
from mcp_endpoint.pipeline import flow
from tests.base import FixturePeerTestCase, audience, mint_token

ADD = "everything__add"
PARAMS = {"name": "add", "arguments": {"a": 2, "b": 3}}


class Quiet:
    can_request = False

    async def send(self, message: dict) -> None:
        pass


class RunCallTests(FixturePeerTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.token = mint_token()
        self.exchanged = self.enterContext(mock.patch.object(flow, "exchange", wraps=flow.exchange))

    async def run_call(self) -> flow.Outcome:
        identity = await authenticate(self.token, await database_sync_to_async(audience)())
        ctx = HostContext(era="legacy", protocol_version="2025-11-25", transport="test", scope="", outbound=Quiet(), identity=identity)
        route = await resolve("", "tool", ADD)
        return await flow.run_call(ctx, route, "tools/call", {**PARAMS, "name": route.upstream_name})

    async def audited(self) -> list[tuple[str, str, str, int | None]]:
        await audit_flush()
        return [(e.name, e.decision, e.outcome, e.error_code) async for e in AuditEvent.objects.order_by("at")]

    async def test_an_allowed_call_ends_with_its_result_and_the_allow(self) -> None:
        outcome = await self.run_call()

        self.assertEqual((outcome.decision, outcome.error), ("allow", None))
        self.assertEqual(outcome.unwrap()["content"][0]["text"], "5")
        self.assertEqual(await self.audited(), [("add", "allow", "ok", None)])

    async def test_a_refused_call_never_reaches_the_exchange_and_its_row_says_why(self) -> None:
        await ConsentPolicy.objects.acreate(peer="everything", kind="tool", name_pattern="add", decision="deny")

        outcome = await self.run_call()

        self.assertIsInstance(outcome.error, jsonrpc.ConsentDeniedError)
        self.assertEqual(outcome.decision, "deny")
        self.exchanged.assert_not_called()
        with self.assertRaises(jsonrpc.ConsentDeniedError):
            outcome.unwrap()
        self.assertEqual(await self.audited(), [("add", "deny", "error", jsonrpc.CONSENT_DENIED)])

    async def test_an_upstream_failure_after_consent_keeps_the_decision(self) -> None:
        self.exchanged.side_effect = jsonrpc.UpstreamFailedError("peer went away")

        outcome = await self.run_call()

        self.assertEqual((outcome.decision, outcome.error_code), ("allow", jsonrpc.UPSTREAM_ERROR))
        self.assertEqual(await self.audited(), [("add", "allow", "error", jsonrpc.UPSTREAM_ERROR)])

    async def test_a_cancelled_call_is_recorded_and_the_cancellation_goes_on(self) -> None:
        self.exchanged.side_effect = asyncio.CancelledError()

        outcome = await self.run_call()

        self.assertIsInstance(outcome.error, asyncio.CancelledError)
        with self.assertRaises(asyncio.CancelledError):
            outcome.unwrap()
        self.assertEqual(await self.audited(), [("add", "allow", "error", jsonrpc.REQUEST_CANCELLED)])
