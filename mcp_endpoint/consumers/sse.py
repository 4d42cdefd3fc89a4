"""Legacy HTTP+SSE (protocol 2024-11-05) at /sse and /peers/<name>/sse.

GET opens the stream and announces where to POST (`event: endpoint`); each POST to
/messages/?session_id=… is acknowledged with 202 and its reply travels on the stream: straight
to it when this worker holds it, else through the session's channel-layer group, so the POST and
the stream may be served by different workers (mcp_endpoint/streams.py).

Every request accepted with 202 gets an answer or an error on the stream, within a bound:

* a POST for a stream on another worker is announced to that stream before the 202, and renewed
  while its requests run (streams.py); with the channel layer unreachable it is refused at once
  (HTTP 503, -32603 `channel_layer_unavailable`) instead of accepted and lost;
* a reply the layer cannot take is retried for up to MCP_SSE_ACCEPTED_LEASE seconds;
* if this worker dies (or loses the layer), the stream's worker answers -32603 `worker_lost`
  once the announcement's lease runs out;
* a request cancelled by this worker's shutdown (not by the host) is answered -32603
  `worker_shutdown` at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any
from urllib.parse import parse_qs

from django.conf import settings

from fedmcp_lib.metrics import stream_open
from mcp_endpoint import dispatcher, jsonrpc, sessions
from mcp_endpoint.consumers.base import SSE_HEADERS, McpHttpConsumer, batch_refusal, sse_event
from mcp_endpoint.context import HostContext
from mcp_endpoint.correlation import correlator
from mcp_endpoint.streams import (
    LAYER_RETRY_SECONDS,
    SessionEvents,
    SessionGroupOutbound,
    announce_accepted,
    announce_settled,
    held_here,
    send_to_session,
)

logger = logging.getLogger(__name__)

# Replies to POSTed messages outlive the POST (it is answered 202 at once); keep their tasks.
_background: set[asyncio.Task[Any]] = set()

_in_work: dict[str, dict[str, Any]] = {}
"""Session id -> requests this worker accepted for a stream held elsewhere (key -> id), until replied."""
_renewing: set[int] = set()

LAYER_UNAVAILABLE_REASON = "channel_layer_unavailable"
LAYER_UNAVAILABLE_RETRY_AFTER = 5
SHUTDOWN_REASON = dispatcher.SHUTDOWN_REASON


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
        requests = [m["id"] for m in messages if dispatcher.classify(m) == "request" and jsonrpc.is_valid_id(m.get("id"))]
        remote = bool(requests) and not held_here(session.id)
        if remote:
            # The stream is on another worker: its replies need the channel layer. Announce them
            # to the stream first (it answers them itself if this worker dies), and refuse the
            # POST now if the layer cannot take the announcement: it could not take the replies.
            try:
                await announce_accepted(session.id, requests)
            except Exception:
                logger.warning("channel layer unreachable: refusing a POST for SSE session %s… held by another worker", session.id[:8], exc_info=True)
                await self.send_error(
                    503, jsonrpc.INTERNAL_ERROR, "Service unavailable: the gateway cannot reach this session's stream; retry later",
                    request_id=requests[0] if len(messages) == 1 else None,
                    data={"reason": LAYER_UNAVAILABLE_REASON, "retryAfterMs": LAYER_UNAVAILABLE_RETRY_AFTER * 1000},
                    headers=[(b"retry-after", str(LAYER_UNAVAILABLE_RETRY_AFTER).encode())],
                )
                return
            _track(session.id, requests)
        for message in messages:
            ctx = HostContext.of_session(session, transport="sse", scope=scope, outbound=SessionGroupOutbound(session.id), identity=self.identity)
            # The answer outlives this POST (answered 202 below): a task of its own, which is
            # also what a later notifications/cancelled for the request cancels.
            task = asyncio.create_task(self._answer(ctx, message, remote))
            _background.add(task)
            task.add_done_callback(_background.discard)
            if dispatcher.classify(message) == "request" and jsonrpc.is_valid_id(message.get("id")):
                await correlator.track(session.id, message["id"], task)
        # One turn of the loop first: the calls run up to their first wait (a tools/call has
        # then sent its upstream request), so the upstream works while the 202 is written.
        await asyncio.sleep(0)
        await self.send_response(202, b"Accepted", headers=[(b"content-type", b"text/plain")])

    @staticmethod
    async def _answer(ctx: HostContext, message: Any, remote: bool) -> None:
        session_id = ctx.session.id  # type: ignore[union-attr]
        request_id = message.get("id") if dispatcher.classify(message) == "request" and jsonrpc.is_valid_id(message.get("id")) else None
        try:
            reply = await dispatcher.handle_message(ctx, message)
        except asyncio.CancelledError:
            if correlator.cancelled_by_host(asyncio.current_task()):
                # The host cancelled it: no response, as the spec says; the stream stops waiting.
                if remote and request_id is not None:
                    await asyncio.shield(_settle(session_id, request_id))
            elif request_id is not None:
                # This worker is shutting down: say so now rather than leave the host waiting.
                await asyncio.shield(_deliver(session_id, request_id, dispatcher.shutdown_error(request_id), remote))
            raise
        except Exception:
            logger.exception("answering an SSE message failed")
            reply = jsonrpc.error_response(request_id, jsonrpc.JsonRpcError().to_error()) if request_id is not None else None
        if reply is not None:
            await _deliver(session_id, request_id, reply, remote)
        elif remote and request_id is not None:
            await _settle(session_id, request_id)


async def _deliver(session_id: str, request_id: Any, reply: dict[str, Any], remote: bool) -> None:
    """Send `reply` to the session's stream; while the channel layer fails, retry for up to the announcement's lease."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settings.MCP_SSE_ACCEPTED_LEASE
    try:
        while True:
            try:
                await send_to_session(session_id, reply)
                return
            except Exception:
                if loop.time() >= deadline:
                    logger.error("could not deliver a reply to SSE session %s…; its stream answers worker_lost", session_id[:8], exc_info=True)
                    return
                logger.warning("could not deliver a reply to SSE session %s…; retrying", session_id[:8], exc_info=True)
                await asyncio.sleep(LAYER_RETRY_SECONDS)
    finally:
        if remote and request_id is not None:
            _untrack(session_id, request_id)


