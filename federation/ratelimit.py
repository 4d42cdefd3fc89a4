"""Token-bucket rate limits on forwarded calls, per identity and per peer.

The rules are `RateLimit` rows (Django admin), read into each worker and kept for
`FEDMCP_RATE_LIMIT_CACHE_SECONDS`. A bucket holds up to `burst` tokens and refills at
`rate_per_minute`; each forwarded call takes one token, and a call that finds less than one is
refused with the time until a token is back.

Buckets live in Redis when `REDIS_URL` is set: one hash per bucket, updated by one Lua script
(atomic, on Redis's clock), so every worker shares them. Without Redis they live in this
process, which is right for the single-process embedded setup. If Redis cannot be reached the
call is let through (and counted in `fedmcp_rate_limit_backend_errors_total`): a limiter outage
must not stop the gateway.

The identity bucket is checked before the peer bucket, so a caller over its own limit does not
use up the tokens every caller of that peer shares.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings

from federation.upstream.base import PeerConfig
from fedmcp_lib import metrics

logger = logging.getLogger(__name__)

MEMORY_MAX_BUCKETS = 100_000
"""Buckets kept in process memory; the least recently used is forgotten (that is: refilled)."""
BACKEND_WARNING_INTERVAL = 60.0

# KEYS[1] the bucket; ARGV: refill rate (tokens per ms), bucket size, key lifetime (ms).
# Returns 0 when a token was taken, else the milliseconds until one is back.
TAKE_TOKEN_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
if now > ts then
  tokens = tokens + (now - ts) * rate
  ts = now
end
tokens = math.min(burst, tokens)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = math.ceil((1 - tokens) / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(ts))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return wait
"""


class RateLimitExceededError(Exception):
    """A call was refused by a rate limit; `scope` is "identity" or "peer"."""

    def __init__(self, scope: str, retry_after_ms: int) -> None:
        super().__init__(f"rate limit exceeded ({scope}); retry in {retry_after_ms} ms")
        self.scope = scope
        self.retry_after_ms = max(1, retry_after_ms)


@dataclass(frozen=True)
class Limit:
    rate_per_minute: int
    burst: int

    @property
    def per_ms(self) -> float:
        return self.rate_per_minute / 60_000

    def lifetime_ms(self) -> int:
        """How long an untouched bucket matters: after this it is full again anyway."""
        return math.ceil(self.burst / self.per_ms) + 1000


@dataclass(frozen=True)
class Rules:
    """A snapshot of the `RateLimit` rows."""

    identity: dict[tuple[int | None, str], Limit] = field(default_factory=dict)
    peer: dict[int | None, Limit] = field(default_factory=dict)

    def identity_rule(self, user_id: int | None, client_id: str) -> tuple[tuple[int | None, str], Limit] | None:
        """The most specific rule, as (its user and client, its limit): user and client, user, client, then the default."""
        candidates: list[tuple[int | None, str]] = []
        if user_id is not None:
            if client_id:
                candidates.append((user_id, client_id))
            candidates.append((user_id, ""))
        if client_id:
            candidates.append((None, client_id))
        candidates.append((None, ""))
        for key in candidates:
            limit = self.identity.get(key)
            if limit is not None:
                return key, limit
        return None

    def for_identity(self, user_id: int | None, client_id: str) -> Limit | None:
        """The limit of the most specific rule (`identity_rule`)."""
        matched = self.identity_rule(user_id, client_id)
        return matched[1] if matched is not None else None

    def for_peer(self, peer_id: int) -> Limit | None:
        return self.peer.get(peer_id) or self.peer.get(None)


@database_sync_to_async
def _load_rules() -> Rules:
    from federation.models import RateLimit, RateLimitScope

    identity: dict[tuple[int | None, str], Limit] = {}
    peer: dict[int | None, Limit] = {}
    for row in RateLimit.objects.all():
        limit = Limit(row.rate_per_minute, row.burst)
        if row.scope == RateLimitScope.IDENTITY:
            identity[(row.user_id, row.client_id)] = limit
        else:
            peer[row.peer_id] = limit
    return Rules(identity, peer)


class _RuleCache:
    def __init__(self) -> None:
        self._rules: Rules | None = None
        self._loaded_at = 0.0

    async def get(self) -> Rules:
        now = time.monotonic()
        if self._rules is None or now - self._loaded_at >= settings.FEDMCP_RATE_LIMIT_CACHE_SECONDS:
            self._rules = await _load_rules()
            self._loaded_at = now
        return self._rules

    def clear(self) -> None:
        self._rules = None


rules = _RuleCache()
"""This worker's copy of the rules."""


def forget_rules() -> None:
    """Read the rules from the database again on the next call (tests, admin actions)."""
    rules.clear()


