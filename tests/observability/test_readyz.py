"""/readyz: 200 while this worker can serve, 503 naming what failed when it cannot.

"Can serve" means: not draining, the database answers and every migration is applied. The
channel layer (Redis) is reported, in the body and as `fedmcp_component_up`, but its outage
leaves the worker ready and "degraded": Streamable HTTP and WebSocket calls keep working, and
every worker shares the same Redis, so taking this one out of rotation would help nobody.
"""

from __future__ import annotations

import os
import secrets
from unittest import mock

from channels.layers import get_channel_layer
from django.test import override_settings

from fedmcp_site.runtime import lifecycle
from tests.base import AsgiTestCase, Reply, http
from tests.observability.scrape import scrape, value

REDIS_URL = os.environ.get("FEDMCP_E2E_REDIS", "redis://127.0.0.1:6379/0")
UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"
"""Port 1 on loopback: nothing listens there, so connecting is refused at once."""


def redis_layer(url: str) -> dict[str, object]:
    return {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [url], "prefix": f"fedmcp-test-{secrets.token_hex(4)}"},
        }
    }


async def readyz() -> Reply:
    return await http("GET", "/readyz", headers={"authorization": None})


class ReadyzTest(AsgiTestCase):
    def setUp(self) -> None:
        super().setUp()
        lifecycle.state.migrations_applied = False

    async def test_it_is_ready_with_the_in_memory_layer(self) -> None:
        reply = await readyz()

        assert reply.status == 200
        body = reply.json()
        assert body["status"] == "ready"
        assert all(check["ok"] for check in body["checks"].values())
        assert set(body["checks"]) == {"database", "migrations", "channelLayer"}

    async def test_it_is_ready_with_a_reachable_redis_and_says_so(self) -> None:
        with override_settings(CHANNEL_LAYERS=redis_layer(REDIS_URL)):
            try:
                reply = await readyz()
            finally:
                await get_channel_layer().close_pools()

        assert reply.status == 200
        assert reply.json()["checks"]["channelLayer"] == {"ok": True, "backend": "redis"}

    async def test_it_stays_ready_but_degraded_when_redis_cannot_be_reached(self) -> None:
        with override_settings(CHANNEL_LAYERS=redis_layer(UNREACHABLE_REDIS)):
            try:
                reply = await readyz()
                samples = await scrape()
            finally:
                await get_channel_layer().close_pools()

        assert reply.status == 200
        body = reply.json()
        assert body["status"] == "degraded"
        assert body["degraded"] == ["channelLayer"]
        assert body["checks"]["channelLayer"]["ok"] is False
        assert body["checks"]["database"]["ok"] is True
        assert value(samples, "fedmcp_component_up", component="channel_layer") == 0.0
        assert value(samples, "fedmcp_component_up", component="database") == 1.0

    async def test_the_component_metric_comes_back_up_with_redis(self) -> None:
        with override_settings(CHANNEL_LAYERS=redis_layer(UNREACHABLE_REDIS)):
            try:
                await readyz()
            finally:
                await get_channel_layer().close_pools()
        reply = await readyz()

        assert (reply.status, reply.json()["status"], reply.json()["degraded"]) == (200, "ready", [])
        assert value(await scrape(), "fedmcp_component_up", component="channel_layer") == 1.0

    async def test_it_is_unavailable_when_the_database_cannot_be_reached(self) -> None:
        with mock.patch.object(lifecycle, "_database_checks", mock.AsyncMock(return_value={
            "database": {"ok": False, "error": "OperationalError"}, "migrations": {"ok": False, "error": "database unreachable"},
        })):
            reply = await readyz()
            samples = await scrape()

        assert reply.status == 503
        assert reply.json()["status"] == "unavailable"
        assert value(samples, "fedmcp_component_up", component="database") == 0.0

    async def test_it_is_unavailable_while_migrations_are_missing(self) -> None:
        with mock.patch.object(lifecycle, "_unapplied_migrations", return_value=2):
            reply = await readyz()

        assert reply.status == 503
        assert reply.json()["checks"]["migrations"]["ok"] is False

    async def test_it_is_unavailable_while_draining(self) -> None:
        with _draining():
            reply = await readyz()

        assert reply.status == 503
        assert reply.json()["draining"] is True

    async def test_liveness_stays_ok_while_draining(self) -> None:
        with _draining():
            reply = await http("GET", "/healthz", headers={"authorization": None})

        assert reply.status == 200


class _draining:
    def __enter__(self) -> None:
        lifecycle.state.draining = True

    def __exit__(self, *exc: object) -> None:
        lifecycle.state.draining = False

