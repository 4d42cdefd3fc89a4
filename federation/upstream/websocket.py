"""Upstream connections over WebSocket, fedmcp's transport extension.

WebSocket is not part of the MCP specification. This speaks it the way the old SDK clients
did and fedmcp's own `/ws` endpoint serves it: subprotocol `mcp`, one JSON-RPC message per text
frame, handshake-era session semantics, and server messages of every call on the one socket.
Correlation is therefore `SingleStreamConnection`'s, as over stdio and HTTP+SSE.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.typing import Subprotocol

from federation.client import OutboundAddressError, describe_failure, open_checked_socket
from federation.tls import PeerTlsError, ssl_context
from federation.upstream.base import JsonDict, UpstreamProtocolError, UpstreamUnavailableError
from federation.upstream.single_stream import SingleStreamConnection

logger = logging.getLogger(__name__)

SUBPROTOCOL = Subprotocol("mcp")
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
USER_AGENT = "fedmcp"


class WebSocketConnection(SingleStreamConnection):
    transport = "websocket"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._socket: ClientConnection | None = None

    # --- lifecycle -----------------------------------------------------------------------

    async def _open(self) -> None:
        await self._check_remote("WebSocket")
        try:
            async with self._handshaking(self._shutdown):
                self._socket = await self._connect()
                if self._socket.subprotocol != SUBPROTOCOL:
                    raise UpstreamProtocolError(f"peer '{self.peer.name}' did not accept the WebSocket subprotocol 'mcp'")
                self._alive = True
                self._reader = asyncio.create_task(self._read_socket(self._socket))
                await self._handshake()
        except (OutboundAddressError, PeerTlsError) as exc:
            raise UpstreamUnavailableError(f"peer '{self.peer.name}': {exc}") from exc
        except (OSError, WebSocketException) as exc:
            secure = self.peer.url.startswith("wss:")
            detail = f"HTTP {exc.response.status_code}" if isinstance(exc, InvalidStatus) else describe_failure(exc, over_tls=secure)
            raise UpstreamUnavailableError(f"cannot reach peer '{self.peer.name}': {detail}") from exc

    async def _connect(self) -> ClientConnection:
        """Open the socket with the peer's credentials; refused ones are refreshed and tried once more.

        Raises:
            OutboundAddressError: the host resolves to an address the guard refuses.
            PeerTlsError: the peer's TLS settings cannot be loaded.
            OSError, WebSocketException: the connection or its handshake failed.
        """
        parts = urlsplit(self.peer.url)
        secure = parts.scheme == "wss"
        context = ssl_context(self.peer.tls) if secure else None
        for attempt in (1, 2):
            headers = await self.auth.headers() if self.auth is not None else {}
            # Dial the address the guard checked, so the client never resolves the name again
            # (DNS rebinding); TLS still names and verifies the URL's host.
            sock = await open_checked_socket(
                parts.hostname or "", parts.port or (443 if secure else 80), timeout=self.peer.connect_timeout
            )
            try:
                return await connect(
                    self.peer.url,
                    sock=sock,
                    ssl=context,
                    subprotocols=[SUBPROTOCOL],
                    additional_headers=headers,
                    user_agent_header=USER_AGENT,
                    max_size=MAX_MESSAGE_BYTES,
                    open_timeout=self.peer.connect_timeout,
                    close_timeout=self.peer.connect_timeout,
                )
            except InvalidStatus as exc:
                sock.close()
                # fedmcp refuses a WebSocket handshake without a valid token with 403 (daphne
                # cannot send 401 there); other servers answer 401.
                if self.auth is None or attempt == 2 or exc.response.status_code not in (401, 403):
                    raise
                await self.auth.refresh(headers)
            except BaseException:
                sock.close()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _release(self) -> None:
        if self._socket is not None:
            socket, self._socket = self._socket, None
            await socket.close()  # bounded by close_timeout

    # --- wire ------------------------------------------------------------------------------

    async def _read_socket(self, socket: ClientConnection) -> None:
        """Read frames until the socket closes; then the session is gone and the connection dies."""
        reason = f"peer '{self.peer.name}' closed the WebSocket"
        try:
            async for frame in socket:
                if not isinstance(frame, str):
                    logger.warning("peer %s: ignoring a binary WebSocket frame", self.peer.name)
                    continue
                await self._on_frame(frame, batch=True)
        except asyncio.CancelledError:
            raise
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else 1006
            reason = f"peer '{self.peer.name}' closed the WebSocket (code {code})"
        except Exception:
            logger.exception("peer %s: WebSocket reader failed", self.peer.name)
        self._die(reason)

    async def _write(self, message: JsonDict) -> None:
        """Send one message as one text frame.

        Raises:
            UpstreamUnavailableError: the socket is closed.
        """
        socket = self._socket
        if socket is None or not self._alive:
            raise UpstreamUnavailableError(f"connection to peer '{self.peer.name}' is closed")
        try:
            await socket.send(json.dumps(message, separators=(",", ":")))
        except ConnectionClosed as exc:
            raise UpstreamUnavailableError(f"peer '{self.peer.name}' closed the WebSocket") from exc

