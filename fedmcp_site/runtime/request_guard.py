"""Deadlines for receiving a request under daphne: slow headers and slow bodies get 408.

daphne hands a request to the application only once Twisted has received all of it (headers
and body, `daphne/http_protocol.py` `WebRequest.process`). Until then nothing of fedmcp runs,
and Twisted's only bound is its idle timeout (60 s), which every received byte resets: a client
that sends one byte every few seconds (slowloris) holds its connection, and its buffered body,
for as long as it likes. Other clients are not blocked (Twisted serves every connection from one
event loop), but each such connection costs a socket and memory, and nothing ends it.

`install()` (called from asgi.py) makes daphne's HTTP/1.1 channel enforce two deadlines:

* the request head (request line and headers) must arrive within
  `FEDMCP_REQUEST_HEADER_TIMEOUT` seconds of its first byte;
* the body must arrive within `FEDMCP_REQUEST_BODY_TIMEOUT` seconds of the end of the headers.

Past either, the client gets `408 Request Timeout` with a JSON-RPC error body and the connection
is closed. These are totals, not per-read timeouts, so dripping does not extend them. A body
that streams far past `FEDMCP_MAX_BODY_BYTES` is cut off with 413 in the same place, so it is
not spooled to disk before the application's own 413. Idle keep-alive connections are left to
Twisted's idle timeout; a response being sent (SSE streams) is not affected.

While the worker drains (fedmcp_site/runtime/lifecycle.py), `drain_connections()` makes every
connection end after its current response: idle keep-alive connections are closed at once,
responses still to be written and every request arriving during the drain get `Connection:
close`, so a balancer stops reusing connections to this worker while it still listens.
`last_request_at()` is when the last request other than a probe arrived.
"""

from __future__ import annotations

import json
import logging
import sys
import weakref
from typing import Any

from django.conf import settings
from twisted.internet import tcp
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers

TARGETS = {"daphne": "4.2.3", "twisted": "26.10.0"}
"""The versions this module was written against (tests/architecture/test_runtime_patches.py)."""

logger = logging.getLogger(__name__)

BODY_FRAMING_ALLOWANCE = 64 * 1024
"""Raw bytes past the body cap tolerated here (chunked framing); the application enforces the exact cap."""


PROBE_PATHS = frozenset({b"/healthz", b"/readyz", b"/metrics"})
"""Requests that are not traffic: a balancer's probes go on while it drains the worker."""

_open_channels: weakref.WeakSet[GuardedChannel] = weakref.WeakSet()
_draining = False
_last_request_at = 0.0


def last_request_at() -> float:
    """The reactor time the last request (not a probe) arrived on any connection."""
    return _last_request_at


def drain_connections() -> int:
    """End every connection after its current response; close idle ones now. Returns how many were closed now."""
    global _draining
    _draining = True
    closed = 0
    for channel in list(_open_channels):
        if channel.transport is None:  # handed over to a WebSocket
            continue
        if not channel.requests:
            channel.loseConnection()
            closed += 1
            continue
        channel.persistent = False
        for request in channel.requests:
            if not request.startedWriting:
                request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
    return closed


def refusal(status: bytes, message: str) -> bytes:
    """A complete HTTP/1.1 response that ends the connection, with a JSON-RPC error body."""
    body = json.dumps({"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": message}}).encode()
    head = b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (status, len(body))
    return head + body


