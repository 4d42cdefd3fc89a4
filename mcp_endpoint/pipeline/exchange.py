"""Step 4: exchange the call with its upstream and shape the answer for the host's era.

This is where the eras meet:

* same era on both sides: the request and everything the upstream sends are passed through,
  with only names, ids and progress tokens rewritten;
* a handshake-era host and a 2026-07-28-only upstream: an `input_required` result is turned
  into server->client requests to the host, and the request is retried upstream with the
  answers (`inputResponses`, `requestState` untouched);
* a 2026-07-28 host and a handshake-era-only upstream: results gain `resultType` and cache
  hints; the upstream call is held open while the host answers what it asks mid-call, in
  `input_required` rounds (held_calls.py).

Sampling and elicitation requests from upstreams pass consent first, in every case
(upstream_requests.py; a 2026-07-28 host's input_required included). A peer gateway's consent
question is answered by home_consent.py.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from federation.credentials import peer_audience
from federation.health import CircuitOpenError, breakers
from federation.pool import pool
from federation.router import Route
from federation.upstream.base import JsonDict, UpstreamConnection, UpstreamError, UpstreamProtocolError, UpstreamUnavailableError
from federation.upstream_oauth import UpstreamAuthorizationRequiredError
from mcp_endpoint import jsonrpc
from mcp_endpoint.context import HostContext
from mcp_endpoint.pipeline.connect import connect_required_error
from mcp_endpoint.pipeline.continuation import continuation_wrap
from mcp_endpoint.pipeline.envelope import gateway_meta, upstream_params, with_fresh_assertion
from mcp_endpoint.pipeline.held_calls import held_request, held_resume, is_held_retry
from mcp_endpoint.pipeline.home_consent import peer_request
from mcp_endpoint.pipeline.upstream_requests import UpstreamCall, ask_upstreams_request, check_input_round, relay_to, upstream_input_gate
from mcp_endpoint.pipeline.values import Approval, CallSubject, Verdict

logger = logging.getLogger(__name__)

MAX_INPUT_ROUNDS = 10
SAFE_TO_RETRY = frozenset({"resources/read", "prompts/get", "completion/complete", "tasks/get", "tasks/list"})
"""Methods without side effects: a broken connection may be retried once."""
CACHEABLE_METHODS = ("resources/read", "tools/list", "resources/list", "resources/templates/list", "prompts/list")


def shape_result(ctx: HostContext, method: str, result: JsonDict) -> JsonDict:
    """Fit a result to the host's era: `resultType` and cache hints for 2026-07-28, none of them before."""
    if ctx.era == "modern":
        result.setdefault("resultType", "complete")
        if method in CACHEABLE_METHODS:
            result.setdefault("ttlMs", 0)
            result.setdefault("cacheScope", "private")
    else:
        for key in ("resultType", "ttlMs", "cacheScope"):
            result.pop(key, None)
    return result


def _raise_upstream_error(ctx: HostContext, method: str, error: Any) -> None:
    if not isinstance(error, dict):
        raise jsonrpc.UpstreamFailedError("the upstream server answered with a malformed error")
    code = error.get("code")
    if not isinstance(code, int) or isinstance(code, bool):
        code = jsonrpc.UPSTREAM_ERROR
    if method == "resources/read" and code in (jsonrpc.RESOURCE_NOT_FOUND_LEGACY, jsonrpc.INVALID_PARAMS):
        # "Resource not found" changed code between the eras; answer in the host's.
        code = jsonrpc.INVALID_PARAMS if ctx.era == "modern" else jsonrpc.RESOURCE_NOT_FOUND_LEGACY
    message = error.get("message") if isinstance(error.get("message"), str) else "upstream error"
    raise jsonrpc.JsonRpcError(message, error.get("data"), code=code)


async def _bridge_input_required(
    ctx: HostContext, connection: UpstreamConnection, call: UpstreamCall, params: JsonDict, result: JsonDict, relay: Any
) -> JsonDict:
    """Answer a 2026-07-28 upstream's input requests by asking a handshake-era host.

    A request consent refuses fails the call (-32017/-32018): inputResponses carry results only.
    """
    method = call.method
    for _ in range(MAX_INPUT_ROUNDS):
        if result.get("resultType") != "input_required":
            return result
        check_input_round(call.peer, call.name, result.get("inputRequests"))
        responses: JsonDict = {}
        for key, request in (result.get("inputRequests") or {}).items():
            if not isinstance(request, dict):
                continue
            reply = await ask_upstreams_request(ctx, call, request.get("method", ""), request.get("params"))
            if "error" in reply:
                _raise_upstream_error(ctx, method, reply["error"])
            responses[key] = reply["result"]
        retry = with_fresh_assertion(ctx, connection.peer, params)
        retry["inputResponses"] = responses
        if "requestState" in result:
            retry["requestState"] = result["requestState"]
        reply = await connection.request(method, retry, on_message=relay)
        if "error" in reply:
            _raise_upstream_error(ctx, method, reply["error"])
        result = reply.get("result") or {}
    raise jsonrpc.UpstreamFailedError("the upstream kept asking for input; giving up")


