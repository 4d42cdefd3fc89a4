"""Three real daphne workers behind a real nginx, on PostgreSQL + Redis, as an operator runs them.

nginx is the Debian package (`make tools` installs `nginx-light`), started here as a foreground
process on a free port, as the current user, with a configuration made from deploy/nginx.conf
itself: its `upstream` settings (least_conn, max_fails, keepalive), maps and `location /` block
as they are, with the example worker addresses replaced by the three workers' ports, and TLS, the
port-80 redirect and the system paths (pid, logs, temp files) replaced by plain HTTP and the
test's own folder. Every host talks to nginx only; the public URL (the tokens' audience) is
nginx's.

* Mixed traffic — the official SDK client over Streamable HTTP in both eras, legacy HTTP+SSE
  hosts and WebSocket hosts — while one worker is SIGKILLed and another SIGTERMed: every host
  request is answered or fails within `BOUND` (a failure is something the host sees: an error
  reply, an HTTP error, a closed stream or socket, never silence), and every call the upstream
  started has its audit row (`ok`, or `interrupted` for the killed worker's).
* A rolling restart of all three workers (SIGTERM, wait for the exit, start again on the same
  port, next) under steady Streamable HTTP traffic: no host sees an error.

Circuit recovery within 5 s of an HTTP upstream's return is tests/e2e/test_fault_recovery.py
(one worker suffices: each worker probes its upstreams itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect

from tests.e2e.conftest import sdk_client
from tests.e2e.harness import ROOT, Gateway, fixture_server, free_port, postgres_database, redis_prefix, stop, wait_until
from tests.observability.test_graceful_shutdown import call_tool

pytestmark = pytest.mark.e2e

BOUND = 30.0
"""Every host request is answered or fails within this many seconds; a healthy run needs far less."""
TIMINGS = {"FEDMCP_AUDIT_INTENT_LEASE": "2", "FEDMCP_SSE_ACCEPTED_LEASE": "3", "FEDMCP_DRAIN_LISTEN": "4"}
"""Short leases, so a killed worker's calls are accounted for within seconds (defaults 60 s, 15 s),
and a shorter listening phase of the drain (default 10 s): nginx has no active health checks, so a
draining worker gets requests until it stops listening, however long that is."""
TOOLS = ("add", "slow_echo")
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
JsonDict = dict[str, Any]


# --- nginx, configured from deploy/nginx.conf --------------------------------------------------------


def nginx_config(folder: Path, port: int, workers: list[int]) -> str:
    """deploy/nginx.conf for a test: plain HTTP on 127.0.0.1:`port`, upstream `workers`, paths under `folder`."""
    text = (ROOT / "deploy" / "nginx.conf").read_text()
    text = "\n".join(line.split("#", 1)[0].rstrip() for line in text.splitlines() if line.split("#", 1)[0].strip())
    # The worker addresses, with the example servers' parameters (max_fails, fail_timeout).
    servers = re.findall(r"^\s*server\s+\S+:\d+(.*);$", text, re.M)
    assert servers, "deploy/nginx.conf has no upstream servers"
    listed = "\n".join(f"    server 127.0.0.1:{p}{servers[0]};" for p in workers)
    text = re.sub(r"(?:^\s*server\s+\S+:\d+.*;\n)+", listed + "\n", text, count=1, flags=re.M)
    # The port-80 redirect goes; the TLS server listens on plain HTTP.
    text = re.sub(r"^server \{\n\s*listen 80;.*?^\}\n", "", text, flags=re.M | re.S)
    text = re.sub(r"^\s*(listen|http2|ssl_\w+|add_header Strict-Transport-Security)\b.*;\n", "", text, flags=re.M)
    text = text.replace("server_name", f"listen 127.0.0.1:{port};\n    server_name", 1)
    text = re.sub(r"access_log \S+", f"access_log {folder / 'access.log'}", text)
    temp = "".join(f"    {kind}_temp_path {folder / kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    user = f"user {getpass.getuser()};\n" if os.geteuid() == 0 else ""  # as root, nginx would switch to `nobody`
    return (
        f"daemon off;\n{user}worker_processes 1;\npid {folder / 'nginx.pid'};\nerror_log {folder / 'error.log'} warn;\n"
        f"events {{ worker_connections 1024; }}\nhttp {{\n{temp}{text}\n}}\n"
    )


@contextlib.contextmanager
def nginx(folder: Path, port: int, workers: list[int]) -> Iterator[subprocess.Popen[bytes]]:
    if not Path(NGINX).exists():
        pytest.fail("nginx is required (Debian: apt-get install nginx-light; `make tools` does it)", pytrace=False)
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "nginx.conf"
    config.write_text(nginx_config(folder, port, workers))
    log = open(folder / "stderr.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [NGINX, "-p", str(folder), "-c", str(config), "-e", str(folder / "error.log")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        def listening() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"nginx exited ({process.returncode}): {(folder / 'error.log').read_text(errors='replace')}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
            return False

        wait_until(listening, timeout=BOUND, what="nginx to listen")
        yield process
    finally:
        stop(process)
        log.close()


# --- the cluster: three workers behind nginx --------------------------------------------------------


@dataclass
class Cluster:
    gateway: Gateway
    fixture_url: str
    url: str
    """nginx's origin: the public URL."""
    ports: list[int]
    folder: Path

    def worker(self, i: int) -> subprocess.Popen[bytes]:
        return next(process for process, port in self.gateway.workers if port == self.ports[i] and process.poll() is None)

    def restart(self, i: int) -> None:
        """Start worker `i` again on its port (nginx's upstream list is fixed)."""
        self.gateway.workers = [(p, port) for p, port in self.gateway.workers if p.poll() is None]
        self.gateway.start_worker(self.ports[i])

    def upstream_calls(self) -> int:
        stats = json.loads(call_tool(self.fixture_url, "stats", {})["result"]["content"][0]["text"])
        return int(stats["add_calls"] + stats["slow_echo_calls"])

    def audit_outcomes(self) -> Counter[str]:
        code = (
            "import json; from collections import Counter; from identity.models import AuditEvent, AuditIntent\n"
            f"rows = AuditEvent.objects.filter(method='tools/call', name__in={list(TOOLS)!r})\n"
            "print(json.dumps({**Counter(rows.values_list('outcome', flat=True)), 'intents': AuditIntent.objects.count()}))"
        )
        return Counter(json.loads(self.gateway.python(code).splitlines()[-1]))

    def settled(self) -> tuple[Counter[str], int]:
        """Audit outcomes and upstream calls once no intent is left (a killed worker's are written by another's upkeep)."""
        outcomes = wait_until(lambda: (o := self.audit_outcomes())["intents"] == 0 and o, timeout=BOUND, what="no audit intent left")
        return outcomes, self.upstream_calls()


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("nginx")
    nginx_port = free_port()
    public = f"http://127.0.0.1:{nginx_port}"
    failed_before = request.session.testsfailed
    with (
        fixture_server(name="fixture", log_dir=folder) as fixture_url,
        postgres_database() as database_url,
        redis_prefix() as prefix,
    ):
        env = {"FEDMCP_PUBLIC_URL": public, "REDIS_URL": os.environ.get("FEDMCP_E2E_REDIS", "redis://127.0.0.1:6379/0"),
               "FEDMCP_REDIS_PREFIX": prefix, **TIMINGS}
        gateway = Gateway(name="nginx", env=env, database_url=database_url)
        try:
            gateway.migrate()
            gateway.command("peer", "add", "fixture", "--url", fixture_url)
            gateway.auth_headers()
            ports = [gateway.start_worker(free_port()) for _ in range(3)]
            with nginx(folder / "nginx", nginx_port, ports):
                yield Cluster(gateway, fixture_url, public, ports, folder)
        finally:
            if request.session.testsfailed > failed_before:
                print(gateway.logs())
                for name in ("error.log", "access.log"):
                    path = folder / "nginx" / name
                    if path.exists():
                        print(f"--- nginx {name}\n{path.read_text(errors='replace')[-4000:]}")
            gateway.cleanup()


