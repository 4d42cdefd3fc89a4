"""Messages addressed to a host session outside any request, from any worker.

Every transport that keeps a stream open for a session (the Streamable HTTP GET stream, a
WebSocket, a legacy SSE stream) reads `SessionEvents`: messages sent to the session's group
by whichever worker produced them, plus catalog and resource events turned into notifications
for that session.

A legacy SSE stream and a WebSocket are their session's only stream, opened with it: while one
is open here, messages this process produces for its session go straight to it, without the
channel layer (no copy of the message, no task per message, and on Redis no round trip).
Other workers still reach it through the session's group.

A legacy SSE POST is answered 202 and its reply travels on the stream later. When the POST
landed on another worker, that worker announces the requests it accepted (`mcp.accepted`) before
its 202 (a channel layer that cannot take the announcement refuses the POST: 503), and renews
them (`mcp.renewed`) while it works on them. The stream's `SessionEvents` keeps them until their
reply passes; one whose lease runs out without a reply (its worker was killed, or the layer
failed under it) is answered here with -32603 `worker_lost`, so no request goes unanswered.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from channels.layers import get_channel_layer
from django.conf import settings

from federation.events import CATALOG_GROUP, RESOURCES_GROUP
from fedmcp_lib.json_types import JsonDict
from fedmcp_lib.layers import Memberships
from mcp_endpoint import jsonrpc
from mcp_endpoint.handlers import host_notifications_for
from mcp_endpoint.sessions import session_group, subscribed_uris

logger = logging.getLogger(__name__)

INBOX_CAPACITY = 1000
"""Events waiting for one stream, as the Redis layer's channel capacity; more are dropped (and logged)."""

RENEWAL_RETRY_SECONDS = 1.0
"""After a failed or unfinished membership renewal, seconds until the next attempt."""

LAYER_RETRY_SECONDS = 1.0
"""After a failed read of the channel layer (Redis unreachable), seconds until the next attempt."""

_held_here: dict[str, SessionEvents] = {}
"""Session id -> its only stream, where this process holds it (legacy SSE, WebSocket)."""

WORKER_LOST_REASON = "worker_lost"
"""`error.data.reason` of a request whose worker stopped (or lost the channel layer) before answering."""


def held_here(session_id: str) -> bool:
    """Whether this process holds the session's only stream (replies need no channel layer)."""
    return session_id in _held_here


def worker_lost(request_id: Any) -> JsonDict:
    """The error a host gets for an accepted request whose worker can no longer answer it."""
    return jsonrpc.error_response(request_id, {
        "code": jsonrpc.INTERNAL_ERROR,
        "message": "The gateway worker handling this request stopped before answering; send it again",
        "data": {"reason": WORKER_LOST_REASON},
    })


async def announce_accepted(session_id: str, request_ids: list[Any], *, renewal: bool = False) -> None:
    """Tell the session's stream, wherever it is, that these requests were accepted elsewhere (or are still in work).

    Raises:
        Exception: as the channel layer raised it (Redis unreachable).
    """
    kind = "mcp.renewed" if renewal else "mcp.accepted"
    await get_channel_layer().group_send(session_group(session_id), {"type": kind, "ids": request_ids, "lease": settings.MCP_SSE_ACCEPTED_LEASE})


async def announce_settled(session_id: str, request_ids: list[Any]) -> None:
    """Tell the stream that these accepted requests end without a reply (the host cancelled them)."""
    await get_channel_layer().group_send(session_group(session_id), {"type": "mcp.settled", "ids": request_ids})


def _request_key(request_id: Any) -> str:
    return json.dumps(request_id)


async def send_to_session(session_id: str, message: JsonDict) -> None:
    """Deliver a message to the stream of a session, wherever it is held."""
    await _to_session(session_id, {"type": "mcp.message", "message": message})


async def close_session_streams(session_id: str) -> None:
    await _to_session(session_id, {"type": "mcp.close"})


async def _to_session(session_id: str, event: JsonDict) -> None:
    events = _held_here.get(session_id)
    if events is not None and events.deliver(event):
        return
    await get_channel_layer().group_send(session_group(session_id), event)


class SessionGroupOutbound:
    """Outbound for transports whose replies travel on the session's stream (legacy SSE)."""

    can_request = True

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id

    async def send(self, message: JsonDict) -> None:
        await send_to_session(self.session_id, message)


