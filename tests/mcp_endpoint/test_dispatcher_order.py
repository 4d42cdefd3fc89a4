"""The order of the dispatcher's checks: a message wrong in several ways gets the first one's error.

envelope -> id -> params shape -> method -> session -> params model -> scope -> handler.
A host learns the most basic thing wrong first, and nothing later runs (no handler, no upstream).
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from unittest import mock

from django.test import SimpleTestCase
from django.utils import timezone

from identity.hostauth.tokens import Identity
from mcp_endpoint import dispatcher, jsonrpc
from mcp_endpoint.context import HostContext
from mcp_endpoint.models import McpSession


class Quiet:
    can_request = False

    async def send(self, message: dict) -> None:
        raise AssertionError(f"nothing should be sent: {message}")


def identity(*scopes: str) -> Identity:
    return Identity(
        token_id=1, user_id=1, username="alice", application_id=1, client_id="host", scopes=frozenset(scopes),
        expires=timezone.now() + timedelta(hours=1),
    )


def context(*, initialized: bool = True, caller: Identity | None = None) -> HostContext:
    session = McpSession(protocol_version="2025-11-25" if initialized else "")
    return HostContext(era="legacy", protocol_version=session.protocol_version, transport="test", scope="", outbound=Quiet(), session=session, identity=caller)


class DispatcherCheckOrder(SimpleTestCase):
    def setUp(self) -> None:
        # Any handler reached is a failure of the order; the scope check reads no database.
        self.handler = mock.AsyncMock(side_effect=AssertionError("the handler ran"))
        self.enterContext(mock.patch.dict(dispatcher.METHODS, {"tools/call": dataclasses.replace(dispatcher.METHODS["tools/call"], handler=self.handler)}))
        self.enterContext(mock.patch.object(dispatcher.gateways, "identity_for_call", mock.AsyncMock(side_effect=lambda caller, **_: caller)))

    async def code(self, message: object, ctx: HostContext | None = None) -> int:
        reply = await dispatcher.handle_message(ctx or context(caller=identity()), message)
        assert reply is not None and "error" in reply, reply
        return reply["error"]["code"]

    async def test_a_broken_envelope_comes_before_an_unknown_method(self) -> None:
        self.assertEqual(await self.code({"jsonrpc": "1.0", "id": 1, "method": "no/such"}), jsonrpc.INVALID_REQUEST)

    async def test_a_bad_id_comes_before_bad_params(self) -> None:
        self.assertEqual(await self.code({"jsonrpc": "2.0", "id": [1], "method": "no/such", "params": "nope"}), jsonrpc.INVALID_REQUEST)

    async def test_params_that_are_no_object_come_before_an_unknown_method(self) -> None:
        self.assertEqual(await self.code({"jsonrpc": "2.0", "id": 1, "method": "no/such", "params": "nope"}), jsonrpc.INVALID_PARAMS)

    async def test_an_unknown_method_comes_before_a_missing_session(self) -> None:
        self.assertEqual(await self.code({"jsonrpc": "2.0", "id": 1, "method": "no/such"}, context(initialized=False)), jsonrpc.METHOD_NOT_FOUND)

    async def test_a_missing_session_comes_before_invalid_params(self) -> None:
        message = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": 5}}
        self.assertEqual(await self.code(message, context(initialized=False)), jsonrpc.INVALID_REQUEST)

    async def test_invalid_params_come_before_a_missing_scope(self) -> None:
        message = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": 5}}
        self.assertEqual(await self.code(message, context(caller=identity())), jsonrpc.INVALID_PARAMS)

    async def test_a_missing_scope_comes_before_the_handler(self) -> None:
        message = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "x", "arguments": {}}}
        self.assertEqual(await self.code(message, context(caller=identity())), jsonrpc.INSUFFICIENT_SCOPE)
        self.handler.assert_not_called()

    async def test_with_everything_right_the_handler_runs(self) -> None:
        self.handler.side_effect = None
        self.handler.return_value = {"content": []}
        message = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "x", "arguments": {}}}
        reply = await dispatcher.handle_message(context(caller=identity("mcp:tools")), message)
        self.assertEqual(reply, {"jsonrpc": "2.0", "id": 1, "result": {"content": []}})


class MethodTable(SimpleTestCase):
    def test_every_method_of_the_table_has_a_handler_and_every_handler_a_method(self) -> None:
        from mcp_endpoint.handlers import HANDLERS
        from mcp_endpoint.methods import ERAS

        self.assertEqual(set(HANDLERS), set(ERAS))

    def test_the_capabilities_follow_the_table(self) -> None:
        from mcp_endpoint.methods import capabilities

        legacy, modern = capabilities("legacy"), capabilities("modern")
        self.assertEqual(legacy["resources"], {"subscribe": True, "listChanged": True})
        self.assertIn("logging", legacy)
        self.assertNotIn("logging", modern)  # logging/setLevel is handshake-era only
        self.assertEqual(set(modern), {"tools", "resources", "prompts", "completions"})