# --- hosts ---------------------------------------------------------------------------------------------


class HostError(Exception):
    """What a host sees when its request fails: an error reply, an HTTP error, a closed stream."""


class Host:
    """One host session through nginx; `call` returns the tool's text or raises."""

    async def open(self) -> None: ...

    async def call(self, name: str, arguments: JsonDict) -> str: ...

    async def close(self) -> None: ...


class SdkHost(Host):
    """The official SDK client over Streamable HTTP, `mode` "legacy" (2025-11-25 sessions) or "2026-07-28"."""

    def __init__(self, cluster: Cluster, mode: str) -> None:
        self.cluster, self.mode = cluster, mode
        self.stack = contextlib.AsyncExitStack()

    async def open(self) -> None:
        self.client = await self.stack.enter_async_context(sdk_client(f"{self.cluster.url}/mcp", headers=self.cluster.gateway.auth_headers(), mode=self.mode))

    async def call(self, name: str, arguments: JsonDict) -> str:
        result = await self.client.call_tool(name, arguments)
        text = result.content[0].text if result.content else ""
        if result.is_error:
            raise HostError(text)
        return text

    async def close(self) -> None:
        await self.stack.aclose()


class SseHost(Host):
    """A 2024-11-05 host: its GET /sse stream and its POSTs each go wherever nginx sends them."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.ids = 0
        self.replies: dict[int, asyncio.Future[JsonDict]] = {}

    async def open(self) -> None:
        self.http = httpx.AsyncClient(base_url=self.cluster.url, headers=self.cluster.gateway.auth_headers(), timeout=httpx.Timeout(BOUND, read=None))
        response = await self.http.send(self.http.build_request("GET", "/sse", headers={"Accept": "text/event-stream"}), stream=True)
        if response.status_code != 200:
            raise HostError(f"GET /sse answered {response.status_code}")
        self.endpoint: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.reader = asyncio.create_task(self._read(response))
        await asyncio.wait_for(asyncio.shield(self.endpoint), BOUND)
        params = {"protocolVersion": "2024-11-05", "capabilities": {}, "clientInfo": {"name": "nginx-e2e", "version": "0"}}
        await self.request("initialize", params)
        await self._post({"jsonrpc": "2.0", "method": "notifications/initialized"})

    async def _read(self, response: httpx.Response) -> None:
        event, data = "message", []
        try:
            async for line in response.aiter_lines():
                if line == "":
                    if event == "endpoint" and not self.endpoint.done():
                        self.endpoint.set_result("\n".join(data))
                    elif event == "message" and data:
                        message = json.loads("\n".join(data))
                        waiter = self.replies.pop(message.get("id"), None) if "method" not in message else None
                        if waiter is not None and not waiter.done():
                            waiter.set_result(message)
                    event, data = "message", []
                elif not line.startswith(":"):
                    name, _, value = line.partition(":")
                    if name == "event":
                        event = value.strip()
                    elif name == "data":
                        data.append(value.removeprefix(" "))
        except httpx.HTTPError:
            pass
        finally:
            await response.aclose()
            # The stream is gone: the host knows its outstanding requests will not be answered here.
            for waiter in [*self.replies.values(), self.endpoint]:
                if not waiter.done():
                    waiter.set_exception(HostError("the /sse stream ended"))
            self.replies.clear()

    async def _post(self, message: JsonDict) -> None:
        reply = await self.http.post(self.endpoint.result(), json=message)
        if reply.status_code != 202:
            raise HostError(f"POST answered {reply.status_code}: {reply.text[:200]}")

    async def request(self, method: str, params: JsonDict) -> JsonDict:
        if self.reader.done():
            raise HostError("the /sse stream ended")
        self.ids += 1
        waiter = self.replies[self.ids] = asyncio.get_running_loop().create_future()
        await self._post({"jsonrpc": "2.0", "id": self.ids, "method": method, "params": params})
        reply = await waiter
        if "error" in reply:
            raise HostError(json.dumps(reply["error"]))
        return reply["result"]

    async def call(self, name: str, arguments: JsonDict) -> str:
        result = await self.request("tools/call", {"name": name, "arguments": arguments})
        if result.get("isError"):
            raise HostError(json.dumps(result))
        return str(result["content"][0]["text"])

    async def close(self) -> None:
        if hasattr(self, "reader"):
            self.reader.cancel()
            await asyncio.gather(self.reader, return_exceptions=True)
        if hasattr(self, "http"):
            await self.http.aclose()


class WsHost(Host):
    """A WebSocket host (subprotocol `mcp`) on /ws."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.ids = 0

    async def open(self) -> None:
        url = self.cluster.url.replace("http://", "ws://") + "/ws"
        self.socket = await ws_connect(url, subprotocols=["mcp"], additional_headers=self.cluster.gateway.auth_headers(), open_timeout=BOUND)
        await self.request("initialize", {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "nginx-e2e", "version": "0"}})
        await self.socket.send(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}))

    async def request(self, method: str, params: JsonDict) -> JsonDict:
        self.ids += 1
        await self.socket.send(json.dumps({"jsonrpc": "2.0", "id": self.ids, "method": method, "params": params}))
        while True:
            message = json.loads(await self.socket.recv())
            if message.get("id") == self.ids and "method" not in message:
                if "error" in message:
                    raise HostError(json.dumps(message["error"]))
                return message["result"]

    async def call(self, name: str, arguments: JsonDict) -> str:
        result = await self.request("tools/call", {"name": name, "arguments": arguments})
        if result.get("isError"):
            raise HostError(json.dumps(result))
        return str(result["content"][0]["text"])

    async def close(self) -> None:
        if hasattr(self, "socket"):
            await self.socket.close()


