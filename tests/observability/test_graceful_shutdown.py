"""A real daphne worker on SIGTERM: it drains in-flight calls, and cancels upstreams it gives up on.

Each test starts a worker of one gateway (peer `fixture`: the fixture server) with its own
grace period, starts a slow call through it, waits (by polling the worker's /metrics) until the
call is in flight, then sends SIGTERM to the worker:

* within the grace period the call completes normally; the worker keeps listening meanwhile,
  answering /readyz 503, closing idle keep-alive connections and sending `Connection: close`,
  and stops listening once nothing is in flight and no request has come for FEDMCP_DRAIN_QUIET;
* past the grace period the call is cancelled and the upstream hears of it (its cancellation
  counter goes up), instead of the call being cut off when the process exits;
* streams a host keeps open until it leaves (the Streamable HTTP GET stream, a WebSocket, a
  2026-07-28 subscriptions/listen) do not hold the drain: the call in flight finishes and the
  worker exits long before a 60 s grace period would end.

The workers log JSON (FEDMCP_LOG_FORMAT=json), so these tests also read real log lines.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect
from websockets.typing import Subprotocol

from tests.e2e.harness import Gateway, fixture_server
from tests.observability.scrape import parse, value

pytestmark = pytest.mark.e2e

WAIT = 20.0
"""Bound on every poll; a healthy run needs a fraction of it."""
HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json", "MCP-Protocol-Version": "2026-07-28"}
META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}


def call_tool(url: str, name: str, arguments: dict[str, Any], headers: dict[str, str] | None = None, timeout: float = 60) -> dict[str, Any]:
    """One 2026-07-28 tools/call; return the JSON-RPC response (from JSON or the SSE stream)."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": name, "arguments": arguments, "_meta": META}}
    response = httpx.post(url, json=body, headers={**HEADERS, "Mcp-Method": "tools/call", "Mcp-Name": name, **(headers or {})}, timeout=timeout)
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:")]
        return next(e for e in events if e.get("id") == 1)
    return response.json()


def cancelled_on_fixture(fixture_url: str) -> int:
    reply = call_tool(fixture_url, "stats", {})
    return int(json.loads(reply["result"]["content"][0]["text"])["slow_echo_cancelled"])


def poll(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def in_flight(url: str) -> float:
    response = httpx.get(f"{url}/metrics", timeout=5)
    return value(parse(response.text), "fedmcp_forwarded_calls_in_flight", peer="fixture")


def refuses_connections(url: str) -> bool:
    try:
        httpx.get(f"{url}/healthz", timeout=1)
    except httpx.ConnectError:
        return True
    return False


def log_entries(gateway: Gateway, request_id: str | None) -> list[dict[str, Any]]:
    """The JSON log lines the gateway's workers wrote for one request (None: outside requests)."""
    entries = [json.loads(line) for line in gateway.logs().splitlines() if line.startswith("{")]
    return [e for e in entries if e["request_id"] == request_id]


@pytest.fixture(scope="module")
def fixture_url() -> Iterator[str]:
    with fixture_server(name="fixture") as url:
        yield url


@pytest.fixture(scope="module")
def gateway(fixture_url: str) -> Iterator[Gateway]:
    with Gateway(name="drain", env={"FEDMCP_LOG_FORMAT": "json"}) as gateway:
        gateway.migrate()
        gateway.command("peer", "add", "fixture", "--url", fixture_url)
        gateway.auth_headers()
        yield gateway


def start_worker(gateway: Gateway, grace: str) -> tuple[Any, str]:
    """Start a worker with this grace period; return its process and base URL."""
    gateway.env["FEDMCP_SHUTDOWN_GRACE"] = grace
    port = gateway.start_worker()
    return gateway.workers[-1][0], f"http://127.0.0.1:{port}"


def slow_call(gateway: Gateway, url: str, pool: ThreadPoolExecutor, delay_ms: int, request_id: str) -> Future[dict[str, Any]]:
    headers = {**gateway.auth_headers(), "X-Request-Id": request_id}
    future = pool.submit(call_tool, f"{url}/mcp", "fixture__slow_echo", {"text": "finished", "delay_ms": delay_ms}, headers)
    poll(lambda: in_flight(url) == 1, "the call to be in flight")
    return future


def kept_alive(url: str) -> socket.socket:
    """A balancer's idle keep-alive connection: one request answered, the connection left open."""
    host, port = url.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)), timeout=WAIT)
    conn.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += conn.recv(4096)
    assert head.startswith(b"HTTP/1.1 200") and b"connection: close" not in head.lower(), head
    return conn


