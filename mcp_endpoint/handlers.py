"""One async function per MCP method. Each takes the host context and validated params."""

from __future__ import annotations

import base64
import binascii
import time
from typing import Any

from channels.layers import get_channel_layer
from django.conf import settings
from mcp.shared.inbound import validate_mcp_param_headers
from mcp_types import SERVER_INFO_META_KEY
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, KNOWN_PROTOCOL_VERSIONS, LATEST_HANDSHAKE_VERSION

from federation import catalog, naming, user_lists
from federation.events import CATALOG_GROUP, RESOURCES_GROUP
from federation.health import breakers
from federation.models import CatalogKind
from federation.pool import pool
from federation.router import AmbiguousUriError, NotRoutableError, Route, peer_for_scope, resolve
from federation.services import GATEWAY_CAPABILITY
from federation.upstream.base import UpstreamError
from federation.upstream_oauth import UpstreamAuthorizationRequiredError
from fedmcp_lib.json_types import JsonDict
from fedmcp_lib.layers import Memberships
from identity.audit import audit_record
from identity.consent import decisions
from mcp_endpoint import jsonrpc, methods, sessions, tasks
from mcp_endpoint.context import HostContext
from mcp_endpoint.pipeline.admit import incoming_hops
from mcp_endpoint.pipeline.connect import connect_required_error
from mcp_endpoint.pipeline.decide import consent_unasked
from mcp_endpoint.pipeline.envelope import gateway_meta
from mcp_endpoint.pipeline.flow import forward

GATEWAY_VERSION = "0.1.0"

LIST_KINDS = {
    "tools/list": (CatalogKind.TOOL, "tools"),
    "resources/list": (CatalogKind.RESOURCE, "resources"),
    "resources/templates/list": (CatalogKind.RESOURCE_TEMPLATE, "resourceTemplates"),
    "prompts/list": (CatalogKind.PROMPT, "prompts"),
}
LIST_CHANGED_METHOD = {
    CatalogKind.TOOL: "notifications/tools/list_changed",
    CatalogKind.PROMPT: "notifications/prompts/list_changed",
    CatalogKind.RESOURCE: "notifications/resources/list_changed",
    CatalogKind.RESOURCE_TEMPLATE: "notifications/resources/list_changed",
}


# --- capabilities and lifecycle --------------------------------------------------------------


async def server_capabilities(ctx: HostContext) -> JsonDict:
    """Return what this endpoint offers: everything on /mcp, what the peer has per peer."""
    full = methods.capabilities(ctx.era)
    # Other fedmcp gateways recognise us by this and import our catalog under stable names.
    identity = {GATEWAY_CAPABILITY: {"name": settings.FEDMCP_GATEWAY_NAME, "scope": ctx.scope or None}}
    if not ctx.scope:
        return {**full, **await _task_capabilities(ctx), "experimental": identity}
    upstream = await catalog.peer_capabilities(ctx.scope) or {}
    offered = {key: value for key, value in full.items() if key in upstream or key == "logging"}
    return {**offered, **_peer_task_capabilities(ctx, upstream), "experimental": identity}


async def _task_capabilities(ctx: HostContext) -> JsonDict:
    """Tasks on /mcp, in the host's era, as far as some peer serves them (mcp_endpoint/tasks.py)."""
    if ctx.era == "modern":
        if await catalog.peers_with_capability("extensions", tasks.TASKS_EXTENSION):
            return {"extensions": {tasks.TASKS_EXTENSION: {}}}
        return {}
    if ctx.protocol_version != tasks.LEGACY_VERSION or not await catalog.peers_with_capability("tasks"):
        return {}
    offered: JsonDict = {}
    if await catalog.peers_with_capability("tasks", "list"):
        offered["list"] = {}
    if await catalog.peers_with_capability("tasks", "cancel"):
        offered["cancel"] = {}
    if await catalog.peers_with_capability("tasks", "requests", "tools", "call"):
        offered["requests"] = {"tools": {"call": {}}}
    return {"tasks": offered}


def _peer_task_capabilities(ctx: HostContext, upstream: JsonDict) -> JsonDict:
    """Tasks on /peers/<name>/mcp: what the peer declares, in the host's era."""
    if ctx.era == "modern":
        extensions = upstream.get("extensions")
        if isinstance(extensions, dict) and isinstance(extensions.get(tasks.TASKS_EXTENSION), dict):
            return {"extensions": {tasks.TASKS_EXTENSION: extensions[tasks.TASKS_EXTENSION]}}
        return {}
    if ctx.protocol_version == tasks.LEGACY_VERSION and isinstance(upstream.get("tasks"), dict):
        return {"tasks": upstream["tasks"]}
    return {}