HOSTS: dict[str, Callable[[Cluster], Host]] = {
    "sdk-legacy": lambda c: SdkHost(c, "legacy"),
    "sdk-2026": lambda c: SdkHost(c, "2026-07-28"),
    "sse": SseHost,
    "ws": WsHost,
}


@dataclass
class Tally:
    """What the hosts saw: answers, failures (with what failed), and requests still unanswered after `BOUND`."""

    answered: int = 0
    failures: list[str] = field(default_factory=list)
    hung: list[str] = field(default_factory=list)


async def bounded(tally: Tally, what: str, step: Awaitable[Any]) -> Any:
    """Run one host request; a request neither answered nor failed within `BOUND` is recorded as hung."""
    try:
        return await asyncio.wait_for(step, BOUND)
    except TimeoutError:
        tally.hung.append(what)
        raise


async def lane(cluster: Cluster, kind: str, n: int, stop_at: asyncio.Event, tally: Tally) -> None:
    """One host of `kind` calling tools back to back until `stop_at`; after a failure it opens a new session."""
    i = 0
    while not stop_at.is_set():
        host = HOSTS[kind](cluster)
        try:
            await bounded(tally, f"{kind} open", host.open())
            while not stop_at.is_set():
                i += 1
                if i % 5 == 0:
                    name, arguments, expected = "fixture__slow_echo", {"text": f"{kind}{n}-{i}", "delay_ms": 200}, f"{kind}{n}-{i}"
                else:
                    name, arguments, expected = "fixture__add", {"a": i, "b": n}, str(i + n)
                text = await bounded(tally, f"{kind} {name}", host.call(name, arguments))
                assert expected in text, (kind, name, text)
                tally.answered += 1
        except AssertionError:
            raise
        except Exception as exc:  # noqa: BLE001  (whatever the host saw, it saw it in time)
            tally.failures.append(f"{kind}: {type(exc).__name__}: {str(exc)[:200]}")
            await asyncio.sleep(0.2)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(host.close(), 5)


