"""Per-worker caches (fedmcp_lib/caching.py) never outlive a change made in another process.

Two real daphne workers on one database, each warmed so it holds the token, the session, the
route and the consent decision in memory; then a *separate* `manage.py` process changes the
database, the way an operator or the admin would, and the very next message on either worker
must see the change. Run on both setups: SQLite (generations in a file next to the database)
and PostgreSQL + Redis (generations in Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from mcp_endpoint import jsonrpc
from tests.e2e import harness
from tests.e2e.harness import Gateway, fixture_server

pytestmark = pytest.mark.e2e

REDIS_URL = harness.REDIS_URL
PEER = "fixture"
TOOL = f"{PEER}__add"
A, B = 0, 1
VERSION = "2025-11-25"
TIMEOUT = 30.0
JsonDict = dict[str, Any]


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with fixture_server(PEER) as url:
        yield url


@pytest.fixture(scope="module", params=["sqlite", "postgres+redis"])
def cluster(request: pytest.FixtureRequest, upstream: str) -> Iterator[Gateway]:
    """Two workers on one database; with Redis, the cache generations live there."""
    env = {"FEDERATION_HEALTH_INTERVAL": "0", "FEDERATION_REFRESH_INTERVAL": "0"}
    with contextlib.ExitStack() as stack:
        database_url = None
        if request.param == "postgres+redis":
            database_url = stack.enter_context(harness.postgres_database("fedmcp_cachegen"))
            env |= {"REDIS_URL": REDIS_URL, "FEDMCP_REDIS_PREFIX": stack.enter_context(harness.redis_prefix("fedmcp-cachegen"))}
        gateway = Gateway(name=f"cachegen-{request.param.replace('+', '-')}", env=env, database_url=database_url)
        stack.callback(gateway.cleanup)
        gateway.migrate()
        gateway.command("peer", "add", PEER, "--url", upstream)
        gateway.start_worker()
        gateway.start_worker()
        yield gateway


@pytest.fixture(autouse=True)
def _worker_logs(cluster: Gateway) -> Iterator[None]:
    """Write the workers' logs after each test; pytest shows them only if the test failed."""
    yield
    sys.stderr.write(cluster.logs())


# --- helpers -------------------------------------------------------------------------------------


def elsewhere(gateway: Gateway, code: str) -> str:
    """Run Python in a process other than the workers (the gateway's `Interpreter`), on the gateway's database; return its last line."""
    lines = gateway.python(code).splitlines()
    return lines[-1] if lines else ""


def token_id(gateway: Gateway, raw: str) -> int:
    code = (
        "import hashlib; from oauth2_provider.models import AccessToken;"
        f"print(AccessToken.objects.get(token_checksum=hashlib.sha256({raw!r}.encode()).hexdigest()).pk)"
    )
    return int(elsewhere(gateway, code))


class Host:
    """A handshake-era Streamable HTTP host whose requests alternate between the two workers."""

    def __init__(self, gateway: Gateway, token: str) -> None:
        self.gateway = gateway
        self.token = token
        self.session = ""
        self.ids = iter(range(1, 10_000))
        self.client = httpx.Client(timeout=TIMEOUT)

    def headers(self) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
        if self.session:
            headers |= {"Mcp-Session-Id": self.session, "MCP-Protocol-Version": VERSION}
        return headers

    def post(self, worker: int, message: JsonDict) -> httpx.Response:
        return self.client.post(self.gateway.url("/mcp", worker), content=json.dumps(message), headers=self.headers())

    def open(self) -> Host:
        params = {"protocolVersion": VERSION, "capabilities": {}, "clientInfo": {"name": "cachegen", "version": "1"}}
        response = self.post(A, {"jsonrpc": "2.0", "id": next(self.ids), "method": "initialize", "params": params})
        assert response.status_code == 200, response.text
        self.session = response.headers["mcp-session-id"]
        assert self.post(B, {"jsonrpc": "2.0", "method": "notifications/initialized"}).status_code == 202
        return self

    def request(self, worker: int, method: str, params: JsonDict | None = None) -> tuple[int, JsonDict | None]:
        response = self.post(worker, {"jsonrpc": "2.0", "id": next(self.ids), "method": method, "params": params or {}})
        if not response.headers.get("content-type", "").startswith("application/json"):
            return response.status_code, None
        return response.status_code, response.json()

    def add(self, worker: int, a: int = 2, b: int = 3) -> tuple[int, JsonDict | None]:
        return self.request(worker, "tools/call", {"name": TOOL, "arguments": {"a": a, "b": b}})

    def warm(self) -> None:
        """Make each worker cache the token, the session, the route and the consent decision."""
        for worker in (A, B, A, B):
            status, reply = self.add(worker)
            assert status == 200 and reply is not None and reply["result"]["content"][0]["text"] == "5", reply

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def host(cluster: Gateway) -> Iterator[Host]:
    opened = Host(cluster, cluster.token()).open()
    opened.warm()
    yield opened
    opened.close()