async def server_info(ctx: HostContext) -> JsonDict:
    return _server_info(ctx)


def _server_info(ctx: HostContext) -> JsonDict:
    name = settings.FEDMCP_GATEWAY_NAME + (f"/{ctx.scope}" if ctx.scope else "")
    return {"name": name, "title": "fedmcp gateway", "version": GATEWAY_VERSION}


def fit_result_to_era(ctx: HostContext, result: JsonDict) -> JsonDict:
    """Give a result the envelope of the host's era, whoever produced its body.

    2026-07-28: `resultType` is required (absent means "complete"), and the serverInfo stamp
    names the server the host talks to, this gateway, even over an upstream's own stamp. The
    handshake era knows neither: an upstream's 2026-07-28 stamp is removed.
    """
    meta = result.get("_meta")
    if ctx.era == "modern":
        result.setdefault("resultType", "complete")
        stamp = _server_info(ctx)
        result["_meta"] = {**meta, SERVER_INFO_META_KEY: stamp} if isinstance(meta, dict) else {SERVER_INFO_META_KEY: stamp}
    elif isinstance(meta, dict) and SERVER_INFO_META_KEY in meta:
        rest = {key: value for key, value in meta.items() if key != SERVER_INFO_META_KEY}
        if rest:
            result["_meta"] = rest
        else:
            del result["_meta"]
    return result


async def instructions(ctx: HostContext) -> str:
    if ctx.scope:
        return await catalog.peer_instructions(ctx.scope)
    return "fedmcp federates several MCP servers. Tools and prompts are named <peer>__<name>; resources fedmcp://<peer>/<uri>."


async def initialize(ctx: HostContext, params: JsonDict) -> JsonDict:
    requested = params.get("protocolVersion")
    version = requested if requested in HANDSHAKE_PROTOCOL_VERSIONS else LATEST_HANDSHAKE_VERSION
    ctx.protocol_version = version
    ctx.client_capabilities = params.get("capabilities") or {}
    ctx.client_info = params.get("clientInfo") or {}
    if ctx.session is not None:
        await sessions.session_initialize(
            session=ctx.session, protocol_version=version, client_capabilities=ctx.client_capabilities, client_info=ctx.client_info
        )
    result: JsonDict = {
        "protocolVersion": version,
        "capabilities": await server_capabilities(ctx),
        "serverInfo": await server_info(ctx),
    }
    if text := await instructions(ctx):
        result["instructions"] = text
    return result


async def discover(ctx: HostContext, params: JsonDict) -> JsonDict:
    result: JsonDict = {
        "supportedVersions": list(KNOWN_PROTOCOL_VERSIONS),
        "capabilities": await server_capabilities(ctx),
        "_meta": {SERVER_INFO_META_KEY: await server_info(ctx)},
        "resultType": "complete",
        "ttlMs": settings.MCP_LIST_TTL_MS,
        "cacheScope": "private",
    }
    if text := await instructions(ctx):
        result["instructions"] = text
    return result


async def ping(ctx: HostContext, params: JsonDict) -> JsonDict:
    return {}


async def set_level(ctx: HostContext, params: JsonDict) -> JsonDict:
    ctx.log_level = params["level"]
    if ctx.session is not None:
        await sessions.session_set_log_level(session=ctx.session, level=params["level"])
    return {}


# --- lists -----------------------------------------------------------------------------------


def _decode_cursor(cursor: Any) -> int:
    if cursor is None:
        return 0
    try:
        offset = int(base64.urlsafe_b64decode(str(cursor).encode()).decode().removeprefix("o:"))
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise jsonrpc.InvalidParamsError("invalid cursor: pass back a nextCursor from an earlier page") from exc
    if offset < 0:
        raise jsonrpc.InvalidParamsError("invalid cursor: pass back a nextCursor from an earlier page")
    return offset


def _encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"o:{offset}".encode()).decode()


