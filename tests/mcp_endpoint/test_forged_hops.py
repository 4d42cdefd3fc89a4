"""Only a trusted peer gateway's hop record counts (issue 15, item 9).

`_meta["io.fedmcp/hops"]` says which gateways a request came through; it drives the loop and
path-length refusals and is passed on (extended) to peer gateways. A plain host could set it
to anything: make the gateway refuse its own calls as loops, or tell a peer gateway the call
had passed gateways it never saw. Now a hop record is honoured only as part of a trusted
gateway's verified assertion (its `via` must equal the record, identity/trust/gateways.py); from
anyone else it is ignored, like the other fedmcp keys hosts send.
"""

from __future__ import annotations

from django.conf import settings

from mcp_endpoint.pipeline.envelope import HOPS_META_KEY
from tests.base import MODERN, FixturePeerTestCase, McpClient, modern_meta, request

TOOL = "everything__add"


class ForgedHopsTest(FixturePeerTestCase):
    async def call_with_hops(self, hops: object) -> dict:
        params = {"name": TOOL, "arguments": {"a": 2, "b": 3}, "_meta": {**modern_meta(), HOPS_META_KEY: hops}}
        headers = {"mcp-protocol-version": MODERN, "mcp-method": "tools/call", "mcp-name": TOOL}
        reply = await McpClient().post(request("tools/call", params), headers)
        return reply.json()

    async def test_a_plain_host_cannot_forge_a_hop_record_that_makes_a_loop(self) -> None:
        answer = await self.call_with_hops([settings.FEDMCP_GATEWAY_NAME])

        assert "error" not in answer, answer
        assert answer["result"]["content"][0]["text"] == "5"

    async def test_a_plain_hosts_overlong_hop_record_is_ignored(self) -> None:
        answer = await self.call_with_hops([f"g{i}" for i in range(settings.FEDERATION_MAX_HOPS + 1)])

        assert "error" not in answer, answer

    async def test_a_plain_hosts_malformed_hop_record_is_ignored(self) -> None:
        answer = await self.call_with_hops({"not": "a list"})

        assert "error" not in answer, answer