# --- tests ---------------------------------------------------------------------------------------


def test_a_token_revoked_by_another_process_stops_working_on_both_workers(cluster: Gateway, host: Host) -> None:
    elsewhere(cluster, f"from oauth2_provider.models import AccessToken; AccessToken.objects.get(pk={token_id(cluster, host.token)}).revoke()")

    for worker in (A, B):
        status, reply = host.add(worker)
        assert status == 401, (worker, status, reply)


def test_a_peer_disabled_by_another_process_disappears_at_once(cluster: Gateway, host: Host) -> None:
    switch = "import asyncio; from federation.models import Peer; from federation.services import peer_set_enabled;"
    elsewhere(cluster, switch + f"asyncio.run(peer_set_enabled(peer_ids=[Peer.objects.get(name={PEER!r}).pk], enabled=False))")
    try:
        for worker in (A, B):
            status, reply = host.add(worker)
            assert reply is not None and reply["error"]["code"] == jsonrpc.INVALID_PARAMS, (worker, reply)
            _, listed = host.request(worker, "tools/list")
            assert listed is not None and TOOL not in [t["name"] for t in listed["result"]["tools"]]
    finally:
        elsewhere(cluster, switch + f"asyncio.run(peer_set_enabled(peer_ids=[Peer.objects.get(name={PEER!r}).pk], enabled=True))")
    for worker in (A, B):
        status, reply = host.add(worker)
        assert reply is not None and "result" in reply, (worker, reply)


def test_a_deny_policy_made_by_another_process_applies_to_the_next_call(cluster: Gateway, host: Host) -> None:
    policy = int(elsewhere(cluster, f"from identity.models import ConsentPolicy; print(ConsentPolicy.objects.create(peer={PEER!r}, decision='deny').pk)"))
    try:
        for worker in (A, B):
            _, reply = host.add(worker)
            assert reply is not None and reply["error"]["code"] == jsonrpc.CONSENT_DENIED, (worker, reply)
    finally:
        elsewhere(cluster, f"from identity.models import ConsentPolicy; ConsentPolicy.objects.filter(pk={policy}).delete()")
    for worker in (A, B):
        _, reply = host.add(worker)
        assert reply is not None and "result" in reply, (worker, reply)


def test_a_session_closed_by_another_process_is_gone_on_both_workers(cluster: Gateway, host: Host) -> None:
    elsewhere(
        cluster,
        "from asgiref.sync import async_to_sync; from mcp_endpoint.sessions import session_close; "
        f"async_to_sync(session_close)(session_id={host.session!r})",
    )

    for worker in (A, B):
        status, _ = host.add(worker)
        assert status == 404, (worker, status)


@pytest.mark.anyio
async def test_a_websocket_stops_at_the_next_message_after_a_revocation_elsewhere(cluster: Gateway) -> None:
    raw = cluster.token()
    async with connect(
        cluster.ws_url("/ws", A), subprotocols=[Subprotocol("mcp")], additional_headers={"Authorization": f"Bearer {raw}"}, open_timeout=TIMEOUT
    ) as socket:

        async def ask(request_id: int, method: str, params: JsonDict) -> JsonDict:
            await socket.send(json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}))
            while True:
                message = json.loads(await socket.recv())
                if message.get("id") == request_id:
                    return message

        init = {"protocolVersion": VERSION, "capabilities": {}, "clientInfo": {"name": "cachegen", "version": "1"}}
        assert "result" in await ask(1, "initialize", init)
        for request_id in (2, 3):
            reply = await ask(request_id, "tools/call", {"name": TOOL, "arguments": {"a": 1, "b": 1}})
            assert reply["result"]["content"][0]["text"] == "2"

        elsewhere(cluster, f"from oauth2_provider.models import AccessToken; AccessToken.objects.filter(pk={token_id(cluster, raw)}).delete()")

        reply = await ask(4, "tools/call", {"name": TOOL, "arguments": {"a": 1, "b": 1}})
        assert reply["error"]["code"] == jsonrpc.TOKEN_REVOKED
        # Then the socket closes with 1008 (policy violation), not 1011 (internal error).
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(socket.recv(), TIMEOUT)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008, closed.value
