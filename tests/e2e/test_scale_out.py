"""Two real daphne workers sharing PostgreSQL and Redis, with no session affinity.

The module starts one fixture upstream (peer `fixture`), a fresh PostgreSQL database and a
Redis key prefix of its own, and two gateway workers on them. Every test alternates its
requests between worker A (index 0) and worker B (index 1), the way a load balancer without
affinity would, and checks that whatever has to cross from one worker to the other does:

* Streamable HTTP, handshake era: the session lives in the database; the GET stream held by A
  receives what B produces; a host's reply to a server->client request and its
  `notifications/cancelled` reach the worker running the call; DELETE on one ends it on both;
* Streamable HTTP, 2026-07-28: stateless calls on either worker;
* legacy HTTP+SSE: the stream on A carries the replies to messages POSTed to B;
* the official `mcp` SDK client behind a round-robin balancer, in each era and over SSE.

PostgreSQL (127.0.0.1:5432) and Redis (127.0.0.1:6379) run on every development and CI
machine; if either is unreachable these tests fail, they never skip. Override the addresses
with FEDMCP_E2E_POSTGRES (an admin DSN; trust auth) and FEDMCP_E2E_REDIS.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.session import ClientRequestContext
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client

from mcp_endpoint import jsonrpc
from tests.e2e import harness
from tests.e2e.harness import Gateway, fixture_server

pytestmark = pytest.mark.e2e

REDIS_URL = harness.REDIS_URL
PEER = "fixture"
A, B = 0, 1
WAIT = 15.0
"""Upper bound for anything a test waits for; a healthy run needs a fraction of a second."""
LEGACY_VERSION = "2025-11-25"
MODERN_VERSION = "2026-07-28"
JSON_AND_SSE = "application/json, text/event-stream"
JsonDict = dict[str, Any]


# --- shared infrastructure --------------------------------------------------------------------


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    """Create a fresh, migrated PostgreSQL database for this module and drop it afterwards."""
    with harness.postgres_database("fedmcp_e2e") as url:
        yield url


@pytest.fixture(scope="module")
def redis_prefix() -> Iterator[str]:
    """Return a channel-layer key prefix unique to this run; delete its keys afterwards."""
    with harness.redis_prefix("fedmcp-e2e") as prefix:
        yield prefix


@dataclass
class Upstream:
    url: str
    log_dir: Path

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("fixture-*.log")))


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    log_dir = tmp_path_factory.mktemp("scale-out-fixture")
    with fixture_server(PEER, log_dir=log_dir) as url:
        yield Upstream(url, log_dir)


@pytest.fixture(scope="module")
def cluster(database_url: str, redis_prefix: str, upstream: Upstream) -> Iterator[Gateway]:
    """Two gateway workers on one PostgreSQL database and one Redis channel layer."""
    env = {
        "REDIS_URL": REDIS_URL,
        "FEDMCP_REDIS_PREFIX": redis_prefix,
        # No periodic probes or catalog refreshes: they would open upstream connections on
        # worker A and publish catalog changes, blurring what these tests prove crossed workers.
        "FEDERATION_HEALTH_INTERVAL": "0",
        "FEDERATION_REFRESH_INTERVAL": "0",
    }
    gateway = Gateway(name="scale-out", env=env, database_url=database_url)
    try:
        gateway.migrate()
        gateway.command("peer", "add", PEER, "--url", upstream.url)
        gateway.start_worker()
        gateway.start_worker()
        yield gateway
    finally:
        gateway.cleanup()


@pytest.fixture(autouse=True)
def _worker_logs(cluster: Gateway) -> Iterator[None]:
    """Write the workers' logs after each test; pytest shows them only if the test failed."""
    yield
    sys.stderr.write(cluster.logs())


def worker_log(cluster: Gateway, worker: int) -> str:
    path = cluster.dir / f"daphne-{cluster.workers[worker][1]}.log"
    return path.read_text(errors="replace") if path.exists() else ""


