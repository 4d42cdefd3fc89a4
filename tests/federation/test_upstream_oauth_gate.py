"""A call to a per-user OAuth peer from a user who has not connected: pointed at /connect/<peer>.

The fixture server is peer `everything`, switched to per-user OAuth after its catalog sync. It
ignores the bearer token the gateway then sends; what matters here is what the host is told
before and after the user connects (the real upstream authorization is tests/e2e/test_upstream_oauth.py).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model
from django.utils import timezone

from federation.models import Peer
from identity.models import UpstreamToken
from mcp_endpoint import jsonrpc, request_states
from tests.base import FixturePeerTestCase, McpClient, Reply, mint_token, modern_meta, request

TOOL = "everything__test_simple_text"
MODERN = "2026-07-28"
URL_ELICITATION = {"elicitation": {"url": {}}}


def message_of(reply: Reply) -> dict[str, Any]:
    if reply.headers.get("content-type", "").startswith("text/event-stream"):
        return [m for m in reply.events() if "method" not in m][-1]
    return reply.json()


@database_sync_to_async
def connect(user: Any, peer: Peer) -> None:
    UpstreamToken.objects.create(
        user=user, peer=peer, issuer="http://as.example", access_token="upstream-access", refresh_token="upstream-refresh",
        expires_at=timezone.now() + timedelta(hours=1),
    )


class ConnectGateTests(FixturePeerTestCase):
    def setUp(self) -> None:
        super().setUp()
        Peer.objects.filter(pk=self.peer.pk).update(user_oauth=True)
        self.peer.refresh_from_db()

    async def legacy_call(self, capabilities: dict[str, Any]) -> dict[str, Any]:
        client = McpClient()
        await client.initialize(capabilities=capabilities)
        return message_of(await client.call("tools/call", {"name": TOOL, "arguments": {}}))

    async def modern_call(self, extra: dict[str, Any] | None = None, *, token: str | None = None) -> dict[str, Any]:
        client = McpClient(token=token)
        params = {"name": TOOL, "arguments": {}, **(extra or {}), "_meta": modern_meta(URL_ELICITATION)}
        headers = {"mcp-protocol-version": MODERN, "mcp-method": "tools/call", "mcp-name": TOOL}
        return message_of(await client.post(request("tools/call", params, 1), headers))

    async def test_a_handshake_host_with_url_elicitation_gets_32042_with_the_connect_page(self) -> None:
        reply = await self.legacy_call(URL_ELICITATION)

        assert reply["error"]["code"] == jsonrpc.URL_ELICITATION_REQUIRED
        (elicitation,) = reply["error"]["data"]["elicitations"]
        assert elicitation["mode"] == "url" and elicitation["url"].endswith("/connect/everything")
        assert elicitation["elicitationId"] and "connect your account" in elicitation["message"]

    async def test_other_hosts_get_an_error_naming_the_connect_page(self) -> None:
        reply = await self.legacy_call({})

        assert reply["error"]["code"] == jsonrpc.UPSTREAM_AUTHORIZATION_REQUIRED
        url = reply["error"]["data"]["connectUrl"]
        assert url.endswith("/connect/everything") and url in reply["error"]["message"]

    async def test_once_connected_the_call_goes_through(self) -> None:
        await connect(self.alice, self.peer)

        reply = await self.legacy_call(URL_ELICITATION)

        assert reply["result"]["content"][0]["text"]

    async def test_another_users_connection_does_not_count(self) -> None:
        await connect(self.alice, self.peer)
        bob = await database_sync_to_async(get_user_model().objects.create_user)("bob")
        bobs_token = await database_sync_to_async(mint_token)(bob.username)

        reply = await self.modern_call(token=bobs_token)

        assert reply["result"]["resultType"] == "input_required"

    async def test_a_2026_host_gets_input_required_and_its_retry_goes_through_once_connected(self) -> None:
        first = await self.modern_call()
        assert first["result"]["resultType"] == "input_required"
        (request_,) = first["result"]["inputRequests"].values()
        assert request_["method"] == "elicitation/create"
        assert request_["params"]["mode"] == "url" and request_["params"]["url"].endswith("/connect/everything")

        await connect(self.alice, self.peer)
        retry = {"requestState": first["result"]["requestState"], "inputResponses": {"fedmcp-connect": {"action": "accept"}}}
        second = await self.modern_call(retry)

        assert second["result"]["resultType"] == "complete" and second["result"]["content"][0]["text"]

    async def test_a_declined_connect_is_refused_at_once(self) -> None:
        first = await self.modern_call()
        retry = {"requestState": first["result"]["requestState"], "inputResponses": {"fedmcp-connect": {"action": "decline"}}}

        second = await self.modern_call(retry)

        assert second["error"]["code"] == jsonrpc.UPSTREAM_AUTHORIZATION_REQUIRED

    async def test_a_forged_request_state_is_refused(self) -> None:
        reply = await self.modern_call({"requestState": request_states.prefix(request_states.CONNECT) + "forged", "inputResponses": {}})

        assert reply["error"]["code"] == jsonrpc.INVALID_PARAMS

    async def test_a_state_issued_to_another_user_is_refused(self) -> None:
        first = await self.modern_call()
        bob = await database_sync_to_async(get_user_model().objects.create_user)("bob")
        bobs_token = await database_sync_to_async(mint_token)(bob.username)

        reply = await self.modern_call({"requestState": first["result"]["requestState"]}, token=bobs_token)

        assert reply["error"]["code"] == jsonrpc.INVALID_PARAMS
