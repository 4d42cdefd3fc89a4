"""Shared machinery of the HTTP transports.

`AsyncHttpConsumer` buffers the whole body without limit and runs `handle` inside its message
loop, so it cannot notice a disconnect while a long call runs. `McpHttpConsumer` caps the body
(413), checks Host and Origin, and runs `handle` as a task: a client that goes away cancels
its request.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from channels.consumer import get_handler_name
from channels.exceptions import StopConsumer
from channels.generic.http import AsyncHttpConsumer
from django.conf import settings
from django.db import Error as DatabaseError

from federation.upkeep import ensure_background_tasks
from fedmcp_lib.json_types import JsonDict
from identity.hostauth.tokens import Identity
from mcp_endpoint import jsonrpc, sessions
from mcp_endpoint.auth import UNAVAILABLE_HEADERS, UNAVAILABLE_MESSAGE

logger = logging.getLogger(__name__)

SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache, no-transform"),
    (b"x-accel-buffering", b"no"),
]


BATCH_VERSION = "2025-03-26"
"""The one protocol version whose hosts may send JSON-RPC batches."""


def batch_refusal(payload: Any, protocol_version: str) -> str | None:
    """Why a JSON-RPC batch is refused on a session of `protocol_version` (None: not a batch, or a fine one).

    Only 2025-03-26 has batches; an empty one is no request at all; every message of a batch
    runs at once, so MCP_MAX_BATCH bounds the fan-out.
    """
    if not isinstance(payload, list):
        return None
    if protocol_version != BATCH_VERSION or not payload:
        return f"Bad Request: JSON-RPC batches are only accepted in protocol version {BATCH_VERSION} (non-empty)"
    if len(payload) > settings.MCP_MAX_BATCH:
        return f"Bad Request: a JSON-RPC batch may hold at most {settings.MCP_MAX_BATCH} messages (FEDMCP_MAX_BATCH)"
    return None


def sse_event(message: JsonDict | None = None, *, event: str = "message", data: str | None = None) -> bytes:
    payload = data if data is not None else jsonrpc.dumps(message)
    return f"event: {event}\ndata: {payload}\n\n".encode()


class DirectDispatchMixin:
    """Run the consumer's message loop without Channels' per-connection and per-message extras.

    * No channel of its own: Channels gives every consumer a channel-layer channel, with a
      receive kept pending on it (a task, and on Redis a place in the layer's receive loop) for
      the life of the request or socket. The MCP consumers never receive on it: what crosses
      workers travels on the channels of `mcp_endpoint.streams.SessionEvents` and the
      correlator. Without a channel layer attached, Channels would still run its loop through
      a task per message and `asyncio.wait`; here messages are awaited directly, in order, as
      that loop dispatches them.
    * No database sweep per message: Channels closes stale database connections before every
      message, with a hop to a thread each time (~5% of a worker's CPU in `make bench`). Every
      database access of the MCP consumers goes through `database_sync_to_async`, which does
      the same around each call.
    """

    scope: JsonDict
    channel_layer: Any
    base_send: Any

    async def __call__(self, scope: JsonDict, receive: Any, send: Any) -> None:
        self.scope = scope
        self.channel_layer = None
        self.base_send = send
        try:
            while True:
                await self.dispatch(await receive())
        except StopConsumer:
            pass

    async def dispatch(self, message: JsonDict) -> None:
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)


class McpHttpConsumer(DirectDispatchMixin, AsyncHttpConsumer):
    """Base for MCP HTTP consumers: size cap, edge checks, cancellable handling."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._size = 0
        self._refused = False
        self._task: asyncio.Task[None] | None = None
        self.response_started = False
        self.finished = False
        self._first_headers: dict[bytes, bytes] | None = None
        self._headers_dict: dict[str, str] | None = None

    # --- helpers for subclasses --------------------------------------------------------------

    def header(self, name: str) -> str | None:
        """The first value of a request header, as `security.header` gives it."""
        first = self._first_headers
        if first is None:
            # Asked about six times a request: one pass over the headers instead of one per ask.
            first = self._first_headers = {}
            for key, value in self.scope.get("headers", []):
                first.setdefault(key, value)
        value = first.get(name.lower().encode())
        return value.decode("latin-1") if value is not None else None

    def headers_dict(self) -> dict[str, str]:
        """Lower-cased request headers, the last value of each (a new dict for each caller)."""
        headers = self._headers_dict
        if headers is None:
            headers = self._headers_dict = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self.scope.get("headers", [])}
        return dict(headers)

    async def send_headers(self, *, status: int = 200, headers: Any = None) -> None:
        self.response_started = True
        await super().send_headers(status=status, headers=headers)

    async def send_response(self, status: int, body: bytes, *, headers: Any = None) -> None:
        """Send a whole response, with its Content-Length (Twisted would frame it as chunked)."""
        headers = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
        if not any(name.lower() == b"content-length" for name, _ in headers):
            headers.append((b"content-length", b"%d" % len(body)))
        await self.send_headers(status=status, headers=headers)
        await self.send_body(body)

    async def send_body(self, body: bytes, *, more_body: bool = False) -> None:
        if not more_body:
            self.finished = True
        await super().send_body(body, more_body=more_body)

    @property
    def identity(self) -> Identity:
        return self.scope["fedmcp.identity"]

    async def send_json(self, status: int, message: Any, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        body = jsonrpc.dumps(message).encode()
        await self.send_response(status, body, headers=[(b"content-type", b"application/json"), *(headers or [])])

    async def send_error(
        self, status: int, code: int, message: str, request_id: Any = None, data: Any = None, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        error: JsonDict = {"code": code, "message": message}
        if data is not None:
            error["data"] = data
        await self.send_json(status, jsonrpc.error_response(request_id, error), headers)

    async def send_plain(self, status: int, text: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        await self.send_response(status, text.encode(), headers=[(b"content-type", b"text/plain; charset=utf-8"), *(headers or [])])

    def accepts(self, media_type: str) -> bool:
        accept = (self.header("accept") or "").lower()
        return media_type in accept or "*/*" in accept

    def parse_body(self, body: bytes) -> Any:
        """Decode a JSON body.

        Raises:
            ParseError: not UTF-8 JSON (or nested too deeply to decode safely).
        """
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise jsonrpc.ParseError() from exc

    # --- the message loop --------------------------------------------------------------------

    async def http_request(self, message: JsonDict) -> None:
        if self._refused or self._task is not None:
            return
        if self._size == 0:
            declared = self.header("content-length")
            if declared and declared.isdigit() and int(declared) > settings.MCP_MAX_BODY_BYTES:
                await self._refuse_too_large()
                return
        chunk = message.get("body", b"")
        self._size += len(chunk)
        if self._size > settings.MCP_MAX_BODY_BYTES:
            await self._refuse_too_large()
            return
        self.body.append(chunk)
        if not message.get("more_body"):
            self._task = asyncio.create_task(self._run(b"".join(self.body)))
            self.body = []

    async def _refuse_too_large(self) -> None:
        self._refused = True
        self.body = []
        await self.send_error(
            413, jsonrpc.INVALID_REQUEST, f"Request body too large: the limit is {settings.MCP_MAX_BODY_BYTES} bytes"
        )

    async def _run(self, body: bytes) -> None:
        ensure_background_tasks()
        sessions.ensure_upkeep()
        try:
            # Host, Origin and the bearer token were checked by mcp_endpoint.auth.
            await self.handle(body)
        except asyncio.CancelledError:
            raise
        except DatabaseError:
            # The database went away after the edge's token check (sessions, catalog reads).
            logger.warning("database unreachable while answering an MCP request", exc_info=True)
            if not self.response_started:
                await self.send_error(503, jsonrpc.INTERNAL_ERROR, UNAVAILABLE_MESSAGE, headers=UNAVAILABLE_HEADERS)
        except Exception:
            logger.exception("MCP HTTP handler failed")
            if not self.response_started:
                await self.send_error(500, jsonrpc.INTERNAL_ERROR, "Internal server error")
            elif not self.finished:
                await self.send_body(b"", more_body=False)
        finally:
            if self.response_started and not self.finished:
                try:
                    await self.send_body(b"", more_body=False)
                except Exception:
                    logger.debug("could not close the response", exc_info=True)

    async def http_disconnect(self, message: JsonDict) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        await self.disconnect()
        raise StopConsumer()