class MemoryBuckets:
    """Token buckets in this process (the embedded, single-worker setup)."""

    def __init__(self, max_buckets: int = MEMORY_MAX_BUCKETS) -> None:
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self.max_buckets = max_buckets

    def take(self, key: str, limit: Limit, now_ms: float | None = None) -> int:
        """Take a token; return 0, or the milliseconds until one is back."""
        now = time.monotonic() * 1000 if now_ms is None else now_ms
        tokens, ts = self._buckets.pop(key, (float(limit.burst), now))
        tokens = min(float(limit.burst), tokens + max(0.0, now - ts) * limit.per_ms)
        wait = 0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = math.ceil((1 - tokens) / limit.per_ms)
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_buckets:
            self._buckets.popitem(last=False)
        return wait

    def clear(self) -> None:
        self._buckets.clear()


class RedisBuckets:
    """Token buckets in Redis, shared by every worker; one client per event loop."""

    def __init__(self) -> None:
        self._client: Any = None
        self._script: Any = None
        self._key: tuple[int, str] | None = None

    def _script_for(self, url: str) -> Any:
        import redis.asyncio

        key = (id(asyncio.get_running_loop()), url)
        if self._key != key:
            # Clients are bound to the loop that made them (a new loop: a test, a command).
            self._client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=2.0, socket_timeout=2.0)
            self._script = self._client.register_script(TAKE_TOKEN_LUA)
            self._key = key
        return self._script

    async def take(self, url: str, key: str, limit: Limit) -> int:
        script = self._script_for(url)
        return int(await script(keys=[key], args=[repr(limit.per_ms), limit.burst, limit.lifetime_ms()]))

    async def close(self) -> None:
        client, self._client, self._script, self._key = self._client, None, None, None
        if client is not None:
            await client.aclose()


memory_buckets = MemoryBuckets()
redis_buckets = RedisBuckets()
_last_backend_warning = 0.0


def identity_bucket(rule: tuple[int | None, str], identity: Any) -> str:
    """Name the bucket a caller takes from under `rule`: whoever the rule names shares it.

    A rule for a user is that user's, through every client they use (a user cannot escape it by
    registering another client); a rule for a client is that client's, for all its users (a
    peer gateway cannot escape it by asserting new users); a rule for both is that pair's. The
    default rule gives each caller a bucket: a local user (all their clients together), a user
    a peer gateway asserts (per gateway and subject), or a client acting for nobody.
    """
    rule_user, rule_client = rule
    if rule_user is not None:
        return f"u{rule_user}:c{rule_client}" if rule_client else f"u{rule_user}"
    if rule_client:
        return f"c{rule_client}"
    if identity is None:
        return "anonymous"
    if identity.user_id is not None:
        return f"u{identity.user_id}"
    if getattr(identity, "federated_subject", ""):
        return f"c{identity.client_id}:f{identity.federated_issuer}|{identity.federated_subject}"
    return f"c{identity.client_id}"


async def _take(bucket: str, limit: Limit) -> int:
    global _last_backend_warning
    key = f"{settings.FEDMCP_RATE_LIMIT_PREFIX}:{bucket}"
    url = settings.REDIS_URL
    if not url:
        return memory_buckets.take(key, limit)
    try:
        return await redis_buckets.take(url, key, limit)
    except Exception as exc:
        metrics.RATE_LIMIT_BACKEND_ERRORS.inc()
        now = time.monotonic()
        if now - _last_backend_warning >= BACKEND_WARNING_INTERVAL:
            _last_backend_warning = now
            logger.warning("rate limits: Redis unreachable, letting calls through: %s", exc)
        return 0


async def check_call(*, identity: Any, peer: PeerConfig) -> None:
    """Take a token for one forwarded call from the caller's bucket, then from the peer's.

    Raises:
        RateLimitExceededError: a bucket is empty; says which and when to retry.
    """
    if not settings.FEDMCP_RATE_LIMITS_ENABLED:
        return
    current = await rules.get()
    if not current.identity and not current.peer:
        return
    user_id = identity.user_id if identity is not None else None
    client_id = (identity.client_id or "") if identity is not None else ""
    matched = current.identity_rule(user_id, client_id)
    if matched is not None:
        rule, limit = matched
        wait = await _take(f"identity:{identity_bucket(rule, identity)}", limit)
        if wait:
            metrics.RATE_LIMITED.labels("identity", peer.name).inc()
            raise RateLimitExceededError("identity", wait)
    limit = current.for_peer(peer.id)
    if limit is not None:
        wait = await _take(f"peer:{peer.name}", limit)
        if wait:
            metrics.RATE_LIMITED.labels("peer", peer.name).inc()
            raise RateLimitExceededError("peer", wait)


async def close() -> None:
    """Close this worker's Redis client (at shutdown)."""
    await redis_buckets.close()
