"""WebSocket at /ws and /peers/<name>/ws: fedmcp's documented transport extension.

WebSocket is not part of the MCP specification. fedmcp speaks it the way the old SDK clients
did: subprotocol `mcp`, one JSON-RPC message per text frame, handshake-era session semantics,
and server->client notifications and requests on the same socket.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.db import Error as DatabaseError

from federation.upkeep import ensure_background_tasks
from fedmcp_lib.json_types import JsonDict
from fedmcp_lib.metrics import stream_open
from identity.hostauth.tokens import still_valid
from mcp_endpoint import dispatcher, jsonrpc, sessions
from mcp_endpoint.auth import UNAVAILABLE_MESSAGE
from mcp_endpoint.consumers.base import DirectDispatchMixin, batch_refusal
from mcp_endpoint.context import HostContext
from mcp_endpoint.models import McpSession
from mcp_endpoint.streams import SessionEvents

logger = logging.getLogger(__name__)

SUBPROTOCOL = "mcp"
WS_1003_UNSUPPORTED_DATA = 1003
WS_1008_POLICY_VIOLATION = 1008
WS_1009_MESSAGE_TOO_BIG = 1009


class _SocketOutbound:
    can_request = True

    def __init__(self, consumer: McpWebSocketConsumer) -> None:
        self.consumer = consumer

    async def send(self, message: JsonDict) -> None:
        await self.consumer.send_message(message)


class McpWebSocketConsumer(DirectDispatchMixin, AsyncWebsocketConsumer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.session: McpSession | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.events_task: asyncio.Task[None] | None = None
        self.outbound = _SocketOutbound(self)
        self._send_lock = asyncio.Lock()

    @property
    def endpoint_scope(self) -> str:
        return self.scope["url_route"]["kwargs"].get("peer", "")

    async def connect(self) -> None:
        ensure_background_tasks()
        sessions.ensure_upkeep()
        if SUBPROTOCOL not in self.scope.get("subprotocols", []):
            # Refuse at the handshake (HTTP 403): without the subprotocol this is not an MCP client.
            await self.close()
            return
        try:
            self.session = await sessions.session_create(transport="websocket", scope=self.endpoint_scope, identity=self.scope["fedmcp.identity"])
        except sessions.SessionLimitError as exc:
            # Accepted first, so the host gets a close code and a reason, not a bare HTTP 403.
            await self.accept(subprotocol=SUBPROTOCOL)
            await self.close(code=WS_1008_POLICY_VIOLATION, reason=str(exc))
            return
        await self.accept(subprotocol=SUBPROTOCOL)
        self.events_task = asyncio.create_task(self._relay_session_events(self.session.id))

    async def disconnect(self, code: int) -> None:
        for task in [*self.tasks, self.events_task]:
            if task is not None:
                task.cancel()
        if self.session is not None:
            await sessions.session_release(session_id=self.session.id)

    async def send_message(self, message: JsonDict) -> None:
        async with self._send_lock:
            await self.send(text_data=jsonrpc.dumps(message))

    async def _relay_session_events(self, session_id: str) -> None:
        async with stream_open("websocket"), SessionEvents(session_id, self.endpoint_scope, keepalive=settings.MCP_SSE_KEEPALIVE, sole=True) as events:
            async for message in events:
                if message is not None:
                    await self.send_message(message)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if text_data is None:
            await self.close(code=WS_1003_UNSUPPORTED_DATA)
            return
        if len(text_data) > settings.MCP_MAX_BODY_BYTES:
            await self.send_message(
                jsonrpc.error_response(
                    None, {"code": jsonrpc.INVALID_REQUEST, "message": f"Message too large: the limit is {settings.MCP_MAX_BODY_BYTES} bytes"}
                )
            )
            await self.close(code=WS_1009_MESSAGE_TOO_BIG)
            return
        try:
            payload = json.loads(text_data)
        except (ValueError, RecursionError):
            await self.send_message(jsonrpc.error_response(None, jsonrpc.ParseError().to_error()))
            return
        request_id = payload.get("id") if isinstance(payload, dict) and jsonrpc.is_valid_id(payload.get("id")) else None
        try:
            valid = await still_valid(self.scope["fedmcp.identity"])
        except DatabaseError:
            # The socket stays open: the host may retry once the database is back.
            logger.warning("database unreachable while checking a WebSocket's token", exc_info=True)
            await self.send_message(jsonrpc.error_response(request_id, {"code": jsonrpc.INTERNAL_ERROR, "message": UNAVAILABLE_MESSAGE}))
            return
        if not valid:
            # A revoked or expired token stops working at the next message, socket or not.
            error = {"code": jsonrpc.TOKEN_REVOKED, "message": "The access token was revoked or expired; reconnect with a new one"}
            await self.send_message(jsonrpc.error_response(request_id, error))
            await self.close(code=WS_1008_POLICY_VIOLATION)
            return
        task = asyncio.create_task(self._answer(payload))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _context(self) -> HostContext:
        assert self.session is not None
        # The session row is the source of truth (initialize and setLevel update it).
        session = await sessions.session_load(self.session.id, self.scope["fedmcp.identity"]) or self.session
        self.session = session
        return HostContext.of_session(
            session, transport="websocket", scope=self.endpoint_scope, outbound=self.outbound, identity=self.scope["fedmcp.identity"]
        )

    async def _answer(self, payload: Any) -> None:
        try:
            if isinstance(payload, list):
                ctx = await self._context()
                if (refusal := batch_refusal(payload, ctx.protocol_version)) is not None:
                    await self.send_message(jsonrpc.error_response(None, jsonrpc.InvalidRequestError(refusal).to_error()))
                    return
                replies = await asyncio.gather(*(self._one(m) for m in payload))
                answered = [r for r in replies if r is not None]
                if answered:
                    async with self._send_lock:
                        await self.send(text_data=jsonrpc.dumps(answered))
                return
            reply = await self._one(payload)
            if reply is not None:
                await self.send_message(reply)
        except asyncio.CancelledError:
            raise
        except DatabaseError:
            logger.warning("database unreachable while answering a WebSocket message", exc_info=True)
            request_id = payload.get("id") if isinstance(payload, dict) and jsonrpc.is_valid_id(payload.get("id")) else None
            await self.send_message(jsonrpc.error_response(request_id, {"code": jsonrpc.INTERNAL_ERROR, "message": UNAVAILABLE_MESSAGE}))
        except Exception:
            logger.exception("WebSocket message handling failed")

    async def _one(self, message: Any) -> JsonDict | None:
        ctx = await self._context()
        if dispatcher.classify(message) == "request":
            return await dispatcher.run_tracked(ctx, message)
        return await dispatcher.handle_message(ctx, message)
