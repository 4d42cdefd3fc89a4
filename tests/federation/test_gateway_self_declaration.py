"""An upstream that says it is a fedmcp gateway is not believed for saying so (issue 15, "Trust boundaries").

Only the operator makes a peer a gateway (`peer add --gateway`, the admin, the API), and what a
gateway peer asserts (its name and the homes of its catalog, what it relays) counts only once
this gateway trusts it in turn (`gateway trust NAME --issuer ORIGIN`: identity/trust/gateways.py
`peer_gateway_standing`). Whatever it is, an upstream's elicitations pass this gateway's
consent policies. The upstreams are `HostileUpstream`s at the HTTP seam; the host is a
2026-07-28 client on /mcp, acting as alice.
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from django.test import override_settings

from federation.models import CatalogEntry, Peer
from federation.router import resolve
from federation.services import peer_add, peer_sync_catalog
from identity.models import ConsentPolicy, ConsentPrompt, TrustedGateway
from identity.trust.gateways import gateway_trust, gateway_untrust
from mcp_endpoint import jsonrpc
from tests.base import MODERN, AsgiTestCase, McpClient, modern_meta, register_peer, request
from tests.federation.hostile_upstream import ORIGIN, PASSWORD_FORM, HostileUpstream, install
from tests.identity.consent.test_flow import final_message

GB_ORIGIN = "http://127.0.0.1:10"
GX_ORIGIN = "http://127.0.0.1:11"
# Tools are allowed without asking, so only the upstream's own requests meet consent (shipped default: ask).
SETTINGS = {"FEDMCP_CONSENT_DEFAULT": "allow", "FEDMCP_CONSENT_ELICITATION_DEFAULT": "ask", "FEDMCP_GATEWAY_NAME": "a"}


class UpstreamTestCase(AsgiTestCase):
    def setUp(self) -> None:
        super().setUp()
        # In setUp: after tests/conftest.py's fixture, which allows everything by default.
        self.enterContext(override_settings(**SETTINGS))


def names_of(peer: str) -> list[tuple[str, str]]:
    return sorted(CatalogEntry.objects.filter(peer__name=peer).values_list("name", "home"))


def believed_gateway(name: str, upstream: HostileUpstream) -> Peer:
    """A peer gateway done right: added with --gateway by the operator, and trusted here in turn."""
    gateway_trust(name=name, issuer=upstream.origin)
    return register_peer(name, upstream.url, is_gateway=True)


async def tool_of(peer: str) -> str:
    """The name hosts see for the peer's first tool, whatever home it was given."""
    return await CatalogEntry.objects.filter(peer__name=peer, kind="tool").order_by("position").values_list("name", flat=True).afirst()


async def call_tool(name: str) -> dict[str, Any]:
    """Call tool `name` on /mcp as a 2026-07-28 host that can answer form and URL elicitations."""
    client = McpClient()
    params = {"name": name, "arguments": {}, "_meta": modern_meta({"elicitation": {"form": {}, "url": {}}, "sampling": {}})}
    headers = {"mcp-protocol-version": MODERN, "mcp-method": "tools/call", "mcp-name": name}
    return final_message(await client.post(request("tools/call", params, client.next_id()), headers))


class SelfDeclaredGatewayTests(UpstreamTestCase):
    def setUp(self) -> None:
        super().setUp()
        # It claims to be gateway `gb` and lists a name under another gateway's home.
        self.evil = HostileUpstream(gateway="gb", tools=["fixture__add", "gc.fixture__add"])
        self.gb = HostileUpstream(gateway="gb", tools=["fixture__add"], origin=GB_ORIGIN)
        install(self, self.evil, self.gb)

    def test_it_is_stored_as_a_plain_peer_under_its_own_name(self) -> None:
        peer = register_peer("evil", self.evil.url)

        self.assertEqual(names_of("evil"), [("evil__fixture__add", "evil"), ("evil__gc.fixture__add", "evil")])
        self.assertEqual((peer.is_gateway, peer.remote_gateway), (False, ""))
        # What it says of itself is kept as a hint for the operator, and nothing more.
        self.assertEqual(peer.suggested_gateway, "gb")

    def test_it_cannot_take_the_names_of_a_gateway_it_claims_to_be(self) -> None:
        # Added first, so it would win any name it shares with the real `gb`.
        register_peer("evil", self.evil.url)
        believed_gateway("gb", self.gb)

        self.assertEqual(list(CatalogEntry.objects.filter(name="gb.fixture__add").values_list("peer__name", flat=True)), ["gb"])
        route = async_to_sync(resolve)("", "tool", "gb.fixture__add")
        self.assertEqual((route.peer.name, route.upstream_name), ("gb", "fixture__add"))

    async def test_its_elicitation_meets_a_deny_policy(self) -> None:
        await database_sync_to_async(register_peer)("evil", self.evil.url)
        await ConsentPolicy.objects.acreate(peer="evil", kind="elicitation", decision="deny")

        reply = await call_tool(await tool_of("evil"))

        self.assertEqual(reply["error"]["code"], jsonrpc.CONSENT_DENIED, reply)
        self.assertNotIn("password", str(reply))

    async def test_without_a_policy_the_user_is_asked_first(self) -> None:
        await database_sync_to_async(register_peer)("evil", self.evil.url)

        result = (await call_tool(await tool_of("evil")))["result"]

        # The host gets only this gateway's pointer to its consent page; the form is held back.
        [pointer] = result["inputRequests"].values()
        self.assertEqual((pointer["method"], pointer["params"]["mode"]), ("elicitation/create", "url"))
        self.assertNotIn("password", str(result))
        prompt = await ConsentPrompt.objects.aget()
        self.assertEqual((prompt.peer, prompt.kind, prompt.request["message"]), ("evil", "elicitation", PASSWORD_FORM["message"]))


