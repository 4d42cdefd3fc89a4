"""A worker that drains on SIGTERM writes the audit row of every call it served, the last included.

A real daphne worker serves quick calls, in both protocol eras, then SIGTERM arrives either
while a slow call is in flight (the drain lets it finish) or right after the last answer (its
row may still wait for the next batch). After the process has exited the database holds one
`tools/call` audit row per call.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.e2e.harness import Gateway, fixture_server
from tests.observability.test_graceful_shutdown import call_tool, in_flight, poll

pytestmark = pytest.mark.e2e

QUICK_CALLS = 20


@pytest.fixture
def gateway(request: pytest.FixtureRequest) -> Iterator[Gateway]:
    env = getattr(request, "param", {})
    with fixture_server(name="fixture") as url, Gateway(name="audit-drain", env=env) as gateway:
        gateway.migrate()
        gateway.command("peer", "add", "fixture", "--url", url)
        gateway.auth_headers()
        yield gateway


def audited_calls(gateway: Gateway) -> int:
    code = "from identity.models import AuditEvent; print(AuditEvent.objects.filter(method='tools/call').count())"
    return int(gateway.python(code).splitlines()[-1])


def handshake_session(url: str, headers: dict[str, str]) -> dict[str, str]:
    """Open a 2025-11-25 session; return the headers that use it."""
    init = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}
    legacy = {**headers, "Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    reply = httpx.post(f"{url}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init}, headers=legacy, timeout=30)
    session = {**legacy, "Mcp-Session-Id": reply.headers["mcp-session-id"], "MCP-Protocol-Version": "2025-11-25"}
    assert httpx.post(f"{url}/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=session, timeout=30).status_code == 202
    return session


def handshake_call(url: str, session: dict[str, str], i: int) -> None:
    body = {"jsonrpc": "2.0", "id": 100 + i, "method": "tools/call", "params": {"name": "fixture__add", "arguments": {"a": i, "b": 1}}}
    reply = httpx.post(f"{url}/mcp", json=body, headers=session, timeout=30)
    assert reply.status_code == 200 and f'"text":"{i + 1}"' in reply.text.replace(" ", ""), reply.text


def test_sigterm_right_after_the_last_answer_loses_no_audit_row(gateway: Gateway) -> None:
    port = gateway.start_worker()
    process = gateway.workers[-1][0]
    url = f"http://127.0.0.1:{port}"
    headers = gateway.auth_headers()
    session = handshake_session(url, headers)
    for i in range(QUICK_CALLS):
        handshake_call(url, session, i)
        reply = call_tool(f"{url}/mcp", "fixture__add", {"a": i, "b": 1}, headers)
        assert reply["result"]["content"][0]["text"] == str(i + 1), reply
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0

    assert audited_calls(gateway) == 2 * QUICK_CALLS


def test_every_call_served_before_and_during_the_drain_is_audited(gateway: Gateway) -> None:
    port = gateway.start_worker()
    process = gateway.workers[-1][0]
    url = f"http://127.0.0.1:{port}"
    headers = gateway.auth_headers()
    for i in range(QUICK_CALLS):
        reply = call_tool(f"{url}/mcp", "fixture__add", {"a": i, "b": 1}, headers)
        assert reply["result"]["content"][0]["text"] == str(i + 1), reply

    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(call_tool, f"{url}/mcp", "fixture__slow_echo", {"text": "last", "delay_ms": 1000}, headers)
        poll(lambda: in_flight(url) == 1, "the last call to be in flight")
        process.send_signal(signal.SIGTERM)
        last = slow.result(30)
    assert json.dumps(last).count("last") >= 1 and "result" in last, last
    assert process.wait(60) == 0

    log = gateway.logs()
    assert "audit event not written" not in log, log[-3000:]
    assert audited_calls(gateway) == QUICK_CALLS + 1


@pytest.mark.parametrize("gateway", [{"FEDMCP_SHUTDOWN_GRACE": "2"}], indirect=True)
def test_calls_on_a_kept_alive_connection_through_the_whole_drain_are_all_audited(gateway: Gateway) -> None:
    """A balancer keeps sending calls until the process is gone, as a balancer does.

    The drain ends idle kept-alive connections and answers `Connection: close`; a request that
    finds its connection closed before any answer was never run, and goes again on a new one
    (what nginx and httpx-style clients do), until the worker stops listening.
    """
    port = gateway.start_worker()
    process = gateway.workers[-1][0]
    url = f"http://127.0.0.1:{port}/mcp"
    headers = {**gateway.auth_headers(), "Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2026-07-28",
               "Mcp-Method": "tools/call", "Mcp-Name": "fixture__add"}
    answered = 0
    meta = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
    with httpx.Client(headers=headers, timeout=30) as client:
        for i in range(5):
            assert "result" in client.post(url, json={"jsonrpc": "2.0", "id": i, "method": "tools/call",
                                                      "params": {"name": "fixture__add", "arguments": {"a": i, "b": 1}, "_meta": meta}}).json()
            answered += 1
        process.send_signal(signal.SIGTERM)
        for i in range(10_000):
            try:
                reply = client.post(url, json={"jsonrpc": "2.0", "id": i, "method": "tools/call",
                                               "params": {"name": "fixture__add", "arguments": {"a": i, "b": 1}, "_meta": meta}})
            except httpx.RemoteProtocolError:
                continue  # closed before an answer: not run; a new connection next
            except httpx.HTTPError:
                break
            if reply.status_code == 200 and "result" in reply.json():
                answered += 1
            elif process.poll() is not None:
                break
    assert process.wait(60) == 0
    assert answered > 5
    assert audited_calls(gateway) >= answered, (audited_calls(gateway), answered)
