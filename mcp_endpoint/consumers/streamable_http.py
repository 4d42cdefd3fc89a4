"""Streamable HTTP at /mcp and /peers/<name>/mcp, both protocol eras on one endpoint.

This consumer only turns HTTP into JSON-RPC and back; it never looks at what a method means.
Era detection: a 2026-07-28 `MCP-Protocol-Version` header (or a body `_meta` envelope without
a session) selects the stateless era; `initialize` or an `Mcp-Session-Id` selects the
handshake era.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from typing import Any

from django.conf import settings
from django.db import Error as DatabaseError
from mcp.shared.inbound import (
    InboundLadderRejection,
    classify_inbound_request,
    decode_header_value,
    find_duplicated_routing_header,
    unsupported_protocol_version_rejection,
)
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, KNOWN_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS, is_version_at_least

from fedmcp_lib.json_types import JsonDict
from fedmcp_lib.metrics import stream_open
from mcp_endpoint import dispatcher, jsonrpc, sessions
from mcp_endpoint.auth import UNAVAILABLE_HEADERS, challenge
from mcp_endpoint.consumers.base import SSE_HEADERS, McpHttpConsumer, batch_refusal, sse_event
from mcp_endpoint.context import HostContext
from mcp_endpoint.models import McpSession
from mcp_endpoint.streams import SessionEvents, close_session_streams

logger = logging.getLogger(__name__)
SESSION_HEADER = b"mcp-session-id"
ALLOW = [(b"allow", b"GET, POST, DELETE")]


SSE_RETRY_MS = 1000
"""The `retry` hint of a priming event: how long a host waits before resuming a broken stream."""
PRIMING_SINCE = "2025-11-25"
"""First revision whose clients expect (and can parse) a priming event (SEP-1699)."""


def priming_event() -> bytes:
    """Return an SSE priming event: a fresh id, empty data and the reconnection delay."""
    return f"id: {secrets.token_urlsafe(12)}\nretry: {SSE_RETRY_MS}\ndata: \n\n".encode()


class PostStream:
    """The reply channel of one POST: JSON, or SSE from the first related message on.

    `priming`: an SSE answer opens with a priming event (2025-11-25 sessions; the event's
    empty data would confuse older clients, and 2026-07-28 dropped resumability).
    """

    def __init__(
        self, consumer: McpHttpConsumer, *, sse_allowed: bool, can_request: bool, headers: list[tuple[bytes, bytes]], priming: bool = False
    ) -> None:
        self.consumer = consumer
        self.sse_allowed = sse_allowed
        self.can_request = can_request and sse_allowed
        self.headers = headers
        self.priming = priming
        self.streaming = False
        self._lock = asyncio.Lock()

    async def _start(self) -> None:
        if not self.streaming:
            self.streaming = True
            await self.consumer.send_headers(status=200, headers=[*SSE_HEADERS, *self.headers])
            if self.priming:
                await self.consumer.send_body(priming_event(), more_body=True)

    async def send(self, message: JsonDict) -> None:
        if not self.sse_allowed:
            logger.debug("dropping %s: the client does not accept text/event-stream", message.get("method"))
            return
        async with self._lock:
            await self._start()
            await self.consumer.send_body(sse_event(message), more_body=True)

    async def finish(self, replies: list[JsonDict], *, status: int = 200, batch: bool = False) -> None:
        async with self._lock:
            if self.streaming:
                body = b"".join(sse_event(r) for r in replies)
                await self.consumer.send_body(body, more_body=False)
            elif not replies:
                await self.consumer.send_response(202, b"", headers=self.headers)
            else:
                payload: Any = replies if batch else replies[0]
                headers = self.headers
                needed = _insufficient_scope(replies)
                retry_after_ms = _rate_limited(replies)
                if not batch and jsonrpc.is_database_unavailable(replies[0].get("error")):
                    status = 503
                    headers = [*headers, *UNAVAILABLE_HEADERS]
                elif retry_after_ms is not None and not batch:
                    # HTTP clients and proxies understand 429 + Retry-After (whole seconds).
                    status = 429
                    headers = [*headers, (b"retry-after", str(max(1, math.ceil(retry_after_ms / 1000))).encode())]
                elif needed is not None and not batch:
                    # RFC 6750 step-up: 403 with the scope the method needs.
                    status = 403
                    headers = [*headers, (b"www-authenticate", challenge(self.consumer.scope, error="insufficient_scope", scope_needed=needed).encode())]
                await self.consumer.send_json(status, payload, headers)


def _rate_limited(replies: list[JsonDict]) -> int | None:
    """The retry hint (ms) of a lone rate-limit error reply, else None."""
    error = replies[0].get("error") if len(replies) == 1 else None
    if isinstance(error, dict) and error.get("code") == jsonrpc.RATE_LIMITED:
        retry = (error.get("data") or {}).get("retryAfterMs")
        return retry if isinstance(retry, int) else 1000
    return None


def _insufficient_scope(replies: list[JsonDict]) -> str | None:
    error = replies[0].get("error") if len(replies) == 1 else None
    if isinstance(error, dict) and error.get("code") == jsonrpc.INSUFFICIENT_SCOPE:
        return (error.get("data") or {}).get("requiredScope")
    return None


def _duplicated_param_header(headers: list[tuple[str, str]]) -> str | None:
    """Name of an `Mcp-Param-*` header sent more than once, or None (SEP-2243).

    The handler sees one value per header (the last), so a copy the first-copy reader upstream
    would take differently is refused here, where the raw lines still are.
    """
    seen: set[str] = set()
    for name, _ in headers:
        key = name.lower()
        if key.startswith("mcp-param-"):
            if key in seen:
                return key
            seen.add(key)
    return None


class McpStreamableHttpConsumer(McpHttpConsumer):
    @property
    def endpoint_scope(self) -> str:
        return self.scope["url_route"]["kwargs"].get("peer", "")

    async def handle(self, body: bytes) -> None:
        method = self.scope["method"]
        if method == "POST":
            await self.post(body)
        elif method == "GET":
            await self.get_stream()
        elif method == "DELETE":
            await self.delete()
        else:
            await self.send_plain(405, "Method Not Allowed: use POST, GET or DELETE", ALLOW)

    # --- POST ----------------------------------------------------------------------------------

    async def post(self, body: bytes) -> None:
        if not self.accepts("application/json"):
            await self.send_error(406, jsonrpc.INVALID_REQUEST, "Not Acceptable: Accept must list application/json and text/event-stream")
            return
        content_type = (self.header("content-type") or "").split(";")[0].strip().lower()
        if content_type != "application/json":
            await self.send_error(415, jsonrpc.INVALID_REQUEST, "Unsupported Media Type: send application/json")
            return
        try:
            payload = self.parse_body(body)
        except jsonrpc.ParseError as exc:
            await self.send_error(400, exc.code, exc.message)
            return
        version = self.header("mcp-protocol-version")
        session_id = self.header("mcp-session-id")
        if version in MODERN_PROTOCOL_VERSIONS:
            await self.post_modern(payload)
        elif version is not None and version not in KNOWN_PROTOCOL_VERSIONS:
            rejection = unsupported_protocol_version_rejection(version)
            assert rejection is not None
            request_id = payload.get("id") if isinstance(payload, dict) and jsonrpc.is_valid_id(payload.get("id")) else None
            await self.send_error(400, rejection.code, rejection.message, request_id, rejection.data)
        elif isinstance(payload, dict) and payload.get("method") == "initialize":
            await self.post_initialize(payload)
        elif session_id:
            await self.post_legacy(payload, session_id, version)
        elif dispatcher.has_modern_envelope(payload):
            await self.post_modern(payload)
        else:
            await self.send_error(
                400, jsonrpc.INVALID_REQUEST,
                "Bad Request: no Mcp-Session-Id header. Send initialize first (handshake era) "
                "or use MCP-Protocol-Version: 2026-07-28 with a _meta envelope (stateless era).",
                request_id=payload.get("id") if isinstance(payload, dict) and jsonrpc.is_valid_id(payload.get("id")) else None,
            )

    def _legacy_context(self, session: McpSession, stream: PostStream) -> HostContext:
        return HostContext.of_session(
            session, transport="streamable-http", scope=self.endpoint_scope, outbound=stream, identity=self.identity, headers=self.headers_dict()
        )

    async def refuse_too_many(self, exc: sessions.SessionLimitError, request_id: Any = None) -> None:
        await self.send_error(429, jsonrpc.TOO_MANY_SESSIONS, str(exc), request_id, {"limit": exc.limit})

    async def post_initialize(self, payload: JsonDict) -> None:
        try:
            session = await sessions.session_create(transport="streamable-http", scope=self.endpoint_scope, identity=self.identity)
        except sessions.SessionLimitError as exc:
            await self.refuse_too_many(exc, payload.get("id") if jsonrpc.is_valid_id(payload.get("id")) else None)
            return
        headers = [(SESSION_HEADER, session.id.encode())]
        stream = PostStream(self, sse_allowed=self.accepts("text/event-stream"), can_request=False, headers=headers)
        reply = await dispatcher.handle_request(self._legacy_context(session, stream), payload)
        if "error" in reply:
            await sessions.session_close(session_id=session.id)
            stream.headers = []
        await stream.finish([reply])

    async def post_legacy(self, payload: Any, session_id: str, version: str | None) -> None:
        session = await sessions.session_load(session_id, self.identity)
        if session is None or session.scope != self.endpoint_scope:
            await self.send_error(404, jsonrpc.INVALID_REQUEST, "Session not found: it expired or was closed; send initialize again")
            return
        if version is not None and session.protocol_version and version != session.protocol_version:
            await self.send_error(
                400, jsonrpc.INVALID_REQUEST,
                f"Bad Request: MCP-Protocol-Version {version} does not match the session's {session.protocol_version}",
            )
            return
        batch = isinstance(payload, list)
        messages = payload if batch else [payload]
        if (refusal := batch_refusal(payload, session.protocol_version)) is not None:
            await self.send_error(400, jsonrpc.INVALID_REQUEST, refusal)
            return
        priming = bool(session.protocol_version) and is_version_at_least(session.protocol_version, PRIMING_SINCE)
        stream = PostStream(self, sse_allowed=self.accepts("text/event-stream"), can_request=True, headers=[], priming=priming)
        kinds = [dispatcher.classify(m) for m in messages]
        if "request" not in kinds and "invalid" not in kinds:
            for message in messages:
                await dispatcher.handle_message(self._legacy_context(session, stream), message)
            await stream.finish([])
            return

        async def one(message: Any, kind: str) -> JsonDict | None:
            ctx = self._legacy_context(session, stream)
            if kind == "request":
                return await dispatcher.run_tracked(ctx, message)
            return await dispatcher.handle_message(ctx, message)

        if batch:
            results = await asyncio.gather(*(one(m, k) for m, k in zip(messages, kinds, strict=True)))
        else:
            results = [await one(messages[0], kinds[0])]  # one message: no task needed to run it
        replies = [r for r in results if r is not None]
        await stream.finish(replies, status=400 if kinds == ["invalid"] else 200, batch=batch)

    async def post_modern(self, payload: Any) -> None:
        if not isinstance(payload, dict):
            await self.send_error(400, jsonrpc.INVALID_REQUEST, "Invalid request: batches are not part of protocol 2026-07-28")
            return
        kind = dispatcher.classify(payload)
        request_id = payload.get("id") if jsonrpc.is_valid_id(payload.get("id")) else None
        if kind == "notification":
            # A 2026-07-28 host cancels by closing its stream; posted notifications are acknowledged.
            await self.send_response(202, b"")
            return
        if kind != "request" or request_id is None:
            await self.send_error(
                400, jsonrpc.INVALID_REQUEST, "Invalid request: POST one JSON-RPC request (clients do not post responses in 2026-07-28)", request_id
            )
            return
        raw_headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self.scope.get("headers", [])]
        duplicated = find_duplicated_routing_header(raw_headers) or _duplicated_param_header(raw_headers)
        verdict = (
            InboundLadderRejection(code=jsonrpc.HEADER_MISMATCH, message=f"{duplicated} header appears more than once")
            if duplicated
            else classify_inbound_request(payload, headers=self.headers_dict())
        )
        if not isinstance(verdict, InboundLadderRejection):
            verdict = _task_name_mismatch(payload, self.headers_dict()) or verdict
        if isinstance(verdict, InboundLadderRejection):
            status = jsonrpc.http_status_for({"error": {"code": verdict.code}})
            await self.send_error(status, verdict.code, verdict.message, request_id, verdict.data)
            return
        if payload["method"] == "subscriptions/listen" and not self.accepts("text/event-stream"):
            await self.send_error(406, jsonrpc.INVALID_REQUEST, "Not Acceptable: subscriptions/listen needs Accept: text/event-stream", request_id)
            return
        meta = payload["params"]["_meta"]
        stream = PostStream(self, sse_allowed=self.accepts("text/event-stream"), can_request=False, headers=[])
        ctx = HostContext.of_envelope(
            protocol_version=verdict.protocol_version, capabilities=verdict.client_capabilities, client_info=verdict.client_info, meta=meta,
            transport="streamable-http", scope=self.endpoint_scope, outbound=stream, identity=self.identity, headers=self.headers_dict(),
        )
        # In a task of its own, so a cancellation by the worker's shutdown is answered
        # `worker_shutdown` (the host's own cancellation closes the connection, which cancels this one).
        reply = await dispatcher.run_tracked(ctx, payload)
        assert reply is not None  # only a session's host cancels with notifications/cancelled
        await stream.finish([reply], status=jsonrpc.http_status_for(reply))

    # --- GET and DELETE (handshake era) ---------------------------------------------------------

    async def get_stream(self) -> None:
        if self.header("mcp-protocol-version") in MODERN_PROTOCOL_VERSIONS:
            await self.send_plain(405, "Method Not Allowed: protocol 2026-07-28 uses subscriptions/listen", [(b"allow", b"POST")])
            return
        if not self.accepts("text/event-stream"):
            await self.send_plain(406, "Not Acceptable: the GET stream is text/event-stream")
            return
        session = await self._session_from_header()
        if session is None:
            return
        try:
            with sessions.stream_slot(self.identity):
                async with stream_open("streamable-http"), SessionEvents(session.id, self.endpoint_scope, keepalive=settings.MCP_SSE_KEEPALIVE) as events:
                    await self.send_headers(status=200, headers=SSE_HEADERS)
                    await self.send_body(b": stream open\n\n", more_body=True)
                    async for message in events:
                        await self.send_body(sse_event(message) if message is not None else b": keepalive\n\n", more_body=True)
        except sessions.SessionLimitError as exc:  # raised on entering the slot only, before any byte is sent
            await self.refuse_too_many(exc)
            return
        await self.send_body(b"", more_body=False)

    async def delete(self) -> None:
        if self.header("mcp-protocol-version") in MODERN_PROTOCOL_VERSIONS:
            # 2026-07-28 has no sessions to end: like GET, DELETE is not part of that era.
            await self.send_plain(405, "Method Not Allowed: protocol 2026-07-28 uses POST only", [(b"allow", b"POST")])
            return
        try:
            session = await self._session_from_header()
            if session is None:
                return
            await sessions.session_close(session_id=session.id)
        except DatabaseError:
            # Answered 503 (base.py); the session is closed once the database is back, so a host
            # that does not retry leaves nothing open.
            if session_id := self.header("mcp-session-id"):
                sessions.session_close_later(session_id=session_id, identity=self.identity)
            raise
        await close_session_streams(session.id)
        await self.send_response(200, b"")

    async def _session_from_header(self) -> McpSession | None:
        session_id = self.header("mcp-session-id")
        if not session_id:
            await self.send_error(400, jsonrpc.INVALID_REQUEST, "Bad Request: Mcp-Session-Id header required")
            return None
        session = await sessions.session_load(session_id, self.identity)
        if session is None or session.scope != self.endpoint_scope:
            await self.send_error(404, jsonrpc.INVALID_REQUEST, "Session not found: it expired or was closed; send initialize again")
            return None
        return session


# Silence "imported but unused" for the constant kept for readers of this module.
_ = HANDSHAKE_PROTOCOL_VERSIONS


TASK_NAME_METHODS = frozenset({"tasks/get", "tasks/update", "tasks/cancel"})
"""SEP-2663: these carry `Mcp-Name: <taskId>`; the SDK's ladder checks only tools, prompts and resources."""


def _task_name_mismatch(payload: JsonDict, headers: dict[str, str]) -> InboundLadderRejection | None:
    """Refuse (-32020) a tasks-extension request whose `Mcp-Name` header names another task than its body."""
    if payload.get("method") not in TASK_NAME_METHODS or "mcp-name" not in headers:
        return None
    task_id = payload["params"].get("taskId")
    if not isinstance(task_id, str) or decode_header_value(headers["mcp-name"]) == task_id:
        return None
    return InboundLadderRejection(code=jsonrpc.HEADER_MISMATCH, message="Mcp-Name header does not match the request body's 'taskId' parameter")

