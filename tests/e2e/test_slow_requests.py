"""Slow and oversize requests against a real daphne worker (fedmcp_site/runtime/request_guard.py).

Raw sockets, so the test controls every byte and when it is sent:

* a client that sends its headers, then drips the POST body to /mcp one byte at a time, gets
  408 with a JSON-RPC error once FEDMCP_REQUEST_BODY_TIMEOUT has passed (never before), and its
  connection is closed; meanwhile other hosts' calls are answered as usual;
* the same for a client that drips its headers, and one that drips the request line itself
  (FEDMCP_REQUEST_HEADER_TIMEOUT);
* an idle keep-alive connection is not a slow request: it still serves a request sent after
  the header timeout has passed;
* a body just over FEDMCP_MAX_BODY_BYTES gets the application's 413 (JSON-RPC error), and a
  100 MB body is cut off with 413 long before it is all sent, instead of being spooled.

Timeouts are set small here (2 s); every wait is bounded by HOST_BOUND.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from mcp_endpoint import jsonrpc
from tests.base import modern_meta
from tests.e2e.harness import Gateway, fixture_server
from tests.e2e.test_fault_isolation import SHORT_TIMEOUTS

pytestmark = pytest.mark.e2e

TIMEOUT = 2.0
"""FEDMCP_REQUEST_HEADER_TIMEOUT and FEDMCP_REQUEST_BODY_TIMEOUT for this gateway."""
MAX_BODY = 64 * 1024
"""FEDMCP_MAX_BODY_BYTES for this gateway."""
HOST_BOUND = 30.0
DRIP_INTERVAL = 0.2
MODERN = "2026-07-28"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One worker for the module (every test closes the connections it opened), peer `beta`.

    The gateway stops before its upstream: the fixture would otherwise wait on SIGTERM for the
    stream the gateway holds to it.
    """
    env = {
        "FEDMCP_REQUEST_HEADER_TIMEOUT": str(TIMEOUT),
        "FEDMCP_REQUEST_BODY_TIMEOUT": str(TIMEOUT),
        "FEDMCP_MAX_BODY_BYTES": str(MAX_BODY),
    }
    with fixture_server("beta", log_dir=tmp_path_factory.mktemp("slow-requests")) as beta_url, Gateway(name="slow-requests", env=env) as gw:
        gw.migrate()
        gw.command("peer", "add", "beta", "--url", beta_url, *SHORT_TIMEOUTS)
        gw.start_worker()
        yield gw


def add_call(gw: Gateway, a: int, b: int) -> str:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "beta__add", "arguments": {"a": a, "b": b}, "_meta": modern_meta()}}
    headers = {
        **gw.auth_headers(), "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": MODERN, "Mcp-Method": "tools/call", "Mcp-Name": "beta__add",
    }
    reply = httpx.post(gw.url("/mcp"), json=body, headers=headers, timeout=HOST_BOUND)
    assert reply.status_code == 200, (reply.status_code, reply.text[:300])
    return reply.json()["result"]["content"][0]["text"]


