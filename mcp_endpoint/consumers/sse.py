"""Legacy HTTP+SSE (protocol 2024-11-05) at /sse and /peers/<name>/sse.

GET opens the stream and announces where to POST (`event: endpoint`); each POST to
/messages/?session_id=… is acknowledged with 202 and its reply travels on the stream: straight
to it when this worker holds it, else through the session's channel-layer group, so the POST and
the stream may be served by different workers (mcp_endpoint/streams.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import parse_qs

from django.conf import settings

from fedmcp_lib.metrics import stream_open
from mcp_endpoint import dispatcher, jsonrpc, sessions
from mcp_endpoint.consumers.base import SSE_HEADERS, McpHttpConsumer, batch_refusal, sse_event
from mcp_endpoint.context import HostContext
from mcp_endpoint.correlation import correlator
from mcp_endpoint.streams import SessionEvents, SessionGroupOutbound, send_to_session

logger = logging.getLogger(__name__)

# Replies to POSTed messages outlive the POST (it is answered 202 at once); keep their tasks.
_background: set[asyncio.Task[Any]] = set()


class McpSseConsumer(McpHttpConsumer):
    """GET /sse: the event stream of one session."""

    async def handle(self, body: bytes) -> None:
        if self.scope["method"] != "GET":
            await self.send_plain(405, "Method Not Allowed: GET the stream, POST to the endpoint it names", [(b"allow", b"GET")])
            return
        scope = self.scope["url_route"]["kwargs"].get("peer", "")
        try:
            session = await sessions.session_create(transport="sse", scope=scope, identity=self.identity)
        except sessions.SessionLimitError as exc:
            await self.send_error(429, jsonrpc.TOO_MANY_SESSIONS, str(exc), data={"limit": exc.limit})
            return
        prefix = f"/peers/{scope}" if scope else ""
        try:
            async with stream_open("sse"), SessionEvents(session.id, scope, keepalive=settings.MCP_SSE_KEEPALIVE, sole=True) as events:
                await self.send_headers(status=200, headers=SSE_HEADERS)
                await self.send_body(sse_event(event="endpoint", data=f"{prefix}/messages/?session_id={session.id}"), more_body=True)
                async for message in events:
                    await self.send_body(sse_event(message) if message is not None else b": keepalive\n\n", more_body=True)
        finally:
            await asyncio.shield(sessions.session_release(session_id=session.id))


class McpSseMessageConsumer(McpHttpConsumer):
    """POST /messages/?session_id=…: one message for a session's stream."""

    async def handle(self, body: bytes) -> None:
        if self.scope["method"] != "POST":
            await self.send_plain(405, "Method Not Allowed: POST JSON-RPC messages here", [(b"allow", b"POST")])
            return
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        session_id = (query.get("session_id") or [""])[0]
        scope = self.scope["url_route"]["kwargs"].get("peer", "")
        session = await sessions.session_load(session_id, self.identity) if session_id else None
        if session is None or session.transport != "sse" or session.scope != scope:
            await self.send_error(404, jsonrpc.INVALID_REQUEST, "Session not found: open the SSE stream again")
            return
        try:
            payload = self.parse_body(body)
        except jsonrpc.ParseError as exc:
            await self.send_error(400, exc.code, exc.message)
            return
        messages = payload if isinstance(payload, list) else [payload]
        if (refusal := batch_refusal(payload, session.protocol_version)) is not None:
            await self.send_error(400, jsonrpc.INVALID_REQUEST, refusal)
            return
        for message in messages:
            ctx = HostContext.of_session(session, transport="sse", scope=scope, outbound=SessionGroupOutbound(session.id), identity=self.identity)
            # The answer outlives this POST (answered 202 below): a task of its own, which is
            # also what a later notifications/cancelled for the request cancels.
            task = asyncio.create_task(self._answer(ctx, message))
            _background.add(task)
            task.add_done_callback(_background.discard)
            if dispatcher.classify(message) == "request" and jsonrpc.is_valid_id(message.get("id")):
                await correlator.track(session.id, message["id"], task)
        # One turn of the loop first: the calls run up to their first wait (a tools/call has
        # then sent its upstream request), so the upstream works while the 202 is written.
        await asyncio.sleep(0)
        await self.send_response(202, b"Accepted", headers=[(b"content-type", b"text/plain")])

    @staticmethod
    async def _answer(ctx: HostContext, message: Any) -> None:
        # Cancelled (notifications/cancelled, shutdown): no response is sent, as the spec says.
        try:
            reply = await dispatcher.handle_message(ctx, message)
            if reply is not None:
                await send_to_session(ctx.session.id, reply)  # type: ignore[union-attr]
        except Exception:
            logger.exception("answering an SSE message failed")
