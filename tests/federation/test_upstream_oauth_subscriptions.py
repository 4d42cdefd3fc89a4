"""Issue 15, finding 4: at a per-user OAuth peer, a subscription is the subscriber's own.

`resources/subscribe` goes upstream on the subscriber's own connection, with their own token
(never the catalog account's, never another user's), and a `notifications/resources/updated`
that arrives on one user's connection reaches that user's sessions only.

The upstream is a handshake-era fake at the outbound seam that records the bearer token of
every request; an update "arriving" on a connection is that connection's event callback.
"""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any
from unittest import mock

import httpx
from channels.db import database_sync_to_async
from django.test import override_settings
from django.utils import timezone

from federation.models import Peer
from federation.pool import pool
from identity.models import UpstreamToken
from mcp_endpoint import jsonrpc
from tests.base import BOB, AsgiTestCase, HttpExchange, McpClient, mint_token, persona, register_peer
from tests.federation.test_catalog_sync import FakeUpstream

NOTES = "file:///notes.txt"
OTHER = "file:///other.txt"
WAIT = 5.0


class SubscribingUpstream(FakeUpstream):
    """A handshake-era server whose resources can be subscribed to; remembers who subscribed."""

    def __init__(self) -> None:
        super().__init__(era="legacy")
        self.resources = [{"uri": NOTES, "name": "notes"}, {"uri": OTHER, "name": "other"}]
        self.subscribed_with: list[tuple[str, str]] = []
        self.accounts: dict[str, list[dict[str, Any]]] = {}

    def client(self, *, connect_timeout: float, read_timeout: float, auth: Any = None, tls: Any = None) -> httpx.AsyncClient:
        """Stand-in for `federation.client.outbound_client`, with the connection's own credentials."""
        from federation.client import ProviderAuth

        return httpx.AsyncClient(
            transport=httpx.MockTransport(self.handle), auth=ProviderAuth(auth) if auth is not None else None,
            timeout=httpx.Timeout(connect_timeout, read=read_timeout),
        )

    def capabilities(self) -> dict[str, Any]:
        return {"tools": {}, "resources": {"subscribe": True}, "prompts": {}}

    def handle(self, request: httpx.Request) -> httpx.Response:
        # What each account holds: the resources list answers with the caller's own files.
        self.resources = self.accounts.get(request.headers.get("authorization", ""), self.resources)
        if request.method == "POST":
            body = json.loads(request.content)
            if body.get("method") in ("resources/subscribe", "resources/unsubscribe"):
                if request.headers.get("mcp-session-id") != self.session_id:
                    return super().handle(request)
                self.subscribed_with.append((body["params"]["uri"], request.headers.get("authorization", "")))
                return self.reply(body, {})
        return super().handle(request)


@database_sync_to_async
def connect(username: str, peer: Peer, token: str) -> None:
    UpstreamToken.objects.create(
        user=persona(username), peer=peer, issuer="http://as.example", access_token=token, refresh_token="",
        expires_at=timezone.now() + timedelta(hours=1),
    )


