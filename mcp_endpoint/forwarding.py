"""Forward one host request to an upstream and relay what comes back.

This is where the eras meet:

* same era on both sides: the request and everything the upstream sends are passed through,
  with only names, ids and progress tokens rewritten;
* a handshake-era host and a 2026-07-28-only upstream: an `input_required` result is turned
  into server->client requests to the host, and the request is retried upstream with the
  answers (`inputResponses`, `requestState` untouched);
* a 2026-07-28 host and a handshake-era-only upstream: results gain `resultType` and cache
  hints; server->client requests from the upstream are refused, because a 2026-07-28 host
  cannot be asked mid-request.

Sampling and elicitation requests from upstreams pass consent first, in every case
(mcp_endpoint/consent_gate.py; a 2026-07-28 host's input_required included).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any

from django.conf import settings

from federation import ratelimit
from federation.credentials import peer_audience
from federation.health import CircuitOpenError, breakers
from federation.pool import pool
from federation.router import Route
from federation.upstream.base import (
    JsonDict,
    PeerConfig,
    UpstreamConnection,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamUnavailableError,
    error_reply,
    modern_meta,
)
from fedmcp_site import metrics, observability
from identity.audit import audit_record
from identity.signing import AssertionConfigError, assertion_create
from identity.trust import ASSERTION_META_KEY, assertion_subject
from identity.upstream_oauth import UpstreamAuthorizationRequiredError
from mcp_endpoint import consent_relay, jsonrpc
from mcp_endpoint.connect_gate import connect_gate, connect_required_error
from mcp_endpoint.consent_gate import (
    Approval,
    UpstreamCall,
    check_input_round,
    consent_gate,
    continuation_wrap,
    max_input_requests,
    upstream_input_gate,
    upstream_input_resume,
    upstream_request_relay,
)
from mcp_endpoint.consent_relay import peer_request
from mcp_endpoint.context import HostContext
from mcp_endpoint.correlation import correlator

logger = logging.getLogger(__name__)

MODERN_META_PREFIX = "io.modelcontextprotocol/"
FEDMCP_META_PREFIX = "io.fedmcp/"
HOPS_META_KEY = "io.fedmcp/hops"
"""The gateways a request has passed through, oldest first; carried only between gateways."""
MAX_INPUT_ROUNDS = 10
# Which client capability a server->client request needs from the host.
REQUEST_CAPABILITY = {
    "sampling/createMessage": ("sampling",),
    "elicitation/create": ("elicitation",),
    "roots/list": ("roots",),
}
SAFE_TO_RETRY = frozenset({"resources/read", "prompts/get", "completion/complete"})
"""Methods without side effects: a broken connection may be retried once."""
ARGUMENT_METHODS = frozenset({"tools/call", "prompts/get"})
"""Calls whose arguments are part of what consent decides, so of what the audit row records (as a digest)."""
CACHEABLE_METHODS = ("resources/read", "tools/list", "resources/list", "resources/templates/list", "prompts/list")


def incoming_hops(ctx: HostContext) -> list[str]:
    """Return the gateways this request came through (empty from hosts), refusing loops and long chains.

    Only a trusted peer gateway's hop record counts: identity/trust.py accepts it as part of
    the gateway's verified assertion (whose `via` must equal `_meta["io.fedmcp/hops"]`) and
    puts it on the acting identity. What anyone else sends under that key is ignored, so a
    host can neither fake a loop nor tell peer gateways about gateways the call never passed.

    Raises:
        FederationLoopError: this gateway is already on the path, or the path is too long.
    """
    hops = list(ctx.identity.via) if ctx.identity is not None else []
    own = settings.FEDMCP_GATEWAY_NAME
    if own in hops:
        path = " -> ".join([*hops, own])
        raise jsonrpc.FederationLoopError(f"Federation loop detected: {path}; the request was refused", {"hops": [*hops, own]})
    if len(hops) >= settings.FEDERATION_MAX_HOPS:
        raise jsonrpc.FederationLoopError(
            f"Federation path too long ({len(hops)} gateways, limit {settings.FEDERATION_MAX_HOPS})", {"hops": hops}
        )
    return hops


def gateway_meta(ctx: HostContext, peer: PeerConfig, hops: list[str]) -> JsonDict:
    """Return fedmcp's own `_meta` keys for a request to a peer gateway.

    The hop record extended with this gateway, and, when this gateway holds credentials at
    the peer, a fresh signed assertion of the acting user (identity/signing.py): the peer
    learns who acts from it, never from the host's token, which stays here.

    Raises:
        UpstreamFailedError: the acting user cannot be asserted (nobody to name, or no issuer).
    """
    via = [*hops, settings.FEDMCP_GATEWAY_NAME]
    meta: JsonDict = {HOPS_META_KEY: via}
    if peer.client_id:
        subject = assertion_subject(ctx.identity) if ctx.identity is not None else ""
        if not subject:
            raise jsonrpc.UpstreamFailedError(f"peer '{peer.name}' needs to know the acting user, and this call has none")
        try:
            meta[ASSERTION_META_KEY] = assertion_create(
                subject=subject, audience=peer_audience(peer.url), client_id=ctx.identity.client_id, via=via
            )
        except AssertionConfigError as exc:
            raise jsonrpc.UpstreamFailedError(str(exc)) from exc
    return meta


def upstream_params(ctx: HostContext, connection: UpstreamConnection, params: JsonDict, fedmcp_meta: JsonDict | None = None) -> JsonDict:
    """Return the params to send upstream: the host's, with `_meta` fitted to the upstream's era.

    `fedmcp_meta` (`gateway_meta`) is added only for peer gateways; other upstreams never see
    fedmcp's own keys, and whatever a host put under them is dropped.
    """
    params = dict(params)
    host_meta = params.pop("_meta", None)
    meta: JsonDict = {k: v for k, v in host_meta.items() if not k.startswith(FEDMCP_META_PREFIX)} if isinstance(host_meta, dict) else {}
    if fedmcp_meta:
        meta.update(fedmcp_meta)
        if request_id := observability.current_request_id():
            # The far gateway logs this request under the same id.
            meta[observability.REQUEST_ID_META_KEY] = request_id
    if connection.era == "modern":
        if ctx.era == "legacy":
            # Bridged: the envelope speaks for the host, from what its session declared. A
            # handshake-era host gets log messages until it raises the threshold with
            # logging/setLevel (see HostContext.wants_log), so opt in at the lowest level.
            meta[f"{MODERN_META_PREFIX}logLevel"] = ctx.log_level or "debug"
            meta = modern_meta(ctx.client_capabilities, meta)
        else:
            meta = modern_meta(ctx.client_capabilities, meta)
    else:
        meta = {k: v for k, v in meta.items() if not k.startswith(MODERN_META_PREFIX)}
    if meta:
        params["_meta"] = meta
    return params


def host_refusal(ctx: HostContext, method: str) -> JsonDict | None:
    """Return the error reply when the host cannot be sent `method` now, else None."""
    needed = REQUEST_CAPABILITY.get(method)
    if needed is not None and not ctx.has_capability(*needed):
        return error_reply(jsonrpc.METHOD_NOT_FOUND, f"the host did not declare the '{needed[0]}' capability")
    if ctx.era != "legacy" or not ctx.outbound.can_request:
        return error_reply(jsonrpc.METHOD_NOT_FOUND, f"the host cannot receive {method} requests on this exchange")
    return None


async def ask_upstreams_request(ctx: HostContext, call: UpstreamCall, method: str, params: Any) -> JsonDict:
    """Relay a server->client request an upstream sent during `call`, consent permitting.

    What the host could not receive anyway is refused without asking anyone.
    """
    refusal = host_refusal(ctx, method)
    if refusal is not None:
        return refusal
    return await upstream_request_relay(ctx, call, method, params, ask_host)


async def ask_host(ctx: HostContext, method: str, params: Any) -> JsonDict:
    """Send a server->client request to the host and return its reply ({"result"} or {"error"}).

    Only possible in the handshake era on an exchange that can carry requests, and only for
    capabilities the host declared.
    """
    refusal = host_refusal(ctx, method)
    if refusal is not None:
        return refusal
    key = correlator.new_request_id()
    future = await correlator.expect_reply(key)
    try:
        message = {"jsonrpc": "2.0", "id": key, "method": method}
        if params is not None:
            message["params"] = params
        await ctx.outbound.send(message)
        reply = await asyncio.wait_for(future, settings.MCP_HOST_REQUEST_TIMEOUT)
    except TimeoutError:
        return error_reply(jsonrpc.UPSTREAM_ERROR, f"the host did not answer {method} in time")
    finally:
        correlator.forget_reply(key)
    if "error" in reply:
        return {"error": reply["error"]}
    return {"result": reply.get("result", {})}


def relay_to(ctx: HostContext, call: UpstreamCall) -> Any:
    """Return the on_message callback that relays upstream messages of one request to the host.

    At most FEDMCP_MAX_INPUT_REQUESTS_PER_ROUND of the upstream's server->client requests are
    relayed at once; the upstream gets a -32016 error for any beyond, which nobody is asked about.
    """
    in_flight = 0
    limit = max_input_requests()

    async def relay(message: JsonDict) -> JsonDict | None:
        nonlocal in_flight
        method = message.get("method")
        if "id" in message:
            if in_flight >= limit:
                logger.warning("peer %s sent more than %d requests at once during %s; refused the excess", call.peer, limit, call.name)
                return error_reply(
                    jsonrpc.RATE_LIMITED,
                    f"{limit} requests of this call are waiting already; this gateway relays at most {limit} at once "
                    "(FEDMCP_MAX_INPUT_REQUESTS_PER_ROUND)",
                )
            in_flight += 1
            try:
                return await ask_upstreams_request(ctx, call, method, message.get("params"))  # type: ignore[arg-type]
            finally:
                in_flight -= 1
        if method == "notifications/progress":
            await ctx.outbound.send(message)
        elif method == "notifications/message":
            level = (message.get("params") or {}).get("level", "info")
            if ctx.wants_log(level):
                await ctx.outbound.send(message)
        return None

    return relay


def _shape_result(ctx: HostContext, method: str, result: JsonDict) -> JsonDict:
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
        retry = _with_fresh_assertion(ctx, connection.peer, params)
        retry["inputResponses"] = responses
        if "requestState" in result:
            retry["requestState"] = result["requestState"]
        reply = await connection.request(method, retry, on_message=relay)
        if "error" in reply:
            _raise_upstream_error(ctx, method, reply["error"])
        result = reply.get("result") or {}
    raise jsonrpc.UpstreamFailedError("the upstream kept asking for input; giving up")


def _with_fresh_assertion(ctx: HostContext, peer: PeerConfig, params: JsonDict) -> JsonDict:
    """Copy `params` for a resend; an assertion is single-use, so a resend gets a new one."""
    params = dict(params)
    meta = params.get("_meta")
    if isinstance(meta, dict) and ASSERTION_META_KEY in meta:
        hops = meta.get(HOPS_META_KEY) or []
        params["_meta"] = {**meta, **gateway_meta(ctx, peer, hops[:-1])}
    return params


def identity_key(ctx: HostContext) -> str:
    """A stable key for the acting user (for peers that run one process per identity)."""
    identity = ctx.identity
    if identity is None:
        return ""
    if identity.federated_issuer:
        return f"{identity.federated_issuer}#{identity.federated_subject}"
    return f"user:{identity.user_id}" if identity.user_id is not None else f"client:{identity.client_id}"


async def _exchange(ctx: HostContext, route: Route, method: str, params: JsonDict, hops: list[str], approval: Approval | None) -> JsonDict:
    """One attempt: send the request on a warm connection and return its result.

    `approval`: the user approved this call, so a 2026-07-28 host's retry of the upstream's
    input_required must not be asked about again; its state says so (`continuation_wrap`).
    """
    user_id = ctx.identity.user_id if ctx.identity is not None else None
    try:
        connection = await pool.get(route.peer, prefer=ctx.era, identity_key=identity_key(ctx), user_id=user_id)
        sent = upstream_params(ctx, connection, params, gateway_meta(ctx, route.peer, hops) if route.peer.is_gateway else None)
        # Only a gateway this one believes is taken at its word about what it relays (identity/trust.py).
        trusted = route.peer.trusted_gateway
        origin = peer_audience(route.peer.url) if trusted else ""
        call = UpstreamCall(
            route.peer.name, method, _audited_name(method, params), trusted, origin,
            arguments=_arguments(method, params), call_id=secrets.token_urlsafe(12),
        )
        relay = relay_to(ctx, call)
        # A peer gateway may first ask for the user's consent at their home (mcp_endpoint/consent_relay.py).
        reply = await peer_request(ctx, connection, method, sent, relay)
    except UpstreamAuthorizationRequiredError as exc:
        # The user's token at a per-user OAuth peer is gone or could not be renewed.
        raise connect_required_error(ctx, route.peer.name, exc.reason) from exc
    if "error" in reply:
        _raise_upstream_error(ctx, method, reply["error"])
    result = reply.get("result")
    if not isinstance(result, dict):
        raise UpstreamProtocolError(f"peer '{route.peer.name}' answered {method} without a result")
    if ctx.era == "legacy" and connection.era == "modern":
        result = await _bridge_input_required(ctx, connection, call, sent, result, relay)
    elif ctx.era == "modern":
        if approval is not None:
            # Before the gate below, which may hold this very result until its requests are approved.
            result = continuation_wrap(approval, result)
        result = await upstream_input_gate(ctx, call, result)
    return result


@metrics.instrument_forward
async def forward(ctx: HostContext, route: Route, method: str, params: JsonDict) -> JsonDict:
    """Send `method` to the route's peer (`_forward`) and record the call in the audit trail.

    Raises:
        JsonRpcError: the upstream answered an error, or could not be used.
    """
    started = time.monotonic()
    error_code: int | None = None
    decision = ""
    result: JsonDict | None = None
    try:
        # Loops and rate limits first, then consent (mcp_endpoint/consent_gate.py): it may
        # refuse, wait for the user, or answer a 2026-07-28 host with an input_required
        # pointing at the consent page.
        hops = await _admit(ctx, route)
        call = UpstreamCall(route.peer.name, method, _audited_name(method, params), arguments=_arguments(method, params))
        held = await upstream_input_resume(ctx, call, params)
        if held is not None:
            # The retry of a call whose upstream's sampling/elicitation requests were held for consent.
            result = _shape_result(ctx, method, held)
            return result
        params, connect = await connect_gate(ctx, route.peer, params)
        if connect is not None:
            result = connect
            return result
        gate = await consent_gate(ctx, route, method, params, _audited_name(method, params))
        decision = gate.decision
        if gate.result is not None:
            result = gate.result
            return result
        consent_relay.home_answer_reset()
        if gate.params is not None:
            params = gate.params
        result = await _forward(ctx, route, method, params, hops, gate.approval)
        # A peer gateway that owns the call may have asked our user (distributed consent).
        decision = consent_relay.home_answer(decision)
        return result
    except jsonrpc.JsonRpcError as exc:
        error_code = exc.code
        decision = getattr(exc, "consent_decision", decision)
        raise
    except asyncio.CancelledError:
        error_code = jsonrpc.REQUEST_CANCELLED
        raise
    except BaseException:
        error_code = jsonrpc.INTERNAL_ERROR
        raise
    finally:
        audit_record(
            identity=ctx.identity,
            peer=route.peer.name,
            method=method,
            name=_audited_name(method, params),
            error_code=error_code,
            latency_ms=(time.monotonic() - started) * 1000,
            decision=decision,
            # Not `ok`: nothing ran yet, or not to the end (docs/CONSENT.md "Outcomes").
            input_required=error_code is None and result is not None and result.get("resultType") == "input_required",
            arguments=_arguments(method, params) if method in ARGUMENT_METHODS else None,
        )


def _arguments(method: str, params: JsonDict) -> Any:
    """A call's arguments as consent binds them (resources have none but their URI)."""
    return {} if method == "resources/read" else params.get("arguments") or {}


