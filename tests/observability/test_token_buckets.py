"""The token buckets and rule precedence on their own; Redis buckets shared by several workers."""

from __future__ import annotations

import asyncio
import os
import secrets

import redis
from django.test import SimpleTestCase

from federation.ratelimit import Limit, MemoryBuckets, RedisBuckets, Rules

REDIS_URL = os.environ.get("FEDMCP_E2E_REDIS", "redis://127.0.0.1:6379/0")
ONE_PER_SECOND = Limit(rate_per_minute=60, burst=2)


def test_a_memory_bucket_allows_the_burst_then_refills_at_the_rate() -> None:
    buckets = MemoryBuckets()

    taken = [buckets.take("k", ONE_PER_SECOND, now_ms=0) for _ in range(3)]

    assert taken[:2] == [0, 0]
    assert taken[2] == 1000
    assert buckets.take("k", ONE_PER_SECOND, now_ms=500) == 500
    assert buckets.take("k", ONE_PER_SECOND, now_ms=1000) == 0


def test_a_memory_bucket_never_holds_more_than_the_burst() -> None:
    buckets = MemoryBuckets()
    buckets.take("k", ONE_PER_SECOND, now_ms=0)

    taken = [buckets.take("k", ONE_PER_SECOND, now_ms=3_600_000) for _ in range(3)]

    assert taken[:2] == [0, 0]
    assert taken[2] > 0


def test_memory_buckets_forget_the_least_recently_used_beyond_their_size() -> None:
    buckets = MemoryBuckets(max_buckets=2)
    for key in ("a", "b", "c"):
        buckets.take(key, ONE_PER_SECOND, now_ms=0)

    assert list(buckets._buckets) == ["b", "c"]


def test_the_most_specific_identity_rule_wins() -> None:
    default, for_client, for_user, for_pair = (Limit(1, n) for n in (1, 2, 3, 4))
    rules = Rules(identity={(None, ""): default, (None, "app"): for_client, (7, ""): for_user, (7, "app"): for_pair})

    assert rules.for_identity(7, "app") is for_pair
    assert rules.for_identity(7, "cli") is for_user
    assert rules.for_identity(8, "app") is for_client
    assert rules.for_identity(8, "cli") is default
    assert rules.for_identity(None, "app") is for_client
    assert Rules().for_identity(7, "app") is None


def test_a_peer_rule_beats_the_peer_default() -> None:
    default, special = Limit(1, 1), Limit(1, 5)
    rules = Rules(peer={None: default, 3: special})

    assert rules.for_peer(3) is special
    assert rules.for_peer(4) is default


class RedisBucketsTest(SimpleTestCase):
    """Each `RedisBuckets` stands for one worker: its own client, the same Redis."""

    def setUp(self) -> None:
        self.key = f"fedmcp-test-{secrets.token_hex(6)}:ratelimit:identity:u1:c"
        self.redis = redis.Redis.from_url(REDIS_URL)

    def tearDown(self) -> None:
        self.redis.delete(self.key)
        self.redis.close()

    async def test_two_workers_share_one_bucket(self) -> None:
        worker_a, worker_b = RedisBuckets(), RedisBuckets()
        try:
            first = await worker_a.take(REDIS_URL, self.key, ONE_PER_SECOND)
            second = await worker_b.take(REDIS_URL, self.key, ONE_PER_SECOND)
            third = await worker_a.take(REDIS_URL, self.key, ONE_PER_SECOND)
        finally:
            await worker_a.close()
            await worker_b.close()

        assert (first, second) == (0, 0)
        assert 0 < third <= 1000

    async def test_concurrent_calls_from_several_workers_take_exactly_the_burst(self) -> None:
        workers = [RedisBuckets() for _ in range(4)]
        limit = Limit(rate_per_minute=1, burst=5)
        try:
            waits = await asyncio.gather(*(workers[i % 4].take(REDIS_URL, self.key, limit) for i in range(20)))
        finally:
            for worker in workers:
                await worker.close()

        assert sum(1 for wait in waits if wait == 0) == 5
        assert self.redis.pttl(self.key) > 0  # untouched buckets expire