async def _settle(session_id: str, request_id: Any) -> None:
    _untrack(session_id, request_id)
    try:
        await announce_settled(session_id, [request_id])
    except Exception:
        logger.warning("could not tell SSE session %s…'s stream that a request was cancelled", session_id[:8], exc_info=True)


def _track(session_id: str, request_ids: list[Any]) -> None:
    in_work = _in_work.setdefault(session_id, {})
    for request_id in request_ids:
        in_work[json.dumps(request_id)] = request_id
    loop = asyncio.get_running_loop()
    if id(loop) not in _renewing:
        _renewing.add(id(loop))
        loop.create_task(_renew_while_in_work(loop))


def _untrack(session_id: str, request_id: Any) -> None:
    in_work = _in_work.get(session_id)
    if in_work is not None:
        in_work.pop(json.dumps(request_id), None)
        if not in_work:
            del _in_work[session_id]


async def _renew_while_in_work(loop: asyncio.AbstractEventLoop) -> None:
    """Renew the announcements of this worker's requests for streams held elsewhere, until none is left."""
    try:
        while _in_work:
            await asyncio.sleep(settings.MCP_SSE_ACCEPTED_LEASE / 3)
            for session_id, in_work in list(_in_work.items()):
                try:
                    await announce_accepted(session_id, list(in_work.values()), renewal=True)
                except Exception:
                    logger.warning("could not renew %d SSE requests of session %s…", len(in_work), session_id[:8], exc_info=True)
    finally:
        _renewing.discard(id(loop))