def post_head(gw: Gateway, length: int) -> bytes:
    port = gw.workers[0][1]
    lines = [
        "POST /mcp HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Authorization: {gw.auth_headers()['Authorization']}",
        "Content-Type: application/json", "Accept: application/json, text/event-stream", f"MCP-Protocol-Version: {MODERN}",
        "Mcp-Method: tools/list", f"Content-Length: {length}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def connect(gw: Gateway) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gw.workers[0][1]), timeout=HOST_BOUND)


class Dripper(threading.Thread):
    """Sends `data` one byte every DRIP_INTERVAL until the server answers or closes; keeps what it answered."""

    def __init__(self, sock: socket.socket, data: bytes) -> None:
        super().__init__(daemon=True)
        self.sock, self.data = sock, data
        self.answer = b""
        self.sent = 0
        self.started_at = self.answered_at = 0.0

    def run(self) -> None:
        self.sock.settimeout(DRIP_INTERVAL)
        self.started_at = time.monotonic()
        deadline = self.started_at + HOST_BOUND
        while time.monotonic() < deadline:
            if self.sent < len(self.data):
                try:
                    self.sock.sendall(self.data[self.sent:self.sent + 1])
                    self.sent += 1
                except OSError:
                    pass  # the server closed its side; read what it said
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            self.answered_at = self.answered_at or time.monotonic()
            self.answer += chunk
        self.sock.close()


def status_and_body(raw: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        chunks = b""
        while body:
            size, _, rest = body.partition(b"\r\n")
            if not int(size, 16):
                break
            chunks, body = chunks + rest[: int(size, 16)], rest[int(size, 16) + 2:]
        body = chunks
    return int(head.split(b" ")[1]), json.loads(body)


def test_a_dripped_body_gets_408_after_the_body_timeout_while_other_hosts_are_served(gateway: Gateway) -> None:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": modern_meta()}}).encode()
    sock = connect(gateway)
    # Taken before the send: the worker may read the head and start its timer before this
    # thread runs again after `sendall`.
    headers_sent = time.monotonic()
    sock.sendall(post_head(gateway, len(body)))
    dripper = Dripper(sock, body)
    dripper.start()
    served = 0
    while dripper.is_alive() and not dripper.answer:
        assert add_call(gateway, served, 1) == str(served + 1)
        served += 1
    dripper.join(HOST_BOUND)
    assert not dripper.is_alive()
    assert served >= 1, "no other host was served while the body dripped"
    assert dripper.sent < len(body), "the whole body was sent: the drip was too fast to prove anything"
    status, answer = status_and_body(dripper.answer)
    assert status == 408, dripper.answer[:500]
    assert answer["error"]["code"] == jsonrpc.INVALID_REQUEST and "body" in answer["error"]["message"], answer
    assert dripper.answered_at - headers_sent >= TIMEOUT, "cut off before the body timeout"
    # And the worker is fine.
    assert add_call(gateway, 2, 3) == "5"


@pytest.mark.parametrize("sent_first", [b"", b"POST /mcp HTTP/1.1\r\n"], ids=["request line", "headers"])
def test_a_dripped_request_head_gets_408_after_the_header_timeout(gateway: Gateway, sent_first: bytes) -> None:
    rest = post_head(gateway, 2)[len(sent_first):] + b"{}"
    sock = connect(gateway)
    sock.sendall(sent_first)
    dripper = Dripper(sock, rest)
    dripper.start()
    assert add_call(gateway, 1, 1) == "2"
    dripper.join(HOST_BOUND)
    assert not dripper.is_alive()
    status, answer = status_and_body(dripper.answer)
    assert status == 408, dripper.answer[:500]
    assert "headers" in answer["error"]["message"], answer
    assert dripper.answered_at - dripper.started_at >= TIMEOUT - DRIP_INTERVAL


def test_an_idle_keep_alive_connection_is_not_a_slow_request(gateway: Gateway) -> None:
    port = gateway.workers[0][1]
    request = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    with connect(gateway) as sock:
        for attempt in range(2):
            if attempt:
                time.sleep(TIMEOUT * 1.5)  # idle, past the header timeout
            sock.sendall(request)
            reply = b""
            while b'"status"' not in reply:
                chunk = sock.recv(65536)
                assert chunk, "the server closed the connection"
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 200"), reply[:300]


def test_a_body_over_the_cap_gets_413_and_a_huge_one_is_cut_off_early(gateway: Gateway) -> None:
    # Just over the cap: the application's own 413, after reading the body.
    body = b"x" * (MAX_BODY + 1)
    with connect(gateway) as sock:
        sock.sendall(post_head(gateway, len(body)) + body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
            if reply.endswith(b"0\r\n\r\n") or (b"content-length" in reply.lower() and reply.endswith(b"}}")):
                break
    status, answer = status_and_body(reply)
    assert status == 413 and answer["error"]["code"] == jsonrpc.INVALID_REQUEST, reply[:300]

    # 100 MB announced and streamed: refused once the stream passes the cap, not after 100 MB.
    huge = 100 * 1024 * 1024
    sent = 0
    reply = b""
    with connect(gateway) as sock:
        sock.sendall(post_head(gateway, huge))
        sock.settimeout(0.05)
        chunk = b"x" * 65536
        while sent < huge:
            try:
                sent += sock.send(chunk)
            except OSError:
                break  # closed by the server
            try:
                reply += sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if reply:
                break
    assert sent < huge // 4, f"{sent} bytes went in before the worker refused"
    if reply:
        assert reply.startswith(b"HTTP/1.1 413"), reply[:300]
    assert add_call(gateway, 1, 2) == "3"