def test_sigterm_keeps_listening_answers_not_ready_and_ends_connections_while_the_call_in_flight_finishes(gateway: Gateway) -> None:
    process, url = start_worker(gateway, grace="30")
    idle = kept_alive(url)
    with ThreadPoolExecutor(1) as pool:
        future = slow_call(gateway, url, pool, delay_ms=3000, request_id="drain-test-1")

        process.send_signal(signal.SIGTERM)
        poll(lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 503, "/readyz to answer 503")
        # Still listening: a new connection is served, and told it will not be kept.
        during = httpx.get(f"{url}/healthz", timeout=5)
        assert (during.status_code, during.headers["connection"]) == (200, "close")
        # The idle kept-alive connection was closed by the worker (a balancer will not reuse it).
        assert idle.recv(4096) == b""
        reply = future.result(timeout=WAIT)

    assert reply["result"]["content"][0]["text"] == "finished"
    assert process.wait(WAIT) == 0
    assert refuses_connections(url)
    [call] = [e for e in log_entries(gateway, "drain-test-1") if e["logger"] == "fedmcp.calls"]
    assert call["outcome"] == "ok"
    assert call["peer"] == "fixture"
    # The worker's own lines about the drain belong to no request.
    assert any("draining" in e["message"] for e in log_entries(gateway, None))


def test_past_the_grace_period_the_call_is_cancelled_upstream_before_exit(gateway: Gateway, fixture_url: str) -> None:
    process, url = start_worker(gateway, grace="0.5")
    cancelled_before = cancelled_on_fixture(fixture_url)
    with ThreadPoolExecutor(1) as pool:
        future = slow_call(gateway, url, pool, delay_ms=60_000, request_id="drain-test-2")

        process.send_signal(signal.SIGTERM)
        assert process.wait(WAIT) == 0
        future.exception(timeout=WAIT)  # the call ends, one way or another

    poll(lambda: cancelled_on_fixture(fixture_url) == cancelled_before + 1, "the fixture to see the cancellation")
    [call] = [e for e in log_entries(gateway, "drain-test-2") if e["logger"] == "fedmcp.calls"]
    assert call["outcome"] == "cancelled"


def read_until_closed(stream: Iterator[Any]) -> None:
    with contextlib.suppress(httpx.HTTPError, ConnectionClosed):
        for _ in stream:
            pass


@contextlib.contextmanager
def open_streams(gateway: Gateway, url: str) -> Iterator[list[threading.Thread]]:
    """Open a GET stream (handshake era), a WebSocket and a subscriptions/listen stream on the
    worker at `url`; yield the threads reading them, which end when the worker closes them."""
    headers = {**gateway.auth_headers(), "Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    init = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "drain-e2e", "version": "0"}}
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(httpx.Client(timeout=httpx.Timeout(WAIT, read=None)))
        reply = client.post(f"{url}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init}, headers=headers)
        session = {**headers, "Mcp-Session-Id": reply.headers["mcp-session-id"], "MCP-Protocol-Version": "2025-11-25"}
        assert client.post(f"{url}/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=session).status_code == 202
        get_stream = stack.enter_context(client.stream("GET", f"{url}/mcp", headers={**session, "Accept": "text/event-stream"}))
        listen = {"jsonrpc": "2.0", "id": 2, "method": "subscriptions/listen", "params": {"_meta": META, "notifications": {"toolsListChanged": True}}}
        listen_stream = stack.enter_context(
            client.stream("POST", f"{url}/mcp", json=listen, headers={**HEADERS, **gateway.auth_headers(), "Mcp-Method": "subscriptions/listen"})
        )
        socket = stack.enter_context(
            ws_connect(f"ws://{url.removeprefix('http://')}/ws", subprotocols=[Subprotocol("mcp")], additional_headers=gateway.auth_headers())
        )
        assert get_stream.status_code == 200 and listen_stream.status_code == 200
        streams = (get_stream.iter_lines(), listen_stream.iter_lines(), iter(socket.recv, None))
        readers = [threading.Thread(target=read_until_closed, args=(stream,), daemon=True) for stream in streams]
        for reader in readers:
            reader.start()
        yield readers


def test_open_streams_do_not_hold_the_drain_and_the_call_in_flight_finishes(gateway: Gateway) -> None:
    process, url = start_worker(gateway, grace="60")
    with ThreadPoolExecutor(1) as pool, open_streams(gateway, url) as readers:
        future = slow_call(gateway, url, pool, delay_ms=1500, request_id="drain-test-3")

        process.send_signal(signal.SIGTERM)
        reply = future.result(timeout=WAIT)
        # The bound is a third of the grace period: only streams holding the drain could exceed it.
        exit_code = process.wait(WAIT)
        for reader in readers:
            reader.join(WAIT)

    assert reply["result"]["content"][0]["text"] == "finished"
    assert exit_code == 0
    assert not any(reader.is_alive() for reader in readers), "a stream stayed open after the worker exited"