class OperatorMarkedGatewayTests(UpstreamTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.gb = HostileUpstream(gateway="gb", tools=["fixture__add"])
        install(self, self.gb)

    def sync(self, peer: Peer) -> list[str]:
        report = async_to_sync(peer_sync_catalog)(peer=peer)
        self.assertTrue(report.ok, report.errors)
        return report.warnings

    def test_it_is_not_believed_until_trusted_in_turn_under_the_name_it_uses(self) -> None:
        peer = peer_add(name="gb-peer", transport="streamable-http", url=self.gb.url, is_gateway=True)

        warnings = self.sync(peer)
        self.assertEqual(names_of("gb-peer"), [("gb-peer__fixture__add", "gb-peer")])
        self.assertIn(f"gateway trust gb --issuer {ORIGIN}", " ".join(warnings))
        self.assertIn("does not trust", Peer.objects.get(name="gb-peer").last_error)

        # Trusted under another name: it would take that name's homes, so still not believed.
        gateway_trust(name="gc", issuer=ORIGIN)
        warnings = self.sync(peer)
        self.assertEqual(names_of("gb-peer"), [("gb-peer__fixture__add", "gb-peer")])
        self.assertIn("trusts http://127.0.0.1:9 as 'gc'", " ".join(warnings))

        gateway_untrust(gateway=TrustedGateway.objects.get(name="gc"))
        gateway_trust(name="gb", issuer=ORIGIN)
        self.assertEqual(self.sync(peer), [])
        self.assertEqual(names_of("gb-peer"), [("gb.fixture__add", "gb.fixture")])
        self.assertEqual(Peer.objects.get(name="gb-peer").remote_gateway, "gb")

    async def test_before_trust_its_elicitation_is_asked_about(self) -> None:
        await database_sync_to_async(peer_add)(name="gb-peer", transport="streamable-http", url=self.gb.url, is_gateway=True)
        await database_sync_to_async(self.sync)(await Peer.objects.aget(name="gb-peer"))

        result = (await call_tool(await tool_of("gb-peer")))["result"]

        self.assertNotIn("password", str(result))
        self.assertEqual(await ConsentPrompt.objects.filter(peer="gb-peer", kind="elicitation").acount(), 1)

    async def test_a_believed_gateways_elicitation_still_meets_a_deny_policy(self) -> None:
        await database_sync_to_async(believed_gateway)("gb", self.gb)
        await ConsentPolicy.objects.acreate(peer="gb", kind="elicitation", decision="deny")

        reply = await call_tool("gb.fixture__add")

        self.assertEqual(reply["error"]["code"], jsonrpc.CONSENT_DENIED, reply)

    async def test_revoking_trust_takes_effect_before_the_next_sync(self) -> None:
        await database_sync_to_async(believed_gateway)("gb", self.gb)
        self.assertTrue((await resolve("", "tool", "gb.fixture__add")).peer.trusted_gateway)

        await database_sync_to_async(gateway_untrust)(gateway=await TrustedGateway.objects.aget(name="gb"))

        self.assertFalse((await resolve("", "tool", "gb.fixture__add")).peer.trusted_gateway)
        result = (await call_tool("gb.fixture__add"))["result"]
        self.assertNotIn("password", str(result))


class BelievedGatewayHomesTests(UpstreamTestCase):
    def test_a_believed_gateway_cannot_list_under_the_home_of_another_gateway_peered_here(self) -> None:
        gb = HostileUpstream(gateway="gb", tools=["fixture__add"], origin=GB_ORIGIN)
        gx = HostileUpstream(gateway="gx", tools=["own__tool", "gb.fixture__add", "gc.fixture__add"], origin=GX_ORIGIN)
        install(self, gb, gx)
        believed_gateway("gb", gb)

        believed_gateway("gx", gx)

        # gb alone lists under gb's homes; what gx relays from gateways not peered here it may.
        self.assertEqual(names_of("gx"), [("gc.fixture__add", "gc.fixture"), ("gx.own__tool", "gx.own")])
        self.assertEqual(names_of("gb"), [("gb.fixture__add", "gb.fixture")])
