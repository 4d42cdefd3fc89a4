"""A failing upstream stays that upstream's problem: real gateway, real upstreams, real faults.

Each test builds its own gateway (one daphne worker, its own SQLite database) with short fault
settings: a circuit opens after 2 consecutive transport failures, half-opens after 1 s, and
background health checks run every 0.5 s. The faults are real: an HTTP upstream process is
SIGKILLed mid-call and started again on the same port, the gateway's stdio child is SIGKILLed
and must be restarted by the gateway, and a loopback server answers MCP with junk.

Hosts are the official SDK client in the handshake era (`mode="legacy"`), one session per
test: a fault on one peer must never break the host's session or the other peers.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError

from mcp_endpoint import jsonrpc
from tests.e2e.conftest import stdio_fixture_command
from tests.e2e.harness import (
    ROOT,
    Gateway,
    fixture_command,
    free_port,
    migrated_gateway,
    stop,
    wait_http,
)

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

FAULT_SETTINGS = {
    "FEDERATION_BREAKER_FAILURES": "2",
    "FEDERATION_BREAKER_COOLDOWN": "1",
    "FEDERATION_HEALTH_INTERVAL": "0.5",
}
SHORT_TIMEOUTS = ("--call-timeout", "3", "--connect-timeout", "2")
ALPHA_CALL_TIMEOUT = 30.0
"""alpha's call timeout: long, so an error well before it can only come from the killed stream."""
KILLED_CALL_BOUND = ALPHA_CALL_TIMEOUT / 3
"""How long the host may wait for the error of the call whose upstream was killed."""
WAIT = 20.0
"""Upper bound for every other poll; a healthy run needs a fraction of it."""
POLL = 0.1
FIXTURE_TOOLS = ("add", "slow_echo", "whoami", "stats")
RSS_GROWTH_LIMIT_KB = 10 * 1024


# --- processes ---------------------------------------------------------------------------------