@override_settings(FEDERATION_ALLOW_LOOPBACK=True)
class PerUserSubscriptionTests(AsgiTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.upstream = SubscribingUpstream()
        self.patch = mock.patch("federation.upstream.streamable_http.outbound_client", self.upstream.client)
        self.patch.start()
        self.addCleanup(self.patch.stop)
        self.peer = register_peer("files", "http://127.0.0.1:9/mcp", sync=False, user_oauth=True)
        self.bob_token = mint_token(BOB)

    async def sync(self) -> None:
        from federation.services import peer_sync_catalog

        report = await peer_sync_catalog(peer=self.peer)
        assert report.ok, report.errors

    async def subscribed_session(self, token: str | None, *uris: str) -> McpClient:
        client = McpClient(token=token)
        await client.initialize()
        for uri in uris:
            reply = (await client.call("resources/subscribe", {"uri": f"fedmcp://files/{uri}"})).json()
            assert reply.get("result") == {}, reply
        return client

    async def test_a_subscription_goes_upstream_with_the_subscribers_own_token(self) -> None:
        await connect("alice", self.peer, "alice-upstream")  # alice connected first: the catalog's account
        await connect(BOB, self.peer, "bob-upstream")
        await self.sync()

        await self.subscribed_session(self.bob_token, NOTES)
        await self.subscribed_session(None, NOTES)  # alice: her own subscription, not bob's

        self.assertEqual(self.upstream.subscribed_with, [(NOTES, "Bearer bob-upstream"), (NOTES, "Bearer alice-upstream")])

    async def test_an_update_on_one_users_connection_reaches_only_that_user(self) -> None:
        await connect("alice", self.peer, "alice-upstream")
        await connect(BOB, self.peer, "bob-upstream")
        await self.sync()
        alice = await self.subscribed_session(None, NOTES, OTHER)
        bob = await self.subscribed_session(self.bob_token, NOTES, OTHER)
        users = {"alice": self.alice.pk, "bob": await database_sync_to_async(lambda: persona(BOB).pk)()}

        def connection_of(user_id: int) -> Any:
            (connection,) = [c for c in pool.connections() if getattr(c.auth, "user_id", None) == user_id and c.peer.name == "files"]
            return connection

        async with (
            HttpExchange("GET", "/mcp", {**alice.headers(), "accept": "text/event-stream"}) as alice_stream,
            HttpExchange("GET", "/mcp", {**bob.headers(), "accept": "text/event-stream"}) as bob_stream,
        ):
            self.assertEqual((await alice_stream.start(), await bob_stream.start()), (200, 200))
            # Alice's server says her notes changed; then bob's says his other file changed.
            await connection_of(users["alice"]).on_event({"jsonrpc": "2.0", "method": "notifications/resources/updated", "params": {"uri": NOTES}})
            await connection_of(users["bob"]).on_event({"jsonrpc": "2.0", "method": "notifications/resources/updated", "params": {"uri": OTHER}})
            alice_first = await asyncio.wait_for(alice_stream.next_event(), WAIT)
            bob_first = await asyncio.wait_for(bob_stream.next_event(), WAIT)

        self.assertEqual(alice_first["params"]["uri"], f"fedmcp://files/{NOTES}")
        self.assertEqual(bob_first["params"]["uri"], f"fedmcp://files/{OTHER}")

    async def test_a_user_who_has_not_connected_cannot_subscribe_on_someone_elses_account(self) -> None:
        await connect("alice", self.peer, "alice-upstream")
        await self.sync()
        client = McpClient(token=self.bob_token)
        await client.initialize()

        reply = (await client.call("resources/subscribe", {"uri": f"fedmcp://files/{NOTES}"})).json()

        self.assertEqual(reply["error"]["code"], jsonrpc.UPSTREAM_AUTHORIZATION_REQUIRED)
        self.assertEqual(self.upstream.subscribed_with, [])
        # Once bob connected his own account, his retry subscribes with it.
        await connect(BOB, self.peer, "bob-upstream")
        reply = (await client.call("resources/subscribe", {"uri": f"fedmcp://files/{NOTES}"})).json()
        self.assertEqual(reply, {"jsonrpc": "2.0", "id": reply["id"], "result": {}})
        self.assertEqual(self.upstream.subscribed_with, [(NOTES, "Bearer bob-upstream")])

    async def test_the_catalog_account_of_a_per_user_peer_lists_no_resources_for_everyone(self) -> None:
        """Issue 15 item 9: resources of a per-user peer are listed per user, never the catalog account's.

        The catalog account is the catalog user set in the admin, else the first user who
        connected (docs/IDENTITY.md "The catalog"): here alice. Bob is shown his own file, never hers.
        """
        self.upstream.accounts = {
            "Bearer alice-upstream": [{"uri": "file:///alice-diary.txt", "name": "diary"}],
            "Bearer bob-upstream": [{"uri": "file:///bob-notes.txt", "name": "notes"}],
        }
        await connect("alice", self.peer, "alice-upstream")
        await connect(BOB, self.peer, "bob-upstream")
        await self.sync()
        client = McpClient(token=self.bob_token)
        await client.initialize()

        listed = (await client.call("resources/list")).json()["result"]["resources"]

        self.assertEqual([r["uri"] for r in listed], ["fedmcp://files/file:///bob-notes.txt"])
