"""The Origin check compares scheme, host *and port* (issue 15, item 9).

A page served by any other program on the gateway's host (`http://127.0.0.1:9999`) is another
origin: it must not drive `/mcp` or `/ws` with a token it got hold of, nor open the consent
page's live feed `/consent/ws` with the user's session cookie. What legitimate clients send
keeps working: no Origin at all (non-browser hosts) on the MCP transports, and the gateway's
own origin.
"""

from __future__ import annotations

import json

from channels.testing import WebsocketCommunicator
from django.test import AsyncClient, override_settings

from fedmcp_site.asgi import application
from tests.base import MODERN, AsgiTestCase, amint_token, http, modern_meta, request, ws_communicator

GATEWAY = "127.0.0.1:8000"
OTHER_PORT = "http://127.0.0.1:9999"
DISCOVER = json.dumps(request("server/discover", {"_meta": modern_meta()})).encode()
ACCEPT = {
    "accept": "application/json, text/event-stream", "content-type": "application/json",
    "mcp-protocol-version": MODERN, "mcp-method": "server/discover",
}


class OriginPortTests(AsgiTestCase):
    async def gateway_token(self) -> str:
        return await amint_token("alice", resource=f"http://{GATEWAY}")

    async def post(self, origin: str | None) -> int:
        headers = {**ACCEPT, "host": GATEWAY, "origin": origin, "authorization": f"Bearer {await self.gateway_token()}"}
        return (await http("POST", "/mcp", DISCOVER, headers)).status

    async def mcp_socket(self, origin: str | None) -> bool:
        socket = ws_communicator(origin=origin, token=await self.gateway_token(), headers={"host": GATEWAY})
        connected, _ = await socket.connect()
        await socket.disconnect()
        return connected

    async def consent_socket(self, origin: str) -> bool:
        browser = AsyncClient()
        await browser.aforce_login(self.alice)
        headers = [(b"host", GATEWAY.encode()), (b"origin", origin.encode()), (b"cookie", f"sessionid={browser.cookies['sessionid'].value}".encode())]
        socket = WebsocketCommunicator(application, "/consent/ws", headers=headers)
        connected, _ = await socket.connect()
        await socket.disconnect()
        return connected

    async def test_an_origin_on_another_port_of_the_gateway_host_is_refused_on_mcp(self) -> None:
        assert await self.post(OTHER_PORT) == 403
        assert await self.post(f"https://{GATEWAY}") == 403  # another scheme is another origin too

    async def test_an_origin_on_another_port_of_the_gateway_host_is_refused_on_ws(self) -> None:
        assert not await self.mcp_socket(OTHER_PORT)

    async def test_an_origin_on_another_port_of_the_gateway_host_is_refused_on_consent_ws(self) -> None:
        assert not await self.consent_socket(OTHER_PORT)

    async def test_the_gateways_own_origin_and_no_origin_are_accepted(self) -> None:
        assert await self.post(f"http://{GATEWAY}") == 200
        assert await self.post(None) == 200
        assert await self.mcp_socket(f"http://{GATEWAY}")
        assert await self.mcp_socket(None)
        assert await self.consent_socket(f"http://{GATEWAY}")

    async def test_the_public_url_is_the_gateways_origin_behind_a_proxy(self) -> None:
        with override_settings(FEDMCP_PUBLIC_URL="https://mcp.example.org", ALLOWED_HOSTS=["mcp.example.org", "127.0.0.1"]):
            token = await amint_token("alice", resource="https://mcp.example.org")
            headers = {**ACCEPT, "host": "mcp.example.org", "authorization": f"Bearer {token}"}
            assert (await http("POST", "/mcp", DISCOVER, {**headers, "origin": "https://mcp.example.org"})).status == 200
            assert (await http("POST", "/mcp", DISCOVER, {**headers, "origin": "https://mcp.example.org:8443"})).status == 403

    async def test_listed_origins_are_accepted_exactly(self) -> None:
        with override_settings(MCP_ALLOWED_ORIGINS=["https://app.example"]):
            assert await self.post("https://app.example") == 200
            assert await self.post("https://app.example:444") == 403
