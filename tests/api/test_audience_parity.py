"""A token's audience is judged the same way on /api/ and on the MCP endpoints.

Behind nginx with `proxy_set_header Host $host`, the port of the public URL is dropped from the
Host header. /mcp compared the token with FEDMCP_PUBLIC_URL and accepted it; /api/ (DOT's
prefix match of the request URL) refused it, "not valid for this resource". Both now ask
identity.hostauth.tokens.audience_error, with or without FEDMCP_PUBLIC_URL, whatever the Host.
"""

from __future__ import annotations

import json

from asgiref.sync import sync_to_async
from django.test import Client, override_settings
from oauth2_provider.models import AccessToken

from identity.hostauth import scopes
from tests.base import MCP_SCOPE, AsgiTestCase, http, mint_token, persona

PUBLIC = "http://127.0.0.1:8443"
HOSTS = ("127.0.0.1:8443", "127.0.0.1")
INITIALIZE = json.dumps({
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
}).encode()
MCP_PATHS = ("/mcp", "/peers/files/mcp")


class AudienceParityTests(AsgiTestCase):
    def setUp(self) -> None:
        super().setUp()
        operator = persona("root")
        operator.is_staff = True
        operator.save()
        self.token = mint_token("root", scope=f"{scopes.ADMIN} {MCP_SCOPE}", resource=PUBLIC)

    async def verdicts(self, host: str) -> dict[str, bool]:
        """Whether each endpoint accepted the token (anything but 401), sent with `host`."""
        client = Client(headers={"host": host, "authorization": f"Bearer {self.token}"})
        api = await sync_to_async(client.get)("/api/peers/")
        accepted = {"/api/": api.status_code != 401}
        for path in MCP_PATHS:
            reply = await http("POST", path, INITIALIZE, {
                "host": host, "authorization": f"Bearer {self.token}",
                "content-type": "application/json", "accept": "application/json, text/event-stream",
            })
            accepted[path] = reply.status != 401
        return accepted

    async def test_with_a_public_url_the_token_is_accepted_everywhere_with_or_without_the_port(self) -> None:
        with override_settings(FEDMCP_PUBLIC_URL=PUBLIC):
            for host in HOSTS:
                assert await self.verdicts(host) == {"/api/": True, "/mcp": True, "/peers/files/mcp": True}, host

    async def test_without_a_public_url_only_the_host_with_the_port_matches_everywhere(self) -> None:
        with override_settings(FEDMCP_PUBLIC_URL=""):
            assert await self.verdicts("127.0.0.1:8443") == {"/api/": True, "/mcp": True, "/peers/files/mcp": True}
            assert await self.verdicts("127.0.0.1") == {"/api/": False, "/mcp": False, "/peers/files/mcp": False}

    async def test_a_token_that_names_no_audience_is_refused_everywhere(self) -> None:
        await AccessToken.objects.filter(user__username="root").aupdate(resource=[])
        with override_settings(FEDMCP_PUBLIC_URL=PUBLIC):
            for host in HOSTS:
                assert await self.verdicts(host) == {"/api/": False, "/mcp": False, "/peers/files/mcp": False}, host
