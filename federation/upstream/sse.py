"""Upstream connections over the legacy HTTP+SSE transport (protocol 2024-11-05 style).

The client GETs the SSE URL and keeps that one stream open. The server's first event is
`endpoint`, whose data is the URI to POST messages to; every server message (responses,
notifications, server->client requests) then arrives on the stream as a `message` event, and
every client message is its own POST, answered 202. Handshake era only: the transport was
deprecated in 2025-03-26, before per-request envelopes existed.

There is one stream for every call in flight, so correlation works as over stdio: responses by
id, progress by token, anything else to the sole call in flight or to nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from federation.client import OutboundAddressError, check_url_allowed, outbound_client
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
from federation.upstream.sse_parser import iter_sse

logger = logging.getLogger(__name__)

MAX_EVENT_BYTES = 64 * 1024 * 1024
SSE_READ_TIMEOUT = 300.0
"""Seconds of silence after which the stream counts as dead (SDK default; servers send keepalives)."""
DEFAULT_PORTS = {"http": 80, "https": 443}


def resolve_endpoint(sse_url: str, data: str) -> str:
    """Return the absolute POST URL an `endpoint` event names.

    Raises:
        UpstreamProtocolError: the endpoint is not on the SSE URL's origin. Following it would
            let an upstream point the gateway at any host (SSRF), past `check_url_allowed`.
    """
    target = urljoin(sse_url, data.strip())
    base, resolved = urlsplit(sse_url), urlsplit(target)
    try:
        same_origin = (
            resolved.scheme == base.scheme
            and resolved.hostname == base.hostname
            and (resolved.port or DEFAULT_PORTS.get(resolved.scheme)) == (base.port or DEFAULT_PORTS.get(base.scheme))
        )
    except ValueError:  # an unparsable port
        same_origin = False
    if not same_origin or resolved.username is not None or resolved.password is not None:
        raise UpstreamProtocolError("upstream named a message endpoint on another origin")
    return resolved._replace(fragment="").geturl()


class SseConnection(UpstreamConnection):
    transport = "sse"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client: httpx.AsyncClient | None = None
        self._endpoint: str | None = None
        self._stream: asyncio.Task[None] | None = None
        self._pending: dict[int, tuple[asyncio.Future[JsonDict], OnMessage | None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closer: asyncio.Task[None] | None = None
        self._alive = False

    # --- lifecycle -----------------------------------------------------------------------

    async def _open(self) -> None:
        if self.requested_era == "modern":
            raise UpstreamProtocolError(f"peer '{self.peer.name}': HTTP+SSE only speaks the handshake era")
        self.era = "legacy"
        try:
            await check_url_allowed(self.peer.url)
        except OutboundAddressError as exc:
            raise UpstreamUnavailableError(f"peer '{self.peer.name}': {exc}") from exc
        self._client = outbound_client(connect_timeout=self.peer.connect_timeout, read_timeout=self.peer.call_timeout)
        endpoint: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._alive = True
        self._stream = asyncio.create_task(self._read_stream(endpoint))
        try:
            async with asyncio.timeout(self.peer.connect_timeout):
                self._endpoint = await endpoint
                await self._handshake()
        except TimeoutError as exc:
            await self._shutdown()
            raise UpstreamTimeoutError(
                f"peer '{self.peer.name}' did not complete the handshake within {self.peer.connect_timeout:g}s"
            ) from exc
        except BaseException:
            await self._shutdown()
            raise

    async def _handshake(self) -> None:
        reply = await self._raw_request("initialize", initialize_params(), None)
        if "error" in reply:
            raise UpstreamProtocolError(f"peer '{self.peer.name}' refused initialize: {reply['error'].get('message')}")
        self.description = describe_initialize(reply.get("result") or {})
        await self._post({"jsonrpc": "2.0", "method": "notifications/initialized"})

    async def _close(self) -> None:
        await self._shutdown()

    async def _shutdown(self) -> None:
        """Stop the stream and background tasks, fail what waits, release the HTTP client (idempotent)."""
        self._alive = False
        self._fail_pending(f"connection to peer '{self.peer.name}' closed")
        current = asyncio.current_task()
        tasks = [t for t in (self._stream, *self._tasks) if t is not None and t is not current and not t.done()]
        for task in tasks:
            task.cancel()
        # Wait for them so the stream's response is closed before the client is.
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def is_healthy(self) -> bool:
        return not self.closed and self._alive

    # --- wire ------------------------------------------------------------------------------

    async def _read_stream(self, endpoint: asyncio.Future[str]) -> None:
        """Read the SSE stream until it ends; then the session is gone and the connection dies."""
        assert self._client is not None
        reason = f"peer '{self.peer.name}' closed the event stream"
        failure: UpstreamError | None = None
        timeout = httpx.Timeout(
            connect=self.peer.connect_timeout, read=SSE_READ_TIMEOUT, write=self.peer.connect_timeout, pool=self.peer.connect_timeout
        )
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-store"}
        try:
            async with self._client.stream("GET", self.peer.url, headers=headers, timeout=timeout) as response:
                content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
                if response.status_code != 200 or content_type != "text/event-stream":
                    raise UpstreamUnavailableError(f"peer '{self.peer.name}' answered HTTP {response.status_code} without an event stream")
                async for event in iter_sse(response.aiter_lines(), max_event_bytes=MAX_EVENT_BYTES):
                    if event.event == "endpoint":
                        if not endpoint.done():
                            endpoint.set_result(resolve_endpoint(self.peer.url, event.data))
                    elif event.event == "message" and event.data:
                        message = _loads(event.data, self.peer.name)
                        if isinstance(message, dict):
                            await self._on_message(message)
        except asyncio.CancelledError:
            raise
        except UpstreamError as exc:
            reason, failure = str(exc), exc
        except httpx.HTTPError as exc:
            reason = f"cannot reach peer '{self.peer.name}': {type(exc).__name__}"
        except ValueError:  # an oversized event or undecodable text
            reason = f"peer '{self.peer.name}' sent an invalid event stream"
        except Exception:
            logger.exception("peer %s: event stream failed", self.peer.name)
        self._die(reason)
        if not endpoint.done():
            endpoint.set_exception(failure or UpstreamUnavailableError(reason))

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

    async def _post(self, message: JsonDict) -> None:
        """POST one message to the endpoint.

        Raises:
            UpstreamUnavailableError: the POST failed or was not accepted.
            UpstreamTimeoutError: the upstream did not answer the POST in time.
        """
        client, endpoint = self._client, self._endpoint
        if client is None or endpoint is None or not self._alive:
            raise UpstreamUnavailableError(f"connection to peer '{self.peer.name}' is closed")
        try:
            response = await client.post(
                endpoint, content=json.dumps(message, separators=(",", ":")), headers={"Content-Type": "application/json"}
            )
        except httpx.TimeoutException as exc:
            raise UpstreamTimeoutError(f"peer '{self.peer.name}' timed out") from exc
        except httpx.HTTPError as exc:
            raise UpstreamUnavailableError(f"cannot reach peer '{self.peer.name}': {type(exc).__name__}") from exc
        if not response.is_success:
            if response.status_code == 404:
                # The server forgot our session; only a new stream gets a new one.
                self._die(f"peer '{self.peer.name}' no longer knows this session")
            raise UpstreamUnavailableError(f"peer '{self.peer.name}' answered HTTP {response.status_code}")

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
            # One stream for every call: attribute to the only call in flight, if any.
            await self._deliver(handler, message)
        elif not self._pending:
            # Off the stream task: the handler may call back into this connection (a catalog
            # re-sync after list_changed) and its responses arrive on this same stream.
            self._spawn(self._route_unrelated(message))
        else:
            logger.debug("peer %s: dropping %s that no single call owns", self.peer.name, method)

    async def _deliver(self, handler: Any, message: JsonDict) -> None:
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
                reply = error_reply(-32603, "the gateway cannot tell which host call this request belongs to")
            else:
                try:
                    reply = await handler(request)
                except Exception:
                    logger.exception("peer %s: relaying %s failed", self.peer.name, request.get("method"))
                    reply = error_reply(-32603, "the gateway could not relay this request to the host")
        with contextlib.suppress(UpstreamError):
            await self._post({"jsonrpc": "2.0", "id": request["id"], **(reply or error_reply(-32603, "no answer"))})

    async def _raw_request(self, method: str, params: JsonDict | None, on_message: OnMessage | None) -> JsonDict:
        request_id = self.next_id()
        future: asyncio.Future[JsonDict] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (future, on_message)
        body: JsonDict = {"jsonrpc": "2.0", "id": request_id, "method": method}
        if params is not None:
            body["params"] = params
        try:
            await self._post(body)
            return await future
        except asyncio.CancelledError:
            if method != "initialize":  # the spec forbids cancelling initialize
                # In the background: this task is being cancelled and must not wait on a POST.
                self._spawn(self._cancel_upstream(request_id))
            raise
        finally:
            self._pending.pop(request_id, None)

    async def _cancel_upstream(self, request_id: int) -> None:
        with contextlib.suppress(UpstreamError):
            await self._post(
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
            await self._post(body)


def _loads(raw: str, peer: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        logger.warning("peer %s: ignoring a non-JSON event", peer)
        return None