# --- wire helpers -----------------------------------------------------------------------------


class EventStream:
    """Server-sent events of one streaming response, read in the background; waits are bounded."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.queue: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue()
        self.seen: list[tuple[str, str]] = []
        self.task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        event, data = "message", []
        try:
            async for line in self.response.aiter_lines():
                if line == "":
                    if data:
                        self.queue.put_nowait((event, "\n".join(data)))
                    event, data = "message", []
                elif line.startswith(":"):
                    continue
                else:
                    name, _, value = line.partition(":")
                    value = value.removeprefix(" ")
                    if name == "event":
                        event = value
                    elif name == "data":
                        data.append(value)
        finally:
            self.queue.put_nowait(None)

    async def next_event(self, timeout: float = WAIT) -> tuple[str, str] | None:
        """Return the next (event, data), or None once the stream has ended."""
        try:
            item = await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            raise AssertionError(f"no event within {timeout:g}s; seen so far: {self.seen}") from None
        if item is None:
            self.queue.put_nowait(None)
        else:
            self.seen.append(item)
        return item

    async def message(self, predicate: Callable[[JsonDict], bool], timeout: float = WAIT) -> JsonDict:
        """Return the first JSON-RPC message matching `predicate` (others are skipped)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(f"no matching message within {timeout:g}s; seen: {self.seen}")
            item = await self.next_event(remaining)
            if item is None:
                raise AssertionError(f"the stream ended before a matching message; seen: {self.seen}")
            if item[0] == "message" and item[1]:  # a priming event (an id, empty data) carries no message
                message = json.loads(item[1])
                if predicate(message):
                    return message

    async def ends(self, timeout: float = WAIT) -> list[JsonDict]:
        """Wait for the end of the stream; return the messages that came before it."""
        deadline = asyncio.get_running_loop().time() + timeout
        messages = []
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise AssertionError(f"the stream did not end within {timeout:g}s; seen: {self.seen}")
            item = await self.next_event(remaining)
            if item is None:
                return messages
            if item[0] == "message" and item[1]:
                messages.append(json.loads(item[1]))

    async def aclose(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def request(request_id: int | str, method: str, params: JsonDict | None = None) -> JsonDict:
    return {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params or {}}


def notification(method: str, params: JsonDict | None = None) -> JsonDict:
    return {"jsonrpc": "2.0", "method": method, "params": params or {}}


def reply_to(response: httpx.Response, request_id: int | str) -> JsonDict:
    """Return the JSON-RPC response for `request_id` from a JSON or a complete SSE body."""
    assert response.status_code == 200, f"HTTP {response.status_code}: {response.text[:500]}"
    if response.headers.get("content-type", "").startswith("application/json"):
        messages = [response.json()]
    else:
        messages = [json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:") and line[5:].strip()]
    for message in messages:
        if message.get("id") == request_id and "method" not in message:
            return message
    raise AssertionError(f"no response to {request_id!r} in {messages}")


def text_of(result: JsonDict) -> str:
    return " ".join(block.get("text", "") for block in result.get("content", []))


async def poll(condition: Callable[[], bool], timeout: float = WAIT) -> bool:
    """Check `condition` until it holds or `timeout` passes (a bounded poll, not a fixed sleep)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


class HandshakeHost:
    """A raw handshake-era host whose requests go to whichever worker the test names."""

    def __init__(self, http: httpx.AsyncClient, cluster: Gateway) -> None:
        self.http = http
        self.cluster = cluster
        self.session_id = ""
        self.ids = iter(range(1, 10_000))

    def url(self, worker: int) -> str:
        return self.cluster.url("/mcp", worker)

    def headers(self, **extra: str) -> dict[str, str]:
        headers = {"Accept": JSON_AND_SSE, "Content-Type": "application/json", "MCP-Protocol-Version": LEGACY_VERSION}
        if self.session_id:
            headers["Mcp-Session-Id"] = self.session_id
        return {**headers, **extra}

    async def open(self, *, initialize_on: int, initialized_on: int, capabilities: JsonDict | None = None) -> JsonDict:
        """Run the handshake, each half on the given worker; return the InitializeResult."""
        params = {
            "protocolVersion": LEGACY_VERSION,
            "capabilities": capabilities or {},
            "clientInfo": {"name": "scale-out-test", "version": "1"},
        }
        headers = {"Accept": JSON_AND_SSE, "Content-Type": "application/json"}
        response = await self.http.post(self.url(initialize_on), json=request(0, "initialize", params), headers=headers)
        result = reply_to(response, 0)["result"]
        self.session_id = response.headers["mcp-session-id"]
        acknowledged = await self.post(initialized_on, notification("notifications/initialized"))
        assert acknowledged.status_code == 202
        return result

    async def post(self, worker: int, message: JsonDict) -> httpx.Response:
        return await self.http.post(self.url(worker), json=message, headers=self.headers())

    async def call(self, worker: int, method: str, params: JsonDict | None = None) -> JsonDict:
        """Send a request to `worker` and return its JSON-RPC response."""
        request_id = next(self.ids)
        return reply_to(await self.post(worker, request(request_id, method, params)), request_id)

    def stream(self, worker: int, method: str, message: JsonDict | None = None) -> Any:
        """Open a streaming GET or POST on `worker` (use as `async with`)."""
        if method == "GET":
            return self.http.stream("GET", self.url(worker), headers=self.headers(Accept="text/event-stream"))
        return self.http.stream("POST", self.url(worker), json=message, headers=self.headers())


IDLE_PAST_BLOCKING_READ = 7.0
"""Seconds of silence on a stream: past channels-redis's 5 s BZPOPMIN and redis-py's default socket timeout."""


def run(cluster: Gateway, scenario: Callable[[httpx.AsyncClient], Awaitable[None]]) -> None:
    async def main() -> None:
        # read=None on the client: waits are bounded by the tests themselves (EventStream, WAIT).
        # Every request carries alice's token; it names the cluster's public URL, so both workers accept it.
        async with httpx.AsyncClient(timeout=httpx.Timeout(WAIT, read=None), headers=cluster.auth_headers()) as http:
            await scenario(http)

    asyncio.run(main())


# --- Streamable HTTP, handshake era -----------------------------------------------------------


def test_get_stream_on_one_worker_receives_list_changed_caused_on_the_other(cluster: Gateway) -> None:
    """A tool call on B makes the upstream change its list; A's GET stream hears of it.

    Keep this test first in the module: worker A must not have an upstream connection of its
    own yet, so the notification can only have come from B through Redis.
    """

    async def scenario(http: httpx.AsyncClient) -> None:
        host = HandshakeHost(http, cluster)
        await host.open(initialize_on=A, initialized_on=B)
        async with host.stream(A, "GET") as get:
            assert get.status_code == 200
            events = EventStream(get)
            try:
                # B opens its upstream listen stream in the background on first use; a change
                # published before it is subscribed is not heard, so trigger again (bounded). A
                # late notification still counts: it waits in the queue for the next attempt.
                for _attempt in range(10):
                    triggered = await host.call(B, "tools/call", {"name": f"{PEER}__test_trigger_tool_change", "arguments": {}})
                    assert "result" in triggered, triggered
                    try:
                        await events.message(lambda m: m.get("method") == "notifications/tools/list_changed", timeout=1)
                        break
                    except AssertionError:
                        continue
                else:
                    raise AssertionError(f"A's GET stream never received tools/list_changed; seen: {events.seen}")
            finally:
                await events.aclose()
        assert f"peer {PEER}: connected" not in worker_log(cluster, A), "worker A talked to the upstream itself"
        assert f"peer {PEER}: connected" in worker_log(cluster, B)

    run(cluster, scenario)


def test_session_requests_alternate_between_workers(cluster: Gateway) -> None:
    async def scenario(http: httpx.AsyncClient) -> None:
        host = HandshakeHost(http, cluster)
        initialized = await host.open(initialize_on=A, initialized_on=B)
        listed = await host.call(A, "tools/list")
        called = await host.call(B, "tools/call", {"name": f"{PEER}__add", "arguments": {"a": 2, "b": 3}})
        pinged = await host.call(A, "ping")

        assert initialized["protocolVersion"] == LEGACY_VERSION
        names = {tool["name"] for tool in listed["result"]["tools"]}
        assert {f"{PEER}__add", f"{PEER}__slow_echo", f"{PEER}__test_sampling"} <= names
        assert text_of(called["result"]) == "5"
        assert pinged["result"] == {}

    run(cluster, scenario)


def test_sampling_reply_posted_to_the_other_worker_completes_the_call(cluster: Gateway) -> None:
    """The call runs on B; the host answers B's sampling request by POSTing to A."""

    async def scenario(http: httpx.AsyncClient) -> None:
        host = HandshakeHost(http, cluster)
        await host.open(initialize_on=A, initialized_on=B, capabilities={"sampling": {}})
        call = request(41, "tools/call", {"name": f"{PEER}__test_sampling", "arguments": {"prompt": "Capital of France?"}})
        async with host.stream(B, "POST", call) as response:
            assert response.status_code == 200
            events = EventStream(response)
            try:
                asked = await events.message(lambda m: m.get("method") == "sampling/createMessage")
                answer = {
                    "jsonrpc": "2.0",
                    "id": asked["id"],
                    "result": {
                        "role": "assistant",
                        "content": {"type": "text", "text": "Paris"},
                        "model": "test",
                        "stopReason": "endTurn",
                    },
                }
                accepted = await host.post(A, answer)
                result = await events.message(lambda m: m.get("id") == 41)
            finally:
                await events.aclose()

        assert accepted.status_code == 202
        assert "Paris" in text_of(result["result"])
        assert not result["result"].get("isError")

    run(cluster, scenario)


def test_cancel_posted_to_the_other_worker_stops_the_call_and_the_upstream(cluster: Gateway, upstream: Upstream) -> None:
    async def scenario(http: httpx.AsyncClient) -> None:
        host = HandshakeHost(http, cluster)
        await host.open(initialize_on=A, initialized_on=B)
        cancelled_before = upstream.log().count("slow_echo cancelled")
        call = request(
            "slow-1", "tools/call",
            {
                "name": f"{PEER}__slow_echo",
                "arguments": {"text": "never", "delay_ms": 120_000},
                "_meta": {"progressToken": "p-1"},
            },
        )
        async with host.stream(B, "POST", call) as response:
            assert response.status_code == 200
            events = EventStream(response)
            try:
                # Progress proves the call reached the upstream before it is cancelled.
                await events.message(lambda m: m.get("method") == "notifications/progress")
                accepted = await host.post(A, notification("notifications/cancelled", {"requestId": "slow-1", "reason": "test"}))
                after = await events.ends()
            finally:
                await events.aclose()

        assert accepted.status_code == 202
        assert not [m for m in after if m.get("id") == "slow-1"], f"a cancelled request must get no response: {after}"
        upstream_cancelled = await poll(lambda: upstream.log().count("slow_echo cancelled") > cancelled_before)
        assert upstream_cancelled, "the upstream call was not cancelled"

    run(cluster, scenario)


def test_delete_on_one_worker_ends_the_session_on_the_other(cluster: Gateway) -> None:
    async def scenario(http: httpx.AsyncClient) -> None:
        host = HandshakeHost(http, cluster)
        await host.open(initialize_on=B, initialized_on=A)
        async with host.stream(A, "GET") as get:
            assert get.status_code == 200
            events = EventStream(get)
            try:
                deleted = await http.delete(host.url(B), headers=host.headers())
                # The close travels from B to the stream A holds through the session's group.
                await events.ends()
            finally:
                await events.aclose()
        after_post = await host.post(A, request(7, "tools/list"))
        after_get = await http.get(host.url(A), headers=host.headers(Accept="text/event-stream"))
        after_post_b = await host.post(B, request(8, "ping"))

        assert deleted.status_code == 200
        for response in (after_post, after_get, after_post_b):
            assert response.status_code == 404
            assert response.json()["error"]["code"] == jsonrpc.INVALID_REQUEST

    run(cluster, scenario)


# --- Streamable HTTP, 2026-07-28 --------------------------------------------------------------


def test_stateless_calls_work_on_both_workers(cluster: Gateway) -> None:
    async def scenario(http: httpx.AsyncClient) -> None:
        meta = {
            "io.modelcontextprotocol/protocolVersion": MODERN_VERSION,
            "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": "scale-out-test", "version": "1"},
        }
        for worker, (a, b) in ((A, (2, 3)), (B, (40, 2)), (A, (1, 1))):
            name = f"{PEER}__add"
            response = await http.post(
                cluster.url("/mcp", worker),
                json=request(worker, "tools/call", {"name": name, "arguments": {"a": a, "b": b}, "_meta": meta}),
                headers={
                    "Accept": JSON_AND_SSE, "Content-Type": "application/json",
                    "MCP-Protocol-Version": MODERN_VERSION, "Mcp-Method": "tools/call", "Mcp-Name": name,
                },
            )
            result = reply_to(response, worker)["result"]
            assert "mcp-session-id" not in response.headers
            assert result["resultType"] == "complete"
            assert text_of(result) == str(a + b), (worker, result)

    run(cluster, scenario)


# --- legacy HTTP+SSE --------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def sse_stream(http: httpx.AsyncClient, cluster: Gateway) -> AsyncIterator[Callable[[JsonDict], Awaitable[JsonDict | None]]]:
    """Open the legacy SSE stream on worker A; yield `exchange`, which POSTs a message to worker B
    (202) and returns the answer that arrives on A's stream (None for a notification)."""
    async with http.stream("GET", cluster.url("/sse", A), headers={"Accept": "text/event-stream"}) as stream:
        assert stream.status_code == 200
        events = EventStream(stream)
        try:
            endpoint = await events.next_event()
            assert endpoint is not None and endpoint[0] == "endpoint", endpoint
            post_url = cluster.url(endpoint[1], B)

            async def exchange(message: JsonDict) -> JsonDict | None:
                accepted = await http.post(post_url, json=message, headers={"Content-Type": "application/json"})
                assert accepted.status_code == 202, accepted.text
                if "id" not in message:
                    return None
                return await events.message(lambda m: m.get("id") == message["id"] and "method" not in m)

            yield exchange
        finally:
            await events.aclose()


SSE_INITIALIZE = {"protocolVersion": "2024-11-05", "capabilities": {}, "clientInfo": {"name": "scale-out-test", "version": "1"}}


def test_sse_stream_on_one_worker_carries_replies_to_posts_on_the_other(cluster: Gateway) -> None:
    async def scenario(http: httpx.AsyncClient) -> None:
        async with sse_stream(http, cluster) as exchange:
            initialized = await exchange(request(1, "initialize", SSE_INITIALIZE))
            await exchange(notification("notifications/initialized"))
            listed = await exchange(request(2, "tools/list"))
            called = await exchange(request(3, "tools/call", {"name": f"{PEER}__add", "arguments": {"a": 20, "b": 22}}))

        assert initialized is not None and initialized["result"]["protocolVersion"] == "2024-11-05"
        assert listed is not None and f"{PEER}__add" in {t["name"] for t in listed["result"]["tools"]}
        assert called is not None and text_of(called["result"]) == "42"

    run(cluster, scenario)


def test_an_sse_stream_idle_past_the_redis_blocking_read_still_carries_the_next_reply(cluster: Gateway) -> None:
    """channels-redis waits for messages with 5 s blocking reads; an idle stream must outlive them.

    With redis-py's default 5 s socket timeout each idle read failed at the 5 s mark, which ended
    the stream (and the worker's correlation listener logged an error each time).
    """

    async def scenario(http: httpx.AsyncClient) -> None:
        async with sse_stream(http, cluster) as exchange:
            await exchange(request(1, "initialize", SSE_INITIALIZE))
            await asyncio.sleep(IDLE_PAST_BLOCKING_READ)
            called = await exchange(request(2, "tools/call", {"name": f"{PEER}__add", "arguments": {"a": 1, "b": 2}}))
        assert called is not None
        assert text_of(called["result"]) == "3"

    run(cluster, scenario)
    for worker in (A, B):
        assert "Timeout reading from" not in worker_log(cluster, worker), worker_log(cluster, worker)[-3000:]


# --- the official SDK client behind a balancer without affinity -------------------------------


class RoundRobinTransport(httpx2.AsyncBaseTransport):
    """A load balancer without session affinity: each request goes to the next worker."""

    def __init__(self, ports: list[int]) -> None:
        self._ports = itertools.cycle(ports)
        self._inner = httpx2.AsyncHTTPTransport()
        self.hits: collections.Counter[int] = collections.Counter()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        port = next(self._ports)
        self.hits[port] += 1
        # The Host header keeps the address the client was given, as behind a real balancer.
        request.url = request.url.copy_with(port=port)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


@pytest.mark.parametrize(
    ("transport", "mode"), [("streamable-http", "legacy"), ("streamable-http", MODERN_VERSION), ("sse", "legacy")]
)
def test_sdk_client_works_through_a_balancer_without_affinity(cluster: Gateway, transport: str, mode: str) -> None:
    balancer = RoundRobinTransport([port for _, port in cluster.workers])
    sampled: list[types.CreateMessageRequestParams] = []

    async def sampling(context: ClientRequestContext, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        sampled.append(params)
        return types.CreateMessageResult(role="assistant", content=types.TextContent(type="text", text="Paris"), model="test")

    def http_client(
        headers: dict[str, str] | None = None, timeout: httpx2.Timeout | None = None, auth: httpx2.Auth | None = None
    ) -> httpx2.AsyncClient:
        # The SDK's factory signature; every client it builds goes through the one balancer.
        timeout = timeout or httpx2.Timeout(WAIT, read=60)
        return httpx2.AsyncClient(headers={**(headers or {}), **cluster.auth_headers()}, timeout=timeout, auth=auth, transport=balancer)

    async def scenario() -> None:
        with anyio.fail_after(4 * WAIT):
            if transport == "sse":
                target = sse_client(cluster.url("/sse", A), httpx_client_factory=http_client)
                async with Client(target, mode=mode, sampling_callback=sampling) as client:
                    await exercise(client)
            else:
                async with http_client() as http:
                    target = streamable_http_client(cluster.url("/mcp", A), http_client=http)
                    async with Client(target, mode=mode, sampling_callback=sampling) as client:
                        await exercise(client)

    results: dict[str, Any] = {}

    async def exercise(client: Client) -> None:
        results["tools"] = {tool.name for tool in (await client.list_tools()).tools}
        results["added"] = await client.call_tool(f"{PEER}__add", {"a": 19, "b": 23})
        results["who"] = await client.call_tool(f"{PEER}__whoami", {})
        results["sampled"] = await client.call_tool(f"{PEER}__test_sampling", {"prompt": "Capital of France?"})

    asyncio.run(scenario())

    assert f"{PEER}__add" in results["tools"]
    assert [block.text for block in results["added"].content] == ["42"]
    assert [block.text for block in results["who"].content] == [PEER]
    assert not results["sampled"].is_error and "Paris" in results["sampled"].content[0].text
    assert len(sampled) == 1
    assert len(balancer.hits) == 2 and min(balancer.hits.values()) >= 2, f"both workers must serve requests: {balancer.hits}"
