"""Legacy HTTP+SSE with faults: every request a worker accepted (202) is answered or refused.

Two real daphne workers share a Redis channel layer (a redis-server of the test's own, so it
can be stopped). The host's /sse stream is on worker B; its POSTs go to worker A, so every
reply crosses workers:

* A is SIGKILLed with calls in flight: B's stream answers each of them -32603 `worker_lost`
  once their announcement's lease (FEDMCP_SSE_ACCEPTED_LEASE, short here) runs out;
* Redis is stopped: a POST to A (which would need Redis to reach B's stream) is refused at once
  with HTTP 503 and a JSON-RPC error, while a POST to B, the stream's own worker, is still
  answered on the stream.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from mcp_endpoint import jsonrpc
from tests.e2e.harness import Gateway, fixture_server, free_port, stop
from tests.e2e.test_faults import redis_server
from tests.e2e.test_scale_out import EventStream, request

pytestmark = pytest.mark.e2e

LEASE = "2"
BOUND = 30.0
"""Bound on every wait; a healthy run needs a fraction of it."""


@pytest.fixture
def gateway() -> Iterator[tuple[Gateway, int]]:
    redis_port = free_port()
    env = {"REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "FEDMCP_REDIS_PREFIX": f"sse{redis_port}", "FEDMCP_SSE_ACCEPTED_LEASE": LEASE}
    with fixture_server(name="fixture") as url, Gateway(name="sse-loss", env=env) as gateway:
        gateway.migrate()
        gateway.command("peer", "add", "fixture", "--url", url)
        gateway.auth_headers()
        yield gateway, redis_port


class Host:
    """A 2024-11-05 host: its stream on one worker, its POSTs to whichever worker the test names."""

    def __init__(self, http: httpx.AsyncClient, gateway: Gateway) -> None:
        self.http = http
        self.gateway = gateway
        self.endpoint = ""

    async def open(self, worker: int) -> EventStream:
        response = await self.http.send(self.http.build_request("GET", self.gateway.url("/sse", worker), headers={"Accept": "text/event-stream"}), stream=True)
        assert response.status_code == 200
        events = EventStream(response)
        kind, data = await events.next_event(BOUND)  # type: ignore[misc]
        assert kind == "endpoint"
        self.endpoint = data
        return events

    async def post(self, worker: int, message: dict[str, Any]) -> httpx.Response:
        return await self.http.post(self.gateway.url(self.endpoint, worker), json=message)

    async def initialize(self, events: EventStream, worker: int) -> None:
        params = {"protocolVersion": "2024-11-05", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}
        assert (await self.post(worker, request(0, "initialize", params))).status_code == 202
        await events.message(lambda m: m.get("id") == 0, BOUND)
        assert (await self.post(worker, {"jsonrpc": "2.0", "method": "notifications/initialized"})).status_code == 202


def run(gateway: Gateway, scenario: Any) -> None:
    async def main() -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(BOUND, read=None), headers=gateway.auth_headers()) as http:
            await scenario(Host(http, gateway))

    asyncio.run(main())


def slow(request_id: str) -> dict[str, Any]:
    arguments = {"text": "x", "delay_ms": 60_000}
    return request(request_id, "tools/call", {"name": "fixture__slow_echo", "arguments": arguments, "_meta": {"progressToken": request_id}})


def test_requests_accepted_by_a_killed_worker_are_answered_on_the_stream(gateway: tuple[Gateway, int]) -> None:
    gw, redis_port = gateway
    with redis_server(redis_port):
        gw.start_worker()  # A: takes the POSTs
        gw.start_worker()  # B: holds the stream

        async def scenario(host: Host) -> None:
            events = await host.open(1)
            await host.initialize(events, 1)
            quick = request("q", "tools/call", {"name": "fixture__add", "arguments": {"a": 1, "b": 2}})
            assert (await host.post(0, quick)).status_code == 202
            assert (await events.message(lambda m: m.get("id") == "q", BOUND))["result"]["content"][0]["text"] == "3"
            ids = ["s1", "s2", "s3"]
            for request_id in ids:
                assert (await host.post(0, slow(request_id))).status_code == 202
            for request_id in ids:  # each call runs upstream: its progress crossed to B's stream
                await events.message(lambda m, r=request_id: m.get("method") == "notifications/progress" and m["params"]["progressToken"] == r, BOUND)

            gw.workers[0][0].send_signal(signal.SIGKILL)

            answers = [await events.message(lambda m: m.get("id") in ids and "method" not in m, BOUND) for _ in ids]
            assert sorted(a["id"] for a in answers) == ids
            for answer in answers:
                assert answer["error"]["code"] == jsonrpc.INTERNAL_ERROR and answer["error"]["data"] == {"reason": "worker_lost"}, answer
            await events.aclose()

        run(gw, scenario)
        assert gw.workers[0][0].wait(BOUND) == -signal.SIGKILL


def test_with_redis_down_a_post_that_needs_it_is_refused_and_one_that_does_not_is_answered(gateway: tuple[Gateway, int]) -> None:
    gw, redis_port = gateway
    with redis_server(redis_port) as redis:
        gw.start_worker()  # A
        gw.start_worker()  # B: holds the stream

        async def scenario(host: Host) -> None:
            events = await host.open(1)
            await host.initialize(events, 1)
            stop(redis)

            refused = await host.post(0, request("via-a", "tools/call", {"name": "fixture__add", "arguments": {"a": 1, "b": 2}}))
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] == "5"
            error = refused.json()
            assert error["id"] == "via-a" and error["error"]["code"] == jsonrpc.INTERNAL_ERROR, error
            assert error["error"]["data"]["reason"] == "channel_layer_unavailable", error

            accepted = await host.post(1, request("via-b", "tools/call", {"name": "fixture__add", "arguments": {"a": 2, "b": 2}}))
            assert accepted.status_code == 202, accepted.text
            answer = await events.message(lambda m: m.get("id") == "via-b", BOUND)
            assert answer["result"]["content"][0]["text"] == "4", answer
            assert not [data for _, data in events.seen if '"via-a"' in data], events.seen
            await events.aclose()

        run(gw, scenario)
