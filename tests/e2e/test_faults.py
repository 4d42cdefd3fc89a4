"""Faults test_fault_isolation.py does not cover, on a real gateway (daphne) and real sockets.

* an upstream that answers a 100 MB body: refused with -32010 at MAX_RESPONSE_BYTES, and the
  worker's peak RSS grows by less than `PEAK_GROWTH_LIMIT_MB`;
* an upstream that accepts the call and never answers: -32010 once the peer's call timeout ends;
* an upstream that drips SSE comment bytes forever (slowloris; every read succeeds, so a
  per-read timeout never fires): -32010 within the same bound;
* a host that disconnects mid-call: the upstream call is cancelled (the fixture's
  `slow_echo_cancelled` counter, read through its `stats` tool);
* a worker restarted with a session open: audit rows survive, the old handshake-era session id
  keeps working (sessions are database rows), and the host may also re-initialize;
* Redis (the channel layer and rate-limit buckets) stopped and started again: calls fail with a
  clear JSON-RPC error or still succeed, never 5xx or a hang; /readyz stays 200 but says
  "degraded" (channelLayer) while it is down, since the worker still serves, and everything
  works again without restarting the worker.

PostgreSQL briefly unreachable is tested in test_db_outage.py (through a proxy the test cuts; the
shared server on 127.0.0.1:5432 is never stopped).

The timeouts here are bounds (the host gives up at `HOST_BOUND`), never wall-clock assertions.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from mcp.shared.exceptions import MCPError

from mcp_endpoint import jsonrpc
from tests.base import modern_meta
from tests.e2e.harness import Gateway, free_port, stop, wait_until
from tests.e2e.test_fault_isolation import (  # noqa: F401  (fixtures)
    SHORT_TIMEOUTS,
    FixtureUpstream,
    gateway,
    host_session,
    rss_kb,
    upstreams,
    worker_pid,
)

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

CALL_TIMEOUT = 3.0
"""The misbehaving peer's call timeout (SHORT_TIMEOUTS)."""
HOST_BOUND = 20.0
"""How long a host waits for any answer here: several call timeouts."""
HUGE_MB = 100
PEAK_GROWTH_LIMIT_MB = 160
"""MAX_RESPONSE_BYTES is 64 MiB: the worker may hold that much before refusing, never 100 MB."""
POLL = 0.1
MODERN = "2026-07-28"


# --- a misbehaving MCP server (2026-07-28, stateless) --------------------------------------------------


class Misfit:
    """Speaks just enough MCP to be registered; its tools misbehave: huge, hang, drip."""

    TOOLS = ("huge", "hang", "drip")

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.calls: dict[str, int] = dict.fromkeys(self.TOOLS, 0)
        misfit = self

        class Handler(BaseHTTPRequestHandler):
            def _json(self, payload: Any, status: int = 200) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802
                message = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                method, ident = message.get("method"), message.get("id")
                if ident is None:
                    self.send_response(202)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif method == "server/discover":
                    self._json({"jsonrpc": "2.0", "id": ident, "result": {
                        "supportedVersions": [MODERN], "capabilities": {"tools": {}},
                        "serverInfo": {"name": "misfit", "version": "0"}}})
                elif method == "tools/list":
                    tools = [{"name": t, "inputSchema": {"type": "object"}} for t in misfit.TOOLS]
                    self._json({"jsonrpc": "2.0", "id": ident, "result": {"tools": tools}})
                elif method == "tools/call":
                    name = message["params"]["name"]
                    misfit.calls[name] = misfit.calls.get(name, 0) + 1
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        getattr(self, f"_{name}")(ident)
                else:
                    self._json({"jsonrpc": "2.0", "id": ident, "error": {"code": -32601, "message": "no"}})

            def _huge(self, ident: Any) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()  # HTTP/1.0, no length: the body ends when the socket does
                self.wfile.write(b'{"jsonrpc":"2.0","id":%s,"result":{"content":[{"type":"text","text":"' % json.dumps(ident).encode())
                chunk = b"x" * (1024 * 1024)
                for _ in range(HUGE_MB):
                    self.wfile.write(chunk)
                self.wfile.write(b'"}]}}')

            def _hang(self, ident: Any) -> None:
                misfit.stopping.wait(60)

            def _drip(self, ident: Any) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                deadline = time.monotonic() + 60
                while not misfit.stopping.is_set() and time.monotonic() < deadline:
                    self.wfile.write(b":")  # one byte of an SSE comment, never a whole event
                    self.wfile.flush()
                    misfit.stopping.wait(0.2)

            def do_GET(self) -> None:  # noqa: N802
                self.send_response(405)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/mcp"

    def __enter__(self) -> Misfit:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()


