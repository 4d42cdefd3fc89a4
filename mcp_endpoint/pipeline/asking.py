"""Asking the user on /consent: the prompt's URL, waiting for the answer, and turning it into a verdict.

Shared by the steps that ask: decide.py (the call itself), upstream_requests.py (an upstream's
sampling/elicitation) and home_consent.py (a peer gateway's question, asked at the user's home).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from django.conf import settings

from federation.upstream.base import JsonDict
from identity.consent.prompts import TooManyPendingPromptsError, consent_prompt_expire, consent_prompt_use, consent_prompt_wait, timeout_setting
from identity.models import ConsentPrompt
from mcp_endpoint import jsonrpc
from mcp_endpoint.context import HostContext
from mcp_endpoint.pipeline.host import ask_host
from mcp_endpoint.pipeline.values import Verdict

INPUT_KEY = "fedmcp-consent"
"""The key of the gateway's own URL elicitation in an input_required result."""


def consent_url(ctx: HostContext, prompt_id: str) -> str:
    base = settings.FEDMCP_PUBLIC_URL.rstrip("/")
    if not base and ctx.headers.get("host"):
        base = f"http://{ctx.headers['host']}"
    return f"{base}/consent/{prompt_id}" if prompt_id else f"{base}/consent"


def url_elicitation(prompt: ConsentPrompt, url: str, message: str) -> JsonDict:
    """The gateway's own URL elicitation pointing at a prompt's page."""
    return {"mode": "url", "message": message, "url": url, "elicitationId": prompt.id}


def input_required(elicitation: JsonDict, state: str) -> JsonDict:
    """The 2026-07-28 answer that sends the host to the consent page; its retry carries `state`."""
    return {"resultType": "input_required", "inputRequests": {INPUT_KEY: {"method": "elicitation/create", "params": elicitation}}, "requestState": state}


def too_many_prompts(ctx: HostContext, exc: TooManyPendingPromptsError) -> jsonrpc.RateLimitedError:
    """The refusal when the user has as many consent prompts waiting as allowed (-32016; audit word `deny`)."""
    return jsonrpc.RateLimitedError(
        f"{exc.pending} consent requests are already waiting for this user on {consent_url(ctx, '')}; answer them or let "
        f"them expire before more can be asked (at most {exc.limit}: FEDMCP_MAX_PENDING_PROMPTS_PER_USER)",
        {"reason": "too_many_pending_prompts", "pending": exc.pending, "limit": exc.limit, "retryAfterMs": int(timeout_setting() * 1000)},
    )


async def wait_for_answer(ctx: HostContext, prompt: ConsentPrompt, url: str, message: str) -> str:
    """Wait (bounded by the prompt's expiry) for the user's answer; return the prompt's final status.

    A host that sent a progressToken gets a progress notification with `message` while it waits.
    """
    token = ctx.meta.get("progressToken")
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        if token is None:
            return
        ticks += 1
        await ctx.outbound.send(jsonrpc.notification("notifications/progress", {"progressToken": token, "progress": ticks, "message": message}))

    return await consent_prompt_wait(prompt.id, until=prompt.expires_at, on_tick=tick)


async def hold_for_answer(ctx: HostContext, prompt: ConsentPrompt, url: str, elicitation: JsonDict) -> str:
    """Hold a handshake-era call until the user answers on /consent; return the prompt's final status.

    Where the host declared `elicitation.url`, it is pointed at the page with `elicitation` (the
    gateway's own request, never gated; its answer does not matter, the page's does). A host
    that goes away or cancels takes the prompt off the user's page.
    """
    asking: asyncio.Task[Any] | None = None
    if ctx.has_capability("elicitation", "url") and ctx.outbound.can_request:
        asking = asyncio.create_task(ask_host(ctx, "elicitation/create", elicitation))
    try:
        return await wait_for_answer(ctx, prompt, url, elicitation["message"])
    except asyncio.CancelledError:
        await asyncio.shield(consent_prompt_expire(prompt_id=prompt.id))
        raise
    finally:
        if asking is not None and not asking.done():
            asking.cancel()
            with contextlib.suppress(BaseException):
                await asking


async def settle(prompt: ConsentPrompt, status: str, *, denied: jsonrpc.JsonRpcError, timeout: jsonrpc.JsonRpcError) -> Verdict:
    """Turn a prompt's final status into a verdict: approved (its approval spent), `denied`, or `timeout`.

    Raises:
        InvalidParamsError: the approval was spent already (a replay).
    """
    if status == ConsentPrompt.Status.APPROVED:
        if not await consent_prompt_use(prompt_id=prompt.id):
            raise jsonrpc.InvalidParamsError("this consent approval was already used")
        return Verdict(word="approved")
    if status == ConsentPrompt.Status.DENIED:
        return Verdict.refuse(denied, "denied")
    return Verdict.refuse(timeout, "timeout")


def strip_state(params: JsonDict) -> JsonDict:
    """`params` without a retry's requestState and inputResponses."""
    return {k: v for k, v in params.items() if k not in ("requestState", "inputResponses")}


def asked_at_home(identity: Any, challenge: str, gateway: str, what: str) -> Verdict:
    """Refused `ask-home` (-32019): `what` needs the consent of a user another gateway asserted; `challenge` is for their home."""
    return Verdict.refuse(
        jsonrpc.ConsentRequiredAtHomeError(
            f"{what} needs the consent of {identity.federated_subject}, which their home gateway {identity.federated_issuer} asks for",
            {"challenge": challenge, "gateway": gateway, "home": identity.federated_issuer},
        ),
        "ask-home",
    )

