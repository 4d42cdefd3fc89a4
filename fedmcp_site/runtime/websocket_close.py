"""WebSocket close codes from the application reach the host under daphne.

daphne closes a socket for the application with autobahn's `sendClose`, which accepts only 1000
and the private ranges 3000-4999. The codes RFC 6455 defines for exactly what the MCP WebSocket
consumer reports (1003 a binary frame, 1008 a token no longer valid, 1009 a message over the
size cap) made it raise; daphne then logged "Exception inside application" and the host got
1011 (internal error) instead. `install()` (called from asgi.py) makes daphne's WebSocket
protocol send every code an endpoint may send (RFC 6455 section 7.4, the IANA registry), with
the reason the application gave (daphne drops it): "too many open sessions (limit 100) …".
"""

from __future__ import annotations

import sys
from typing import Any

TARGETS = {"daphne": "4.2.3", "autobahn": "26.11.1"}
"""The versions this module was written against (tests/architecture/test_runtime_patches.py)."""

MAX_REASON_BYTES = 123
"""A close frame's payload is at most 125 bytes: the 2-byte code and up to 123 of UTF-8 reason."""
SENDABLE = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1011, 1012, 1013, 1014}) | frozenset(range(3000, 5000))
"""Close codes an endpoint may put in a close frame (1004-1006, 1010 and 1015 are not among them)."""


def closing_websocket_factory(base: type) -> type:
    """daphne's WebSocket factory (`base`) building protocols that close with any `SENDABLE` code."""

    class ClosingWebSocketProtocol(base.protocol):  # type: ignore[misc, name-defined]
        def handle_reply(self, message: dict[str, Any]) -> None:
            if message.get("type") == "websocket.close" and self.state != self.STATE_CONNECTING:
                self.serverClose(code=message.get("code"), reason=message.get("reason"))
                return
            super().handle_reply(message)

        def serverClose(self, code: int | None = None, reason: str | None = None) -> None:
            code = 1000 if code is None else code
            if code not in SENDABLE:
                code = 1011  # what the application asked for cannot be sent: an internal error
            reason_bytes = reason.encode()[:MAX_REASON_BYTES].decode(errors="ignore").encode() if reason else None
            # autobahn's sendClose checks the code against its narrower list, then does just this.
            self.sendCloseFrame(code=code, reasonUtf8=reason_bytes, isReply=False)

    class ClosingWebSocketFactory(base):  # type: ignore[misc, valid-type]
        protocol = ClosingWebSocketProtocol

    return ClosingWebSocketFactory


def install() -> None:
    """Make daphne build `ClosingWebSocketProtocol`s, when this process is a daphne server about to start."""
    server: Any = sys.modules.get("daphne.server")
    if server is None:
        return
    from daphne.ws_protocol import WebSocketFactory

    server.WebSocketFactory = closing_websocket_factory(WebSocketFactory)
