"""Rate limits on forwarded calls, through the app: per identity and per peer, memory and Redis.

The call after the bucket is empty is answered -32016 with `data.retryAfterMs`, and on
Streamable HTTP with HTTP 429 and `Retry-After`.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

import redis
from channels.db import database_sync_to_async
from django.test import override_settings

from federation import ratelimit
from federation.models import RateLimit, RateLimitScope
from mcp_endpoint import jsonrpc
from tests.base import BOB, HANDSHAKE, FixturePeerTestCase, McpClient, Reply, mint_token, persona, request, ws_communicator
from tests.observability.scrape import scrape, value

REDIS_URL = os.environ.get("FEDMCP_E2E_REDIS", "redis://127.0.0.1:6379/0")
TOOL = "everything__add"
INITIALIZE_PARAMS = {"protocolVersion": HANDSHAKE, "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}


async def add(client: McpClient) -> Reply:
    return await client.call_modern("tools/call", {"name": TOOL, "arguments": {"a": 1, "b": 1}}, name=TOOL)


def assert_rate_limited(reply: Reply, scope: str) -> None:
    assert reply.status == 429, reply
    assert int(reply.headers["retry-after"]) >= 1
    error = reply.json()["error"]
    assert error["code"] == jsonrpc.RATE_LIMITED
    assert error["data"]["retryAfterMs"] > 0
    assert error["data"]["scope"] == scope


@database_sync_to_async
def limit(scope: str, *, burst: int, rate_per_minute: int = 1, **target: Any) -> RateLimit:
    rule = RateLimit.objects.create(scope=scope, burst=burst, rate_per_minute=rate_per_minute, **target)
    ratelimit.forget_rules()
    return rule


class RateLimitCase(FixturePeerTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.bob_token = mint_token(BOB)
        self.bob = persona(BOB)
        ratelimit.forget_rules()
        ratelimit.memory_buckets.clear()

    def tearDown(self) -> None:
        ratelimit.forget_rules()
        ratelimit.memory_buckets.clear()
        super().tearDown()


class InMemoryRateLimitTest(RateLimitCase):
    async def test_the_call_after_the_burst_gets_429_retry_after_and_32016(self) -> None:
        await limit(RateLimitScope.IDENTITY, user=self.alice, burst=2)
        client = McpClient()

        first, second, third = await add(client), await add(client), await add(client)

        assert first.status == 200 and first.error_code is None
        assert second.status == 200 and second.error_code is None
        assert_rate_limited(third, "identity")

    async def test_the_handshake_era_gets_429_too(self) -> None:
        await limit(RateLimitScope.IDENTITY, user=self.alice, burst=1)
        client = McpClient()
        await client.initialize()

        ok = await client.call("tools/call", {"name": TOOL, "arguments": {"a": 1, "b": 1}})
        refused = await client.call("tools/call", {"name": TOOL, "arguments": {"a": 1, "b": 1}})

        assert ok.status == 200 and ok.error_code is None
        assert_rate_limited(refused, "identity")

    async def test_each_identity_has_its_own_bucket(self) -> None:
        await limit(RateLimitScope.IDENTITY, burst=1)  # the default for every identity
        alice, bob = McpClient(), McpClient(token=self.bob_token)

        assert (await add(alice)).error_code is None
        assert_rate_limited(await add(alice), "identity")
        assert (await add(bob)).error_code is None

    async def test_a_user_rule_beats_the_default(self) -> None:
        await limit(RateLimitScope.IDENTITY, burst=1)
        await limit(RateLimitScope.IDENTITY, user=self.alice, burst=3)
        alice = McpClient()

        replies = [await add(alice) for _ in range(4)]

        assert [r.error_code for r in replies[:3]] == [None, None, None]
        assert_rate_limited(replies[3], "identity")

    async def test_a_peer_limit_is_shared_by_every_caller(self) -> None:
        await limit(RateLimitScope.PEER, peer=self.peer, burst=1)

        assert (await add(McpClient())).error_code is None
        assert_rate_limited(await add(McpClient(token=self.bob_token)), "peer")

    async def test_a_caller_over_its_own_limit_leaves_the_peer_bucket_alone(self) -> None:
        await limit(RateLimitScope.IDENTITY, user=self.alice, burst=1)
        await limit(RateLimitScope.PEER, burst=2)  # the default for every peer
        alice, bob = McpClient(), McpClient(token=self.bob_token)

        assert (await add(alice)).error_code is None
        assert_rate_limited(await add(alice), "identity")
        assert_rate_limited(await add(alice), "identity")
        assert (await add(bob)).error_code is None

    async def test_websocket_hosts_get_the_json_rpc_error(self) -> None:
        await limit(RateLimitScope.IDENTITY, user=self.alice, burst=1)
        socket = ws_communicator()
        await socket.connect()
        await socket.send_json_to(request("initialize", INITIALIZE_PARAMS, 1))
        await socket.receive_json_from()
        call = {"name": TOOL, "arguments": {"a": 1, "b": 1}}

        await socket.send_json_to(request("tools/call", call, 2))
        ok = await socket.receive_json_from(timeout=10)
        await socket.send_json_to(request("tools/call", call, 3))
        refused = await socket.receive_json_from(timeout=10)
        await socket.disconnect()

        assert "result" in ok
        assert refused["error"]["code"] == jsonrpc.RATE_LIMITED
        assert refused["error"]["data"]["retryAfterMs"] > 0

    async def test_refusals_are_counted_in_metrics(self) -> None:
        await limit(RateLimitScope.PEER, peer=self.peer, burst=1)
        client = McpClient()
        await add(client)
        before = await scrape()

        assert_rate_limited(await add(client), "peer")
        after = await scrape()

        hits = "fedmcp_rate_limited_total"
        assert value(after, hits, scope="peer", peer="everything") - value(before, hits, scope="peer", peer="everything") == 1
        calls = "fedmcp_forwarded_calls_total"
        labels = {"peer": "everything", "method": "tools/call", "outcome": "rate_limited"}
        assert value(after, calls, **labels) - value(before, calls, **labels) == 1


class RedisRateLimitTest(RateLimitCase):
    """The same limits with the buckets in Redis (what several workers share)."""

    def setUp(self) -> None:
        super().setUp()
        self.prefix = f"fedmcp-test-{secrets.token_hex(6)}:ratelimit"
        self.redis = redis.Redis.from_url(REDIS_URL)
        override = override_settings(REDIS_URL=REDIS_URL, FEDMCP_RATE_LIMIT_PREFIX=self.prefix)
        override.enable()
        self.addCleanup(override.disable)

    def tearDown(self) -> None:
        keys = list(self.redis.scan_iter(f"{self.prefix}:*"))
        if keys:
            self.redis.delete(*keys)
        self.redis.close()
        super().tearDown()

    async def test_the_call_after_the_burst_is_refused(self) -> None:
        await limit(RateLimitScope.IDENTITY, user=self.alice, burst=2)
        client = McpClient()
        try:
            replies = [await add(client) for _ in range(3)]
        finally:
            await ratelimit.close()

        assert [r.error_code for r in replies[:2]] == [None, None]
        assert_rate_limited(replies[2], "identity")
        # The bucket is in Redis, not in this process.
        assert list(self.redis.scan_iter(f"{self.prefix}:identity:*"))
        assert not ratelimit.memory_buckets._buckets

    async def test_a_peer_limit_is_shared_by_every_caller(self) -> None:
        await limit(RateLimitScope.PEER, peer=self.peer, burst=1)
        try:
            first = await add(McpClient())
            second = await add(McpClient(token=self.bob_token))
        finally:
            await ratelimit.close()

        assert first.error_code is None
        assert_rate_limited(second, "peer")
        assert self.redis.exists(f"{self.prefix}:peer:everything")

    async def test_calls_go_through_when_redis_is_unreachable(self) -> None:
        await limit(RateLimitScope.IDENTITY, user=self.alice, burst=1)
        before = await scrape()
        try:
            with override_settings(REDIS_URL="redis://127.0.0.1:1/0"):
                replies = [await add(McpClient()) for _ in range(2)]
        finally:
            await ratelimit.close()
        after = await scrape()

        assert [r.error_code for r in replies] == [None, None]
        errors = "fedmcp_rate_limit_backend_errors_total"
        assert value(after, errors) - value(before, errors) == 2
