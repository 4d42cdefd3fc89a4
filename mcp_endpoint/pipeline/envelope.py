"""What a forwarded request carries upstream besides the host's params: era-fitted `_meta`, hops, and the acting user's assertion."""

from __future__ import annotations

from django.conf import settings

from federation.credentials import peer_audience
from federation.upstream.base import JsonDict, PeerConfig, UpstreamConnection, modern_meta
from fedmcp_lib import observability
from identity.trust.gateways import ASSERTION_META_KEY, assertion_subject
from identity.trust.signing import AssertionConfigError, assertion_create
from mcp_endpoint import jsonrpc
from mcp_endpoint.context import HostContext

MODERN_META_PREFIX = "io.modelcontextprotocol/"
FEDMCP_META_PREFIX = "io.fedmcp/"
HOPS_META_KEY = "io.fedmcp/hops"
"""The gateways a request has passed through, oldest first; carried only between gateways."""


def gateway_meta(ctx: HostContext, peer: PeerConfig, hops: list[str]) -> JsonDict:
    """Return fedmcp's own `_meta` keys for a request to a peer gateway.

    The hop record extended with this gateway, and, when this gateway holds credentials at
    the peer, a fresh signed assertion of the acting user (identity/trust/signing.py): the peer
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
        meta = {k: v for k, v in meta.items() if not k.startswith(MODERN_META_PREFIX)}
    if meta:
        params["_meta"] = meta
    return params


def with_fresh_assertion(ctx: HostContext, peer: PeerConfig, params: JsonDict) -> JsonDict:
    """Copy `params` for a resend; an assertion is single-use, so a resend gets a new one."""
    params = dict(params)
    meta = params.get("_meta")
    if isinstance(meta, dict) and ASSERTION_META_KEY in meta:
        hops = meta.get(HOPS_META_KEY) or []
        params["_meta"] = {**meta, **gateway_meta(ctx, peer, hops[:-1])}
    return params
