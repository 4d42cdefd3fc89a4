"""/metrics after real calls through the in-process app: counters, histogram, gauges, access."""

from __future__ import annotations

import secrets
from datetime import timedelta

from channels.db import database_sync_to_async
from channels.testing import ApplicationCommunicator
from django.test import override_settings
from django.utils import timezone

from federation.models import CatalogKind
from fedmcp_lib import metrics
from fedmcp_site.asgi import application
from identity.models import ConsentPrompt
from mcp_endpoint import jsonrpc
from tests.base import HOST, TIMEOUT, FixturePeerTestCase, HttpExchange, McpClient, add_catalog_entry, http_scope, persona, register_peer
from tests.e2e.harness import free_port
from tests.observability.scrape import has, scrape, value

CALLS = "fedmcp_forwarded_calls_total"
SECONDS = "fedmcp_forwarded_call_duration_seconds"


async def add(client: McpClient, name: str = "everything__add") -> int | None:
    reply = await client.call_modern("tools/call", {"name": name, "arguments": {"a": 2, "b": 3}}, name=name)
    return reply.error_code


class MetricsAfterCallsTest(FixturePeerTestCase):
    async def test_it_counts_and_times_calls_per_peer_and_method(self) -> None:
        before = await scrape()
        client = McpClient()

        assert await add(client) is None
        assert await add(client) is None
        after = await scrape()

        labels = {"peer": "everything", "method": "tools/call"}
        assert value(after, CALLS, **labels, outcome="ok") - value(before, CALLS, **labels, outcome="ok") == 2
        assert value(after, f"{SECONDS}_count", **labels) - value(before, f"{SECONDS}_count", **labels) == 2
        assert value(after, f"{SECONDS}_bucket", **labels, le="+Inf") - value(before, f"{SECONDS}_bucket", **labels, le="+Inf") == 2
        assert value(after, f"{SECONDS}_sum", **labels) > value(before, f"{SECONDS}_sum", **labels)
        assert value(after, "fedmcp_forwarded_calls_in_flight", peer="everything") == 0

    async def test_it_counts_an_unreachable_peer_as_unavailable(self) -> None:
        down = await _register_unreachable_peer("down")
        before = await scrape()

        code = await add(McpClient(), "down__add")
        after = await scrape()

        assert code == jsonrpc.UPSTREAM_ERROR
        labels = {"peer": down, "method": "tools/call"}
        assert value(after, CALLS, **labels, outcome="unavailable") - value(before, CALLS, **labels, outcome="unavailable") == 1
        assert value(after, f"{SECONDS}_count", **labels) - value(before, f"{SECONDS}_count", **labels) == 1

    @override_settings(FEDERATION_BREAKER_FAILURES=1)
    async def test_it_reports_an_open_circuit_and_counts_the_calls_it_refuses(self) -> None:
        down = await _register_unreachable_peer("flaky")
        client = McpClient()
        assert await add(client, "flaky__add") == jsonrpc.UPSTREAM_ERROR  # opens the circuit
        before = await scrape()

        assert await add(client, "flaky__add") == jsonrpc.UPSTREAM_ERROR
        after = await scrape()

        assert value(after, "fedmcp_circuit_state", peer=down, state="open") == 1
        assert value(after, "fedmcp_circuit_state", peer=down, state="closed") == 0
        assert value(after, "fedmcp_circuit_state", peer="everything", state="closed") == 1
        labels = {"peer": down, "method": "tools/call"}
        assert value(after, CALLS, **labels, outcome="circuit_open") - value(before, CALLS, **labels, outcome="circuit_open") == 1
        # Refused without trying the upstream: not a latency sample.
        assert value(after, f"{SECONDS}_count", **labels) == value(before, f"{SECONDS}_count", **labels)

    async def test_it_reports_host_sessions_and_open_streams_per_transport(self) -> None:
        client = McpClient()
        await client.initialize()
        before = await scrape()

        async with HttpExchange("GET", "/mcp", client.headers({"accept": "text/event-stream"})) as stream:
            assert await stream.start() == 200
            during = await scrape()
        after = await scrape()

        assert value(during, "fedmcp_host_sessions", transport="streamable-http") == 1
        assert value(during, "fedmcp_host_sessions", transport="websocket") == 0
        assert value(during, "fedmcp_open_streams", transport="streamable-http") == value(before, "fedmcp_open_streams", transport="streamable-http") + 1
        assert value(after, "fedmcp_open_streams", transport="streamable-http") == value(before, "fedmcp_open_streams", transport="streamable-http")


class MetricsHooksAndAccessTest(FixturePeerTestCase):
    async def test_pending_consent_prompts_are_counted_at_scrape_time(self) -> None:
        assert value(await scrape(), "fedmcp_consent_prompts_pending") == 0

        alice = await database_sync_to_async(persona)("alice")
        now = timezone.now()
        for expires in (now + timedelta(minutes=2), now + timedelta(minutes=2), now - timedelta(seconds=1)):
            await ConsentPrompt.objects.acreate(id=secrets.token_urlsafe(8), user=alice, peer="everything", kind="tool", name="add", expires_at=expires)

        assert value(await scrape(), "fedmcp_consent_prompts_pending") == 2  # the expired one waits for nobody

    async def test_a_series_nobody_registers_is_not_exported(self) -> None:
        source = metrics._sources["fedmcp_consent_prompts_pending"]
        metrics.register_scrape("fedmcp_consent_prompts_pending", None)
        try:
            assert not has(await scrape(), "fedmcp_consent_prompts_pending")
        finally:
            metrics.register_scrape("fedmcp_consent_prompts_pending", source)

    async def test_it_refuses_clients_outside_the_allowed_networks(self) -> None:
        scope = {**http_scope("GET", "/metrics", {"host": HOST}), "client": ("192.0.2.10", 40000)}
        communicator = ApplicationCommunicator(application, scope)
        await communicator.send_input({"type": "http.request", "body": b"", "more_body": False})
        start = await communicator.receive_output(TIMEOUT)
        await communicator.receive_output(TIMEOUT)
        await communicator.wait(TIMEOUT)

        assert start["status"] == 403

    @override_settings(FEDMCP_METRICS_ALLOWED_NETWORKS=["192.0.2.0/24"])
    async def test_it_serves_clients_in_a_configured_network(self) -> None:
        scope = {**http_scope("GET", "/metrics", {"host": HOST}), "client": ("192.0.2.10", 40000)}
        communicator = ApplicationCommunicator(application, scope)
        await communicator.send_input({"type": "http.request", "body": b"", "more_body": False})
        start = await communicator.receive_output(TIMEOUT)
        body = await communicator.receive_output(TIMEOUT)
        await communicator.wait(TIMEOUT)

        assert start["status"] == 200
        assert b"fedmcp_forwarded_calls_in_flight" in body["body"]


@database_sync_to_async
def _register_unreachable_peer(name: str) -> str:
    # A loopback port nothing listens on: connecting fails at once.
    peer = register_peer(name, f"http://127.0.0.1:{free_port()}/mcp", sync=False, connect_timeout=5.0)
    add_catalog_entry(peer, CatalogKind.TOOL, "add")
    return peer.name
