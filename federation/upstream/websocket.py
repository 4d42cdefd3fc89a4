"""Upstream connections over WebSocket, fedmcp's transport extension.

WebSocket is not part of the MCP specification. This speaks it the way the old SDK clients
did and fedmcp's own `/ws` endpoint serves it: subprotocol `mcp`, one JSON-RPC message per text
frame, handshake-era session semantics, and server messages of every call on the one socket.
Correlation therefore works as over stdio: responses by id, progress by token, anything else to
the sole call in flight or to nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.typing import Subprotocol

from federation.client import OutboundAddressError, check_url_allowed
from federation.upstream.base import (
    JsonDict,
    OnMessage,
    UpstreamConnection,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
    describe_initialize,
    error_reply,
    initialize_params,
)

logger = logging.getLogger(__name__)

SUBPROTOCOL = Subprotocol("mcp")
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
USER_AGENT = "fedmcp"


class WebSocketConnection(UpstreamConnection):
    transport = "websocket"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._socket: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, tuple[asyncio.Future[JsonDict], OnMessage | None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closer: asyncio.Task[None] | None = None
        self._alive = False

    # --- lifecycle -----------------------------------------------------------------------

    async def _open(self) -> None:
        if self.requested_era == "modern":
            raise UpstreamProtocolError(f"peer '{self.peer.name}': WebSocket only speaks the handshake era")
        self.era = "legacy"
        try:
            await check_url_allowed(self.peer.url)
        except OutboundAddressError as exc:
            raise UpstreamUnavailableError(f"peer '{self.peer.name}': {exc}") from exc
        try:
            async with asyncio.timeout(self.peer.connect_timeout):
                self._socket = await connect(
                    self.peer.url,
                    subprotocols=[SUBPROTOCOL],
                    user_agent_header=USER_AGENT,
                    max_size=MAX_MESSAGE_BYTES,
                    open_timeout=self.peer.connect_timeout,
                    close_timeout=self.peer.connect_timeout,
                )
                if self._socket.subprotocol != SUBPROTOCOL:
                    raise UpstreamProtocolError(f"peer '{self.peer.name}' did not accept the WebSocket subprotocol 'mcp'")
                self._alive = True
                self._reader = asyncio.create_task(self._read_socket(self._socket))
                await self._handshake()
        except TimeoutError as exc:
            await self._shutdown()
            raise UpstreamTimeoutError(
                f"peer '{self.peer.name}' did not complete the handshake within {self.peer.connect_timeout:g}s"
            ) from exc
        except (OSError, WebSocketException) as exc:
            await self._shutdown()
            detail = f"HTTP {exc.response.status_code}" if isinstance(exc, InvalidStatus) else type(exc).__name__
            raise UpstreamUnavailableError(f"cannot reach peer '{self.peer.name}': {detail}") from exc
        except BaseException:
            await self._shutdown()
            raise

    async def _handshake(self) -> None:
        reply = await self._raw_request("initialize", initialize_params(), None)
        if "error" in reply:
            raise UpstreamProtocolError(f"peer '{self.peer.name}' refused initialize: {reply['error'].get('message')}")
        self.description = describe_initialize(reply.get("result") or {})
        await self._write({"jsonrpc": "2.0", "method": "notifications/initialized"})

    async def _close(self) -> None:
        await self._shutdown()

    async def _shutdown(self) -> None:
        """Stop the reader and background tasks, fail what waits, close the socket (idempotent)."""
        self._alive = False
        self._fail_pending(f"connection to peer '{self.peer.name}' closed")
        current = asyncio.current_task()
        tasks = [t for t in (self._reader, *self._tasks) if t is not None and t is not current and not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._socket is not None:
            socket, self._socket = self._socket, None
            await socket.close()  # bounded by close_timeout

    def is_healthy(self) -> bool:
        return not self.closed and self._alive

    # --- wire ------------------------------------------------------------------------------

    async def _read_socket(self, socket: ClientConnection) -> None:
        """Read frames until the socket closes; then the session is gone and the connection dies."""
        reason = f"peer '{self.peer.name}' closed the WebSocket"
        try:
            async for frame in socket:
                if not isinstance(frame, str):
                    logger.warning("peer %s: ignoring a binary WebSocket frame", self.peer.name)
                    continue
                message = _loads(frame, self.peer.name)
                for item in message if isinstance(message, list) else [message]:
                    if isinstance(item, dict):
                        await self._on_message(item)
        except asyncio.CancelledError:
            raise
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else 1006
            reason = f"peer '{self.peer.name}' closed the WebSocket (code {code})"
        except Exception:
            logger.exception("peer %s: WebSocket reader failed", self.peer.name)
        self._die(reason)

    def _die(self, reason: str) -> None:
        """Mark the session lost: fail what waits, report unhealthy, release resources.

        Closing happens here because the pool replaces an unhealthy connection without
        closing it; it runs as its own task because the caller may be a task it cancels.
        """
        if not self._alive:
            return
        self._alive = False
        if not self.closed:
            logger.warning("peer %s: %s; the connection will be replaced", self.peer.name, reason)
        self._fail_pending(reason)
        self._closer = asyncio.create_task(self.close())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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

    async def _on_message(self, message: JsonDict) -> None:
        if "method" not in message:
            entry = self._pending.get(message.get("id"))  # type: ignore[arg-type]
            if entry is not None and not entry[0].done():
                entry[0].set_result(message)
            return
        if "id" in message:
            self._spawn(self._answer(message))
            return
        method = message["method"]
        handler = self._sole_handler()
        if method == "notifications/progress":
            await self._deliver(self._route_unrelated, message)
        elif method in ("notifications/message", "notifications/cancelled") and handler is not None:
            # One socket for every call: attribute to the only call in flight, if any.
            await self._deliver(handler, message)
        elif not self._pending:
            # Off the reader: the handler may call back into this connection (a catalog
            # re-sync after list_changed) and its responses arrive on this same socket.
            self._spawn(self._route_unrelated(message))
        else:
            logger.debug("peer %s: dropping %s that no single call owns", self.peer.name, method)

    async def _deliver(self, handler: Any, message: JsonDict) -> None:
        # A failing host handler must not take the shared socket down with it.
        try:
            await handler(message)
        except Exception:
            logger.exception("peer %s: delivering %s failed", self.peer.name, message.get("method"))

    def _sole_handler(self) -> OnMessage | None:
        handlers = [h for _, h in self._pending.values() if h is not None]
        return handlers[0] if len(handlers) == 1 else None

    async def _answer(self, request: JsonDict) -> None:
        if request.get("method") == "ping":
            reply: JsonDict | None = {"result": {}}
        else:
            handler = self._sole_handler()
            if handler is None:
                # With several host calls in flight on one socket, a server->client request
                # cannot be attributed safely; refusing beats sending it to the wrong user.
                reply = error_reply(-32603, "the gateway cannot tell which host call this request belongs to")
            else:
                try:
                    reply = await handler(request)
                except Exception:
                    logger.exception("peer %s: relaying %s failed", self.peer.name, request.get("method"))
                    reply = error_reply(-32603, "the gateway could not relay this request to the host")
        with contextlib.suppress(UpstreamError):
            await self._write({"jsonrpc": "2.0", "id": request["id"], **(reply or error_reply(-32603, "no answer"))})

    async def _raw_request(self, method: str, params: JsonDict | None, on_message: OnMessage | None) -> JsonDict:
        request_id = self.next_id()
        future: asyncio.Future[JsonDict] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (future, on_message)
        body: JsonDict = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            body["params"] = params
        try:
            await self._write(body)
            return await future
        except asyncio.CancelledError:
            if method != "initialize":  # the spec forbids cancelling initialize
                self._spawn(self._cancel_upstream(request_id))
            raise
        finally:
            self._pending.pop(request_id, None)

    async def _cancel_upstream(self, request_id: int) -> None:
        with contextlib.suppress(UpstreamError):
            await self._write(
                {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": request_id, "reason": "cancelled by host"}}
            )

    def _fail_pending(self, reason: str) -> None:
        for future, _ in list(self._pending.values()):
            if not future.done():
                future.set_exception(UpstreamUnavailableError(reason))

    async def _send_request(
        self, method: str, params: JsonDict | None, on_message: OnMessage | None, timeout: float
    ) -> JsonDict:
        try:
            async with asyncio.timeout(timeout):
                return await self._raw_request(method, params, on_message)
        except TimeoutError as exc:
            raise UpstreamTimeoutError(f"peer '{self.peer.name}' did not answer {method} within {timeout:g}s") from exc

    async def _send_notification(self, method: str, params: JsonDict | None) -> None:
        body: JsonDict = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            body["params"] = params
        with contextlib.suppress(UpstreamError):
            await self._write(body)


def _loads(raw: str, peer: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        logger.warning("peer %s: ignoring a non-JSON frame", peer)
        return None
