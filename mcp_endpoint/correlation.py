"""In-flight correlation that works across workers.

Three things must find their way to the worker that holds the waiting task:

* a host's answer to a server->client request (sampling, elicitation, roots),
* a host's `notifications/cancelled` for a request it sent earlier, and
* a 2026-07-28 host's retry of a call whose upstream call is held open on one worker
  (`hold` / `resume`: mcp_endpoint/pipeline/held_calls.py).

The answer or the cancellation may arrive at any worker. Each worker first looks in its own
table of waiting tasks (the common, single-process case, no round trip); if the task is not
there it broadcasts on the channel layer, and the worker that has it acts. Each worker
listens on one channel joined to `WORKERS_GROUP`, so a request in flight costs nothing on the
channel layer until something has to cross workers.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from channels.layers import get_channel_layer

from fedmcp_lib.json_types import JsonDict
from fedmcp_lib.layers import listen
from mcp_endpoint import jsonrpc

logger = logging.getLogger(__name__)

WORKERS_GROUP = "fedmcp.workers"
RESUME_ACK_TIMEOUT = 2.0
"""Seconds a worker waits for the worker holding a call to say it has it."""

Resume = Callable[[JsonDict], Awaitable[JsonDict]]


class _Correlator:
    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[JsonDict]] = {}
        self._inflight: dict[tuple[str, str], asyncio.Task[Any]] = {}
        self._held: dict[str, Resume] = {}
        self._host_cancelled: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()
        self._listener: asyncio.Task[None] | None = None
        self._listener_loop: asyncio.AbstractEventLoop | None = None
        self._joined = asyncio.Event()

    async def _ensure_listener(self) -> None:
        loop = asyncio.get_running_loop()
        if self._listener is not None and self._listener_loop is loop and not self._listener.done():
            await self._joined.wait()
            return
        layer = get_channel_layer()
        if layer is None:
            return
        self._joined = asyncio.Event()
        self._listener_loop = loop
        self._listener = asyncio.create_task(self._listen(layer))
        await self._joined.wait()

    async def _listen(self, layer: Any) -> None:
        # The membership is renewed while the worker lives, messages or not.
        await listen(layer, (WORKERS_GROUP,), self._on_message, what="worker correlation", joined=self._joined)

    async def _on_message(self, message: JsonDict) -> None:
        kind = message.get("type")
        if kind == "correlation.reply":
            self._resolve_local(message["key"], message["message"])
        elif kind == "correlation.cancel":
            self._cancel_local(message["session"], message["request"])
        elif kind == "correlation.resume" and message.get("key") in self._held:
            asyncio.create_task(self._resume_for(message))

    async def _broadcast(self, message: JsonDict) -> None:
        layer = get_channel_layer()
        if layer is not None:
            await layer.group_send(WORKERS_GROUP, message)

    # --- server->client requests -------------------------------------------------------------

    def new_request_id(self) -> str:
        return f"fedmcp-{uuid.uuid4().hex}"

    async def expect_reply(self, key: str) -> asyncio.Future[JsonDict]:
        """Register interest in the host's reply to request `key`; await the returned future."""
        await self._ensure_listener()
        future: asyncio.Future[JsonDict] = asyncio.get_running_loop().create_future()
        self._waiting[key] = future
        return future

    def forget_reply(self, key: str) -> None:
        self._waiting.pop(key, None)

    def _resolve_local(self, key: str, message: JsonDict) -> bool:
        future = self._waiting.pop(key, None)
        if future is None or future.done():
            return False
        future.set_result(message)
        return True

    async def deliver_reply(self, message: JsonDict) -> None:
        """Hand a host's JSON-RPC response to whichever worker asked the question."""
        key = message.get("id")
        if not isinstance(key, str) or not key.startswith("fedmcp-"):
            logger.debug("dropping a response to an unknown request id %r", key)
            return
        if not self._resolve_local(key, message):
            await self._broadcast({"type": "correlation.reply", "key": key, "message": message})

    # --- cancellation ------------------------------------------------------------------------

    async def track(self, session_id: str, request_id: Any, task: asyncio.Task[Any]) -> None:
        """Remember a host request in flight so a later notifications/cancelled can stop it."""
        await self._ensure_listener()
        key = (session_id, repr(request_id))
        self._inflight[key] = task
        task.add_done_callback(lambda _t: self._inflight.pop(key, None))

    def _cancel_local(self, session_id: str, request_repr: str) -> bool:
        task = self._inflight.pop((session_id, request_repr), None)
        if task is None:
            return False
        self._host_cancelled.add(task)
        task.cancel()
        return True

    def cancelled_by_host(self, task: asyncio.Task[Any] | None) -> bool:
        """Whether `task` was cancelled by its host's notifications/cancelled (not by a shutdown)."""
        return task is not None and task in self._host_cancelled

    async def cancel(self, session_id: str, request_id: Any) -> None:
        """Cancel the host request `request_id` of `session_id`, wherever it runs."""
        if not self._cancel_local(session_id, repr(request_id)):
            await self._broadcast({"type": "correlation.cancel", "session": session_id, "request": repr(request_id)})

    # --- held calls ------------------------------------------------------------------------------

    async def hold(self, key: str, resume: Resume) -> None:
        """Say this worker holds `key`: a `resume(key, payload)` from any worker runs `resume(payload)` here."""
        await self._ensure_listener()
        self._held[key] = resume

    def release(self, key: str) -> None:
        self._held.pop(key, None)

    async def resume(self, key: str, payload: JsonDict, timeout: float) -> JsonDict | None:
        """Run the holder's `resume(payload)` for `key`, here or on the worker that holds it; return its answer.

        None when no worker says it holds `key` within RESUME_ACK_TIMEOUT (its worker stopped, or
        it expired), or the holder did not answer within `timeout`.
        """
        local = self._held.get(key)
        if local is not None:
            return await local(payload)
        reply_key = self.new_request_id()
        ack = await self.expect_reply(f"{reply_key}-ack")
        answer = await self.expect_reply(reply_key)
        try:
            await self._broadcast({"type": "correlation.resume", "key": key, "payload": payload, "reply": reply_key})
            if get_channel_layer() is None:
                return None
            await asyncio.wait_for(ack, RESUME_ACK_TIMEOUT)
            return await asyncio.wait_for(answer, timeout)
        except TimeoutError:
            return None
        finally:
            self.forget_reply(f"{reply_key}-ack")
            self.forget_reply(reply_key)

    async def _resume_for(self, message: JsonDict) -> None:
        """On the worker holding `message["key"]`: acknowledge, resume it, send the answer back."""
        resume = self._held.get(message["key"])
        if resume is None:
            return
        reply = message.get("reply")
        await self._broadcast({"type": "correlation.reply", "key": f"{reply}-ack", "message": {}})
        try:
            answer = await resume(message.get("payload") or {})
        except Exception:
            logger.exception("resuming held call %s failed", message["key"])
            answer = {"error": jsonrpc.JsonRpcError("the gateway failed to resume the held call").to_error()}
        await self._broadcast({"type": "correlation.reply", "key": reply, "message": answer})


correlator = _Correlator()