@contextlib.asynccontextmanager
async def traffic(cluster: Cluster, kinds: dict[str, int]) -> AsyncIterator[Tally]:
    """Run `kinds[kind]` hosts of each kind until the block ends; yield their tally."""
    tally, stop_at = Tally(), asyncio.Event()
    lanes = [asyncio.create_task(lane(cluster, kind, n, stop_at, tally)) for kind, count in kinds.items() for n in range(count)]
    try:
        yield tally
    finally:
        stop_at.set()
        done, pending = await asyncio.wait(lanes, timeout=BOUND + 10)
        for task in pending:
            task.cancel()
        for task in done:
            task.result()  # a wrong answer fails the test
        assert not pending, "a host did not stop"


async def answered_at_least(tally: Tally, n: int) -> None:
    async with asyncio.timeout(BOUND):
        while tally.answered < n:
            await asyncio.sleep(0.05)


async def exited(process: subprocess.Popen[bytes]) -> int:
    return await asyncio.to_thread(process.wait, BOUND + 30)


def new_rows(outcomes: Counter[str], before: Counter[str]) -> dict[str, int]:
    """Audit rows by outcome written since `before`."""
    return {k: n for k in outcomes if k != "intents" and (n := outcomes[k] - before[k])}


# --- the tests ---------------------------------------------------------------------------------------


