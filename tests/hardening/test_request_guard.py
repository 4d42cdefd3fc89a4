"""The request deadlines of fedmcp_site/runtime/request_guard.py, on a Twisted channel with a fake clock.

No sockets and no real time: bytes go in through a `StringTransport`, time passes with
`Clock.advance`. tests/e2e/test_slow_requests.py proves the same against a real daphne worker.
"""

from __future__ import annotations

import io
import json
from types import MethodType, SimpleNamespace
from typing import Any

import pytest
from django.test import override_settings
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.http import HTTPChannel, HTTPFactory, Request
from twisted.web.test.requesthelper import DummyChannel

from fedmcp_site.runtime.request_guard import BODY_FRAMING_ALLOWANCE, GuardedChannel, guarded_factory

HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 30.0
HEAD = b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n"


class Recorded(Request):
    """A request that only records that it was handed on (daphne's would start the application)."""

    processed: list[Recorded] = []

    def process(self) -> None:
        Recorded.processed.append(self)


@pytest.fixture
def channel() -> Any:
    Recorded.processed = []
    clock = Clock()
    with override_settings(FEDMCP_REQUEST_HEADER_TIMEOUT=HEADER_TIMEOUT, FEDMCP_REQUEST_BODY_TIMEOUT=BODY_TIMEOUT, MCP_MAX_BODY_BYTES=1000):
        guarded = GuardedChannel()
        guarded.requestFactory = Recorded
        guarded.callLater = clock.callLater
        guarded.timeOut = None  # Twisted's idle timeout: not under test
        guarded.clock = clock
        guarded.makeConnection(StringTransport())
        yield guarded


def refusal_of(channel: Any) -> tuple[int, dict[str, Any]]:
    raw = channel.transport.value()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert channel.transport.disconnecting, "the connection was not closed"
    return int(head.split(b" ")[1]), json.loads(body)


def test_a_body_dripped_past_the_body_timeout_gets_408(channel: Any) -> None:
    channel.dataReceived(HEAD)
    for _ in range(9):  # one byte short, a byte every 3 s: each read would reset an idle timeout
        channel.dataReceived(b"x")
        channel.clock.advance(3)
    assert channel.transport.value() == b""
    channel.clock.advance(BODY_TIMEOUT - 27 + 0.1)
    status, body = refusal_of(channel)
    assert status == 408 and "request body" in body["error"]["message"] and body["error"]["code"] == -32600
    assert Recorded.processed == []
    channel.dataReceived(b"x")  # the last byte, too late: ignored
    assert Recorded.processed == []


def test_a_body_in_time_is_handed_on_and_the_deadline_is_cancelled(channel: Any) -> None:
    channel.dataReceived(HEAD)
    channel.clock.advance(BODY_TIMEOUT - 1)
    channel.dataReceived(b"0123456789")
    assert len(Recorded.processed) == 1
    channel.clock.advance(BODY_TIMEOUT * 10)  # a long-running response is not a slow request
    assert channel.transport.value() == b"" and not channel.transport.disconnecting


@pytest.mark.parametrize("first", [b"P", b"POST /mcp HTTP/1.1\r\n", b"POST /mcp HTTP/1.1\r\nHost: x\r\n"])
def test_a_head_dripped_past_the_header_timeout_gets_408(channel: Any, first: bytes) -> None:
    channel.dataReceived(first)
    channel.clock.advance(HEADER_TIMEOUT - 0.1)
    assert channel.transport.value() == b""
    channel.dataReceived(b"X")
    channel.clock.advance(0.2)
    status, body = refusal_of(channel)
    assert status == 408 and "headers" in body["error"]["message"]


def test_an_idle_connection_has_no_header_deadline(channel: Any) -> None:
    channel.clock.advance(HEADER_TIMEOUT * 10)
    assert channel.transport.value() == b"" and not channel.transport.disconnecting