async def list_catalog(ctx: HostContext, params: JsonDict, method: str) -> JsonDict:
    kind, key = LIST_KINDS[method]
    if ctx.scope and await peer_for_scope(ctx.scope) is None:
        raise jsonrpc.UpstreamFailedError(f"peer '{ctx.scope}' is not available")
    skip_peers = breakers.open_peers()
    items = await catalog.list_items(ctx.scope, kind, skip_peers=skip_peers)
    # What a consent policy denies this caller is not listed (identity/consent/policy.py).
    hidden = await decisions.consent_hidden_names(identity=ctx.identity, scope=ctx.scope, kind=kind)
    if hidden:
        field = catalog.NAME_FIELDS[kind]
        items = [item for item in items if item.get(field) not in hidden]
    # A per-user OAuth peer's resources: the caller's own, from their own connection, never the catalog's.
    own = await user_lists.user_items(identity=ctx.identity, scope=ctx.scope, kind=kind, era=ctx.era, skip_peers=skip_peers)
    if own:
        items = [*items, *own]
    offset = _decode_cursor(params.get("cursor"))
    page_size = settings.MCP_PAGE_SIZE
    result: JsonDict = {key: items[offset : offset + page_size]}
    if offset + page_size < len(items):
        result["nextCursor"] = _encode_cursor(offset + page_size)
    if ctx.era == "modern":
        result.update(resultType="complete", ttlMs=settings.MCP_LIST_TTL_MS, cacheScope="private")
    return result


async def tools_list(ctx: HostContext, params: JsonDict) -> JsonDict:
    return await list_catalog(ctx, params, "tools/list")


async def resources_list(ctx: HostContext, params: JsonDict) -> JsonDict:
    return await list_catalog(ctx, params, "resources/list")


async def resource_templates_list(ctx: HostContext, params: JsonDict) -> JsonDict:
    return await list_catalog(ctx, params, "resources/templates/list")


async def prompts_list(ctx: HostContext, params: JsonDict) -> JsonDict:
    return await list_catalog(ctx, params, "prompts/list")


# --- routed calls ----------------------------------------------------------------------------


async def _route(ctx: HostContext, kind: str, name: str) -> Route:
    try:
        return await resolve(ctx.scope, kind, name)
    except AmbiguousUriError as exc:
        raise jsonrpc.InvalidParamsError(str(exc), {"uri": name}) from exc
    except NotRoutableError as exc:
        if kind == CatalogKind.RESOURCE:
            code = jsonrpc.INVALID_PARAMS if ctx.era == "modern" else jsonrpc.RESOURCE_NOT_FOUND_LEGACY
            raise jsonrpc.JsonRpcError(f"Resource not found: {name}", {"uri": name}, code=code) from exc
        raise jsonrpc.InvalidParamsError(str(exc)) from exc


def _check_param_headers(ctx: HostContext, route: Route, params: JsonDict) -> None:
    """Check a 2026-07-28 HTTP call's `Mcp-Param-*` headers against the tool's `x-mcp-header` declarations.

    As the SDK's server does (SEP-2243): each declared argument and its header are present
    together and equal (after the base64 sentinel), or absent together. The schema is the one
    the host was listed; the gateway sends the upstream its own headers from the arguments.

    Raises:
        HeaderMismatchError: they disagree (-32020, HTTP 400).
    """
    if ctx.era != "modern" or ctx.transport != "streamable-http" or not route.param_headers:
        return
    arguments = params.get("arguments") or {}
    schema = (route.entry_payload or {}).get("inputSchema")
    rejection = validate_mcp_param_headers(schema, arguments, ctx.headers) if isinstance(arguments, dict) else None
    if rejection is not None:
        raise jsonrpc.HeaderMismatchError(rejection.message)


async def tools_call(ctx: HostContext, params: JsonDict) -> JsonDict:
    route = await _route(ctx, CatalogKind.TOOL, params["name"])
    _check_param_headers(ctx, route, params)
    result = await forward(ctx, route, "tools/call", {**tasks.call_params(ctx, params), "name": route.upstream_name})
    # A call the upstream made a task: the host gets the gateway's id for it (tasks.py).
    return tasks.issue_in_call_result(ctx, route.peer.name, result)


async def prompts_get(ctx: HostContext, params: JsonDict) -> JsonDict:
    route = await _route(ctx, CatalogKind.PROMPT, params["name"])
    return await forward(ctx, route, "prompts/get", {**params, "name": route.upstream_name})


def _rewrite_contents(ctx: HostContext, route: Route, result: JsonDict) -> JsonDict:
    if ctx.scope:
        return result
    contents = result.get("contents")
    if isinstance(contents, list):
        result["contents"] = [
            {**c, "uri": naming.host_uri(route.peer.name, route.peer.remote_gateway if route.peer.trusted_gateway else "", c["uri"])}
            if isinstance(c, dict) and isinstance(c.get("uri"), str)
            else c
            for c in contents
        ]
    return result