def test_a_kill_and_a_drain_during_mixed_traffic_leave_no_request_unanswered_and_no_call_unaudited(cluster: Cluster) -> None:
    rows_before, upstream_before = cluster.settled()
    kinds = {"sdk-legacy": 2, "sdk-2026": 2, "sse": 2, "ws": 2}

    async def scenario() -> Tally:
        async with traffic(cluster, kinds) as tally:
            await answered_at_least(tally, 60)
            killed = cluster.worker(0)
            killed.send_signal(signal.SIGKILL)
            await answered_at_least(tally, tally.answered + 40)
            drained = cluster.worker(1)
            drained.send_signal(signal.SIGTERM)
            assert await exited(drained) == 0
            assert await exited(killed) == -signal.SIGKILL
            await answered_at_least(tally, tally.answered + 40)  # all on the last worker now
        return tally

    tally = asyncio.run(scenario())
    cluster.restart(0)
    cluster.restart(1)

    assert not tally.hung, f"requests neither answered nor failed within {BOUND:g}s: {tally.hung}"
    outcomes, upstream = cluster.settled()
    started = upstream - upstream_before
    rows = new_rows(outcomes, rows_before)
    total = sum(rows.values())
    print(f"\n[nginx] mixed traffic: {tally.answered} answered, {len(tally.failures)} failed {tally.failures}; "
          f"upstream calls {started}, audit rows {rows}")
    # `interrupted`: the killed worker's calls, written by another worker's upkeep. `error`: a call
    # the host saw fail, such as a WebSocket call cut off when the drained worker stopped (its
    # socket closes; WebSocket sessions end with their worker, docs/DEPLOYMENT.md).
    assert set(rows) <= {"ok", "interrupted", "error"}, rows
    assert rows.get("error", 0) <= len(tally.failures), (rows, tally.failures)
    # Every call the upstream started has its row. A row may stand for a call that never reached
    # the upstream: its intent was committed, then the worker was killed before sending it (at
    # most one per host, each host has one call in flight).
    assert started <= total <= started + sum(kinds.values()), (started, rows)
    # The hosts saw at least the `ok` rows; the other answers they saw are among the `interrupted`.
    assert rows.get("ok", 0) <= tally.answered <= total, (rows, tally.answered)
    assert tally.answered > 140


def test_a_rolling_restart_of_every_worker_under_steady_traffic_shows_hosts_no_error(cluster: Cluster) -> None:
    rows_before, upstream_before = cluster.settled()
    kinds = {"sdk-legacy": 3, "sdk-2026": 3}

    async def scenario() -> Tally:
        async with traffic(cluster, kinds) as tally:
            await answered_at_least(tally, 30)
            for i in range(3):
                draining = cluster.worker(i)
                draining.send_signal(signal.SIGTERM)
                assert await exited(draining) == 0
                await asyncio.to_thread(cluster.restart, i)
                await answered_at_least(tally, tally.answered + 20)
        return tally

    started_at = time.monotonic()
    tally = asyncio.run(scenario())
    outcomes, upstream = cluster.settled()
    rows = new_rows(outcomes, rows_before)
    print(f"\n[nginx] rolling restart in {time.monotonic() - started_at:.0f}s: {tally.answered} answered, "
          f"{len(tally.failures)} failed {tally.failures}; upstream calls {upstream - upstream_before}, audit rows {rows}")
    assert not tally.hung and not tally.failures, (tally.hung, tally.failures)
    assert rows == {"ok": upstream - upstream_before} and tally.answered == rows["ok"], (rows, upstream - upstream_before, tally.answered)
