"""The consent step of `forwarding.forward`: allow, refuse, or ask the user and wait.

A call that must be asked creates a `ConsentPrompt` and points the host at /consent/<id>:

* handshake era: the call waits here (bounded by FEDMCP_CONSENT_TIMEOUT), sending progress
  notifications if the host sent a progressToken, and a URL-mode `elicitation/create` if the
  host declared `elicitation.url`;
* 2026-07-28: the call returns an `input_required` result whose input request is a URL
  elicitation to the consent page and whose `requestState` names the prompt, signed; the
  retry carrying that state waits for (or picks up) the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core import signing

from federation.router import Route
from identity import consent, consent_cache
from identity.models import ConsentDecision, ConsentPrompt
from mcp_endpoint import jsonrpc
from mcp_endpoint.context import HostContext

JsonDict = dict[str, Any]

STATE_PREFIX = "fedmcp-consent:"
STATE_SALT = "fedmcp.consent.request-state"
INPUT_KEY = "fedmcp-consent"


@dataclass
class Gate:
    """What the consent step let through: the audit word, the params to send, or a result."""

    decision: str = ""
    params: JsonDict | None = None
    result: JsonDict | None = None


def consent_url(ctx: HostContext, prompt_id: str) -> str:
    base = settings.FEDMCP_PUBLIC_URL.rstrip("/")
    if not base and ctx.headers.get("host"):
        base = f"http://{ctx.headers['host']}"
    return f"{base}/consent/{prompt_id}"


def _state_for(prompt: ConsentPrompt) -> str:
    return STATE_PREFIX + signing.dumps({"p": prompt.id}, salt=STATE_SALT, compress=True)


def _prompt_id_from(state: str) -> str:
    try:
        data = signing.loads(state.removeprefix(STATE_PREFIX), salt=STATE_SALT, max_age=consent.timeout_setting() + 3600)
    except signing.BadSignature as exc:
        raise jsonrpc.InvalidParamsError("requestState is not one this gateway issued") from exc
    if not isinstance(data, dict) or not isinstance(data.get("p"), str):
        raise jsonrpc.InvalidParamsError("requestState is not one this gateway issued")
    return data["p"]


def _arguments(method: str, params: JsonDict) -> Any:
    if method == "resources/read":
        return {}
    return params.get("arguments") or {}


def _message(prompt: ConsentPrompt, url: str) -> str:
    return f"fedmcp needs your approval to call {prompt.kind} '{prompt.name}' on '{prompt.peer}': open {url}"


async def _finish(prompt: ConsentPrompt, status: str, url: str) -> str:
    """Turn a prompt's final status into the audit word, or the host's error."""
    if status == ConsentPrompt.Status.APPROVED:
        if not await consent.consent_prompt_use(prompt_id=prompt.id):
            raise jsonrpc.InvalidParamsError("this consent approval was already used")
        return "approved"
    if status == ConsentPrompt.Status.DENIED:
        exc: jsonrpc.JsonRpcError = jsonrpc.ConsentDeniedError(
            f"The user denied the {prompt.kind} call '{prompt.name}' on peer '{prompt.peer}'", {"consentId": prompt.id}
        )
        exc.consent_decision = "denied"  # type: ignore[attr-defined]
        raise exc
    exc = jsonrpc.ConsentTimeoutError(
        f"Nobody answered the consent request for '{prompt.name}' on peer '{prompt.peer}' in time; see {url}",
        {"consentId": prompt.id, "url": url},
    )
    exc.consent_decision = "timeout"  # type: ignore[attr-defined]
    raise exc


async def _wait(ctx: HostContext, prompt: ConsentPrompt, url: str) -> str:
    token = ctx.meta.get("progressToken")
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        if token is None:
            return
        ticks += 1
        await ctx.outbound.send(
            jsonrpc.notification("notifications/progress", {"progressToken": token, "progress": ticks, "message": _message(prompt, url)})
        )

    return await consent.consent_prompt_wait(prompt.id, until=prompt.expires_at, on_tick=tick)


def _strip_state(params: JsonDict) -> JsonDict:
    return {k: v for k, v in params.items() if k not in ("requestState", "inputResponses")}


async def consent_gate(ctx: HostContext, route: Route, method: str, params: JsonDict, name: str) -> Gate:
    """Apply consent to one call about to be forwarded.

    Raises:
        ConsentDeniedError: a policy or the user refused (-32017).
        ConsentTimeoutError: nobody answered in time (-32018).
    """
    kind = consent.KIND_FOR_METHOD.get(method)
    if kind is None:
        return Gate(params=params)
    peer = route.peer.name
    state = params.get("requestState")
    if ctx.era == "modern" and isinstance(state, str) and state.startswith(STATE_PREFIX):
        prompt = await consent.consent_prompt_for(prompt_id=_prompt_id_from(state), identity=ctx.identity)
        if prompt is None or prompt.peer != peer or prompt.kind != kind or prompt.name != name:
            raise jsonrpc.InvalidParamsError("requestState does not belong to this call")
        url = consent_url(ctx, prompt.id)
        status = await _wait(ctx, prompt, url)
        return Gate(decision=await _finish(prompt, status, url), params=_strip_state(params))

    decision = await consent_cache.consent_decide(identity=ctx.identity, peer=peer, kind=kind, name=name)
    if decision.action == ConsentDecision.ALLOW:
        return Gate(decision=decision.label, params=params)
    if decision.action == ConsentDecision.DENY:
        exc = jsonrpc.ConsentDeniedError(f"A consent policy refuses the {kind} call '{name}' on peer '{peer}'", {"reason": decision.reason})
        exc.consent_decision = "deny"  # type: ignore[attr-defined]
        raise exc

    if ctx.identity is None or ctx.identity.user_id is None:
        # Nobody could answer on /consent (a client-only token, or a federated user not linked
        # to a local account): refuse now rather than wait out the timeout.
        exc = jsonrpc.ConsentDeniedError(
            f"The {kind} call '{name}' on peer '{peer}' needs the user's consent, and no local user can be asked",
            {"reason": "no local user to ask"},
        )
        exc.consent_decision = "deny"  # type: ignore[attr-defined]
        raise exc
    prompt = await consent.consent_prompt_create(
        identity=ctx.identity, peer=peer, kind=kind, name=name, arguments=_arguments(method, params),
        decision=decision, timeout=consent.timeout_setting(),
    )
    url = consent_url(ctx, prompt.id)
    elicitation = {"mode": "url", "message": _message(prompt, url), "url": url, "elicitationId": prompt.id}
    if ctx.era == "modern":
        result = {
            "resultType": "input_required",
            "inputRequests": {INPUT_KEY: {"method": "elicitation/create", "params": elicitation}},
            "requestState": _state_for(prompt),
        }
        return Gate(decision="ask", result=result)

    asking: asyncio.Task[Any] | None = None
    if ctx.has_capability("elicitation", "url") and ctx.outbound.can_request:
        from mcp_endpoint.forwarding import ask_host

        # Point the host at the page; its answer does not matter, the page's does.
        asking = asyncio.create_task(ask_host(ctx, "elicitation/create", elicitation))
    try:
        status = await _wait(ctx, prompt, url)
    except asyncio.CancelledError:
        # The host went away or cancelled: take the prompt off the user's page.
        await asyncio.shield(consent.consent_prompt_expire(prompt_id=prompt.id))
        raise
    finally:
        if asking is not None and not asking.done():
            asking.cancel()
            with contextlib.suppress(BaseException):
                await asking
    return Gate(decision=await _finish(prompt, status, url), params=params)
