"""The shape shared by upstream kinds that carry every call over one stream.

Over stdio, legacy HTTP+SSE and WebSocket, the server's messages for every call in flight
arrive interleaved on one stream (stdout, the SSE stream, the socket). Correlation therefore
works the same way for all three: responses by id, progress by token, log messages and
cancellations to the sole call in flight (or to nobody when that is ambiguous), and catalog and
resource events always to `on_event`. Each kind only opens and closes its stream, writes one
message (`_write`), feeds what it reads to `_on_message`, and may change the handshake.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

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
    unrouted_request_reply,
)
from federation.upstream.wire import UpstreamMessageError, check_message, decode

logger = logging.getLogger(__name__)

CALL_NOTIFICATIONS = frozenset({"notifications/message", "notifications/cancelled"})
"""Notifications that belong to a call but carry no token naming it."""

HANDSHAKE_METHODS = frozenset({"initialize", "server/discover"})
"""Requests never cancelled upstream: the spec forbids cancelling initialize, and stdio's
2026-07-28 probe, server/discover, stands in its place."""


class SingleStreamConnection(UpstreamConnection):
    """An upstream connection whose calls all share one stream of server messages.

    Subclasses implement `_open`, `_write` and a reader task that passes each message it reads
    to `_on_message`. Kinds whose session lives and dies with the stream set `_alive` once it is
    open, store the reader in `_reader`, call `_die` when it ends and override `_release`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending: dict[int, tuple[asyncio.Future[JsonDict], OnMessage | None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reader: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None
        self._alive = False

    @abc.abstractmethod
    async def _write(self, message: JsonDict) -> None:
        """Send one message upstream.

        Raises:
            UpstreamError: the message could not be sent.
        """

    # --- lifecycle -----------------------------------------------------------------------

    async def _check_remote(self, kind: str) -> None:
        """Settle on the handshake era and check the peer's URL, for the kinds that dial one.

        Raises:
            UpstreamProtocolError: the 2026-07-28 era was asked of a kind that only speaks the
                handshake era.
            UpstreamUnavailableError: the outbound guard refuses the URL.
        """
        if self.requested_era == "modern":
            raise UpstreamProtocolError(f"peer '{self.peer.name}': {kind} only speaks the handshake era")
        self.era = "legacy"
        try:
            await check_url_allowed(self.peer.url)
        except OutboundAddressError as exc:
            raise UpstreamUnavailableError(f"peer '{self.peer.name}': {exc}") from exc

    @contextlib.asynccontextmanager
    async def _handshaking(self, cleanup: Callable[[], Awaitable[None]]) -> AsyncIterator[None]:
        """Bound the body by the connect timeout; if it fails in any way, run `cleanup` first.

        Raises:
            UpstreamTimeoutError: the connect timeout passed.
        """
        try:
            async with asyncio.timeout(self.peer.connect_timeout):
                yield
        except TimeoutError as exc:
            await cleanup()
            raise UpstreamTimeoutError(
                f"peer '{self.peer.name}' did not complete the handshake within {self.peer.connect_timeout:g}s"
            ) from exc
        except BaseException:
            await cleanup()
            raise

    async def _handshake(self) -> None:
        """Run the handshake-era initialize exchange.

        Raises:
            UpstreamProtocolError: the upstream refused or answered with no usable result.
        """
        self.era = "legacy"
        reply = await self._raw_request("initialize", initialize_params(), None)
        if "error" in reply:
            raise UpstreamProtocolError(f"peer '{self.peer.name}' refused initialize: {reply['error'].get('message')}")
        self.description = describe_initialize(reply.get("result") or {})
        await self._write({"jsonrpc": "2.0", "method": "notifications/initialized"})

    async def _close(self) -> None:
        await self._shutdown()

    async def _shutdown(self) -> None:
        """Stop the reader and background tasks, fail what waits, release the stream (idempotent)."""
        self._alive = False
        self._fail_pending(f"connection to peer '{self.peer.name}' closed")
        await self._cancel_tasks()
        await self._release()

    async def _release(self) -> None:
        """Free what the stream runs on (an HTTP client, a socket); its readers have stopped."""

    async def _cancel_tasks(self) -> None:
        """Cancel the reader and background tasks, except the calling one, and wait for them."""
        current = asyncio.current_task()
        tasks = [t for t in (self._reader, *self._tasks) if t is not None and t is not current and not t.done()]
        for task in tasks:
            task.cancel()
        # Wait for them so nothing still reads the stream when `_release` frees it.
        await asyncio.gather(*tasks, return_exceptions=True)

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

    def is_healthy(self) -> bool:
        return not self.closed and self._alive

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- routing ---------------------------------------------------------------------------

    async def _on_frame(self, raw: bytes | str, *, batch: bool = False) -> None:
        """Parse one frame off the stream (wire.py) and route its messages (runs on the reader task).

        `batch`: a JSON array is a batch of messages (WebSocket).

        A refused frame fails the call it answers, when its id can be read, and is otherwise
        dropped: either way the stream, shared by every call, goes on.
        """
        try:
            value = decode(raw, peer=self.peer.name)
        except UpstreamMessageError as exc:
            self._refuse(exc)
            return
        for item in value if batch and isinstance(value, list) else [value]:
            try:
                message = check_message(item, peer=self.peer.name)
            except UpstreamMessageError as exc:
                self._refuse(exc)
                continue
            await self._on_message(message)

    def _refuse(self, error: UpstreamMessageError) -> None:
        """Fail the call a refused message answered, if it is still waiting; else only log."""
        entry = self._pending.get(error.request_id) if error.request_id is not None else None  # type: ignore[arg-type]
        if entry is not None and not entry[0].done():
            logger.warning("peer %s: failing call %r: %s", self.peer.name, error.request_id, error)
            entry[0].set_exception(error)
        else:
            logger.warning("peer %s: ignoring a message: %s", self.peer.name, error)

    async def _on_message(self, message: JsonDict) -> None:
        """Route one checked message (wire.py `check_message`) the reader took off the stream."""
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
        elif method in CALL_NOTIFICATIONS and handler is not None:
            # One stream for every call: attribute to the only call in flight.
            await self._deliver(handler, message)
        elif method in CALL_NOTIFICATIONS and self._pending:
            logger.debug("peer %s: dropping %s that no single call owns", self.peer.name, method)
        else:
            # Catalog and resource events go to on_event whatever is in flight. Off the reader:
            # the handler may call back into this connection (a catalog re-sync after
            # list_changed) and its responses arrive on this same stream.
            self._spawn(self._route_unrelated(message))

    async def _deliver(self, handler: Callable[[JsonDict], Awaitable[Any]], message: JsonDict) -> None:
        # A failing host handler must not take the shared stream down with it.
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
                # With several host calls in flight on one stream, a server->client request
                # cannot be attributed safely; refusing beats sending it to the wrong user.
                calls = [h for _, h in self._pending.values() if h is not None]
                reason = "ambiguous-host-call" if calls else "no-host-call"
                reply = unrouted_request_reply(self.peer.name, request.get("method"), reason)
            else:
                try:
                    reply = await handler(request)
                except Exception:
                    logger.exception("peer %s: relaying %s failed", self.peer.name, request.get("method"))
                    reply = error_reply(-32603, "the gateway could not relay this request to the host")
        with contextlib.suppress(UpstreamError):
            await self._write({"jsonrpc": "2.0", "id": request["id"], **(reply or error_reply(-32603, "no answer"))})

    # --- requests --------------------------------------------------------------------------

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
            if method not in HANDSHAKE_METHODS:
                # In the background: this task is being cancelled and must not wait on a write.
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