def _audited_name(method: str, params: JsonDict) -> str:
    """The tool, prompt or resource a call is about, as the peer knows it."""
    if method == "completion/complete":
        ref = params.get("ref") if isinstance(params.get("ref"), dict) else {}
        value = ref.get("name") or ref.get("uri")
    else:
        value = params.get("uri") if method == "resources/read" else params.get("name")
    return value if isinstance(value, str) else ""


async def _admit(ctx: HostContext, route: Route) -> list[str]:
    """Refuse loops and over-limit callers (before consent, so neither can create prompts); return the hops."""
    hops = incoming_hops(ctx)
    try:
        await ratelimit.check_call(identity=ctx.identity, peer=route.peer)
    except ratelimit.RateLimitExceededError as exc:
        raise jsonrpc.RateLimitedError(
            f"Rate limit exceeded ({exc.scope}): retry in {exc.retry_after_ms} ms",
            {"retryAfterMs": exc.retry_after_ms, "scope": exc.scope},
        ) from exc
    return hops


async def _forward(ctx: HostContext, route: Route, method: str, params: JsonDict, hops: list[str], approval: Approval | None) -> JsonDict:
    """Send `method` to the route's peer and return the result shaped for the host's era.

    `approval` as for `_exchange`.

    Transport failures count against the peer's circuit breaker. Methods without side effects
    are retried once on a broken connection; tools/call never is, because the upstream may
    have run it.

    Raises:
        JsonRpcError: the upstream answered an error, or could not be used.
    """
    breaker = breakers.for_peer(route.peer)
    attempts = 2 if method in SAFE_TO_RETRY else 1
    for attempt in range(1, attempts + 1):
        try:
            breaker.before_call(route.peer.name)
        except CircuitOpenError as exc:
            raise jsonrpc.UpstreamFailedError(str(exc)) from exc
        try:
            result = await _exchange(ctx, route, method, params, hops, approval)
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
        return _shape_result(ctx, method, result)
    raise AssertionError("unreachable")  # pragma: no cover