_KEEPALIVE: JsonDict = {"type": "keepalive"}


class SessionEvents:
    """Messages for one session; join (``async with``) before telling the host where to write.

    Iterating yields messages, and None after every `keepalive` seconds of silence. `sole`
    marks the session's only stream (legacy SSE, WebSocket): this process then delivers to it
    directly (`send_to_session`).

    One task per stream reads the channel layer into an inbox, with one receive pending for
    the stream's life (retried if the layer fails): the in-memory layer scans every channel and group on each receive(), so
    restarting it every `keepalive` seconds in every open stream costs O(streams^2) CPU (0.39
    of a core for 2,000 idle WebSockets, 0.01 without; see docs/PERFORMANCE.md), and on
    channels-redis a cancelled receive may lose a message. One timer per stream sends the
    keepalives and renews the group memberships before `group_expiry` drops them.
    """

    def __init__(self, session_id: str, scope: str, *, keepalive: float, sole: bool = False) -> None:
        self.session_id = session_id
        self.scope = scope
        self.keepalive = keepalive
        self.sole = sole
        self.groups = (session_group(session_id), CATALOG_GROUP, RESOURCES_GROUP)
        self.layer = get_channel_layer()
        self.channel = ""
        self._inbox: deque[JsonDict] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._renewal: asyncio.Task[None] | None = None
        self._heard_at = 0.0
        self._accepted: dict[str, tuple[Any, float]] = {}
        """Requests other workers accepted for this stream: key -> (id, loop time their lease ends)."""
        self._lost: dict[str, float] = {}
        """Requests answered here as `worker_lost` -> until when (loop time) a reply arriving after all is dropped."""

    async def __aenter__(self) -> SessionEvents:
        # The default prefix on purpose: channels-redis reads all of a process's channels from
        # one Redis key per prefix under one lock, so a custom prefix waits (up to its 5 s
        # BZPOPMIN timeout, again and again) while another channel of the process holds the lock.
        self.channel = await self.layer.new_channel()
        self.memberships = Memberships(self.layer, self.channel, self.groups)
        await self.memberships.join()
        self._loop = loop = asyncio.get_running_loop()
        self._heard_at = loop.time()
        self._reader = loop.create_task(self._read_layer())
        self._schedule_tick()
        if self.sole:
            _held_here[self.session_id] = self
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if _held_here.get(self.session_id) is self:
            del _held_here[self.session_id]
        for pending in (self._timer, self._reader, self._renewal):
            if pending is not None:
                pending.cancel()
        await self.memberships.leave()

    # --- the inbox -------------------------------------------------------------------------------

    def deliver(self, event: JsonDict) -> bool:
        """Queue an event produced in this process; False if it must travel on the layer instead."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return False
        if running is not self._loop:
            return False
        self._put(event)
        return True

    def _put(self, item: JsonDict) -> None:
        if item is not _KEEPALIVE:
            self._heard_at = self._loop.time()  # type: ignore[union-attr]
        if len(self._inbox) >= INBOX_CAPACITY:
            logger.warning("session %s: %d events wait for its stream; dropping one", self.session_id, len(self._inbox))
            return
        self._inbox.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _next(self) -> JsonDict:
        inbox = self._inbox
        while not inbox:
            self._waiter = self._loop.create_future()  # type: ignore[union-attr]
            try:
                await self._waiter
            finally:
                self._waiter = None
        return inbox.popleft()

    async def _read_layer(self) -> None:
        # A layer that fails (Redis restarting, unreachable) is read again every
        # LAYER_RETRY_SECONDS; the stream stays open meanwhile, with its keepalives and what this
        # process sends it, and /readyz reports the layer. Its groups are joined again first: a
        # restarted Redis has forgotten them.
        failures = 0
        while True:
            try:
                if failures:
                    await self.memberships.join()
                event = await self.layer.receive(self.channel)
            except asyncio.CancelledError:
                raise
            except Exception:
                failures += 1
                if failures == 1:
                    logger.warning("session %s: reading the channel layer failed; retrying every %gs", self.session_id, LAYER_RETRY_SECONDS, exc_info=True)
                await asyncio.sleep(LAYER_RETRY_SECONDS)
                continue
            if failures:
                logger.warning("session %s: the channel layer is readable again after %d failed reads", self.session_id, failures)
                failures = 0
            self._put(event)

    # --- keepalives and renewals -----------------------------------------------------------------

    def _schedule_tick(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        renew_in = self.memberships.renew_at - time.monotonic()
        if renew_in <= 0:
            renew_in = RENEWAL_RETRY_SECONDS  # a renewal is under way, or the last one failed
        at = min(self._heard_at + self.keepalive, now + renew_in)
        if self._accepted:
            at = min(at, min(deadline for _, deadline in self._accepted.values()))
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(at, self._tick)

    def _tick(self) -> None:
        now = self._loop.time()  # type: ignore[union-attr]
        for key, (request_id, deadline) in list(self._accepted.items()):
            if deadline <= now:
                del self._accepted[key]
                self._lost[key] = now + 2 * settings.MCP_SSE_ACCEPTED_LEASE
                logger.warning("session %s: request %s accepted by another worker got no reply in time; answering worker_lost", self.session_id, key)
                self._put({"type": "mcp.message", "message": worker_lost(request_id), "lost": True})
        for key, until in list(self._lost.items()):
            if until <= now:
                del self._lost[key]
        if now - self._heard_at >= self.keepalive:
            self._heard_at = now
            self._put(_KEEPALIVE)
        if time.monotonic() >= self.memberships.renew_at and (self._renewal is None or self._renewal.done()):
            # A stream may stay open for days; its memberships must outlive group_expiry.
            self._renewal = self._loop.create_task(self.memberships.renew_if_due())  # type: ignore[union-attr]
            self._renewal.add_done_callback(_log_renewal_failure)
        self._schedule_tick()

    # --- iteration -------------------------------------------------------------------------------

    async def __aiter__(self) -> AsyncIterator[JsonDict | None]:
        while True:
            event = await self._next()
            if event is _KEEPALIVE:
                yield None
                continue
            kind = event.get("type")
            if kind == "mcp.message":
                message = event["message"]
                if (self._accepted or self._lost) and not event.get("lost") and self._is_late(message):
                    continue
                yield message
            elif kind in ("mcp.accepted", "mcp.renewed", "mcp.settled"):
                self._track(kind, event)
            elif kind == "mcp.close":
                return
            elif kind == "catalog.changed":
                for note in host_notifications_for(self.scope, event):
                    yield note
            elif kind == "resource.updated" and (not self.scope or event.get("peer") == self.scope):
                uris = await subscribed_uris(session_id=self.session_id, peer_name=event["peer"], upstream_uri=event["uri"], user_id=event.get("user"))
                for uri in uris:
                    yield jsonrpc.notification("notifications/resources/updated", {"uri": uri})


    # --- requests accepted by other workers ------------------------------------------------------

    def _track(self, kind: str, event: JsonDict) -> None:
        now = self._loop.time()  # type: ignore[union-attr]
        for request_id in event.get("ids", ()):
            key = _request_key(request_id)
            if kind == "mcp.settled":
                self._accepted.pop(key, None)
            elif kind == "mcp.accepted":
                self._lost.pop(key, None)  # the host reused the id: this is a new request
                self._accepted[key] = (request_id, now + float(event.get("lease", settings.MCP_SSE_ACCEPTED_LEASE)))
            elif key in self._accepted:
                # A renewal only extends: one that crossed the reply must not bring the request back.
                self._accepted[key] = (request_id, now + float(event.get("lease", settings.MCP_SSE_ACCEPTED_LEASE)))
        self._schedule_tick()

    def _is_late(self, message: Any) -> bool:
        """Stop tracking the request `message` answers; True if it was already answered `worker_lost`."""
        if not isinstance(message, dict) or "method" in message or "id" not in message:
            return False
        key = _request_key(message["id"])
        self._accepted.pop(key, None)
        until = self._lost.pop(key, None)
        if until is not None and until > self._loop.time():  # type: ignore[union-attr]
            logger.warning("session %s: dropping the late reply to request %s (answered worker_lost already)", self.session_id, key)
            return True
        return False


def _log_renewal_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("renewing a stream's channel-layer memberships failed; retrying", exc_info=task.exception())
