"""PostgreSQL briefly unreachable, for one real gateway worker: clear errors, then recovery without a restart.

The gateway has a PostgreSQL database of its own on the shared server (127.0.0.1:5432), which
it reaches through a loopback TCP proxy this test controls (tests/e2e/cuttable_proxy.py). The
shared server is never stopped: cutting the proxy drops every connection the worker holds
(reset) and refuses new ones, which is what the worker sees when its database goes away.

While the database is unreachable:

* what the worker holds in its caches (fedmcp_lib/caching.py) keeps working: a call with a
  token, route and consent decision it has already checked is served, and its audit row is
  queued (identity/audit.py) and written once the database is back;
* whatever needs the database gets HTTP 503 with a JSON-RPC error body and `Retry-After`,
  quickly (no 500, no traceback, no hang): a token the worker has not seen yet, a new
  handshake-era session (`initialize` writes its row); over a WebSocket, a request that needs
  the database gets a JSON-RPC error (-32603, "database") and the socket stays open; a new
  WebSocket with an unseen token is refused at the handshake (daphne cannot send a 503 there);
* /readyz answers 503 and says the database check failed; /healthz answers 503 too (JSON).

After the proxy is restored, the same worker process (no restart) answers /readyz 200 and
serves calls again; a handshake-era session and a WebSocket opened before the outage still
work. Every call that succeeded, before, during or after the outage, has its audit row, with
the time it was made.

Override the server with FEDMCP_E2E_POSTGRES (an admin DSN; trust auth), as in test_scale_out.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect
from websockets.typing import Subprotocol

from mcp_endpoint import jsonrpc
from tests.base import modern_meta
from tests.e2e import harness
from tests.e2e.cuttable_proxy import CuttableProxy
from tests.e2e.harness import Gateway
from tests.e2e.test_fault_isolation import SHORT_TIMEOUTS, upstreams  # noqa: F401  (fixture)

pytestmark = pytest.mark.e2e

HOST_BOUND = 20.0
"""How long a host waits for any answer: an outage must produce an answer well within it."""
OUTAGE_SECONDS = 3.0
POLL = 0.2
MODERN = "2026-07-28"
HANDSHAKE = "2025-11-25"


@pytest.fixture
def database() -> Iterator[tuple[str, int, str]]:
    """A fresh, migrated database on the shared server: (host, port, name); dropped afterwards."""
    with harness.postgres_database("fedmcp_outage") as url:
        parts = urlsplit(url)
        yield parts.hostname or "127.0.0.1", parts.port or 5432, parts.path.lstrip("/")


def modern_call(gw: Gateway, name: str, arguments: dict[str, Any], token: str | None = None) -> httpx.Response:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": name, "arguments": arguments, "_meta": modern_meta()}}
    auth = {"Authorization": f"Bearer {token}"} if token else gw.auth_headers()
    headers = {**auth, "Accept": "application/json, text/event-stream", "MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": name}
    return httpx.post(gw.url("/mcp"), json=body, headers=headers, timeout=HOST_BOUND)


def handshake_post(gw: Gateway, message: dict[str, Any], session: str | None) -> httpx.Response:
    headers = {**gw.auth_headers(), "Accept": "application/json, text/event-stream", "MCP-Protocol-Version": HANDSHAKE}
    if session:
        headers["Mcp-Session-Id"] = session
    return httpx.post(gw.url("/mcp"), json=message, headers=headers, timeout=HOST_BOUND)


def answer(response: httpx.Response) -> dict[str, Any]:
    if response.headers.get("content-type", "").startswith("application/json"):
        return response.json()
    return json.loads([line[5:] for line in response.text.splitlines() if line.startswith("data:")][-1])


def added(response: httpx.Response) -> str:
    assert response.status_code == 200, (response.status_code, response.text[:500])
    return answer(response)["result"]["content"][0]["text"]


def ok_audit_rows(gw: Gateway) -> int:
    script = "from identity.models import AuditEvent; print(AuditEvent.objects.filter(outcome='ok', method='tools/call').count())"
    return int(gw.manage("shell", "-c", script).stdout.strip().splitlines()[-1])


def served_or_unavailable(response: httpx.Response, expected: str) -> bool:
    """During the outage: served from the worker's caches (True), or refused clearly (False)."""
    if response.status_code == 200:
        assert added(response) == expected
        return True
    assert_unavailable(response)
    return False


