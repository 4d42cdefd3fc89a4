"""Load generator for the benchmark: MCP clients over Streamable HTTP (both eras), WebSocket and SSE.

Runs in its own process (the runner starts it), so its CPU is not the gateway's. HTTP is spoken
over raw keep-alive sockets (no client library per request); WebSocket uses `websockets` with
its C speedups. Each simulated host owns one warm session and one connection and sends its
calls back to back.

Modes:

* ``latency``: one host, `warmup` calls, then `n` timed calls, one at a time → p50/p90/p99/mean;
* ``throughput``: `concurrency` hosts for `duration` seconds after a warm-up → calls/s, and the
  latency percentiles under that load;
* ``list``: one host pages through tools/list (`n` times) → the time to fetch the whole list.

Usage (JSON spec on the command line, JSON result on stdout)::

    .venv/bin/python -m bench.loadgen '{"transport": "http-legacy", "url": "http://127.0.0.1:9100/mcp", ...}'
"""

from __future__ import annotations

import asyncio
import itertools
import json
import resource
import sys
import time
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import connect as ws_connect

MODERN = "2026-07-28"
HANDSHAKE = "2025-11-25"
SSE_VERSION = "2024-11-05"
CLIENT_INFO = {"name": "fedmcp-bench", "version": "1.0"}
JsonDict = dict[str, Any]


class CallError(Exception):
    """The server answered something other than a result."""


# --- HTTP/1.1 over one keep-alive socket -------------------------------------------------------