def peak_rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status").read().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


async def upstream_error_code(client: Any, name: str) -> int:
    with pytest.raises(MCPError) as failure:
        with anyio_fail_after(HOST_BOUND):
            await client.call_tool(name, {})
    return failure.value.code


def anyio_fail_after(seconds: float) -> Any:
    import anyio

    return anyio.fail_after(seconds)


async def test_a_huge_a_hanging_and_a_dripping_upstream_each_fail_with_32010_and_memory_stays_bounded(
    gateway: Gateway, upstreams: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    beta = upstreams("beta")
    with Misfit() as misfit:
        gateway.command("peer", "add", "misfit", "--url", misfit.url, *SHORT_TIMEOUTS)
        gateway.command("peer", "add", "beta", "--url", beta.url, *SHORT_TIMEOUTS)
        gateway.start_worker()
        pid = worker_pid(gateway)
        codes: dict[str, int] = {}
        async with host_session(gateway) as client:
            assert (await client.call_tool("beta__add", {"a": 1, "b": 2})).content[0].text == "3"
            peak_before = peak_rss_kb(pid)
            codes["huge"] = await upstream_error_code(client, "misfit__huge")
            peak_growth_mb = (peak_rss_kb(pid) - peak_before) / 1024
            codes["hang"] = await upstream_error_code(client, "misfit__hang")
            codes["drip"] = await upstream_error_code(client, "misfit__drip")
            # The same session still works, on the well-behaved peer.
            assert (await client.call_tool("beta__add", {"a": 2, "b": 3})).content[0].text == "5"
        assert codes == dict.fromkeys(("huge", "hang", "drip"), jsonrpc.UPSTREAM_ERROR), codes
        assert misfit.calls["huge"] >= 1 and misfit.calls["hang"] >= 1 and misfit.calls["drip"] >= 1
        assert peak_growth_mb < PEAK_GROWTH_LIMIT_MB, peak_growth_mb
        assert gateway.workers[0][0].poll() is None
    with capsys.disabled():
        print(f"\n[faults] codes {codes}; peak RSS growth for a {HUGE_MB} MB answer: {peak_growth_mb:.0f} MB")


# --- a host that disconnects mid-call --------------------------------------------------------------------


def stats_through(gw: Gateway, token_headers: dict[str, str]) -> dict[str, int]:
    body = {"jsonrpc": "2.0", "id": "s", "method": "tools/call", "params": {"name": "beta__stats", "arguments": {}, "_meta": modern_meta()}}
    headers = {
        **token_headers, "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": "beta__stats",
    }
    reply = httpx.post(gw.url("/mcp"), json=body, headers=headers, timeout=HOST_BOUND)
    text = reply.text
    if reply.headers["content-type"].startswith("application/json"):
        payload = json.loads(text)
    else:
        payload = json.loads([line[5:] for line in text.splitlines() if line.startswith("data:")][-1])
    return json.loads(payload["result"]["content"][0]["text"])


def test_a_host_that_disconnects_mid_call_cancels_the_upstream_call(gateway: Gateway, upstreams: Any) -> None:
    beta = upstreams("beta")
    gateway.command("peer", "add", "beta", "--url", beta.url, *SHORT_TIMEOUTS[2:], "--call-timeout", "60")
    gateway.start_worker()
    auth = gateway.auth_headers()
    before = stats_through(gateway, auth)["slow_echo_cancelled"]
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": "beta__slow_echo", "arguments": {"text": "x", "delay_ms": 30000}, "_meta": {**modern_meta(), "progressToken": "p"}}}
    headers = {
        **auth, "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": "beta__slow_echo",
    }
    with httpx.Client(timeout=HOST_BOUND) as http, http.stream("POST", gateway.url("/mcp"), json=body, headers=headers) as response:
        assert response.status_code == 200
        for line in response.iter_lines():  # the first progress event: the upstream call is running
            if line.startswith("data:") and "notifications/progress" in line:
                break
    # The connection is closed now; the gateway must cancel the upstream call.
    deadline = time.monotonic() + HOST_BOUND
    after = before
    while time.monotonic() < deadline and after == before:
        time.sleep(POLL)
        after = stats_through(gateway, auth)["slow_echo_cancelled"]
    assert after == before + 1, (before, after)


# --- a worker restarted with a session open --------------------------------------------------------------


def audit_rows(gw: Gateway, method: str | None = None) -> int:
    query = f"filter(method={method!r})" if method else "all()"
    return int(gw.python(f"from identity.models import AuditEvent; print(AuditEvent.objects.{query}.count())").splitlines()[-1])


def handshake_post(gw: Gateway, message: dict[str, Any], session: str | None, version: str = "2025-11-25") -> httpx.Response:
    headers = {**gw.auth_headers(), "Accept": "application/json, text/event-stream", "MCP-Protocol-Version": version}
    if session:
        headers["Mcp-Session-Id"] = session
    return httpx.post(gw.url("/mcp"), json=message, headers=headers, timeout=HOST_BOUND)


def answer(response: httpx.Response) -> dict[str, Any]:
    if response.headers.get("content-type", "").startswith("application/json"):
        return response.json()
    return json.loads([line[5:] for line in response.text.splitlines() if line.startswith("data:")][-1])


def test_a_restarted_worker_keeps_sessions_and_audit_rows(gateway: Gateway, upstreams: Any) -> None:
    beta = upstreams("beta")
    gateway.command("peer", "add", "beta", "--url", beta.url, *SHORT_TIMEOUTS)
    gateway.start_worker()
    params = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": params}
    started = handshake_post(gateway, init, None)
    session = started.headers["mcp-session-id"]
    assert handshake_post(gateway, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session).status_code == 202
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "beta__add", "arguments": {"a": 1, "b": 2}}}
    assert answer(handshake_post(gateway, call, session))["result"]["content"][0]["text"] == "3"
    # The audit trail is written just after the answer: wait for the call's row.
    wait_until(lambda: audit_rows(gateway, "tools/call") == 1, what="the call's audit row")
    rows = audit_rows(gateway)

    gateway.stop()
    gateway.start_worker()

    assert audit_rows(gateway) == rows
    # The old session id still works: sessions are database rows, not worker memory.
    again = handshake_post(gateway, {**call, "id": 3}, session)
    assert again.status_code == 200, again.text
    assert answer(again)["result"]["content"][0]["text"] == "3"
    # And a host may simply start over.
    fresh = handshake_post(gateway, init, None)
    assert fresh.status_code == 200 and fresh.headers["mcp-session-id"] != session
    wait_until(lambda: audit_rows(gateway, "tools/call") == 2, what="the second call's audit row")
    assert audit_rows(gateway) > rows