class Socket:
    """A minimal MCP host over one WebSocket (the sync client: its own I/O thread)."""

    def __init__(self, gw: Gateway, token: str | None = None) -> None:
        auth = {"Authorization": f"Bearer {token}"} if token else gw.auth_headers()
        self.ws: ClientConnection = ws_connect(gw.ws_url("/ws"), subprotocols=[Subprotocol("mcp")], additional_headers=auth, open_timeout=HOST_BOUND)
        self.ids = 0

    def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self.ids += 1
        self.ws.send(json.dumps({"jsonrpc": "2.0", "id": self.ids, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=HOST_BOUND))
            if message.get("id") == self.ids and "method" not in message:
                return message

    def add(self, a: int, b: int) -> dict[str, Any]:
        return self.request("tools/call", {"name": "beta__add", "arguments": {"a": a, "b": b}})


def assert_unavailable(response: httpx.Response) -> None:
    """A clear, machine-readable refusal: 503, JSON-RPC error body, Retry-After."""
    assert response.status_code == 503, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json"), response.headers
    assert "Traceback" not in response.text
    error = response.json()["error"]
    assert error["code"] == jsonrpc.INTERNAL_ERROR and "database" in error["message"].lower(), error
    assert int(response.headers["retry-after"]) >= 1


def test_postgresql_unreachable_then_back_needs_no_worker_restart(database: tuple[str, int, str], upstreams: Any) -> None:  # noqa: F811
    host, port, name = database
    beta = upstreams("beta")
    with CuttableProxy((host, port)) as proxy, Gateway(name="db-outage", database_url=f"postgres://postgres@127.0.0.1:{proxy.port}/{name}") as gw:
        gw.migrate()
        gw.command("peer", "add", "beta", "--url", beta.url, *SHORT_TIMEOUTS)
        gw.start_worker()
        worker = gw.workers[0][0]
        succeeded = 0

        assert added(modern_call(gw, "beta__add", {"a": 1, "b": 2})) == "3"
        succeeded += 1
        params = {"protocolVersion": HANDSHAKE, "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": params}
        session = handshake_post(gw, init, None).headers["mcp-session-id"]
        assert handshake_post(gw, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session).status_code == 202
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "beta__add", "arguments": {"a": 2, "b": 2}}}
        assert added(handshake_post(gw, call, session)) == "4"
        succeeded += 1
        socket = Socket(gw)
        socket.request("initialize", {"protocolVersion": HANDSHAKE, "capabilities": {}, "clientInfo": {"name": "ws", "version": "0"}})
        socket.ws.send(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        assert socket.add(5, 5)["result"]["content"][0]["text"] == "10"
        succeeded += 1
        assert httpx.get(gw.url("/readyz"), timeout=HOST_BOUND).status_code == 200

        unseen = gw.token()  # minted now, first used during the outage: only the database knows it
        outage_started = time.time()
        proxy.cut()
        outage_ends = time.monotonic() + OUTAGE_SECONDS
        # Served from the caches: the token, the route and the consent decision were checked before.
        assert added(modern_call(gw, "beta__add", {"a": 1, "b": 1})) == "2"
        succeeded += 1
        during = 1
        # The session was read before; whether this worker still needs its row is its business,
        # but the answer is either the result or the clear refusal.
        if served_or_unavailable(handshake_post(gw, {**call, "id": 3}, session), "4"):
            succeeded += 1
            during += 1
        # What only the database can answer is refused clearly.
        assert_unavailable(modern_call(gw, "beta__add", {"a": 1, "b": 1}, token=unseen))
        assert_unavailable(handshake_post(gw, init, None))
        ready = httpx.get(gw.url("/readyz"), timeout=HOST_BOUND)
        assert ready.status_code == 503 and ready.json()["checks"]["database"]["ok"] is False, ready.text
        reply = socket.add(1, 1)
        if "result" in reply:
            assert reply["result"]["content"][0]["text"] == "2"
            succeeded += 1
            during += 1
        else:
            error = reply["error"]
            assert error["code"] == jsonrpc.INTERNAL_ERROR and "database" in error["message"].lower(), error
        with pytest.raises(InvalidStatus):
            Socket(gw, token=unseen)
        health = httpx.get(gw.url("/healthz"), timeout=HOST_BOUND)
        assert health.status_code == 503 and health.headers["content-type"].startswith("application/json"), (health.status_code, health.text[:300])
        time.sleep(max(0.0, outage_ends - time.monotonic()))
        outage_over = time.time()
        proxy.restore()

        deadline = time.monotonic() + HOST_BOUND
        while time.monotonic() < deadline and httpx.get(gw.url("/readyz"), timeout=HOST_BOUND).status_code != 200:
            time.sleep(POLL)
        assert httpx.get(gw.url("/readyz"), timeout=HOST_BOUND).status_code == 200
        assert added(modern_call(gw, "beta__add", {"a": 3, "b": 4})) == "7"
        succeeded += 1
        # The session opened before the outage is a database row: it is still there.
        assert added(handshake_post(gw, {**call, "id": 4}, session)) == "4"
        succeeded += 1
        assert socket.add(6, 6)["result"]["content"][0]["text"] == "12"
        succeeded += 1
        socket.ws.close()
        assert worker.poll() is None, "the worker exited"
        assert gw.workers[0][0] is worker

        deadline = time.monotonic() + HOST_BOUND
        while time.monotonic() < deadline and ok_audit_rows(gw) < succeeded:
            time.sleep(POLL)
        assert ok_audit_rows(gw) == succeeded
        # The calls served during the outage were written afterwards, stamped with their own time.
        assert audit_rows_between(gw, outage_started, outage_over) == during


def audit_rows_between(gw: Gateway, start: float, end: float) -> int:
    script = (
        "import datetime as d; from identity.models import AuditEvent; "
        f"t = lambda s: d.datetime.fromtimestamp(s, d.timezone.utc); "
        f"print(AuditEvent.objects.filter(outcome='ok', method='tools/call', at__gte=t({start}), at__lte=t({end})).count())"
    )
    return int(gw.manage("shell", "-c", script).stdout.strip().splitlines()[-1])
