"""A health probe that fails in an unexpected way is still a recorded, counted failure."""

from __future__ import annotations

from unittest import mock

from django.test import TransactionTestCase

from federation import health
from federation.models import Peer, PeerHealthCheck, Transport
from federation.upstream.base import PeerConfig


class UnexpectedProbeFailureTests(TransactionTestCase):
    async def test_it_is_recorded_and_counts_against_the_breaker(self) -> None:
        peer = await Peer.objects.acreate(name="odd", transport=Transport.STREAMABLE_HTTP, url="http://127.0.0.1:9/mcp")
        config = PeerConfig.from_peer(peer)
        breaker = health.breakers.for_peer(config)
        before = breaker.failures
        with mock.patch("federation.pool.pool.get", side_effect=RuntimeError("something nobody expected")), \
                self.assertLogs("federation.health", "ERROR"):
            assert await health.check_peer(config) is False
        check = await PeerHealthCheck.objects.aget(peer=peer)
        assert (check.ok, check.error) == (False, "RuntimeError: something nobody expected")
        assert breaker.failures == before + 1