async def resources_read(ctx: HostContext, params: JsonDict) -> JsonDict:
    route = await _route(ctx, CatalogKind.RESOURCE, params["uri"])
    result = await forward(ctx, route, "resources/read", {**params, "uri": route.upstream_name})
    return _rewrite_contents(ctx, route, result)


async def complete(ctx: HostContext, params: JsonDict) -> JsonDict:
    ref = dict(params["ref"])
    if ref.get("type") == "ref/prompt":
        route = await _route(ctx, CatalogKind.PROMPT, ref.get("name", ""))
        ref["name"] = route.upstream_name
    elif ref.get("type") == "ref/resource":
        try:
            route = await resolve(ctx.scope, CatalogKind.RESOURCE, ref.get("uri", ""))
        except NotRoutableError as exc:
            raise jsonrpc.InvalidParamsError(str(exc)) from exc
        ref["uri"] = route.upstream_name
    else:
        raise jsonrpc.InvalidParamsError("ref.type must be 'ref/prompt' or 'ref/resource'")
    return await forward(ctx, route, "completion/complete", {**params, "ref": ref})


async def resources_subscribe(ctx: HostContext, params: JsonDict) -> JsonDict:
    uri = naming.canonical_uri(params["uri"])  # one subscription whatever the spelling
    route = await _route(ctx, CatalogKind.RESOURCE, uri)
    assert ctx.session is not None
    started = time.monotonic()
    # What a policy denies reading is not watched either.
    verdict = await consent_unasked(ctx, route.peer.name, "resource", route.upstream_name)
    if verdict.refusal is not None:
        audit_record(
            identity=ctx.identity, peer=route.peer.name, method="resources/subscribe", name=route.upstream_name,
            error_code=verdict.refusal.code, latency_ms=(time.monotonic() - started) * 1000, decision=verdict.word,
        )
        raise verdict.refusal
    first = await sessions.subscription_add(
        session=ctx.session, uri=uri, peer_name=route.peer.name, upstream_uri=route.upstream_name, per_user=route.peer.user_oauth
    )
    if first:
        try:
            await _upstream_subscription(ctx, route, "resources/subscribe")
        except jsonrpc.JsonRpcError:
            # Not subscribed upstream: a retry (once the user connected, say) must try again.
            await sessions.subscription_remove(session=ctx.session, uri=uri, per_user=route.peer.user_oauth)
            raise
    return {}


async def resources_unsubscribe(ctx: HostContext, params: JsonDict) -> JsonDict:
    assert ctx.session is not None
    uri = naming.canonical_uri(params["uri"])
    try:
        route: Route | None = await resolve(ctx.scope, CatalogKind.RESOURCE, uri)
    except NotRoutableError:
        route = None  # the peer or the resource is gone: only the local subscription is left to drop
    removed = await sessions.subscription_remove(session=ctx.session, uri=uri, per_user=route is not None and route.peer.user_oauth)
    if removed is not None and removed[2] and route is not None:
        await _upstream_subscription(ctx, route, "resources/unsubscribe")
    return {}


async def _upstream_subscription(ctx: HostContext, route: Route, method: str) -> None:
    """Subscribe or unsubscribe upstream, where the upstream supports it in the handshake era.

    At a per-user OAuth peer, on the user's own connection: the subscription is theirs, made
    with their token, and the updates that come back on it reach their sessions only.
    """
    user_id = ctx.identity.user_id if ctx.identity is not None and route.peer.user_oauth else None
    if route.peer.user_oauth and user_id is None:
        raise connect_required_error(ctx, route.peer.name, "a subscription needs a local user's own account")
    try:
        connection = await pool.get(route.peer, prefer="legacy", user_id=user_id)
    except UpstreamAuthorizationRequiredError as exc:
        raise connect_required_error(ctx, route.peer.name, exc.reason) from exc
    except UpstreamError as exc:
        raise jsonrpc.UpstreamFailedError(str(exc)) from exc
    resources = connection.description.capabilities.get("resources") or {}
    if connection.era != "legacy" or not resources.get("subscribe"):
        return
    params: JsonDict = {"uri": route.upstream_name}
    if route.peer.is_gateway:
        # A peer gateway subscribes on behalf of a user, like any call it takes.
        params["_meta"] = gateway_meta(ctx, route.peer, incoming_hops(ctx))
    reply = await connection.request(method, params)
    if "error" in reply:
        raise jsonrpc.UpstreamFailedError(f"peer '{route.peer.name}' refused {method}: {reply['error'].get('message', 'error')}")


