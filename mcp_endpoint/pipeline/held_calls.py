"""A 2026-07-28 host calling a handshake-era upstream that asks it something mid-call.

A handshake-era upstream sends sampling, elicitation and roots requests in the middle of a call
and waits for the answers; a 2026-07-28 host cannot be sent anything mid-request. So the
gateway holds the upstream call open and answers the host `input_required`: the upstream's
requests as `inputRequests`, and a signed `requestState` naming the held call. The host's retry
with `inputResponses` resumes it: the answers go to the upstream, and the host gets the call's
result, or the upstream's next requests as another round.

The held call lives on the worker that started it. A retry that lands on another worker is
carried there over the channel layer (`correlator.resume`). Each round waits for the host at
most FEDMCP_HOST_REQUEST_TIMEOUT, as a handshake-era host's answer does; then the upstream's
requests are answered with an error, and a later retry is told the call is gone.

Consent applies to the requests as to an `input_required` round of a 2026-07-28 upstream: the
round built here goes through `upstream_input_gate` (exchange.py) like any other.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from federation.upstream.base import JsonDict, UpstreamConnection, UpstreamError, error_reply
from mcp_endpoint import jsonrpc, request_states
from mcp_endpoint.context import HostContext
from mcp_endpoint.correlation import correlator
from mcp_endpoint.pipeline.host import REQUEST_CAPABILITY
from mcp_endpoint.pipeline.upstream_requests import UpstreamCall, max_input_requests

logger = logging.getLogger(__name__)

STATE_SALT = "fedmcp.bridge.held-call"


def _host_timeout() -> float:
    return float(settings.MCP_HOST_REQUEST_TIMEOUT)


@dataclass
class _Asked:
    """One request of the upstream's, waiting for the host's answer."""

    key: str
    method: str
    params: Any
    answer: asyncio.Future[JsonDict]


class HeldCall:
    """One upstream call held open across a 2026-07-28 host's rounds."""

    def __init__(self, ctx: HostContext, call: UpstreamCall) -> None:
        self.id = secrets.token_urlsafe(18)
        self.binding = call.binding(ctx)
        self.budget = 0.0
        """Seconds the upstream call may take in all (`held_request`)."""
        self.round = 0
        self.task: asyncio.Task[JsonDict] | None = None
        self._can_ask = {method for method, needed in REQUEST_CAPABILITY.items() if ctx.has_capability(*needed)}
        self._arrived: asyncio.Queue[_Asked] = asyncio.Queue()
        self._asked: dict[str, _Asked] = {}
        self._numbers = 0
        self._busy = asyncio.Lock()
        self._expiry: asyncio.TimerHandle | None = None

    async def on_message(self, message: JsonDict) -> JsonDict | None:
        """The upstream's messages during the call: its requests wait for the host's next retry.

        Notifications (progress, logs) have no request of the host's to travel on once the
        first round is answered, and are dropped.
        """
        method = message.get("method")
        if "id" not in message or not isinstance(method, str):
            return None
        if method not in self._can_ask:
            needed = REQUEST_CAPABILITY.get(method)
            why = f"the host did not declare the '{needed[0]}' capability" if needed else f"the host cannot be sent {method}"
            return error_reply(jsonrpc.METHOD_NOT_FOUND, why)
        if self._arrived.qsize() + len(self._asked) >= max_input_requests():
            return error_reply(jsonrpc.RATE_LIMITED, "too many requests of this call are waiting for the host already")
        self._numbers += 1
        asked = _Asked(f"upstream-{self._numbers}", method, message.get("params"), asyncio.get_running_loop().create_future())
        await self._arrived.put(asked)
        return await asked.answer

    async def next_answer(self) -> JsonDict:
        """The upstream's reply to the call, or a round of its requests for the host as an `input_required` result.

        Raises:
            UpstreamError: the upstream call failed (as `connection.request` raises).
        """
        assert self.task is not None
        arrival = asyncio.ensure_future(self._arrived.get())
        try:
            await asyncio.wait({self.task, arrival}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not arrival.done():
                arrival.cancel()
        if not arrival.done() or arrival.cancelled():
            self.end()
            return self.task.result()
        round_ = [arrival.result()]
        while not self._arrived.empty():
            round_.append(self._arrived.get_nowait())
        self._asked = {asked.key: asked for asked in round_}
        self.round += 1
        self._expiry = asyncio.get_running_loop().call_later(_host_timeout(), self._host_gone)
        state = request_states.issue(request_states.BRIDGE, {"h": self.id, "r": self.round, "b": self.binding, "t": self.budget}, salt=STATE_SALT)
        requests = {asked.key: {"method": asked.method, "params": asked.params} for asked in round_}
        return {"result": {"resultType": "input_required", "inputRequests": requests, "requestState": state}}

    async def resume(self, payload: JsonDict) -> JsonDict:
        """Give the upstream the host's answers for round `payload["round"]`; return `next_answer()`'s, or an error reply.

        Never raises: the answer may have to cross to another worker (`correlator.resume`).
        """
        if self._busy.locked() or payload.get("round") != self.round:
            return {"error": jsonrpc.InvalidParamsError("requestState is from a round that was answered already").to_error()}
        async with self._busy:
            if self._expiry is not None:
                self._expiry.cancel()
            responses = payload.get("responses") if isinstance(payload.get("responses"), dict) else {}
            for key, asked in self._asked.items():
                if asked.answer.done():
                    continue
                if key in responses:
                    asked.answer.set_result({"result": responses[key]})
                else:
                    asked.answer.set_result(error_reply(jsonrpc.INVALID_PARAMS, f"the host's retry did not answer {asked.method}"))
            self._asked = {}
            try:
                return await self.next_answer()
            except jsonrpc.JsonRpcError as exc:
                return {"error": exc.to_error()}
            except UpstreamError as exc:
                return {"error": jsonrpc.UpstreamFailedError(str(exc)).to_error()}

    def _host_gone(self) -> None:
        """The host did not come back in time: the upstream's requests get an error, and the call ends."""
        for asked in self._asked.values():
            if not asked.answer.done():
                asked.answer.set_result(error_reply(jsonrpc.UPSTREAM_ERROR, f"the host did not answer {asked.method} in time"))
        self._asked = {}
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.end()

    def end(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        _held.pop(self.id, None)
        correlator.release(self.id)


_held: dict[str, HeldCall] = {}
"""This worker's held calls, by id."""


async def held_request(ctx: HostContext, call: UpstreamCall, connection: UpstreamConnection, method: str, sent: JsonDict) -> JsonDict:
    """Send `method` to a handshake-era upstream for a 2026-07-28 host; return its reply or a first round of requests.

    Raises:
        UpstreamError: the upstream call failed before it asked anything.
    """
    held = HeldCall(ctx, call)
    # The call waits for the host's answers too, up to FEDMCP_HOST_REQUEST_TIMEOUT a round.
    held.budget = connection.peer.call_timeout + _host_timeout()
    held.task = asyncio.create_task(connection.request(method, sent, on_message=held.on_message, timeout=held.budget))
    _held[held.id] = held
    await correlator.hold(held.id, held.resume)
    try:
        return await held.next_answer()
    except BaseException:
        held.end()
        if not held.task.done():
            held.task.cancel()
        raise


def is_held_retry(ctx: HostContext, params: JsonDict) -> bool:
    """Whether this is a 2026-07-28 host's retry of a call held by `held_request`."""
    return ctx.era == "modern" and request_states.is_ours(request_states.BRIDGE, params.get("requestState"))


async def held_resume(ctx: HostContext, call: UpstreamCall, params: JsonDict) -> JsonDict:
    """Resume the held call a retry names (`is_held_retry`) with its `inputResponses`; return the upstream's next reply.

    Raises:
        InvalidParamsError: the state is forged, another caller's or call's, or `inputResponses` is not an object.
        UpstreamFailedError: the held call is gone (its worker stopped, or the host came back too late).
    """
    data = request_states.read(request_states.BRIDGE, params["requestState"], salt=STATE_SALT, max_age=_host_timeout() + 60)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), t) for k, t in (("h", str), ("r", int), ("b", str))):
        raise jsonrpc.InvalidParamsError("requestState is not one this gateway issued")
    if not hmac.compare_digest(data["b"], call.binding(ctx)):
        raise jsonrpc.InvalidParamsError("requestState does not belong to this call")
    responses = params.get("inputResponses", {})
    if not isinstance(responses, dict):
        raise jsonrpc.InvalidParamsError("inputResponses must be an object")
    payload = {"round": data["r"], "responses": responses}
    # The held call ends within its upstream's bound (`held_request`), which the state carries.
    budget = data.get("t") if isinstance(data.get("t"), (int, float)) else _host_timeout()
    answer = await correlator.resume(data["h"], payload, timeout=budget)
    if answer is None:
        raise jsonrpc.UpstreamFailedError(
            f"the call to '{call.name}' on peer '{call.peer}' this retry continues is gone (its worker stopped, or the "
            "host answered too late); call the tool again",
            {"reason": "held_call_gone"},
        )
    return answer
