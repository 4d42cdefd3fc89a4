"""One upstream answer cannot flood a user's consent queue (issue 15, "Trust boundaries").

A hostile upstream (`HostileUpstream`, peer `evil`) answers tools/call with an input_required
round of thousands of sampling requests, or keeps asking. The gateway passes at most
FEDMCP_MAX_INPUT_REQUESTS_PER_ROUND requests of one round (and, in the handshake era, relays at
most that many server->client requests of one call at once), keeps at most
FEDMCP_MAX_PENDING_PROMPTS_PER_USER prompts waiting for one user, refuses the rest with a
JSON-RPC error that says why, and shows the prompts of one call together on /consent.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any
from unittest import mock

from channels.db import database_sync_to_async
from django.test import AsyncClient, override_settings
from django.utils import timezone

from identity.models import ConsentPrompt
from mcp_endpoint import jsonrpc
from mcp_endpoint.pipeline.upstream_requests import UpstreamCall, relay_to
from tests.base import MODERN, AsgiTestCase, McpClient, modern_meta, register_peer, request
from tests.federation.hostile_upstream import HostileUpstream, install
from tests.identity.consent.test_flow import final_message
from tests.identity.consent.test_sampling_relay import context

TOOL = "evil__add"
# Tools are allowed without asking; the upstream's sampling and elicitation are asked (the shipped default).
SETTINGS = {"FEDMCP_CONSENT_DEFAULT": "allow", "FEDMCP_CONSENT_SAMPLING_DEFAULT": "ask", "FEDMCP_CONSENT_ELICITATION_DEFAULT": "ask"}
ROUND_LIMIT = 16
PENDING_LIMIT = 50
"""The shipped defaults of FEDMCP_MAX_INPUT_REQUESTS_PER_ROUND and FEDMCP_MAX_PENDING_PROMPTS_PER_USER."""


async def modern_call(client: McpClient | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    client = client or McpClient()
    params = {"name": TOOL, "arguments": {}, **(extra or {}), "_meta": modern_meta({"sampling": {}, "elicitation": {"form": {}, "url": {}}})}
    headers = {"mcp-protocol-version": MODERN, "mcp-method": "tools/call", "mcp-name": TOOL}
    return final_message(await client.post(request("tools/call", params, client.next_id()), headers, timeout=60))


class FloodTestCase(AsgiTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.enterContext(override_settings(**SETTINGS))
        self.upstream = HostileUpstream()
        install(self, self.upstream)
        register_peer("evil", self.upstream.url)

    async def pending(self) -> int:
        return await ConsentPrompt.objects.filter(status=ConsentPrompt.Status.PENDING).acount()


class RoundTests(FloodTestCase):
    async def test_a_round_of_2000_sampling_requests_is_refused_whole(self) -> None:
        self.upstream.flood(2000)
        started = time.monotonic()

        reply = await modern_call()

        error = reply["error"]
        self.assertEqual(error["code"], jsonrpc.UPSTREAM_ERROR, reply)
        self.assertIn("asked for 2000 inputs at once", error["message"])
        self.assertIn(f"at most {ROUND_LIMIT} per round (FEDMCP_MAX_INPUT_REQUESTS_PER_ROUND)", error["message"])
        self.assertEqual(error["data"], {"reason": "too_many_input_requests", "count": 2000, "limit": ROUND_LIMIT})
        self.assertEqual(await self.pending(), 0)
        self.assertLess(time.monotonic() - started, 10)

    async def test_a_round_at_the_limit_is_asked_about(self) -> None:
        self.upstream.flood(ROUND_LIMIT)

        result = (await modern_call())["result"]

        self.assertEqual(len(result["inputRequests"]), ROUND_LIMIT)
        self.assertEqual(await self.pending(), ROUND_LIMIT)

    async def test_a_handshake_era_host_gets_the_same_refusal(self) -> None:
        # The gateway answers the 2026-07-28 upstream's round for the host, one request at a time.
        self.upstream.flood(2000)
        client = McpClient()
        await client.initialize(capabilities={"sampling": {}})

        reply = final_message(await client.call("tools/call", {"name": TOOL, "arguments": {}}, timeout=60))

        self.assertEqual(reply["error"]["code"], jsonrpc.UPSTREAM_ERROR, reply)
        self.assertIn("FEDMCP_MAX_INPUT_REQUESTS_PER_ROUND", reply["error"]["message"])
        self.assertEqual(await self.pending(), 0)


class PendingPromptTests(FloodTestCase):
    async def test_rounds_stop_at_the_users_pending_limit_with_a_clear_error(self) -> None:
        self.upstream.flood(ROUND_LIMIT)
        for _ in range(PENDING_LIMIT // ROUND_LIMIT):
            self.assertEqual((await modern_call())["result"]["resultType"], "input_required")
        before = await self.pending()
        self.assertEqual(before, (PENDING_LIMIT // ROUND_LIMIT) * ROUND_LIMIT)

        reply = await modern_call()

        error = reply["error"]
        self.assertEqual(error["code"], jsonrpc.RATE_LIMITED, reply)
        self.assertIn(f"{before} consent requests are already waiting", error["message"])
        self.assertIn("FEDMCP_MAX_PENDING_PROMPTS_PER_USER", error["message"])
        self.assertEqual((error["data"]["reason"], error["data"]["limit"]), ("too_many_pending_prompts", PENDING_LIMIT))
        # The round did not fit: none of it was asked.
        self.assertEqual(await self.pending(), before)

    async def test_a_round_that_fits_fills_the_queue_and_then_nothing_more_is_asked(self) -> None:
        self.upstream.flood(ROUND_LIMIT)
        for _ in range(PENDING_LIMIT // ROUND_LIMIT):
            await modern_call()
        self.upstream.flood(PENDING_LIMIT % ROUND_LIMIT)
        self.assertEqual((await modern_call())["result"]["resultType"], "input_required")
        self.assertEqual(await self.pending(), PENDING_LIMIT)

        self.upstream.flood(1, "elicitation/create", {"mode": "form", "message": "one more?", "requestedSchema": {"type": "object"}})
        self.assertEqual((await modern_call())["error"]["code"], jsonrpc.RATE_LIMITED)
        self.assertEqual(await self.pending(), PENDING_LIMIT)

        # Answered or expired prompts make room again.
        oldest = await ConsentPrompt.objects.filter(status=ConsentPrompt.Status.PENDING).order_by("created_at").afirst()
        await ConsentPrompt.objects.filter(pk=oldest.pk).aupdate(expires_at=timezone.now() - timedelta(seconds=1))
        self.assertEqual((await modern_call())["result"]["resultType"], "input_required")


class HandshakeRelayTests(AsgiTestCase):
    async def test_at_most_a_rounds_worth_of_requests_are_relayed_at_once(self) -> None:
        release = asyncio.Event()
        relayed = 0

        async def asked(ctx: Any, call: Any, method: str, params: Any) -> dict[str, Any]:
            nonlocal relayed
            relayed += 1
            await release.wait()
            return {"result": {}}

        relay = relay_to(context(), UpstreamCall("evil", "tools/call", "add"))
        with mock.patch("mcp_endpoint.pipeline.upstream_requests.ask_upstreams_request", asked):
            tasks = [asyncio.create_task(relay({"jsonrpc": "2.0", "id": i, "method": "sampling/createMessage", "params": {}})) for i in range(2000)]
            # Every request beyond the round's worth is refused at once; wait (bounded) for that.
            async with asyncio.timeout(10):
                while sum(t.done() for t in tasks) < 2000 - ROUND_LIMIT:
                    await asyncio.sleep(0.01)
            refused = [t.result() for t in tasks if t.done()]
            release.set()
            answered = await asyncio.gather(*tasks)

        self.assertEqual(relayed, ROUND_LIMIT)
        self.assertEqual(len(refused), 2000 - ROUND_LIMIT)
        self.assertTrue(all(r["error"]["code"] == jsonrpc.RATE_LIMITED for r in refused))
        self.assertIn("at most 16 at once (FEDMCP_MAX_INPUT_REQUESTS_PER_ROUND)", refused[0]["error"]["message"])
        self.assertEqual(sum("result" in r for r in answered), ROUND_LIMIT)


class ConsentPageTests(FloodTestCase):
    async def test_the_prompts_of_one_call_are_shown_together(self) -> None:
        self.upstream.flood(3)
        await modern_call()
        self.upstream.flood(2, "elicitation/create", {"mode": "form", "message": "Your name?", "requestedSchema": {"type": "object"}})
        await modern_call()
        browser = AsyncClient()
        await browser.aforce_login(self.alice)

        page = (await browser.get("/consent")).content.decode()

        calls = await database_sync_to_async(lambda: sorted({p.call for p in ConsentPrompt.objects.all()}))()
        self.assertEqual(len(calls), 2)
        self.assertTrue(all(calls))
        for call in calls:
            group = page.split(f'<div class="call" data-call="{call}">', 1)[1].split('<div class="call"', 1)[0]
            ids = await database_sync_to_async(lambda c=call: list(ConsentPrompt.objects.filter(call=c).values_list("id", flat=True)))()
            self.assertTrue(all(f'id="prompt-{i}"' in group for i in ids))
        self.assertIn("<span data-count>3</span> requests", page)
        self.assertIn("<span data-count>2</span> requests", page)
