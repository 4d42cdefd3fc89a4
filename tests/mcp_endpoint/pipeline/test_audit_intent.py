"""The pipeline commits a call's audit intent before the exchange step sends it upstream.

Against the fixture server with the gateway's real steps; the exchange step is wrapped to look
at the database at the moment the call is about to go upstream.
"""

from __future__ import annotations

from typing import Any
from unittest import mock

from channels.db import database_sync_to_async

from federation.router import resolve
from identity.audit import audit_flush
from identity.hostauth.tokens import authenticate
from identity.models import AuditEvent, AuditIntent, ConsentPolicy
from mcp_endpoint.context import HostContext
from mcp_endpoint.pipeline import flow
from tests.base import FixturePeerTestCase, audience
from tests.mcp_endpoint.pipeline.test_flow import ADD, PARAMS, Quiet


class AuditIntentOnTheCallPathTests(FixturePeerTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.seen_at_exchange: list[list[dict[str, Any]]] = []
        real_exchange = flow.exchange

        async def exchange(*args: Any, **kwargs: Any) -> Any:
            self.seen_at_exchange.append(await database_sync_to_async(lambda: [i.event for i in AuditIntent.objects.all()])())
            return await real_exchange(*args, **kwargs)

        self.enterContext(mock.patch.object(flow, "exchange", side_effect=exchange))

    async def run_call(self) -> flow.Outcome:
        identity = await authenticate(self.token, await database_sync_to_async(audience)())
        ctx = HostContext(era="legacy", protocol_version="2025-11-25", transport="test", scope="", outbound=Quiet(), identity=identity)
        route = await resolve("", "tool", ADD)
        return await flow.run_call(ctx, route, "tools/call", {**PARAMS, "name": route.upstream_name})

    async def test_the_intent_is_in_the_database_when_the_call_goes_upstream_and_gone_with_its_event(self) -> None:
        outcome = await self.run_call()

        assert outcome.unwrap()["content"][0]["text"] == "5"
        [intents] = self.seen_at_exchange
        assert [(i["peer"], i["method"], i["name"], i["decision"], i["username"]) for i in intents] == [
            ("everything", "tools/call", "add", "allow", "alice")
        ]
        await audit_flush()
        assert await AuditIntent.objects.acount() == 0
        assert [(e.name, e.outcome) async for e in AuditEvent.objects.all()] == [("add", "ok")]

    async def test_a_call_refused_before_the_upstream_writes_no_intent(self) -> None:
        await ConsentPolicy.objects.acreate(peer="everything", kind="tool", name_pattern="add", decision="deny")

        await self.run_call()

        assert self.seen_at_exchange == []
        await audit_flush()
        assert await AuditIntent.objects.acount() == 0
        assert [e.outcome async for e in AuditEvent.objects.all()] == ["error"]
