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
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from django.conf import settings

from federation.pool import pool
from federation.router import Route
from federation.upstream.base import (
    JsonDict,
    UpstreamConnection,
    UpstreamError,
    UpstreamTimeoutError,
    error_reply,
    modern_meta,
)
from mcp_endpoint import jsonrpc
from mcp_endpoint.context import HostContext
from mcp_endpoint.correlation import correlator

logger = logging.getLogger(__name__)

MODERN_META_PREFIX = "io.modelcontextprotocol/"
MAX_INPUT_ROUNDS = 10
# Which client capability a server->client request needs from the host.
REQUEST_CAPABILITY = {
    "sampling/createMessage": ("sampling",),
    "elicitation/create": ("elicitation",),
    "roots/list": ("roots",),
}
CACHEABLE_METHODS = ("resources/read", "tools/list", "resources/list", "resources/templates/list", "prompts/list")


def upstream_params(ctx: HostContext, connection: UpstreamConnection, params: JsonDict) -> JsonDict:
    """Return the params to send upstream: the host's, with `_meta` fitted to the upstream's era."""
    params = dict(params)
    host_meta = params.pop("_meta", None)
    meta: JsonDict = dict(host_meta) if isinstance(host_meta, dict) else {}
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


async def ask_host(ctx: HostContext, method: str, params: Any) -> JsonDict:
    """Send a server->client request to the host and return its reply ({"result"} or {"error"}).

    Only possible in the handshake era on an exchange that can carry requests, and only for
    capabilities the host declared.
    """
    needed = REQUEST_CAPABILITY.get(method)
    if needed is not None and not ctx.has_capability(*needed):
        return error_reply(jsonrpc.METHOD_NOT_FOUND, f"the host did not declare the '{needed[0]}' capability")
    if ctx.era != "legacy" or not ctx.outbound.can_request:
        return error_reply(jsonrpc.METHOD_NOT_FOUND, f"the host cannot receive {method} requests on this exchange")
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


def relay_to(ctx: HostContext) -> Any:
    """Return the on_message callback that relays upstream messages of one request to the host."""

    async def relay(message: JsonDict) -> JsonDict | None:
        method = message.get("method")
        if "id" in message:
            return await ask_host(ctx, method, message.get("params"))  # type: ignore[arg-type]
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
    ctx: HostContext, connection: UpstreamConnection, method: str, params: JsonDict, result: JsonDict, relay: Any
) -> JsonDict:
    """Answer a 2026-07-28 upstream's input requests by asking a handshake-era host."""
    for _ in range(MAX_INPUT_ROUNDS):
        if result.get("resultType") != "input_required":
            return result
        responses: JsonDict = {}
        for key, request in (result.get("inputRequests") or {}).items():
            if not isinstance(request, dict):
                continue
            reply = await ask_host(ctx, request.get("method", ""), request.get("params"))
            if "error" in reply:
                _raise_upstream_error(ctx, method, reply["error"])
            responses[key] = reply["result"]
        retry = dict(params)
        retry["inputResponses"] = responses
        if "requestState" in result:
            retry["requestState"] = result["requestState"]
        reply = await connection.request(method, retry, on_message=relay)
        if "error" in reply:
            _raise_upstream_error(ctx, method, reply["error"])
        result = reply.get("result") or {}
    raise jsonrpc.UpstreamFailedError("the upstream kept asking for input; giving up")


async def forward(ctx: HostContext, route: Route, method: str, params: JsonDict) -> JsonDict:
    """Send `method` to the route's peer and return the result shaped for the host's era.

    Raises:
        JsonRpcError: the upstream answered an error, or could not be used.
    """
    try:
        connection = await pool.get(route.peer, prefer=ctx.era)
        sent = upstream_params(ctx, connection, params)
        relay = relay_to(ctx)
        reply = await connection.request(method, sent, on_message=relay)
        if "error" in reply:
            _raise_upstream_error(ctx, method, reply["error"])
        result = reply.get("result")
        if not isinstance(result, dict):
            raise jsonrpc.UpstreamFailedError(f"peer '{route.peer.name}' answered {method} without a result")
        if ctx.era == "legacy" and connection.era == "modern":
            result = await _bridge_input_required(ctx, connection, method, sent, result, relay)
    except UpstreamTimeoutError as exc:
        raise jsonrpc.UpstreamFailedError(str(exc)) from exc
    except UpstreamError as exc:
        raise jsonrpc.UpstreamFailedError(str(exc)) from exc
    return _shape_result(ctx, method, result)