# --- 2026-07-28 subscriptions ----------------------------------------------------------------


async def subscriptions_listen(ctx: HostContext, params: JsonDict) -> JsonDict:
    """Stream list_changed and resources/updated notifications until the host disconnects."""
    wanted = params.get("notifications") or {}
    honoured: JsonDict = {}
    for key in ("toolsListChanged", "promptsListChanged", "resourcesListChanged"):
        if wanted.get(key):
            honoured[key] = True
    uris = [u for u in wanted.get("resourceSubscriptions") or [] if isinstance(u, str)]
    routes: dict[tuple[str, str], str] = {}
    for uri in uris:
        try:
            route = await resolve(ctx.scope, CatalogKind.RESOURCE, uri)
        except NotRoutableError:
            continue
        # As resources/subscribe: what a policy denies reading is not watched (left out of the acknowledgement).
        if (await consent_unasked(ctx, route.peer.name, "resource", route.upstream_name)).refusal is not None:
            continue
        routes[(route.peer.name, route.upstream_name)] = uri
    if routes:
        honoured["resourceSubscriptions"] = list(routes.values())
    tag = {"io.modelcontextprotocol/subscriptionId": ctx.request_id}

    async def send(method: str, params: JsonDict | None = None) -> None:
        # Every notification on a listen stream names the subscription it belongs to.
        await ctx.outbound.send(jsonrpc.notification(method, {**(params or {}), "_meta": tag}))

    try:
        with sessions.stream_slot(ctx.identity):
            await _listen(ctx, send, honoured, routes)
    except sessions.SessionLimitError as exc:  # raised on entering the slot only
        raise jsonrpc.TooManySessionsError(str(exc), {"limit": exc.limit}) from exc
    return {}  # pragma: no cover - _listen returns only by cancellation


async def _listen(ctx: HostContext, send: Any, honoured: JsonDict, routes: dict[tuple[str, str], str]) -> None:
    layer = get_channel_layer()
    channel = await layer.new_channel()  # default prefix: see SessionEvents.__aenter__
    memberships = Memberships(layer, channel, (CATALOG_GROUP, RESOURCES_GROUP))
    await memberships.join()
    try:
        await send("notifications/subscriptions/acknowledged", {"notifications": honoured})
        flags = {CatalogKind.TOOL: "toolsListChanged", CatalogKind.PROMPT: "promptsListChanged",
                 CatalogKind.RESOURCE: "resourcesListChanged", CatalogKind.RESOURCE_TEMPLATE: "resourcesListChanged"}
        while True:
            event = await memberships.receive()
            for note in host_notifications_for(ctx.scope, event):
                method = note["method"]
                if method == "notifications/resources/updated":
                    if event.get("user") is not None and (ctx.identity is None or event["user"] != ctx.identity.user_id):
                        continue  # about another user's account at a per-user OAuth peer
                    uri = routes.get((event["peer"], event["uri"]))
                    if uri is not None:
                        await send(method, {"uri": uri})
                elif any(honoured.get(flags[k]) and LIST_CHANGED_METHOD[k] == method for k in flags):
                    await send(method)
    finally:
        await memberships.leave()


def host_notifications_for(scope: str, event: JsonDict) -> list[JsonDict]:
    """Turn a catalog/resource event into the notifications a host on `scope` should get."""
    peer = event.get("peer")
    if scope and peer != scope:
        return []
    if event.get("type") == "catalog.changed":
        methods = dict.fromkeys(LIST_CHANGED_METHOD[k] for k in event.get("kinds", []) if k in LIST_CHANGED_METHOD)
        return [jsonrpc.notification(m) for m in methods]
    if event.get("type") == "resource.updated":
        uri = event["uri"] if scope else naming.qualify_uri(peer, event["uri"])  # type: ignore[arg-type]
        return [jsonrpc.notification("notifications/resources/updated", {"uri": uri})]
    return []


HANDLERS = {
    "initialize": initialize,
    "ping": ping,
    "logging/setLevel": set_level,
    "resources/subscribe": resources_subscribe,
    "resources/unsubscribe": resources_unsubscribe,
    "server/discover": discover,
    "subscriptions/listen": subscriptions_listen,
    "tools/list": tools_list,
    "tools/call": tools_call,
    "resources/list": resources_list,
    "resources/templates/list": resource_templates_list,
    "resources/read": resources_read,
    "prompts/list": prompts_list,
    "prompts/get": prompts_get,
    "completion/complete": complete,
    **tasks.HANDLERS,
}
"""Who answers each method of the table (methods.py)."""

