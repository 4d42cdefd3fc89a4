"""The database failing under a request: a clear 503, never a 500 or a traceback.

tests/e2e/test_db_outage.py makes PostgreSQL really unreachable for a daphne worker; these are
the same answers in process, at each place a request reads the database: the bearer-token check
at the edge, the session lookup inside the consumer, a handler's own reads (the catalog) in both
eras and over a WebSocket, and /healthz.
"""

from __future__ import annotations

import json
from unittest import mock

from django.db import InterfaceError, OperationalError
from django.test import Client, TestCase

from mcp_endpoint import jsonrpc
from tests.base import HOST, AsgiTestCase, McpClient, http, request, ws_communicator

SECRET = "password=hunter2 host=db.internal"
"""What a database error's text may hold; it must never reach a host."""


class McpRequestTests(AsgiTestCase):
    def assert_unavailable(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.assertEqual(status, 503, body)
        self.assertEqual(headers["retry-after"], "5")
        self.assertTrue(headers["content-type"].startswith("application/json"))
        error = json.loads(body)["error"]
        self.assertEqual(error["code"], jsonrpc.INTERNAL_ERROR)
        self.assertIn("database", error["message"])
        self.assertNotIn(SECRET.encode(), body)
        self.assertNotIn(b"Traceback", body)

    async def test_the_token_check_failing_answers_503(self) -> None:
        with (
            mock.patch("mcp_endpoint.auth.authenticate", side_effect=OperationalError(SECRET)),
            self.assertLogs("mcp_endpoint.auth", "WARNING"),
        ):
            reply = await http("POST", "/mcp", json.dumps(request("tools/list")).encode(), {"content-type": "application/json", "accept": "application/json"})
        self.assert_unavailable(reply.status, reply.headers, reply.body)

    async def test_a_broken_connection_after_the_token_check_answers_503(self) -> None:
        client = McpClient()
        await client.initialize()
        with (
            mock.patch("mcp_endpoint.sessions.session_load", side_effect=InterfaceError(SECRET)),
            self.assertLogs("mcp_endpoint.consumers.base", "WARNING"),
        ):
            reply = await client.call("tools/list")
        self.assert_unavailable(reply.status, reply.headers, reply.body)
        # And once the database answers again, so does the same session.
        self.assertIn("tools", (await client.call("tools/list")).json()["result"])

    async def test_a_handler_reading_the_catalog_answers_503_in_the_handshake_era(self) -> None:
        client = McpClient()
        await client.initialize()
        with (
            mock.patch("mcp_endpoint.handlers.catalog.list_items", side_effect=OperationalError(SECRET)),
            self.assertLogs("mcp_endpoint.dispatcher", "WARNING"),
        ):
            reply = await client.call("tools/list")
        self.assert_unavailable(reply.status, reply.headers, reply.body)
        self.assertEqual(reply.json()["error"]["data"], {"reason": "database_unavailable", "retryAfterMs": 5000})
        self.assertIn("tools", (await client.call("tools/list")).json()["result"])

    async def test_a_handler_reading_the_catalog_answers_503_in_the_stateless_era(self) -> None:
        with (
            mock.patch("mcp_endpoint.handlers.catalog.list_items", side_effect=OperationalError(SECRET)),
            self.assertLogs("mcp_endpoint.dispatcher", "WARNING"),
        ):
            reply = await McpClient().call_modern("tools/list")
        self.assert_unavailable(reply.status, reply.headers, reply.body)

    async def test_in_a_batch_the_failed_request_is_an_error_beside_the_others(self) -> None:
        client = McpClient()
        await client.initialize("2025-03-26")  # the one version with JSON-RPC batches
        batch = [request("tools/list", None, 7), request("ping", None, 8)]
        with (
            mock.patch("mcp_endpoint.handlers.catalog.list_items", side_effect=OperationalError(SECRET)),
            self.assertLogs("mcp_endpoint.dispatcher", "WARNING"),
        ):
            reply = await client.post(batch)
        self.assertEqual(reply.status, 200, reply.body)
        answers = {a["id"]: a for a in reply.json()}
        self.assertEqual(answers[7]["error"]["code"], jsonrpc.INTERNAL_ERROR)
        self.assertIn("database", answers[7]["error"]["message"])
        self.assertEqual(answers[8]["result"], {})

    async def test_over_a_websocket_the_error_names_the_database_and_the_socket_stays_open(self) -> None:
        ws = ws_communicator()
        connected, _ = await ws.connect()
        self.assertTrue(connected)
        await ws.send_json_to(request("initialize", {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}, 1))
        await ws.receive_json_from()
        await ws.send_json_to({"jsonrpc": "2.0", "method": "notifications/initialized"})
        with (
            mock.patch("mcp_endpoint.handlers.catalog.list_items", side_effect=OperationalError(SECRET)),
            self.assertLogs("mcp_endpoint.dispatcher", "WARNING"),
        ):
            await ws.send_json_to(request("tools/list", None, 2))
            reply = await ws.receive_json_from()
        self.assertEqual(reply["id"], 2)
        self.assertEqual(reply["error"]["code"], jsonrpc.INTERNAL_ERROR)
        self.assertEqual(reply["error"]["data"]["reason"], "database_unavailable")
        self.assertNotIn(SECRET, json.dumps(reply))
        await ws.send_json_to(request("tools/list", None, 3))
        self.assertIn("tools", (await ws.receive_json_from())["result"])
        await ws.disconnect()


class HealthzTests(TestCase):
    def test_healthz_answers_503_with_json_while_the_database_is_down(self) -> None:
        with (
            mock.patch("fedmcp_site.views.Peer.objects.count", side_effect=OperationalError(SECRET)),
            self.assertLogs("fedmcp_site.views", "WARNING"),
        ):
            reply = Client(HTTP_HOST=HOST).get("/healthz")
        self.assertEqual(reply.status_code, 503)
        self.assertEqual(reply.json(), {"status": "unavailable", "error": "OperationalError"})