class FixtureUpstream:
    """The fixture over Streamable HTTP as a process the test kills and restarts on one port."""

    def __init__(self, name: str, log_dir: Path) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self._log_path = log_dir / f"fixture-{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self._log_path, "ab") as log:
            self.process = subprocess.Popen(
                fixture_command(name=self.name, port=self.port), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_http(self.url, process=self.process)

    def kill(self) -> None:
        """SIGKILL the process group: no graceful shutdown, open streams just break."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)


@pytest.fixture
def upstreams(tmp_path: Path) -> Iterator[Callable[[str], FixtureUpstream]]:
    """Start fixture upstreams by name; all of them are stopped after the test."""
    started: list[FixtureUpstream] = []

    def start(name: str) -> FixtureUpstream:
        upstream = FixtureUpstream(name, tmp_path)
        started.append(upstream)
        upstream.start()
        return upstream

    yield start
    for upstream in started:
        upstream.stop()


@pytest.fixture
def gateway(request: pytest.FixtureRequest, upstreams: Callable[[str], FixtureUpstream]) -> Iterator[Gateway]:
    """A migrated gateway with the short fault settings; the test adds peers, then starts it.

    It stops before the test's upstreams do: an HTTP upstream still holding the gateway's
    streams would otherwise wait for them on SIGTERM.
    """
    with migrated_gateway(request, name="faults", env=FAULT_SETTINGS) as gw:
        yield gw


def worker_pid(gw: Gateway) -> int:
    return gw.workers[0][0].pid


def child_pids(pid: int) -> set[int]:
    """Children of `pid` (zombies included, so an unreaped child still counts)."""
    children: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            children.update(int(c) for c in (task / "children").read_text().split())
    return children


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def health_checks(gw: Gateway, peer: str) -> dict[str, int]:
    """Count the PeerHealthCheck rows the worker recorded for `peer`, failed and ok."""
    script = (
        "import json; from federation.models import PeerHealthCheck as H;"
        f"rows = H.objects.filter(peer__name={peer!r});"
        "print(json.dumps({'failed': rows.filter(ok=False).count(), 'ok': rows.filter(ok=True).count()}))"
    )
    return json.loads(gw.python(script).splitlines()[-1])


# --- host helpers --------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def host_session(gw: Gateway) -> AsyncIterator[Client]:
    """One handshake-era host session on the aggregated /mcp, with a bearer token for alice."""
    minted = await anyio.to_thread.run_sync(lambda: gw.manage("token", "--user", "alice", "--create-user", "--resource", gw.url("")))
    token = minted.stdout.strip()
    async with create_mcp_http_client(headers={"Authorization": f"Bearer {token}"}) as http:
        async with Client(streamable_http_client(gw.url("/mcp"), http_client=http), mode="legacy") as client:
            yield client


def texts(result: Any) -> list[str]:
    return [block.text for block in result.content if getattr(block, "text", None) is not None]


async def tool_names(client: Client) -> set[str]:
    """Every tool name the gateway lists now, all pages, never from the client's cache."""
    names: set[str] = set()
    cursor = None
    while True:
        page = await client.list_tools(cursor=cursor, cache_mode="bypass")
        names.update(tool.name for tool in page.tools)
        cursor = page.next_cursor
        if not cursor:
            return names


def tools_of(peer: str) -> set[str]:
    return {f"{peer}__{tool}" for tool in FIXTURE_TOOLS}


async def upstream_error(client: Client, name: str, arguments: dict[str, Any]) -> MCPError:
    """Call a tool that must fail with an upstream error, and return that error."""
    with pytest.raises(MCPError) as failure:
        await client.call_tool(name, arguments)
    assert failure.value.code == jsonrpc.UPSTREAM_ERROR, failure.value.message
    return failure.value


async def add(client: Client, peer: str, a: int, b: int) -> str:
    result = await client.call_tool(f"{peer}__add", {"a": a, "b": b})
    assert not result.is_error, texts(result)
    return texts(result)[0]


# --- 1. an HTTP upstream killed mid-call -------------------------------------------------------------


async def test_an_upstream_killed_mid_call_fails_only_its_calls_and_recovers_when_back(
    gateway: Gateway, upstreams: Callable[[str], FixtureUpstream]
) -> None:
    alpha, beta = upstreams("alpha"), upstreams("beta")
    gateway.command("peer", "add", "alpha", "--url", alpha.url, "--call-timeout", str(ALPHA_CALL_TIMEOUT), "--connect-timeout", "2")
    gateway.command("peer", "add", "beta", "--url", beta.url, *SHORT_TIMEOUTS)
    gateway.start_worker()

    async with host_session(gateway) as client:
        assert tools_of("alpha") | tools_of("beta") <= await tool_names(client)

        # A long call is running on alpha (its first progress arrived) when alpha is killed.
        running = anyio.Event()
        failures: list[MCPError] = []

        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            running.set()

        async def slow_call() -> None:
            with pytest.raises(MCPError) as failure:
                await client.call_tool("alpha__slow_echo", {"text": "never", "delay_ms": 600_000}, progress_callback=on_progress)
            failures.append(failure.value)

        async with anyio.create_task_group() as group:
            group.start_soon(slow_call)
            with anyio.fail_after(WAIT):
                await running.wait()
            await anyio.to_thread.run_sync(alpha.kill)
            # Well inside alpha's call timeout: the broken stream, not a timeout, ends the call.
            with anyio.fail_after(KILLED_CALL_BOUND):
                while not failures:
                    await anyio.sleep(POLL)
        assert failures[0].code == jsonrpc.UPSTREAM_ERROR, failures[0].message

        # The same host session keeps working with the other peer.
        assert await add(client, "beta", 2, 3) == "5"

        # Calls to alpha keep failing; its circuit opens and its tools leave the list, beta's stay.
        await upstream_error(client, "alpha__add", {"a": 1, "b": 1})
        await upstream_error(client, "alpha__add", {"a": 1, "b": 1})
        with anyio.fail_after(WAIT):
            while tools_of("alpha") & (names := await tool_names(client)):
                await anyio.sleep(POLL)
        assert tools_of("beta") <= names
        await upstream_error(client, "alpha__add", {"a": 1, "b": 1})
        assert await add(client, "beta", 4, 5) == "9"

        # The health checks noticed: at least one failed probe is recorded while alpha is down.
        with anyio.fail_after(WAIT):
            while (await anyio.to_thread.run_sync(health_checks, gateway, "alpha"))["failed"] < 1:
                await anyio.sleep(POLL)

        # alpha comes back on the same port. Only health checks call it now (this loop only
        # lists), so its tools coming back shows that a health check closed the circuit.
        await anyio.to_thread.run_sync(alpha.start)
        with anyio.fail_after(WAIT):
            while not tools_of("alpha") <= (names := await tool_names(client)):
                await anyio.sleep(POLL)
        assert tools_of("beta") <= names
        assert await add(client, "alpha", 20, 22) == "42"
        assert texts(await client.call_tool("alpha__whoami", {})) == ["alpha"]
        assert await add(client, "beta", 1, 2) == "3"

    checks = health_checks(gateway, "alpha")
    assert checks["failed"] >= 1 and checks["ok"] >= 1, checks


# --- 2. a stdio child killed, then 1,000 calls ------------------------------------------------------


async def test_a_killed_stdio_child_is_restarted_and_a_thousand_calls_leave_one_child_and_flat_memory(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway.manage(
        "peer", "add", "local", "--command", stdio_fixture_command("local"), "--env", f"PYTHONPATH={ROOT}",
        # A child needs a second or so to import the SDK: a roomier handshake timeout than HTTP peers.
        "--call-timeout", "3", "--connect-timeout", "10",
    )
    gateway.start_worker()
    worker = worker_pid(gateway)

    async with host_session(gateway) as client:
        assert await add(client, "local", 1, 2) == "3"  # the worker spawns its child on first use
        [first_child] = child_pids(worker)
        assert "tests.fixtures.everything_server" in cmdline(first_child)

        os.kill(first_child, signal.SIGKILL)

        # The gateway reaps the dead child and starts a new one; calls work again.
        with anyio.fail_after(WAIT):
            while True:
                children = child_pids(worker)
                if len(children) == 1 and first_child not in children:
                    try:
                        if await add(client, "local", 3, 4) == "7":
                            break
                    except MCPError as exc:  # restarting, or its circuit is still open
                        assert exc.code == jsonrpc.UPSTREAM_ERROR, exc.message
                await anyio.sleep(POLL)
        [second_child] = children
        assert "tests.fixtures.everything_server" in cmdline(second_child)

        async def calls(count: int, lanes: int = 4) -> None:
            async def lane(offset: int) -> None:
                for i in range(offset, count, lanes):
                    assert await add(client, "local", i, 1000) == str(i + 1000)

            async with anyio.create_task_group() as group:
                for offset in range(lanes):
                    group.start_soon(lane, offset)

        rss_start = rss_kb(worker)
        await calls(100)
        rss_100 = rss_kb(worker)
        await calls(900)
        rss_1000 = rss_kb(worker)
        children = child_pids(worker)

    with capsys.disabled():
        print(
            f"\n[fault-isolation] worker RSS: after restart {rss_start} kB, after 100 calls {rss_100} kB, "
            f"after 1000 calls {rss_1000} kB (growth {rss_1000 - rss_100} kB); children {sorted(children)}"
        )
    # One stdio peer, one child: the restarted one, with no stray or unreaped processes.
    assert children == {second_child}
    assert rss_1000 - rss_100 < RSS_GROWTH_LIMIT_KB, (rss_100, rss_1000)


# --- 3. a peer that answers junk ----------------------------------------------------------------------


class JunkServer:
    """Answers every request with 200: `/html` with an HTML page, `/json` with broken JSON."""

    BODIES = {
        "/html": ("text/html; charset=utf-8", b"<html><body><h1>Welcome to nginx!</h1></body></html>"),
        "/json": ("application/json", b'{"jsonrpc": "2.0", "id": 1, "result": {"protocolVer'),
    }

    def __init__(self) -> None:
        self.hits: dict[str, int] = {path: 0 for path in self.BODIES}
        junk = self

        class Handler(BaseHTTPRequestHandler):
            def _junk(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                content_type, body = junk.BODIES.get(self.path, junk.BODIES["/html"])
                junk.hits[self.path] = junk.hits.get(self.path, 0) + 1
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_POST = do_GET = do_DELETE = _junk

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="junk-server", daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"

    def __enter__(self) -> JunkServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


def add_catalog_entries(gw: Gateway, peers: list[str], tool: str) -> None:
    """Give peers that cannot list their tools one each, as if an earlier sync had stored it."""
    script = (
        "from federation.models import CatalogEntry, Peer\n"
        f"for peer in Peer.objects.filter(name__in={peers!r}):\n"
        f"    CatalogEntry.objects.create(peer=peer, kind='tool', upstream_name={tool!r}, name=peer.name + '__' + {tool!r},"
        f" home=peer.name, payload={{'name': {tool!r}, 'inputSchema': {{'type': 'object'}}}})\n"
    )
    gw.python(script)


async def test_a_peer_answering_junk_fails_with_upstream_error_while_the_rest_keeps_working(
    gateway: Gateway, upstreams: Callable[[str], FixtureUpstream], capsys: pytest.CaptureFixture[str]
) -> None:
    beta = upstreams("beta")
    with JunkServer() as junk:
        gateway.command("peer", "add", "beta", "--url", beta.url, *SHORT_TIMEOUTS)
        for peer, path in (("junkhtml", "/html"), ("junkjson", "/json")):
            gateway.command("peer", "add", peer, "--url", junk.url(path), "--no-sync", *SHORT_TIMEOUTS)
        add_catalog_entries(gateway, ["junkhtml", "junkjson"], "add")
        gateway.start_worker()

        messages: dict[str, list[str]] = {}
        async with host_session(gateway) as client:
            for peer in ("junkhtml", "junkjson"):
                for _ in range(3):
                    error = await upstream_error(client, f"{peer}__add", {"a": 1, "b": 2})
                    messages.setdefault(peer, []).append(error.message)
                # The other peer still works in the same session, after every junk answer.
                assert await add(client, "beta", 2, 3) == "5"

            # The junk peers' circuits are open: their tools are left out, beta's are listed.
            names = await tool_names(client)
            assert tools_of("beta") <= names
            assert not {"junkhtml__add", "junkjson__add"} & names

            async with httpx.AsyncClient() as http:
                health = await http.get(gateway.url("/healthz"), timeout=WAIT)
            assert health.status_code == 200
            assert await add(client, "beta", 40, 2) == "42"

        assert gateway.workers[0][0].poll() is None, "the gateway worker died"
        assert junk.hits["/html"] > 0 and junk.hits["/json"] > 0, junk.hits

    with capsys.disabled():
        print(f"\n[fault-isolation] junk peer errors: {json.dumps(messages, indent=1)}")
