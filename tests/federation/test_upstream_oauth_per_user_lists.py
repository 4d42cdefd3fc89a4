"""Issue 15, item 9: what one account lists at a per-user OAuth peer is never shown to another user.

Alice and bob each connected their own account at a per-user OAuth peer whose server lists
each account's own files. Resources and resource templates are per account: each user's
`resources/list` and `resources/templates/list` come from their own connection, never from the
catalog account's (the first user who connected). Reads go upstream with the reader's own
token, and the upstream decides; a user who has not connected sees none of the peer's resources.

The upstream is a fake at the outbound seam that answers by the bearer token of each request.
"""

from __future__ import annotations

import json
from typing import Any
from unittest import mock

import httpx
from django.test import override_settings

from mcp_endpoint import jsonrpc
from tests.base import BOB, AsgiTestCase, McpClient, mint_token, register_peer
from tests.federation.test_catalog_sync import FakeUpstream
from tests.federation.test_upstream_oauth_subscriptions import connect

ALICE_FILE = "file:///alice-diary.txt"
BOB_FILE = "file:///bob-notes.txt"
BOB_OTHER = "file:///bob-todo.txt"
ACCOUNTS = {
    "Bearer alice-upstream": {
        "resources": [{"uri": ALICE_FILE, "name": "diary"}],
        "templates": [{"uriTemplate": "file:///alice/{name}", "name": "alice's folder"}],
    },
    "Bearer bob-upstream": {
        "resources": [{"uri": BOB_FILE, "name": "notes"}, {"uri": BOB_OTHER, "name": "todo"}],
        "templates": [{"uriTemplate": "file:///bob/{name}", "name": "bob's folder"}],
    },
}


class AccountsUpstream(FakeUpstream):
    """A server that lists, and lets read, only the files of the account whose token it gets."""

    def __init__(self, era: str) -> None:
        super().__init__(era=era)
        self.reads: list[tuple[str, str]] = []

    def client(self, *, connect_timeout: float, read_timeout: float, auth: Any = None, tls: Any = None) -> httpx.AsyncClient:
        from federation.client import ProviderAuth

        return httpx.AsyncClient(
            transport=httpx.MockTransport(self.handle), auth=ProviderAuth(auth) if auth is not None else None,
            timeout=httpx.Timeout(connect_timeout, read=read_timeout),
        )

    def handle(self, request: httpx.Request) -> httpx.Response:
        account = ACCOUNTS.get(request.headers.get("authorization", ""), {"resources": [], "templates": []})
        self.resources, self.templates = account["resources"], account["templates"]
        if request.method == "POST":
            body = json.loads(request.content)
            if body.get("method") == "resources/read":
                uri = body["params"]["uri"]
                self.reads.append((uri, request.headers.get("authorization", "")))
                if any(r["uri"] == uri for r in account["resources"]):
                    return self.reply(body, {"contents": [{"uri": uri, "text": f"contents of {uri}"}]})
                return self.reply(body, error={"code": -32002, "message": f"Resource not found: {uri}"})
        return super().handle(request)


