"""A minimal, fast MCP server for the benchmark: `echo` and `add`, both protocol eras.

Raw asyncio, no framework, so it is much cheaper per call than the gateway and never the
bottleneck. One port serves:

* Streamable HTTP at `/mcp`: the handshake era (`initialize`, `Mcp-Session-Id`) and the
  stateless 2026-07-28 era (`server/discover`, `_meta` envelopes); JSON answers, no GET stream;
* legacy HTTP+SSE at `/sse` (GET, the stream) and `/messages/?session_id=…` (POST, 202);
* WebSocket at `/ws`, subprotocol `mcp`, one JSON-RPC message per text frame.

`--tools N` lists N extra tools (`tool-0` … `tool-<N-1>`, all echoing) for the tools/list
benchmark. Loopback only. Run::

    .venv/bin/python -m bench.fast_upstream --port 9100
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import itertools
import json
import signal
from typing import Any
from urllib.parse import parse_qs, urlsplit

MODERN = "2026-07-28"
HANDSHAKE = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SERVER_INFO = {"name": "bench-fast-upstream", "version": "1.0"}
CAPABILITIES = {"tools": {}}

ECHO = {
    "name": "echo",
    "description": "Echo the message back.",
    "inputSchema": {"type": "object", "properties": {"message": {"type": "string"}}, "required": ["message"]},
}
ADD = {
    "name": "add",
    "description": "Add two numbers.",
    "inputSchema": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]},
}


class Mcp:
    """The MCP method table, shared by every transport."""

    def __init__(self, extra_tools: int) -> None:
        self.tools = [ECHO, ADD] + [
            {**ECHO, "name": f"tool-{i}", "description": f"Benchmark tool number {i}: echoes its message."} for i in range(extra_tools)
        ]
        self.sessions: set[str] = set()
        self._ids = itertools.count(1)

    def new_session(self) -> str:
        session = f"s{next(self._ids)}-{hashlib.sha1(str(id(self)).encode()).hexdigest()[:8]}"
        self.sessions.add(session)
        return session

    def answer(self, message: Any, *, modern: bool) -> dict[str, Any] | None:
        """Return the response to one message (None for notifications and responses)."""
        if not isinstance(message, dict) or "method" not in message:
            return None
        if "id" not in message:
            return None
        method, params = message["method"], message.get("params") or {}
        request_id = message["id"]
        if method == "tools/call":
            args = params.get("arguments") or {}
            name = params.get("name")
            if name == "add":
                text = str(args.get("a", 0) + args.get("b", 0))
            elif name == "echo" or (isinstance(name, str) and name.startswith("tool-")):
                text = str(args.get("message", ""))
            else:
                return _error(request_id, -32602, f"Unknown tool: {name}")
            result: dict[str, Any] = {"content": [{"type": "text", "text": text}], "isError": False}
        elif method == "tools/list":
            result = {"tools": self.tools}
        elif method == "ping":
            result = {}
        elif method == "initialize":
            requested = params.get("protocolVersion")
            result = {
                "protocolVersion": requested if requested in HANDSHAKE else HANDSHAKE[0],
                "capabilities": CAPABILITIES,
                "serverInfo": SERVER_INFO,
            }
        elif method == "server/discover":
            result = {
                "supportedVersions": [MODERN, *HANDSHAKE],
                "capabilities": CAPABILITIES,
                "_meta": {"io.modelcontextprotocol/serverInfo": SERVER_INFO},
            }
        else:
            return _error(request_id, -32601, f"Method not found: {method}")
        if modern:
            result["resultType"] = "complete"
        return {"jsonrpc": "2.0", "id": request_id, "result": result}


def _error(request_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}


def _dumps(message: Any) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def _response(status: int, reason: str, body: bytes = b"", headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    head = [f"HTTP/1.1 {status} {reason}", f"content-length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def streamable_http(mcp: Mcp, method: str, headers: dict[str, str], body: bytes) -> tuple[int, str, bytes, tuple[tuple[str, str], ...]]:
    """Answer one request to `/mcp`: (status, reason, body, extra headers).

    `headers` has lower-case names. Shared with bench.reference, which serves the same answers
    from daphne.
    """
    if method == "DELETE":
        mcp.sessions.discard(headers.get("mcp-session-id", ""))
        return 200, "OK", b"", ()
    if method != "POST":
        # No standalone GET stream: clients see 405 and do without it.
        return 405, "Method Not Allowed", b"", (("allow", "POST, DELETE"),)
    try:
        message = json.loads(body)
    except ValueError:
        return 400, "Bad Request", _dumps(_error(None, -32700, "Parse error")), (("content-type", "application/json"),)
    modern = headers.get("mcp-protocol-version") == MODERN
    extra: tuple[tuple[str, str], ...] = ()
    if not modern and isinstance(message, dict) and message.get("method") == "initialize":
        extra = (("mcp-session-id", mcp.new_session()),)
    elif not modern and headers.get("mcp-session-id") not in mcp.sessions:
        return (404 if "mcp-session-id" in headers else 400), "Bad Request", b"", ()
    reply = mcp.answer(message, modern=modern)
    if reply is None:
        return 202, "Accepted", b"", ()
    return 200, "OK", _dumps(reply), (("content-type", "application/json"), *extra)


def _ws_frame(payload: bytes, opcode: int = 1) -> bytes:
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big")
    return header + payload


def _unmask(data: bytes, mask: bytes) -> bytes:
    if not data or mask == b"\0\0\0\0":
        return data
    n = len(data)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


class Connection(asyncio.Protocol):
    """One TCP connection: HTTP/1.1 keep-alive requests, or a WebSocket after an upgrade."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.mcp = server.mcp
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.mode = "http"
        self.sse_session: str | None = None
        self.ws_parts: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.sse_session is not None:
            self.server.sse_streams.pop(self.sse_session, None)
            self.mcp.sessions.discard(self.sse_session)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.mode == "ws":
            self._ws_frames()
            return
        while self.mode == "http":
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            headers: dict[str, str] = {}
            for line in head[1:]:
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
            length = int(headers.get("content-length") or 0)
            if len(self.buffer) < end + 4 + length:
                return
            body = bytes(self.buffer[end + 4 : end + 4 + length])
            del self.buffer[: end + 4 + length]
            method, target, _ = head[0].split(" ", 2)
            self._request(method, target, headers, body)

    # --- HTTP ----------------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def _request(self, method: str, target: str, headers: dict[str, str], body: bytes) -> None:
        parts = urlsplit(target)
        path = parts.path.rstrip("/") or "/"
        if path == "/mcp":
            self._mcp(method, headers, body)
        elif path == "/messages" and method == "POST":
            session = (parse_qs(parts.query).get("session_id") or [""])[0]
            stream = self.server.sse_streams.get(session)
            if stream is None:
                self._send(_response(404, "Not Found"))
                return
            self._send(_response(202, "Accepted"))
            reply = self.mcp.answer(json.loads(body), modern=False)
            if reply is not None:
                stream._send(b"event: message\ndata: " + _dumps(reply) + b"\n\n")
        elif path == "/sse" and method == "GET":
            self.sse_session = self.mcp.new_session()
            self.server.sse_streams[self.sse_session] = self
            self.mode = "sse"
            self._send(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\r\n"
                + f"event: endpoint\ndata: /messages/?session_id={self.sse_session}\n\n".encode()
            )
        elif path == "/ws" and headers.get("upgrade", "").lower() == "websocket":
            accept = base64.b64encode(hashlib.sha1(headers["sec-websocket-key"].encode() + WS_GUID).digest()).decode()
            protocol = "\r\nsec-websocket-protocol: mcp" if "mcp" in headers.get("sec-websocket-protocol", "") else ""
            self._send(
                f"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
                f"sec-websocket-accept: {accept}{protocol}\r\n\r\n".encode()
            )
            self.mode = "ws"
            if self.buffer:
                self._ws_frames()
        else:
            self._send(_response(404, "Not Found"))

    def _mcp(self, method: str, headers: dict[str, str], body: bytes) -> None:
        self._send(_response(*streamable_http(self.mcp, method, headers, body)))

    # --- WebSocket -----------------------------------------------------------------------------

    def _ws_frames(self) -> None:
        buf = self.buffer
        while len(buf) >= 2:
            opcode, length, offset = buf[0] & 0x0F, buf[1] & 0x7F, 2
            fin = buf[0] & 0x80
            if length == 126:
                if len(buf) < 4:
                    return
                length, offset = int.from_bytes(buf[2:4], "big"), 4
            elif length == 127:
                if len(buf) < 10:
                    return
                length, offset = int.from_bytes(buf[2:10], "big"), 10
            masked = buf[1] & 0x80
            mask = bytes(buf[offset : offset + 4]) if masked else b"\0\0\0\0"
            offset += 4 if masked else 0
            if len(buf) < offset + length:
                return
            payload = _unmask(bytes(buf[offset : offset + length]), mask)
            del buf[: offset + length]
            if opcode == 8:
                self._send(_ws_frame(payload[:2], 8))
                assert self.transport is not None
                self.transport.close()
                return
            if opcode == 9:
                self._send(_ws_frame(payload, 10))
                continue
            if opcode in (0, 1, 2):
                self.ws_parts.append(payload)
                if fin:
                    text, self.ws_parts = b"".join(self.ws_parts), []
                    reply = self.mcp.answer(json.loads(text), modern=False)
                    if reply is not None:
                        self._send(_ws_frame(_dumps(reply)))


class Server:
    def __init__(self, mcp: Mcp) -> None:
        self.mcp = mcp
        self.sse_streams: dict[str, Connection] = {}


async def serve_until_signalled(protocol_factory: Any, port: int) -> None:
    """Serve `protocol_factory` on 127.0.0.1:`port` until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(protocol_factory, "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


async def serve(port: int, extra_tools: int) -> None:
    server_state = Server(Mcp(extra_tools))
    await serve_until_signalled(lambda: Connection(server_state), port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tools", type=int, default=0, help="extra tools to list (tools/list benchmark)")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.tools))


if __name__ == "__main__":
    main()
