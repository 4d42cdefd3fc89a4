"""Step 1: admit a call, before anyone is asked or anything is sent: no loops, no caller over its rate limit."""

from __future__ import annotations

from django.conf import settings

from federation import ratelimit
from federation.router import Route
from mcp_endpoint import jsonrpc
from mcp_endpoint.context import HostContext


def incoming_hops(ctx: HostContext) -> list[str]:
    """Return the gateways this request came through (empty from hosts), refusing loops and long chains.

    Only a trusted peer gateway's hop record counts: identity/trust/gateways.py accepts it as part of
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


async def admit(ctx: HostContext, route: Route) -> list[str]:
    """Refuse loops and over-limit callers (before consent, so neither can create prompts); return the hops.

    Raises:
        FederationLoopError: see `incoming_hops`.
        RateLimitedError: the caller or the peer is over a rate limit (-32016).
    """
    hops = incoming_hops(ctx)
    try:
        await ratelimit.check_call(identity=ctx.identity, peer=route.peer)
    except ratelimit.RateLimitExceededError as exc:
        raise jsonrpc.RateLimitedError(
            f"Rate limit exceeded ({exc.scope}): retry in {exc.retry_after_ms} ms",
            {"retryAfterMs": exc.retry_after_ms, "scope": exc.scope},
        ) from exc
    return hops