async def _attempt(ctx: HostContext, route: Route, subject: CallSubject, params: JsonDict, hops: list[str], approval: Approval | None) -> Verdict:
    """One attempt: send the request on a warm connection; return its result (`answer`), or a refusal on the way.

    `approval`: the user approved this call, so a 2026-07-28 host's retry of the upstream's
    input_required must not be asked about again; its state says so (`continuation_wrap`).
    """
    method = subject.method
    identity = ctx.identity
    # Only a gateway this one believes is taken at its word about what it relays (identity/trust/gateways.py).
    trusted = route.peer.trusted_gateway
    origin = peer_audience(route.peer.url) if trusted else ""
    call = UpstreamCall(route.peer.name, method, subject.name, trusted, origin, arguments=subject.arguments, call_id=secrets.token_urlsafe(12))
    relay = relay_to(ctx, call)
    connection: UpstreamConnection | None = None
    try:
        if is_held_retry(ctx, params):
            # A 2026-07-28 host answering what a handshake-era upstream asked mid-call (held_calls.py).
            asked = Verdict(answer=await held_resume(ctx, call, params))
        else:
            connection = await pool.get(
                route.peer, prefer=ctx.era, identity_key=identity.subject_key() if identity is not None else "",
                user_id=identity.user_id if identity is not None else None,
            )
            if method == "tools/call":
                connection.declare_tool_headers(route.upstream_name, route.param_headers)
            sent = upstream_params(ctx, connection, params, gateway_meta(ctx, route.peer, hops) if route.peer.is_gateway else None)
            if ctx.era == "modern" and connection.era == "legacy" and not route.peer.is_gateway:
                # What the upstream asks mid-call comes back to the host as input_required rounds.
                asked = Verdict(answer=await held_request(ctx, call, connection, method, sent))
            else:
                # A peer gateway may first ask for the user's consent at their home (home_consent.py).
                asked = await peer_request(ctx, connection, method, sent, relay)
    except UpstreamAuthorizationRequiredError as exc:
        # The user's token at a per-user OAuth peer is gone or could not be renewed.
        raise connect_required_error(ctx, route.peer.name, exc.reason) from exc
    if asked.refusal is not None:
        return asked
    reply = asked.answer or {}
    if "error" in reply:
        _raise_upstream_error(ctx, method, reply["error"])
    result = reply.get("result")
    if not isinstance(result, dict):
        raise UpstreamProtocolError(f"peer '{route.peer.name}' answered {method} without a result")
    if ctx.era == "legacy" and connection is not None and connection.era == "modern":
        result = await _bridge_input_required(ctx, connection, call, sent, result, relay)
    elif ctx.era == "modern":
        if approval is not None:
            # Before the gate below, which may hold this very result until its requests are approved.
            result = continuation_wrap(approval, result)
        gated = await upstream_input_gate(ctx, call, result)
        if gated.refusal is not None:
            return Verdict.refuse(gated.refusal, gated.word)
        result = gated.answer  # type: ignore[assignment]
    return Verdict(word=asked.word, answer=result)


async def exchange(ctx: HostContext, route: Route, subject: CallSubject, params: JsonDict, hops: list[str], approval: Approval | None) -> Verdict:
    """Send the call to the route's peer; return the result shaped for the host's era (`answer`) or a refusal.

    The verdict's word is a decision made on the way: our user's answer to a peer gateway's
    consent question (home_consent.py), or the refusal of an upstream's input request.
    `approval` as for `_attempt`.

    Transport failures count against the peer's circuit breaker. Methods without side effects
    are retried once on a broken connection; tools/call never is, because the upstream may
    have run it.

    Raises:
        JsonRpcError: the upstream answered an error, or could not be used.
    """
    method = subject.method
    breaker = breakers.for_peer(route.peer)
    attempts = 2 if method in SAFE_TO_RETRY else 1
    for attempt in range(1, attempts + 1):
        try:
            breaker.before_call(route.peer.name)
        except CircuitOpenError as exc:
            raise jsonrpc.UpstreamFailedError(str(exc)) from exc
        try:
            verdict = await _attempt(ctx, route, subject, params, hops, approval)
        except jsonrpc.JsonRpcError:
            breaker.record_success()  # the upstream answered: its transport is healthy
            raise
        except UpstreamUnavailableError as exc:
            breaker.record_failure(exc)
            if attempt < attempts:
                logger.info("peer %s: retrying %s after: %s", route.peer.name, method, exc)
                continue
            raise jsonrpc.UpstreamFailedError(str(exc)) from exc
        except UpstreamError as exc:
            breaker.record_failure(exc)
            raise jsonrpc.UpstreamFailedError(str(exc)) from exc
        breaker.record_success()
        if verdict.refusal is not None:
            return verdict
        return Verdict(word=verdict.word, answer=shape_result(ctx, method, verdict.answer))  # type: ignore[arg-type]
    raise AssertionError("unreachable")  # pragma: no cover
