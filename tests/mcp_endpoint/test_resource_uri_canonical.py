"""Issue 15, finding 1: a resource deny policy is not bypassed by writing the URI another way.

Policy, router, grants and audit all see one canonical form of a URI (RFC 3986 §6.2.2:
scheme and host in lower case, percent-encoding hex in upper case, percent-encoded unreserved
characters decoded, dot segments removed), on the aggregated and the per-peer endpoint, and
the upstream receives that form.
"""

from __future__ import annotations

from channels.db import database_sync_to_async

from identity.audit import audit_flush
from identity.models import AuditEvent, ConsentPolicy
from mcp_endpoint import jsonrpc
from tests.base import FixturePeerTestCase, McpClient

DENIED = "test://template/42/data"
VARIANTS = [
    "test://template/4%32/data",
    "test://template/%34%32/data",
    "TEST://template/42/data",
    "test://TEMPLATE/42/data",
    "test://template/./42/data",
    "test://template/x/../42/data",
    "test://template/x/%2E%2E/42/data",
    "test://template/42/%64ata",
]
CALL_TIMEOUT = 20.0


@database_sync_to_async
def audited_reads() -> list[tuple[str, str, int | None]]:
    return list(AuditEvent.objects.filter(method="resources/read").order_by("id").values_list("name", "decision", "error_code"))


class ResourceDenyEncodingBypassTests(FixturePeerTestCase):
    def setUp(self) -> None:
        super().setUp()
        ConsentPolicy.objects.create(peer="everything", kind="resource", name_pattern=DENIED, decision="deny")

    async def read_codes(self, client: McpClient, uris: list[str]) -> dict[str, object]:
        await client.initialize()
        codes: dict[str, object] = {}
        for uri in uris:
            reply = (await client.call("resources/read", {"uri": uri}, timeout=CALL_TIMEOUT)).json()
            codes[uri] = reply["error"]["code"] if "error" in reply else "served"
        return codes

    async def test_resource_deny_is_not_bypassed_by_percent_encoding_on_the_aggregated_endpoint(self) -> None:
        uris = [f"fedmcp://everything/{u}" for u in [DENIED, *VARIANTS]]
        codes = await self.read_codes(McpClient(), uris)
        self.assertEqual(codes, dict.fromkeys(uris, jsonrpc.CONSENT_DENIED))
        await audit_flush()
        self.assertEqual(await audited_reads(), [(DENIED, "deny", jsonrpc.CONSENT_DENIED)] * len(uris))

    async def test_resource_deny_is_not_bypassed_by_percent_encoding_on_the_per_peer_endpoint(self) -> None:
        uris = [DENIED, *VARIANTS]
        codes = await self.read_codes(McpClient("/peers/everything/mcp"), uris)
        self.assertEqual(codes, dict.fromkeys(uris, jsonrpc.CONSENT_DENIED))
        await audit_flush()
        self.assertEqual(await audited_reads(), [(DENIED, "deny", jsonrpc.CONSENT_DENIED)] * len(uris))

    async def test_other_ids_are_still_served_and_the_upstream_gets_the_canonical_form(self) -> None:
        client = McpClient()
        await client.initialize()
        reply = (await client.call("resources/read", {"uri": "fedmcp://everything/test://template/4%33/data"}, timeout=CALL_TIMEOUT)).json()
        contents = reply["result"]["contents"]
        # The fixture echoes the id it received: decoded by us, not by it.
        self.assertEqual(contents[0]["uri"], "fedmcp://everything/test://template/43/data")
        self.assertIn('"id": "43"', contents[0]["text"])

    async def test_an_encoded_slash_next_to_a_dot_segment_is_refused_as_ambiguous(self) -> None:
        # An upstream that decodes %2F before removing dot segments would read .../42/data.
        codes = await self.read_codes(McpClient("/peers/everything/mcp"), ["test://template/x%2F..%2F42/data"])
        self.assertEqual(codes, {"test://template/x%2F..%2F42/data": jsonrpc.INVALID_PARAMS})