class GuardedChannel(HTTPChannel):
    """Twisted's HTTP/1.1 channel with total deadlines for the head and the body of each request.

    A deadline is noted when its clock starts (the head's first byte, the end of the headers)
    and given a timer only if the bytes of that read did not complete what it waits for: most
    requests arrive in one read, and a timer set and cancelled within it costs more than
    parsing the head.
    """

    def __init__(self) -> None:
        super().__init__()
        self._due: tuple[float, bytes, str] | None = None
        """The deadline being enforced: (when, status, message), or None."""
        self._deadline: Any = None
        """The timer of `_due`, once the read that started it ended without meeting it."""
        self._deadline_for: tuple[float, bytes, str] | None = None
        self._body_bytes = 0
        self._refused = False
        self._host: Any = None

    # --- deadlines -------------------------------------------------------------------------------

    def _now(self) -> float:
        # The clock of the channel's timers (the reactor's; a fake clock in tests).
        return float(self.callLater.__self__.seconds())  # type: ignore[attr-defined]

    def _arm(self, seconds: float, status: bytes, message: str) -> None:
        self._due = (self._now() + seconds, status, message)

    def _disarm(self) -> None:
        self._due = None
        self._cancel_timer()

    def _cancel_timer(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = self._deadline_for = None

    def _schedule(self) -> None:
        """After a read: give the deadline still pending its timer (at its original time)."""
        due = self._due
        if due is None or due is self._deadline_for or self._refused:
            return
        self._cancel_timer()
        self._deadline = self.callLater(max(0.0, due[0] - self._now()), self._refuse, due[1], due[2])
        self._deadline_for = due

    def _refuse(self, status: bytes, message: str) -> None:
        self._deadline = self._deadline_for = self._due = None
        if self._refused or self.transport is None:
            return
        self._refused = True
        peer = self.transport.getPeer()
        logger.warning("refusing a request from %s:%s: %s", getattr(peer, "host", "?"), getattr(peer, "port", "?"), message)
        self.transport.write(refusal(status, message))
        self.setTimeout(None)
        self.loseConnection()
        # As Twisted's own idle timeout does: a client that does not read is aborted.
        self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)

    # --- Twisted's hooks ---------------------------------------------------------------------------

    def connectionMade(self) -> None:
        super().connectionMade()
        _open_channels.add(self)

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        global _last_request_at
        if getattr(self, "_path", b"").split(b"?", 1)[0] not in PROBE_PATHS:
            _last_request_at = self._now()
        if _draining:
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
            return False
        return bool(super().checkPersistence(request, version))

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if self._due is None and not self._handlingRequest:
            # The first byte of a request head (not of an idle keep-alive connection).
            timeout = settings.FEDMCP_REQUEST_HEADER_TIMEOUT
            self._arm(timeout, b"408 Request Timeout", f"Request Timeout: the request headers did not arrive within {timeout:g} s")
        super().dataReceived(data)
        self._schedule()

    def allHeadersReceived(self) -> None:
        timeout = settings.FEDMCP_REQUEST_BODY_TIMEOUT
        self._body_bytes = 0
        self._arm(timeout, b"408 Request Timeout", f"Request Timeout: the request body did not arrive within {timeout:g} s")
        super().allHeadersReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if not self._handlingRequest and not self._refused:
            self._body_bytes += len(data)
            if self._body_bytes > settings.MCP_MAX_BODY_BYTES + BODY_FRAMING_ALLOWANCE:
                self._disarm()
                self._refuse(b"413 Content Too Large", f"Request body too large: the limit is {settings.MCP_MAX_BODY_BYTES} bytes")
                return
        super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        self._disarm()
        if self.requests:
            # daphne hands the application `request.content` as received and never reads
            # `request.args`; Twisted's parsing of form bodies into it (the Content-Type read
            # through the email package, ~12% of a busy worker) is skipped.
            self.requests[-1]._parsePOSTFormSubmission = False
        super().allContentReceived()

    # --- writing responses ------------------------------------------------------------------------

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        # The same bytes as Twisted's, handed to the transport as one piece: its writeSequence
        # checks and buffers each of the ~25 fragments of a response head separately.
        if not isinstance(headers, Headers):
            super().writeHeaders(version, code, reason, headers)
            return
        head = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                head += (name, b": ", value, b"\r\n")
        head.append(b"\r\n")
        self.transport.write(b"".join(head))

    def requestDone(self, request: Any) -> None:
        super().requestDone(request)
        # The response is complete: send it now rather than when the reactor next finds the
        # socket writable, one pass of the event loop later. What cannot be sent at once stays
        # buffered and registered, and any failure is met again (and handled) by the reactor's
        # own doWrite; a connection being closed is left entirely to the reactor.
        transport = self.transport
        if (
            isinstance(transport, tcp.Connection)
            and transport.connected
            and not transport.disconnecting
            and not transport._writeDisconnecting
        ):
            transport.doWrite()

    def getHost(self) -> Any:
        # Twisted asks for every request (getsockname); a connection's local address is fixed.
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def connectionLost(self, reason: Any) -> None:
        self._disarm()
        _open_channels.discard(self)
        super().connectionLost(reason)


def guarded_factory(base: type) -> type:
    """daphne's HTTP factory (`base`) building `GuardedChannel`s."""

    class GuardedHTTPFactory(base):  # type: ignore[misc, valid-type]
        # HTTP/2 is not negotiated by these workers (TLS ends at the balancer), so the channel is
        # built directly instead of Twisted's HTTP/1.1-or-2 wrapper.
        def protocol(self) -> GuardedChannel:
            return GuardedChannel()

        def log(self, request: Any) -> None:
            # Twisted formats a combined-log line for every request and writes it to the Twisted
            # log, which daphne sends nowhere unless run with -v 2 or more (daphne.server
            # `Server.run`). daphne's own access log (--access-log) is written elsewhere and stays.
            if getattr(self.server, "verbosity", 1) > 1:
                super().log(request)

    return GuardedHTTPFactory


def install() -> None:
    """Make daphne build `GuardedChannel`s, when this process is a daphne server about to start."""
    server = sys.modules.get("daphne.server")
    if server is None:
        return
    from daphne.http_protocol import HTTPFactory

    server.HTTPFactory = guarded_factory(HTTPFactory)
