"""A handshake-era MCP server that answers some calls with hostile messages, then behaves.

Run over stdio (default) or as Streamable HTTP (`--http PORT`, JSON replies, or event streams
with `--sse-replies`). Its tools:

* `add` answers `{"a"} + {"b"}` as text, as any server would;
* `deep` answers with a result whose structured content nests `depth` arrays (default 50,000)
  deep, the id first;
* `deep_id_last` the same with the id after the result;
* `huge` answers with a result `size` bytes long (default 1 MiB);
* `bad_params` sends a `notifications/progress` whose params are a string, then answers;
* `bad_id` answers with a response whose id is a list (nobody's), then never answers.

Hostile replies are written as text: `json.dumps` itself could not encode them.
"""

from __future__ import annotations

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOOLS = ["add", "deep", "deep_id_last", "huge", "bad_params", "bad_id"]


def text_result(request_id: Any, text: str) -> str:
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "result": {"content": [{"type": "text", "text": text}]}})


def answer(message: dict[str, Any]) -> list[str]:
    """The lines to send for one message from the gateway."""
    method, request_id = message.get("method"), message.get("id")
    if method is None or request_id is None:
        return []
    params = message.get("params") or {}
    if method == "initialize":
        version = params.get("protocolVersion", "2025-06-18")
        result = {"protocolVersion": version, "capabilities": {"tools": {}}, "serverInfo": {"name": "hostile", "version": "1"}}
        return [json.dumps({"jsonrpc": "2.0", "id": request_id, "result": result})]
    if method == "tools/list":
        tools = [{"name": name, "inputSchema": {"type": "object"}} for name in TOOLS]
        return [json.dumps({"jsonrpc": "2.0", "id": request_id, "result": {"tools": tools}})]
    if method == "ping":
        return [json.dumps({"jsonrpc": "2.0", "id": request_id, "result": {}})]
    if method != "tools/call":
        return [json.dumps({"jsonrpc": "2.0", "id": request_id, "error": {"code": -32601, "message": "Method not found"}})]
    name, arguments = params.get("name"), params.get("arguments") or {}
    rid = json.dumps(request_id)
    if name == "add":
        return [text_result(request_id, str(arguments.get("a", 0) + arguments.get("b", 0)))]
    if name in ("deep", "deep_id_last"):
        depth = int(arguments.get("depth", 50_000))
        result = '{"content":[{"type":"text","text":"deep"}],"structuredContent":{"x":' + "[" * depth + "]" * depth + "}}"
        if name == "deep":
            return ['{"jsonrpc":"2.0","id":' + rid + ',"result":' + result + "}"]
        return ['{"jsonrpc":"2.0","result":' + result + ',"id":' + rid + "}"]
    if name == "huge":
        return [text_result(request_id, "x" * int(arguments.get("size", 1024 * 1024)))]
    if name == "bad_params":
        return ['{"jsonrpc":"2.0","method":"notifications/progress","params":"nope"}', text_result(request_id, "after bad params")]
    if name == "bad_id":
        return ['{"jsonrpc":"2.0","id":[' + rid + '],"result":{}}']
    return [json.dumps({"jsonrpc": "2.0", "id": request_id, "error": {"code": -32602, "message": f"Unknown tool {name}"}})]


def serve_stdio() -> None:
    while line := sys.stdin.readline():
        for out in answer(json.loads(line)):
            sys.stdout.write(out + "\n")
        sys.stdout.flush()


def serve_http(port: int, sse_replies: bool) -> None:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            lines = answer(json.loads(body))
            if not lines:
                self.send_response(202)
                self.send_header("content-length", "0")
                self.end_headers()
                return
            if sse_replies:
                payload = "".join(f"event: message\ndata: {line}\n\n" for line in lines).encode()
                content_type = "text/event-stream"
            else:
                payload, content_type = lines[-1].encode(), "application/json"
            self.send_response(200)
            self.send_header("content-type", content_type)
            self.send_header("mcp-session-id", "hostile-session")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            self.send_response(405)
            self.send_header("content-length", "0")
            self.end_headers()

        do_DELETE = do_GET

        def log_message(self, format: str, *args: Any) -> None:
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--http", type=int, default=0, help="serve Streamable HTTP on this port instead of stdio")
    parser.add_argument("--sse-replies", action="store_true", help="answer POSTs with event streams")
    options = parser.parse_args()
    if options.http:
        serve_http(options.http, options.sse_replies)
    else:
        serve_stdio()