@override_settings(FEDERATION_ALLOW_LOOPBACK=True)
class PerUserListsTests(AsgiTestCase):
    upstream_era = "legacy"

    def setUp(self) -> None:
        super().setUp()
        self.upstream = AccountsUpstream(self.upstream_era)
        self.patch = mock.patch("federation.upstream.streamable_http.outbound_client", self.upstream.client)
        self.patch.start()
        self.addCleanup(self.patch.stop)
        self.peer = register_peer("files", "http://127.0.0.1:9/mcp", sync=False, user_oauth=True)
        self.bob_token = mint_token(BOB)

    async def both_connected(self) -> None:
        from federation.services import peer_sync_catalog

        await connect("alice", self.peer, "alice-upstream")  # first: the catalog's account
        await connect(BOB, self.peer, "bob-upstream")
        report = await peer_sync_catalog(peer=self.peer)
        assert report.ok, report.errors

    async def listed(self, client: McpClient, era: str, method: str, key: str) -> list[str]:
        field = "uri" if key == "resources" else "uriTemplate"
        names: list[str] = []
        cursor: str | None = None
        while True:
            params = {"cursor": cursor} if cursor else {}
            reply = await (client.call_modern(method, params) if era == "modern" else client.call(method, params))
            result = reply.json()["result"]
            names += [item[field] for item in result[key]]
            cursor = result.get("nextCursor")
            if not cursor:
                return names

    async def host(self, token: str | None, path: str, era: str) -> McpClient:
        client = McpClient(path, token=token)
        if era == "legacy":
            await client.initialize()
        return client

    async def test_bob_lists_only_his_own_resources_and_templates_on_every_endpoint_and_era(self) -> None:
        await self.both_connected()
        for path, prefix in (("/mcp", "fedmcp://files/"), ("/peers/files/mcp", "")):
            for era in ("legacy", "modern"):
                with self.subTest(path=path, era=era):
                    bob = await self.host(self.bob_token, path, era)
                    resources = await self.listed(bob, era, "resources/list", "resources")
                    templates = await self.listed(bob, era, "resources/templates/list", "resourceTemplates")
                    self.assertEqual(resources, [prefix + BOB_FILE, prefix + BOB_OTHER])
                    self.assertEqual(templates, [prefix + "file:///bob/{name}"])
                    alice = await self.host(None, path, era)
                    self.assertEqual(await self.listed(alice, era, "resources/list", "resources"), [prefix + ALICE_FILE])

    @override_settings(MCP_PAGE_SIZE=1)
    async def test_a_users_own_list_pages(self) -> None:
        await self.both_connected()
        bob = await self.host(self.bob_token, "/mcp", "legacy")

        first = (await bob.call("resources/list")).json()["result"]

        self.assertEqual([r["uri"] for r in first["resources"]], [f"fedmcp://files/{BOB_FILE}"])
        second = (await bob.call("resources/list", {"cursor": first["nextCursor"]})).json()["result"]
        self.assertEqual([r["uri"] for r in second["resources"]], [f"fedmcp://files/{BOB_OTHER}"])
        self.assertNotIn("nextCursor", second)

    async def test_bob_reads_his_own_resource_with_his_own_token(self) -> None:
        await self.both_connected()
        for path, uri in (("/mcp", f"fedmcp://files/{BOB_FILE}"), ("/peers/files/mcp", BOB_FILE)):
            with self.subTest(path=path):
                bob = await self.host(self.bob_token, path, "legacy")
                reply = (await bob.call("resources/read", {"uri": uri})).json()
                self.assertEqual(reply["result"]["contents"], [{"uri": uri, "text": f"contents of {BOB_FILE}"}])
        self.assertEqual(self.upstream.reads, [(BOB_FILE, "Bearer bob-upstream")] * 2)

    async def test_bob_cannot_read_alices_resource_the_upstream_decides_with_his_token(self) -> None:
        await self.both_connected()
        bob = await self.host(self.bob_token, "/mcp", "legacy")

        reply = (await bob.call("resources/read", {"uri": f"fedmcp://files/{ALICE_FILE}"})).json()

        self.assertIn("error", reply)
        self.assertNotIn("contents of", json.dumps(reply))
        self.assertEqual(self.upstream.reads, [(ALICE_FILE, "Bearer bob-upstream")])

    async def test_a_user_who_has_not_connected_sees_no_resources_of_the_peer(self) -> None:
        from federation.services import peer_sync_catalog

        await connect("alice", self.peer, "alice-upstream")
        report = await peer_sync_catalog(peer=self.peer)
        assert report.ok, report.errors
        for path in ("/mcp", "/peers/files/mcp"):
            with self.subTest(path=path):
                bob = await self.host(self.bob_token, path, "legacy")
                self.assertEqual(await self.listed(bob, "legacy", "resources/list", "resources"), [])
                self.assertEqual(await self.listed(bob, "legacy", "resources/templates/list", "resourceTemplates"), [])
                # Reading still asks him to connect his own account, never uses alice's.
                reply = (await bob.call("resources/read", {"uri": f"fedmcp://files/{ALICE_FILE}" if path == "/mcp" else ALICE_FILE})).json()
                self.assertEqual(reply["error"]["code"], jsonrpc.UPSTREAM_AUTHORIZATION_REQUIRED)
        self.assertEqual(self.upstream.reads, [])


    async def test_a_resource_a_policy_denies_is_left_out_of_the_users_own_list(self) -> None:
        from identity.models import ConsentPolicy

        await self.both_connected()
        await ConsentPolicy.objects.acreate(peer="files", kind="resource", name_pattern=BOB_OTHER, decision="deny")
        for path, prefix in (("/mcp", "fedmcp://files/"), ("/peers/files/mcp", "")):
            with self.subTest(path=path):
                bob = await self.host(self.bob_token, path, "legacy")
                self.assertEqual(await self.listed(bob, "legacy", "resources/list", "resources"), [prefix + BOB_FILE])


    async def test_the_catalog_keeps_no_account_data_and_an_older_syncs_entries_are_not_listed(self) -> None:
        from federation.models import CatalogEntry, CatalogKind

        await self.both_connected()
        kinds = {kind async for kind in CatalogEntry.objects.filter(peer=self.peer).values_list("kind", flat=True)}
        self.assertEqual(kinds, {CatalogKind.TOOL, CatalogKind.PROMPT})  # the catalog account's resources were not stored
        # A catalog synced before this fix still holds alice's file: it is never listed, nor routed by it.
        await CatalogEntry.objects.acreate(
            peer=self.peer, kind=CatalogKind.RESOURCE, upstream_name=ALICE_FILE, name=f"fedmcp://files/{ALICE_FILE}",
            home="files", position=0, payload={"uri": ALICE_FILE, "name": "diary"},
        )
        bob = await self.host(self.bob_token, "/mcp", "legacy")
        self.assertEqual(await self.listed(bob, "legacy", "resources/list", "resources"), [f"fedmcp://files/{BOB_FILE}", f"fedmcp://files/{BOB_OTHER}"])


class PerUserListsModernUpstreamTests(PerUserListsTests):
    upstream_era = "modern"
