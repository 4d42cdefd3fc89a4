"""Step 2: connect — for per-user OAuth peers (federation/upstream_oauth.py).

A call to such a peer needs the acting user's own token there. A user who has not connected
their account is pointed at /connect/<peer>, the way the host's era allows:

* handshake era, host declared `elicitation.url`: error -32042 (URL elicitation required) whose
  `data.elicitations` holds a URL elicitation to the connect page; the host opens it and retries;
* 2026-07-28, host declared `elicitation.url`: an `input_required` result with that URL
  elicitation and a signed `requestState`; the retry carrying it waits (bounded by
  FEDMCP_UPSTREAM_CONNECT_WAIT) for the user to finish connecting;
* any other host: error -32030 whose message names the connect page (`data.connectUrl`).
"""

from __future__ import annotations

import asyncio
import secrets
import time

from django.conf import settings

from federation import upstream_oauth
from federation.upstream.base import PeerConfig
from fedmcp_lib.json_types import JsonDict
from mcp_endpoint import jsonrpc, request_states
from mcp_endpoint.context import HostContext

STATE_SALT = "fedmcp.connect.request-state"
INPUT_KEY = "fedmcp-connect"
WAIT_POLL = 1.0


def connect_url(ctx: HostContext, peer_name: str) -> str:
    base = settings.FEDMCP_PUBLIC_URL.rstrip("/")
    if not base and ctx.headers.get("host"):
        base = f"http://{ctx.headers['host']}"
    return upstream_oauth.connect_page_url(base, peer_name)


def _message(peer_name: str, url: str) -> str:
    return f"Peer '{peer_name}' needs your own authorization: connect your account at {url}, then try again"


def connect_required_error(ctx: HostContext, peer_name: str, reason: str = "") -> jsonrpc.JsonRpcError:
    """The error telling the host's user to connect their account at `peer_name`."""
    url = connect_url(ctx, peer_name)
    message = _message(peer_name, url) + (f" ({reason})" if reason else "")
    if ctx.era == "legacy" and ctx.has_capability("elicitation", "url"):
        elicitation = {"mode": "url", "elicitationId": secrets.token_urlsafe(16), "url": url, "message": message}
        return jsonrpc.UrlElicitationRequiredError(message, {"elicitations": [elicitation]})
    return jsonrpc.UpstreamAuthorizationRequiredError(message, {"peer": peer_name, "connectUrl": url})


def _state_for(ctx: HostContext, peer: PeerConfig) -> str:
    return request_states.issue(request_states.CONNECT, {"p": peer.name, "u": ctx.identity.user_id}, salt=STATE_SALT)


def _check_state(ctx: HostContext, peer: PeerConfig, state: str) -> None:
    data = request_states.read(request_states.CONNECT, state, salt=STATE_SALT, max_age=settings.FEDMCP_UPSTREAM_CONNECT_WAIT + 3600)
    if data != {"p": peer.name, "u": ctx.identity.user_id}:
        raise jsonrpc.InvalidParamsError("requestState does not belong to this call")


def _declined(params: JsonDict) -> bool:
    responses = params.get("inputResponses")
    answer = responses.get(INPUT_KEY) if isinstance(responses, dict) else None
    return isinstance(answer, dict) and answer.get("action") in ("decline", "cancel")


async def _wait_connected(user_id: int, peer: PeerConfig) -> bool:
    deadline = time.monotonic() + settings.FEDMCP_UPSTREAM_CONNECT_WAIT
    while True:
        if await upstream_oauth.has_connection(user_id=user_id, peer_id=peer.id):
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(WAIT_POLL)


async def connect(ctx: HostContext, peer: PeerConfig, params: JsonDict) -> tuple[JsonDict, JsonDict | None]:
    """Let a call through to a per-user OAuth peer only when its user has connected there.

    Returns (the params to go on with, None) or (params, an `input_required` result for a
    2026-07-28 host).

    Raises:
        UrlElicitationRequiredError: -32042, for a handshake-era host that takes URL elicitations.
        UpstreamAuthorizationRequiredError: -32030, for other hosts or callers without a local user.
    """
    if not peer.user_oauth:
        return params, None
    user_id = ctx.identity.user_id if ctx.identity is not None else None
    if user_id is None:
        raise jsonrpc.UpstreamAuthorizationRequiredError(
            f"Peer '{peer.name}' acts with each user's own account there, and this call has no local user who could connect one",
            {"peer": peer.name},
        )
    state = params.get("requestState")
    if ctx.era == "modern" and request_states.is_ours(request_states.CONNECT, state):
        _check_state(ctx, peer, state)
        declined = _declined(params)
        params = {k: v for k, v in params.items() if k not in ("requestState", "inputResponses")}
        if not declined and await _wait_connected(user_id, peer):
            return params, None
        raise connect_required_error(ctx, peer.name, "the account was not connected")
    if await upstream_oauth.has_connection(user_id=user_id, peer_id=peer.id):
        return params, None
    if ctx.era == "modern" and ctx.has_capability("elicitation", "url"):
        url = connect_url(ctx, peer.name)
        elicitation = {"mode": "url", "message": _message(peer.name, url), "url": url}
        result = {
            "resultType": "input_required",
            "inputRequests": {INPUT_KEY: {"method": "elicitation/create", "params": elicitation}},
            "requestState": _state_for(ctx, peer),
        }
        return params, result
    raise connect_required_error(ctx, peer.name)