class HttpConnection:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.authority = f"{self.host}:{self.port}"
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=2**24)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    async def send_head(self, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> None:
        if self.writer is None:
            await self.open()
        assert self.writer is not None
        lines = [f"{method} {path} HTTP/1.1", f"host: {self.authority}", f"content-length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    async def read_head(self) -> tuple[int, dict[str, str]]:
        assert self.reader is not None
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
        return status, headers

    async def read_body(self, headers: dict[str, str]) -> bytes:
        assert self.reader is not None
        if "content-length" in headers:
            return await self.reader.readexactly(int(headers["content-length"]))
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    return b"".join(chunks)
                chunks.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
        return await self.reader.read()

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        await self.send_head(method, path, headers, body)
        status, response_headers = await self.read_head()
        payload = await self.read_body(response_headers) if status not in (204, 304) else b""
        if response_headers.get("connection", "").lower() == "close":
            self.close()
            self.writer = None
        return status, response_headers, payload


def _reply_from(status: int, headers: dict[str, str], body: bytes) -> JsonDict:
    if headers.get("content-type", "").startswith("text/event-stream"):
        messages = [json.loads(line[5:]) for line in body.decode().splitlines() if line.startswith("data:") and line[5:].strip()]
        replies = [m for m in messages if "method" not in m]
        if not replies:
            raise CallError(f"HTTP {status}: no reply on the stream")
        return replies[-1]
    if not body:
        raise CallError(f"HTTP {status}: empty body")
    return json.loads(body)


def _result(reply: JsonDict) -> JsonDict:
    if "result" not in reply:
        raise CallError(json.dumps(reply.get("error"))[:300])
    return reply["result"]


# --- MCP clients --------------------------------------------------------------------------------


class Client:
    """One host: one session, one connection."""

    def __init__(self, spec: JsonDict) -> None:
        self.spec = spec
        self.ids = itertools.count(1)
        self.auth = {"authorization": f"Bearer {spec['token']}"} if spec.get("token") else {}

    async def start(self) -> None: ...

    async def request(self, method: str, params: JsonDict) -> JsonDict: ...

    async def close(self) -> None: ...

    async def call(self, tool: str, arguments: JsonDict) -> JsonDict:
        result = await self.request("tools/call", {"name": tool, "arguments": arguments})
        if result.get("isError"):
            raise CallError(json.dumps(result)[:300])
        return result


class HttpLegacyClient(Client):
    async def start(self) -> None:
        self.url = urlsplit(self.spec["url"])
        self.path = self.url.path or "/"
        self.conn = HttpConnection(self.spec["url"])
        await self.conn.open()
        self.headers = {"accept": "application/json, text/event-stream", "content-type": "application/json", **self.auth}
        body = {
            "jsonrpc": "2.0",
            "id": next(self.ids),
            "method": "initialize",
            "params": {"protocolVersion": HANDSHAKE, "capabilities": {}, "clientInfo": CLIENT_INFO},
        }
        status, headers, payload = await self.conn.request("POST", self.path, self.headers, json.dumps(body).encode())
        _result(_reply_from(status, headers, payload))
        self.headers["mcp-session-id"] = headers["mcp-session-id"]
        self.headers["mcp-protocol-version"] = HANDSHAKE
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        status, _, _ = await self.conn.request("POST", self.path, self.headers, json.dumps(note).encode())
        if status != 202:
            raise CallError(f"notifications/initialized answered HTTP {status}")

    async def request(self, method: str, params: JsonDict) -> JsonDict:
        body = json.dumps({"jsonrpc": "2.0", "id": next(self.ids), "method": method, "params": params}).encode()
        status, headers, payload = await self.conn.request("POST", self.path, self.headers, body)
        return _result(_reply_from(status, headers, payload))

    async def close(self) -> None:
        self.conn.close()


class HttpModernClient(Client):
    async def start(self) -> None:
        self.path = urlsplit(self.spec["url"]).path or "/"
        self.conn = HttpConnection(self.spec["url"])
        await self.conn.open()
        self.headers = {
            "accept": "application/json, text/event-stream",
            "content-type": "application/json",
            "mcp-protocol-version": MODERN,
            **self.auth,
        }
        self.meta = {
            "io.modelcontextprotocol/protocolVersion": MODERN,
            "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": CLIENT_INFO,
        }

    async def request(self, method: str, params: JsonDict) -> JsonDict:
        headers = {**self.headers, "mcp-method": method}
        if method == "tools/call":
            headers["mcp-name"] = params["name"]
        body = json.dumps({"jsonrpc": "2.0", "id": next(self.ids), "method": method, "params": {**params, "_meta": self.meta}}).encode()
        status, response_headers, payload = await self.conn.request("POST", self.path, headers, body)
        return _result(_reply_from(status, response_headers, payload))

    async def close(self) -> None:
        self.conn.close()


class WebSocketClient(Client):
    async def start(self) -> None:
        self.socket = await ws_connect(
            self.spec["url"],
            subprotocols=["mcp"],
            additional_headers=self.auth,
            max_size=2**26,
            compression=None,
            open_timeout=60,
            ping_interval=None,
        )
        await self.request("initialize", {"protocolVersion": HANDSHAKE, "capabilities": {}, "clientInfo": CLIENT_INFO})
        await self.socket.send(json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}))

    async def request(self, method: str, params: JsonDict) -> JsonDict:
        request_id = next(self.ids)
        await self.socket.send(json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}))
        while True:
            message = json.loads(await self.socket.recv())
            if message.get("id") == request_id and "method" not in message:
                return _result(message)

    async def close(self) -> None:
        await self.socket.close()