def test_a_body_streamed_far_past_the_cap_gets_413(channel: Any) -> None:
    channel.dataReceived(b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
    channel.dataReceived(b"x" * (1000 + BODY_FRAMING_ALLOWANCE))
    assert channel.transport.value() == b""
    channel.dataReceived(b"x")
    status, body = refusal_of(channel)
    assert status == 413 and "1000 bytes" in body["error"]["message"]
    assert Recorded.processed == []


@pytest.mark.parametrize(
    "content_type", [b"application/x-www-form-urlencoded", b"multipart/form-data; boundary=zz"]
)
def test_form_bodies_are_handed_on_as_received_not_parsed_by_twisted(channel: Any, content_type: bytes) -> None:
    """daphne passes `request.content` to the application; Twisted's form parsing is skipped.

    (It cost ~12% of a busy worker reading the Content-Type, and answered a malformed multipart
    body with its own 400 before the application could.)
    """
    body = b"a=1&b=2" if content_type.startswith(b"application") else b"not multipart at all"
    channel.dataReceived(b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (content_type, len(body), body))
    assert len(Recorded.processed) == 1
    request = Recorded.processed[0]
    assert request.args == {} and request.content.read() == body
    assert channel.transport.value() == b""


def test_the_local_address_is_asked_once_per_connection(channel: Any) -> None:
    asked = []
    real = channel.transport.getHost
    channel.transport.getHost = lambda: asked.append(1) or real()
    for _ in range(3):
        channel.dataReceived(HEAD + b"0123456789")
        Recorded.processed[-1].finish()
    assert len(Recorded.processed) == 3 and len(asked) == 1
    assert Recorded.processed[-1].getHost() == real()


@pytest.mark.parametrize(("verbosity", "logged"), [(1, False), (2, True)])
def test_twisteds_own_access_line_is_made_only_when_daphne_keeps_twisteds_log(verbosity: int, logged: bool) -> None:
    """daphne sends the Twisted log nowhere below -v 2: formatting a line for it was wasted work."""
    factory = guarded_factory(HTTPFactory)()
    factory.server = SimpleNamespace(verbosity=verbosity)
    factory._logFile = io.StringIO()
    factory._logDateTime = "[24/Nov/2026:10:00:00 +0000]"
    request = Request(DummyChannel())
    request.method, request.uri, request.clientproto, request.code, request.sentLength = b"POST", b"/mcp", b"HTTP/1.1", 200, 12
    factory.log(request)
    written = factory._logFile.getvalue()
    assert bool(written) is logged
    if logged:
        assert '"POST /mcp HTTP/1.1" 200 12' in written


def test_a_request_that_comes_in_one_read_sets_no_timer(channel: Any) -> None:
    timers = []
    # Bound to the clock, as the reactor's callLater is (the channel reads the time from it).
    channel.callLater = MethodType(lambda clock, *args: timers.append(args) or clock.callLater(*args), channel.clock)
    channel.dataReceived(HEAD + b"0123456789")
    assert len(Recorded.processed) == 1 and timers == []
    Recorded.processed[-1].finish()
    channel.dataReceived(HEAD)  # the body is late: now the body deadline needs its timer
    assert [t[0] for t in timers] == [BODY_TIMEOUT]


def test_a_response_is_written_byte_for_byte_as_twisted_writes_it(channel: Any) -> None:
    """The head goes to the transport in one piece; the bytes are Twisted's own."""

    def respond(on: Any) -> bytes:
        on.dataReceived(HEAD + b"0123456789")
        request = Recorded.processed[-1]
        request.setResponseCode(202)
        request.responseHeaders.addRawHeader(b"content-type", b"application/json")
        request.responseHeaders.addRawHeader(b"x-two", b"a")
        request.responseHeaders.addRawHeader(b"x-two", b"b")
        request.write(b'{"ok":true}')
        request.finish()
        return bytes(on.transport.value())

    plain = HTTPChannel()
    plain.requestFactory = Recorded
    plain.callLater = channel.clock.callLater
    plain.timeOut = None
    plain.makeConnection(StringTransport())
    expected = respond(plain)
    assert respond(channel) == expected
    assert expected.startswith(b"HTTP/1.1 202 Accepted\r\n") and b"X-Two: a\r\nX-Two: b\r\n" in expected
