"""A host whose tools/call waits in a thread while the test answers a consent prompt.

The consent tests (browser, sampling, distributed) all need the same thing: a handshake-era
host over Streamable HTTP starts a call that the gateway holds, the test approves or denies
it elsewhere (a browser, a plain HTTP client), then collects the host's reply.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx

from tests.e2e.harness import DEFAULT_USER, Gateway

JsonDict = dict[str, Any]
HANDSHAKE_VERSION = "2025-11-25"


def final(reply: httpx.Response) -> JsonDict:
    """The JSON-RPC response of a POST, answered as JSON or as an SSE stream."""
    if reply.headers.get("content-type", "").startswith("text/event-stream"):
        messages = [json.loads(line[5:].strip()) for line in reply.text.splitlines() if line.startswith("data:") and line[5:].strip()]
        return [m for m in messages if "method" not in m][-1]
    return reply.json()


class BackgroundHost:
    """A handshake-era host on `gateway`'s /mcp (worker `worker`) as `user`.

    `wait` bounds each step: the host's HTTP client gives up after three times that, and
    `wait()` waits twice that for the call to finish.
    """

    client_name = "consent-e2e-host"

    def __init__(self, gateway: Gateway, *, wait: float, user: str = DEFAULT_USER, worker: int = 0) -> None:
        self.url = gateway.url("/mcp", worker)
        self.headers = {**gateway.auth_headers(user), "Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
        self.bound = wait
        self.client = httpx.Client(timeout=httpx.Timeout(wait * 3))
        self.result: JsonDict | None = None
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def post(self, message: JsonDict) -> httpx.Response:
        return self.client.post(self.url, json=message, headers=self.headers)

    def initialize(self, capabilities: JsonDict | None = None) -> None:
        """Open a session declaring `capabilities` (none by default)."""
        params = {"protocolVersion": HANDSHAKE_VERSION, "capabilities": capabilities or {}, "clientInfo": {"name": self.client_name, "version": "0"}}
        reply = self.post({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": params})
        assert reply.status_code == 200, reply.text
        self.headers["Mcp-Session-Id"] = reply.headers["mcp-session-id"]
        self.headers["Mcp-Protocol-Version"] = final(reply)["result"]["protocolVersion"]
        assert self.post({"jsonrpc": "2.0", "method": "notifications/initialized"}).status_code == 202

    def call_in_background(self, params: JsonDict) -> None:
        """Send tools/call with `params` from a thread; `wait()` returns its reply."""
        message = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": params}

        def run() -> None:
            try:
                self.result = self.exchange(message)
            except BaseException as exc:  # handed to the test thread
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def exchange(self, message: JsonDict) -> JsonDict:
        """Send the call and return its JSON-RPC response (in the background thread)."""
        return final(self.post(message))

    def wait(self) -> JsonDict:
        assert self.thread is not None
        self.thread.join(self.bound * 2)
        assert not self.thread.is_alive(), "the host's call did not finish"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    def close(self) -> None:
        self.client.close()