class SseClient(Client):
    """Legacy HTTP+SSE: one GET stream for replies, POSTs on a second keep-alive connection."""

    async def start(self) -> None:
        self.stream = HttpConnection(self.spec["url"])
        self.poster = HttpConnection(self.spec["url"])
        self.pending: dict[int, asyncio.Future[JsonDict]] = {}
        await self.stream.send_head("GET", urlsplit(self.spec["url"]).path, {"accept": "text/event-stream", **self.auth})
        status, headers = await self.stream.read_head()
        if status != 200:
            raise CallError(f"GET /sse answered HTTP {status}")
        self.chunked = headers.get("transfer-encoding", "").lower() == "chunked"
        self.endpoint: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.reader = asyncio.create_task(self._read())
        self.messages_path = await asyncio.wait_for(self.endpoint, 30)
        await self.request("initialize", {"protocolVersion": SSE_VERSION, "capabilities": {}, "clientInfo": CLIENT_INFO})
        await self._post({"jsonrpc": "2.0", "method": "notifications/initialized"})

    async def _chunks(self) -> Any:
        reader = self.stream.reader
        assert reader is not None
        while True:
            if self.chunked:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    return
                data = await reader.readexactly(size)
                await reader.readexactly(2)
            else:
                data = await reader.read(65536)
                if not data:
                    return
            yield data

    async def _read(self) -> None:
        buffer = b""
        async for data in self._chunks():
            buffer += data.replace(b"\r\n", b"\n")
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                name, payload = "message", []
                for line in event.decode().split("\n"):
                    if line.startswith("event:"):
                        name = line[6:].strip()
                    elif line.startswith("data:"):
                        payload.append(line[5:].lstrip())
                if name == "endpoint" and not self.endpoint.done():
                    self.endpoint.set_result("\n".join(payload))
                elif name == "message" and payload:
                    message = json.loads("\n".join(payload))
                    future = self.pending.pop(message.get("id"), None) if "method" not in message else None
                    if future is not None and not future.done():
                        future.set_result(message)

    async def _post(self, message: JsonDict) -> None:
        status, _, _ = await self.poster.request(
            "POST", self.messages_path, {"content-type": "application/json", **self.auth}, json.dumps(message).encode()
        )
        if status != 202:
            raise CallError(f"POST {self.messages_path} answered HTTP {status}")

    async def request(self, method: str, params: JsonDict) -> JsonDict:
        request_id = next(self.ids)
        future: asyncio.Future[JsonDict] = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        await self._post({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        return _result(await asyncio.wait_for(future, 60))

    async def close(self) -> None:
        self.reader.cancel()
        self.stream.close()
        self.poster.close()


CLIENTS = {"http-legacy": HttpLegacyClient, "http-modern": HttpModernClient, "ws": WebSocketClient, "sse": SseClient}


# --- measurements ------------------------------------------------------------------------------


def percentiles(samples: list[float]) -> JsonDict:
    if not samples:
        return {}
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    return {
        "p50_ms": at(0.50),
        "p90_ms": at(0.90),
        "p99_ms": at(0.99),
        "mean_ms": round(sum(ordered) / len(ordered) * 1000, 3),
        "n": len(ordered),
    }


async def latency(spec: JsonDict) -> JsonDict:
    client = CLIENTS[spec["transport"]](spec)
    await client.start()
    if spec.get("method"):
        method, params = spec["method"], spec.get("params") or {}

        async def once() -> Any:
            return await client.request(method, params)
    else:
        tool, arguments = spec["tool"], spec.get("arguments", {"message": "hello"})

        async def once() -> Any:
            return await client.call(tool, arguments)

    try:
        for _ in range(spec.get("warmup", 200)):
            await once()
        samples = []
        clock = time.perf_counter
        for _ in range(spec.get("n", 2000)):
            start = clock()
            await once()
            samples.append(clock() - start)
    finally:
        await client.close()
    return percentiles(samples)


async def throughput(spec: JsonDict) -> JsonDict:
    concurrency, duration = spec.get("concurrency", 32), spec.get("duration", 8.0)
    tool, arguments = spec["tool"], spec.get("arguments", {"message": "hello"})
    # With several URLs (workers of one gateway), hosts are spread over them round-robin.
    urls = spec.get("urls") or [spec["url"]]
    clients = [CLIENTS[spec["transport"]]({**spec, "url": urls[i % len(urls)]}) for i in range(concurrency)]
    semaphore = asyncio.Semaphore(spec.get("connect_parallelism", 16))

    async def start(client: Client) -> None:
        async with semaphore:
            await client.start()

    await asyncio.gather(*(start(c) for c in clients))
    samples: list[float] = []
    errors: list[str] = []
    state = {"measuring": False, "stop": False}

    async def run(client: Client) -> None:
        clock = time.perf_counter
        while not state["stop"]:
            begin = clock()
            try:
                await client.call(tool, arguments)
            except (CallError, OSError, asyncio.IncompleteReadError) as exc:
                if state["measuring"]:
                    errors.append(type(exc).__name__ + ": " + str(exc)[:200])
                if len(errors) > 100:
                    return
                continue
            if state["measuring"]:
                samples.append(clock() - begin)

    tasks = [asyncio.create_task(run(c)) for c in clients]
    await asyncio.sleep(spec.get("warmup_seconds", 1.0))
    state["measuring"] = True
    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    await asyncio.sleep(duration)
    state["measuring"] = False
    elapsed, cpu1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    completed = len(samples)
    state["stop"] = True
    await asyncio.wait(tasks, timeout=30)
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {
        "calls_per_s": round(completed / elapsed, 1),
        "completed": completed,
        "errors": len(errors),
        "first_errors": errors[:3],
        "concurrency": concurrency,
        "seconds": round(elapsed, 2),
        "loadgen_cpu_share": round(cpu / elapsed, 2),
        "under_load": percentiles(samples),
    }


async def list_tools(spec: JsonDict) -> JsonDict:
    client = CLIENTS[spec["transport"]](spec)
    await client.start()
    totals, first_pages, count, pages = [], [], 0, 0
    try:
        for _ in range(spec.get("n", 5)):
            start = time.perf_counter()
            cursor, count, pages = None, 0, 0
            while True:
                result = await client.request("tools/list", {"cursor": cursor} if cursor else {})
                if pages == 0:
                    first_pages.append(time.perf_counter() - start)
                pages += 1
                count += len(result.get("tools", []))
                cursor = result.get("nextCursor")
                if not cursor:
                    break
            totals.append(time.perf_counter() - start)
    finally:
        await client.close()
    return {"tools": count, "pages": pages, "full_list": percentiles(totals), "first_page": percentiles(first_pages)}


async def idle_sockets(spec: JsonDict) -> None:
    """Open `count` WebSocket sessions, report on stdout, hold them until stdin closes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    semaphore = asyncio.Semaphore(spec.get("connect_parallelism", 64))
    sockets: list[Any] = []
    failures: list[str] = []
    auth = {"authorization": f"Bearer {spec['token']}"} if spec.get("token") else {}

    async def one() -> None:
        async with semaphore:
            try:
                sockets.append(
                    await ws_connect(
                        spec["url"],
                        subprotocols=["mcp"],
                        additional_headers=auth,
                        compression=None,
                        open_timeout=120,
                        ping_interval=None,
                        close_timeout=1,
                    )
                )
            except Exception as exc:  # noqa: BLE001 - counted and reported
                failures.append(type(exc).__name__)

    start = time.perf_counter()
    jobs = [asyncio.ensure_future(one()) for _ in range(spec["count"])]
    # Bounded: whatever is open when the deadline passes is what gets measured.
    _, late = await asyncio.wait(jobs, timeout=spec.get("deadline", 300))
    for job in late:
        job.cancel()
    await asyncio.gather(*late, return_exceptions=True)
    elapsed = time.perf_counter() - start
    # Every socket is proved open by a round trip on a sample of them.
    sample = sockets[:: max(1, len(sockets) // 20)]
    for index, socket in enumerate(sample):
        await socket.send(json.dumps({"jsonrpc": "2.0", "id": index, "method": "ping"}))
        json.loads(await asyncio.wait_for(socket.recv(), 30))
    print(
        json.dumps(
            {
                "open": len(sockets),
                "failed": len(failures),
                "failures": failures[:5],
                "connect_seconds": round(elapsed, 2),
                "not_attempted_in_time": len(late),
                "nofile_limit": hard,
            }
        ),
        flush=True,
    )
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    for socket in sockets:
        socket.transport.abort()


def main() -> None:
    spec = json.loads(sys.argv[1])
    mode = spec.get("mode", "latency")
    if mode == "idle-ws":
        asyncio.run(idle_sockets(spec))
        return
    result = asyncio.run({"latency": latency, "throughput": throughput, "list": list_tools}[mode](spec))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
