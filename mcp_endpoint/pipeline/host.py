"""Server->client requests to the host (sampling, elicitation, roots) during one of its calls."""

from __future__ import annotations

import asyncio
from typing import Any

from django.conf import settings

from federation.upstream.base import JsonDict, error_reply
from mcp_endpoint import jsonrpc
from mcp_endpoint.context import HostContext
from mcp_endpoint.correlation import correlator

REQUEST_CAPABILITY = {
    "sampling/createMessage": ("sampling",),
    "elicitation/create": ("elicitation",),
    "roots/list": ("roots",),
}
"""Which client capability a server->client request needs from the host."""


def host_refusal(ctx: HostContext, method: str) -> JsonDict | None:
    """Return the error reply when the host cannot be sent `method` now, else None."""
    needed = REQUEST_CAPABILITY.get(method)
    if needed is not None and not ctx.has_capability(*needed):
        return error_reply(jsonrpc.METHOD_NOT_FOUND, f"the host did not declare the '{needed[0]}' capability")
    if ctx.era != "legacy" or not ctx.outbound.can_request:
        return error_reply(jsonrpc.METHOD_NOT_FOUND, f"the host cannot receive {method} requests on this exchange")
    return None


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
