"""The database failing under a request: a clear 503, never a 500 or a traceback.

tests/e2e/test_db_outage.py makes PostgreSQL really unreachable for a daphne worker; these are
the same answers in process, at each place a request reads the database: the bearer-token check
at the edge, the session lookup inside the consumer, and /healthz.
"""

from __future__ import annotations

import json
from unittest import mock

from django.db import InterfaceError, OperationalError
from django.test import Client, TestCase

from mcp_endpoint import jsonrpc
from tests.base import HOST, AsgiTestCase, McpClient, http, request

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


class HealthzTests(TestCase):
    def test_healthz_answers_503_with_json_while_the_database_is_down(self) -> None:
        with (
            mock.patch("fedmcp_site.views.Peer.objects.count", side_effect=OperationalError(SECRET)),
            self.assertLogs("fedmcp_site.views", "WARNING"),
        ):
            reply = Client(HTTP_HOST=HOST).get("/healthz")
        self.assertEqual(reply.status_code, 503)
        self.assertEqual(reply.json(), {"status": "unavailable", "error": "OperationalError"})