# --- Redis briefly unavailable -----------------------------------------------------------------------------


@contextlib.contextmanager
def redis_server(port: int) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                import socket

                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            time.sleep(POLL)
        yield process
    finally:
        stop(process)


def modern_call(gw: Gateway, name: str, arguments: dict[str, Any]) -> httpx.Response:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": name, "arguments": arguments, "_meta": modern_meta()}}
    headers = {
        **gw.auth_headers(), "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": name,
    }
    return httpx.post(gw.url("/mcp"), json=body, headers=headers, timeout=HOST_BOUND)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_redis_stopped_and_started_again_needs_no_worker_restart(upstreams: Any) -> None:
    beta = upstreams("beta")
    port = free_port()
    with Gateway(name="redis-fault", env={"REDIS_URL": f"redis://127.0.0.1:{port}/0", "FEDMCP_REDIS_PREFIX": f"fault{port}"}) as gw:
        gw.migrate()
        gw.command("peer", "add", "beta", "--url", beta.url, *SHORT_TIMEOUTS)
        with redis_server(port):
            gw.start_worker()
            assert answer(modern_call(gw, "beta__add", {"a": 1, "b": 2}))["result"]["content"][0]["text"] == "3"
        # Redis is down.
        down = modern_call(gw, "beta__add", {"a": 1, "b": 2})
        assert down.status_code < 500, (down.status_code, down.text[:300])
        outcome = answer(down)
        assert "result" in outcome or outcome["error"]["code"] in {jsonrpc.UPSTREAM_ERROR, jsonrpc.INTERNAL_ERROR, jsonrpc.RATE_LIMITED}, outcome
        ready = httpx.get(gw.url("/readyz"), timeout=HOST_BOUND)
        assert (ready.status_code, ready.json()["status"], ready.json()["degraded"]) == (200, "degraded", ["channelLayer"]), ready.text
        with redis_server(port):
            deadline = time.monotonic() + HOST_BOUND
            while time.monotonic() < deadline and httpx.get(gw.url("/readyz"), timeout=HOST_BOUND).json()["status"] != "ready":
                time.sleep(POLL)
            ready = httpx.get(gw.url("/readyz"), timeout=HOST_BOUND)
            assert (ready.status_code, ready.json()["status"]) == (200, "ready"), ready.text
            assert answer(modern_call(gw, "beta__add", {"a": 2, "b": 3}))["result"]["content"][0]["text"] == "5"
            assert gw.workers[0][0].poll() is None
