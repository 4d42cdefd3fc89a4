"""/readyz: 200 when the database, migrations and channel layer answer; 503 naming what failed."""

from __future__ import annotations

import os
import secrets
from unittest import mock

from channels.layers import get_channel_layer
from django.test import override_settings

from fedmcp_site import lifecycle
from tests.base import AsgiTestCase, Reply, http

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

    async def test_it_is_unavailable_when_redis_cannot_be_reached(self) -> None:
        with override_settings(CHANNEL_LAYERS=redis_layer(UNREACHABLE_REDIS)):
            try:
                reply = await readyz()
            finally:
                await get_channel_layer().close_pools()

        assert reply.status == 503
        body = reply.json()
        assert body["status"] == "unavailable"
        assert body["checks"]["channelLayer"]["ok"] is False
        assert body["checks"]["database"]["ok"] is True

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

