"""The consent step of `forwarding.forward`: allow, refuse, or ask the user and wait.

A call that must be asked creates a `ConsentPrompt` and points the host at /consent/<id>:

* handshake era: the call waits here (bounded by FEDMCP_CONSENT_TIMEOUT), sending progress
  notifications if the host sent a progressToken, and a URL-mode `elicitation/create` if the
  host declared `elicitation.url`;
* 2026-07-28: the call returns an `input_required` result whose input request is a URL
  elicitation to the consent page and whose `requestState` names the prompt and binds the
  exact call (signed); the retry of that same call waits for (or picks up) the answer.

When the upstream answers an approved 2026-07-28 call with `input_required` of its own, the
host gets a continuation `requestState` instead of the upstream's, and its retry is not asked
about again (`continuation_wrap`, `_continuation`; docs/CONSENT.md "Further rounds of an
approved call").

A user asserted by a trusted peer gateway (and not linked to an account here) is asked at
their home gateway instead (`_ask_home`; docs/CONSENT.md "Distributed consent").

Sampling and elicitation requests that upstreams send during a call are gated here too
(`upstream_request_relay`, `upstream_input_gate`, `upstream_input_resume`; docs/CONSENT.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.core import signing

from federation.router import Route
from identity import consent, consent_cache, deferral, remote_consent, trust
from identity.audit import audit_record
from identity.call_digest import arguments_hash
from identity.models import ConsentDecision, ConsentPrompt
from identity.signing import AssertionConfigError, issuer
from identity.upstream_requests import request_summary, source_text
from mcp_endpoint import jsonrpc, request_states
from mcp_endpoint.context import HostContext

JsonDict = dict[str, Any]
HostAsker = Callable[[HostContext, str, Any], Awaitable[JsonDict]]

STATE_SALT = "fedmcp.consent.request-state"
INPUT_KEY = "fedmcp-consent"
CONTINUE_SALT = "fedmcp.consent.continue-state"
CONTINUE_SEPARATOR = "~"
"""Ends the signed part of a continuation state (no signed value contains it); the upstream's
own requestState, if it sent one, follows verbatim."""
CONTINUED = "continued"
"""The audit word for a further input_required round of a call the user approved."""


@dataclass(frozen=True)
class Approval:
    """A call as consent approves it: who (user or federated identity, client), peer, kind, name, arguments."""

    who: str
    client_id: str
    peer: str
    kind: str
    name: str
    arguments_hash: str

    def binding(self, upstream_state: str | None) -> str:
        """Digest of this call and one round's upstream requestState, which a continuation must match."""
        parts = [self.who, self.client_id, self.peer, self.kind, self.name, self.arguments_hash, upstream_state]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


@dataclass
class Gate:
    """What the consent step let through: the audit word, the params to send, or a result.

    `approval` is set when the user approved this call (now, or in an earlier round of it):
    an upstream's input_required for it gets a continuation state (`continuation_wrap`).
    """

    decision: str = ""
    params: JsonDict | None = None
    result: JsonDict | None = None
    approval: Approval | None = None


@dataclass(frozen=True)
class Continuation:
    """A verified continuation state: the call it continues, its single-use nonce, expiry and upstream state."""

    approval: Approval
    nonce: str
    expires: int
    """Epoch seconds."""
    upstream_state: str | None

    def is_expired(self) -> bool:
        return time.time() >= self.expires


def consent_url(ctx: HostContext, prompt_id: str) -> str:
    base = settings.FEDMCP_PUBLIC_URL.rstrip("/")
    if not base and ctx.headers.get("host"):
        base = f"http://{ctx.headers['host']}"
    return f"{base}/consent/{prompt_id}" if prompt_id else f"{base}/consent"


def too_many_prompts(ctx: HostContext, exc: consent.TooManyPendingPromptsError) -> jsonrpc.RateLimitedError:
    """The refusal when the user has as many consent prompts waiting as allowed (-32016)."""
    refusal = jsonrpc.RateLimitedError(
        f"{exc.pending} consent requests are already waiting for this user on {consent_url(ctx, '')}; answer them or let "
        f"them expire before more can be asked (at most {exc.limit}: FEDMCP_MAX_PENDING_PROMPTS_PER_USER)",
        {"reason": "too_many_pending_prompts", "pending": exc.pending, "limit": exc.limit, "retryAfterMs": int(consent.timeout_setting() * 1000)},
    )
    refusal.consent_decision = "deny"  # type: ignore[attr-defined]
    return refusal


async def prompt_or_refusal(ctx: HostContext, creating: Awaitable[ConsentPrompt]) -> ConsentPrompt:
    """Await a prompt's creation; a user with too many waiting gets a refusal instead.

    Raises:
        RateLimitedError: FEDMCP_MAX_PENDING_PROMPTS_PER_USER prompts wait for the user already (-32016).
    """
    try:
        return await creating
    except consent.TooManyPendingPromptsError as exc:
        raise too_many_prompts(ctx, exc) from exc


def max_input_requests() -> int:
    """Most requests one upstream answer may ask at once (FEDMCP_MAX_INPUT_REQUESTS_PER_ROUND)."""
    return max(1, int(getattr(settings, "FEDMCP_MAX_INPUT_REQUESTS_PER_ROUND", 16)))


def check_input_round(peer: str, name: str, requests: Any) -> None:
    """Refuse an upstream's input_required round that asks for more requests than allowed.

    Raises:
        UpstreamFailedError: it asks for more than FEDMCP_MAX_INPUT_REQUESTS_PER_ROUND (-32010).
    """
    count, limit = len(requests) if isinstance(requests, dict) else 0, max_input_requests()
    if count > limit:
        raise jsonrpc.UpstreamFailedError(
            f"peer '{peer}' asked for {count} inputs at once during '{name}'; this gateway passes at most {limit} "
            "per round (FEDMCP_MAX_INPUT_REQUESTS_PER_ROUND)",
            {"reason": "too_many_input_requests", "count": count, "limit": limit},
        )


def _state_for(prompt: ConsentPrompt, approval: Approval) -> str:
    """The signed requestState of a prompt about the call `approval` describes (and no other)."""
    return request_states.issue(request_states.CONSENT, {"p": prompt.id, "b": approval.binding(None)}, salt=STATE_SALT)


def _consent_state(state: str) -> tuple[str, str]:
    """Return (prompt id, binding of the call it was issued for) from one of our consent states.

    A state issued before states were bound to their call has an empty binding, which no call matches.

    Raises:
        InvalidParamsError: not a consent state this gateway issued.
    """
    data = request_states.read(request_states.CONSENT, state, salt=STATE_SALT, max_age=consent.timeout_setting() + 3600)
    if not isinstance(data, dict) or not isinstance(data.get("p"), str):
        raise jsonrpc.InvalidParamsError("requestState is not one this gateway issued")
    binding = data.get("b")
    return data["p"], binding if isinstance(binding, str) else ""


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


async def wait_for_answer(ctx: HostContext, prompt: ConsentPrompt, url: str, message: str | None = None) -> str:
    """Wait (bounded by the prompt's expiry) for the user's answer; return the prompt's final status.

    A host that sent a progressToken gets a progress notification with `message` (by default
    the call's consent message) while it waits.
    """
    token = ctx.meta.get("progressToken")
    text = message if message is not None else _message(prompt, url)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        if token is None:
            return
        ticks += 1
        await ctx.outbound.send(jsonrpc.notification("notifications/progress", {"progressToken": token, "progress": ticks, "message": text}))

    return await consent.consent_prompt_wait(prompt.id, until=prompt.expires_at, on_tick=tick)


async def hold_for_answer(ctx: HostContext, prompt: ConsentPrompt, url: str, elicitation: JsonDict) -> str:
    """Hold a handshake-era call until the user answers on /consent; return the prompt's final status.

    Where the host declared `elicitation.url`, it is pointed at the page with `elicitation` (the
    gateway's own request, never gated; its answer does not matter, the page's does). A host
    that goes away or cancels takes the prompt off the user's page.
    """
    from mcp_endpoint.forwarding import ask_host

    asking: asyncio.Task[Any] | None = None
    if ctx.has_capability("elicitation", "url") and ctx.outbound.can_request:
        asking = asyncio.create_task(ask_host(ctx, "elicitation/create", elicitation))
    try:
        return await wait_for_answer(ctx, prompt, url, elicitation["message"])
    except asyncio.CancelledError:
        await asyncio.shield(consent.consent_prompt_expire(prompt_id=prompt.id))
        raise
    finally:
        if asking is not None and not asking.done():
            asking.cancel()
            with contextlib.suppress(BaseException):
                await asking


def _strip_state(params: JsonDict) -> JsonDict:
    return {k: v for k, v in params.items() if k not in ("requestState", "inputResponses")}


def approval_for(ctx: HostContext, peer: str, kind: str, name: str, arguments: Any) -> Approval:
    identity = ctx.identity
    if identity is None:
        who, client_id = "", ""
    elif identity.user_id is not None:
        who, client_id = f"user:{identity.user_id}", identity.client_id
    else:
        who, client_id = f"{identity.federated_issuer}#{identity.federated_subject}", identity.client_id
    return Approval(who, client_id, peer, kind, name, arguments_hash(arguments))


def continue_prefix() -> str:
    """How this gateway's own continuation states begin (a peer gateway's, passed on through this one, is an upstream's state here)."""
    return request_states.prefix(request_states.CONTINUE)


def continuation_wrap(approval: Approval, result: JsonDict) -> JsonDict:
    """Return an upstream's `input_required` result for an approved call, with a continuation state.

    The state is a signed part (a fresh single-use nonce, an expiry FEDMCP_CONSENT_CONTINUE_TIMEOUT
    from now, and `approval` bound to the upstream's requestState of this round) and, after
    CONTINUE_SEPARATOR, the upstream's requestState verbatim if it sent one. The host's retry
    with it is not asked about again (`consent_gate`), and the upstream gets its own state back
    unchanged. Any other result is returned as it is.

    Raises:
        UpstreamFailedError: the upstream's requestState is not a string.
    """
    if result.get("resultType") != "input_required":
        return result
    upstream_state = result.get("requestState")
    if upstream_state is not None and not isinstance(upstream_state, str):
        raise jsonrpc.UpstreamFailedError("the upstream answered input_required with a requestState that is not a string")
    claims = {
        "n": secrets.token_urlsafe(16),
        "e": int(time.time() + consent.continue_timeout_setting()),
        "b": approval.binding(upstream_state),
    }
    state = continue_prefix() + signing.dumps(claims, salt=CONTINUE_SALT)
    if upstream_state is not None:
        state += CONTINUE_SEPARATOR + upstream_state
    return {**result, "requestState": state}


def _continuation(approval: Approval, state: str) -> Continuation:
    """Verify a continuation state for the call `approval` describes (expired or not); return it.

    Raises:
        InvalidParamsError: not a state this gateway issued, or one for another call, user or
            upstream state.
    """
    signed, separator, upstream_state = state.removeprefix(continue_prefix()).partition(CONTINUE_SEPARATOR)
    try:
        claims = signing.loads(signed, salt=CONTINUE_SALT)
    except signing.BadSignature as exc:
        raise jsonrpc.InvalidParamsError("requestState is not one this gateway issued") from exc
    if not isinstance(claims, dict) or not all(isinstance(claims.get(k), t) for k, t in (("n", str), ("e", int), ("b", str))):
        raise jsonrpc.InvalidParamsError("requestState is not one this gateway issued")
    continuation = Continuation(approval, claims["n"], claims["e"], upstream_state if separator else None)
    if not hmac.compare_digest(claims["b"], approval.binding(continuation.upstream_state)):
        raise jsonrpc.InvalidParamsError("requestState does not belong to this call")
    return continuation


def _with_upstream_state(params: JsonDict, upstream_state: str | None) -> JsonDict:
    """Return `params` with the continuation state replaced by the upstream's own (or none)."""
    params = {k: v for k, v in params.items() if k != "requestState"}
    if upstream_state is not None:
        params["requestState"] = upstream_state
    return params


async def _continue(continuation: Continuation) -> None:
    """Spend a continuation's nonce.

    Raises:
        InvalidParamsError: it was spent before (a replay).
    """
    expires_at = datetime.fromtimestamp(continuation.expires, tz=UTC)
    if not await consent.consent_continuation_spend(nonce=continuation.nonce, expires_at=expires_at):
        raise jsonrpc.InvalidParamsError("this requestState was already used")


async def consent_unasked(ctx: HostContext, peer: str, kind: str, name: str) -> str:
    """Apply the policy to a request about a prompt or resource that is never asked about; return the audit word.

    `completion/complete` and `resources/subscribe` get the decision prompts/get and
    resources/read get: a deny refuses them. An ask lets them through unasked (the user is
    asked when the prompt is got or the resource read; a prompt for each completion would be
    no use), audited with no decision word; an allow as `allow` (or `grant`).

    Raises:
        ConsentDeniedError: a policy refuses the prompt or resource (-32017).
    """
    decision = await consent_cache.consent_decide(identity=ctx.identity, peer=peer, kind=kind, name=name)
    if decision.action == ConsentDecision.DENY:
        exc = jsonrpc.ConsentDeniedError(f"A consent policy refuses the {kind} '{name}' on peer '{peer}'", {"reason": decision.reason})
        exc.consent_decision = "deny"  # type: ignore[attr-defined]
        raise exc
    return decision.label if decision.action == ConsentDecision.ALLOW else ""


async def consent_gate(ctx: HostContext, route: Route, method: str, params: JsonDict, name: str) -> Gate:
    """Apply consent to one call about to be forwarded.

    A 2026-07-28 retry carrying this gateway's consent state waits for the user's answer only
    when it is the exact call the prompt showed (caller, client, peer, kind, name, arguments:
    `Approval.binding`); any other call carrying it is decided, and asked about, afresh.
    A retry carrying this gateway's continuation state (`continuation_wrap`) is not asked
    about again while the continuation lasts; policies still apply to it.
    `completion/complete` gets the policy of the prompt or resource it completes (`consent_unasked`).

    Raises:
        ConsentDeniedError: a policy or the user refused (-32017).
        ConsentTimeoutError: nobody answered in time (-32018).
        InvalidParamsError: a requestState of this gateway's is forged, spent, or another call's (-32602).
    """
    kind = consent.KIND_FOR_METHOD.get(method)
    if kind is None:
        ref = params.get("ref") if method == "completion/complete" and isinstance(params.get("ref"), dict) else {}
        ref_type = ref.get("type")
        looked_up = consent.KIND_FOR_COMPLETION_REF.get(ref_type) if isinstance(ref_type, str) else None
        if looked_up is None:
            return Gate(params=params)
        return Gate(decision=await consent_unasked(ctx, route.peer.name, looked_up, name), params=params)
    peer = route.peer.name
    state = params.get("requestState")
    if ctx.era == "modern" and request_states.is_ours(request_states.CONSENT, state):
        prompt_id, binding = _consent_state(state)
        prompt = await consent.consent_prompt_for(prompt_id=prompt_id, identity=ctx.identity)
        if prompt is None or prompt.owner_gateway:
            raise jsonrpc.InvalidParamsError("requestState does not belong to this call")
        approval = approval_for(ctx, peer, kind, name, _arguments(method, params))
        if hmac.compare_digest(binding, approval.binding(None)):
            url = consent_url(ctx, prompt.id)
            status = await wait_for_answer(ctx, prompt, url)
            word = await _finish(prompt, status, url)
            return Gate(decision=word, params=_strip_state(params), approval=approval)
        # The user approves the exact call shown on /consent: this caller (user or federated
        # identity and client application), peer, tool and arguments. Any other call carrying
        # the state is a new call, decided and, if need be, asked about afresh; the approval
        # stays for the call it was given to.
        params = _strip_state(params)
    continuation: Continuation | None = None
    if ctx.era == "modern" and isinstance(state, str) and state.startswith(continue_prefix()):
        # A further round of a call the user approved; it still passes the policies below.
        continuation = _continuation(approval_for(ctx, peer, kind, name, _arguments(method, params)), state)
        params = _with_upstream_state(params, continuation.upstream_state)

    decision = await consent_cache.consent_decide(identity=ctx.identity, peer=peer, kind=kind, name=name)
    if decision.action == ConsentDecision.ALLOW:
        return Gate(decision=decision.label, params=params)
    if decision.action == ConsentDecision.DENY:
        exc = jsonrpc.ConsentDeniedError(f"A consent policy refuses the {kind} call '{name}' on peer '{peer}'", {"reason": decision.reason})
        exc.consent_decision = "deny"  # type: ignore[attr-defined]
        raise exc
    if continuation is not None and not continuation.is_expired():
        await _continue(continuation)
        return Gate(decision=CONTINUED, params=params, approval=continuation.approval)
    if continuation is not None:
        # The approval lapsed: asked afresh, and once approved the call starts over upstream
        # (the retry of the gateway's own input_required carries no upstream state).
        params = _strip_state(params)

    if ctx.identity is not None and ctx.identity.user_id is None and ctx.identity.federated_issuer:
        # A user of a trusted gateway, not linked to an account here: their home gateway asks.
        word = await _ask_home(ctx, peer, kind, name, _arguments(method, params), decision)
        return Gate(decision=word, params=params, approval=approval_for(ctx, peer, kind, name, _arguments(method, params)))
    if ctx.identity is None or ctx.identity.user_id is None:
        # Nobody could answer on /consent (a client-only token): refuse now rather than wait
        # out the timeout.
        exc = jsonrpc.ConsentDeniedError(
            f"The {kind} call '{name}' on peer '{peer}' needs the user's consent, and no local user can be asked",
            {"reason": "no local user to ask"},
        )
        exc.consent_decision = "deny"  # type: ignore[attr-defined]
        raise exc
    approval = approval_for(ctx, peer, kind, name, _arguments(method, params))
    prompt = await prompt_or_refusal(
        ctx,
        consent.consent_prompt_create(
            identity=ctx.identity, peer=peer, kind=kind, name=name, arguments=_arguments(method, params),
            decision=decision, timeout=consent.timeout_setting(),
        ),
    )
    url = consent_url(ctx, prompt.id)
    elicitation = {"mode": "url", "message": _message(prompt, url), "url": url, "elicitationId": prompt.id}
    if ctx.era == "modern":
        result = {
            "resultType": "input_required",
            "inputRequests": {INPUT_KEY: {"method": "elicitation/create", "params": elicitation}},
            "requestState": _state_for(prompt, approval),
        }
        return Gate(decision="ask", result=result)

    # Handshake era: this very call waits on the prompt it created, with its own params, so the
    # answer can't reach another call.
    status = await hold_for_answer(ctx, prompt, url, elicitation)
    word = await _finish(prompt, status, url)
    return Gate(decision=word, params=params, approval=approval)


# --- sampling and elicitation requests from upstreams ----------------------------------------
#
# An upstream may ask the host for sampling/createMessage or elicitation/create while serving a
# call. Consent decides (kinds `sampling` / `elicitation`, named by the call's tool) before the
# host sees it: allowed requests are relayed; refused ones are answered with an error the host
# never sees; asked ones wait for the user on /consent, where the page shows what would be sent.
# A user of a trusted peer gateway, who has nobody to ask here, is asked by that gateway
# instead: the request goes on to it marked `DEFERRED_META_KEY` (audit word `home`).
# The gateway's own URL elicitation pointing at /consent (above) does not pass through here.

HELD_SALT = "fedmcp.consent.held-input"
DEFERRED_META_KEY = "io.fedmcp/consent-deferred"
"""Marks a request a gateway left to the caller's home gateway to ask about.

Its value says where the request comes from (gateway, server, call) with a signed proof
(identity/deferral.py `mark_create`); older gateways set just their name. Set by a gateway whose
decision is *ask* for a user it cannot ask but whose home gateway gates (`trust.home_gateway`);
kept unchanged by gateways on the way towards the home; honoured only from a peer gateway (a
plain upstream's is dropped); removed where the request reaches the user's host, whose gateway
shows the user the source as far as it can vouch for it (`deferral.source_of`).
"""
HOME = "home"
"""The audit word for a request left to the caller's home gateway (docs/CONSENT.md "Across gateways")."""


@dataclass(frozen=True)
class UpstreamCall:
    """The call during which an upstream sends a server->client request: peer, method, name."""

    peer: str
    method: str
    name: str
    from_gateway: bool = False
    """The peer is a fedmcp gateway this one believes (`PeerConfig.trusted_gateway`: marked by the
    operator and trusted in turn), which has gated its own upstreams' requests already."""
    peer_origin: str = ""
    """A peer gateway's public origin: what signs as that peer (identity/deferral.py)."""
    arguments: Any = field(default=None, compare=False)
    """The call's arguments as sent upstream: requests held for consent go back only to this call (`_held_binding`)."""

    def binding(self, ctx: HostContext) -> str:
        """Digest of this call by this caller (as `Approval.binding`): a held request's state must match it."""
        kind = consent.KIND_FOR_METHOD.get(self.method, self.method)
        return approval_for(ctx, self.peer, kind, self.name, self.arguments).binding(None)
    call_id: str = ""
    """Random, one per host call: the prompts it causes are shown together on /consent."""


def _gated_kind(call: UpstreamCall, method: str, params: Any) -> str | None:
    """The consent kind of an upstream's request (sampling, elicitation), or None for any other request."""
    return consent.REQUEST_KIND_FOR_METHOD.get(method)


def _gated_at_peer(call: UpstreamCall, kind: str, params: Any) -> bool:
    """Whether the request is an elicitation a believed peer gateway gated already.

    Such elicitations include that gateway's own pointers to its consent page, which must
    reach the user, so when no policy of ours names them they pass (`_request_decide`); our
    policies still apply, as to any upstream's. Not when that gateway left the question to us
    (`DEFERRED_META_KEY`), nor from a peer this gateway does not believe (`from_gateway` is
    False: whatever it says of itself). Sampling spends this side's model, so every gateway on
    the way decides for itself.
    """
    return kind == "elicitation" and call.from_gateway and _deferral(call, params) is None


def _deferral(call: UpstreamCall, params: Any) -> Any:
    """The deferral mark a peer gateway put on its request, or None (a plain upstream's counts for nothing)."""
    meta = params.get("_meta") if isinstance(params, dict) else None
    if not call.from_gateway or not isinstance(meta, dict):
        return None
    return meta.get(DEFERRED_META_KEY)


def _with_mark(params: Any, mark: Any) -> Any:
    """Return `params` with the deferral mark set to `mark`, or without it (None); `params` itself if so already."""
    meta = params.get("_meta") if isinstance(params, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    if (mark is None and DEFERRED_META_KEY not in meta) or (mark is not None and meta.get(DEFERRED_META_KEY) == mark):
        return params
    meta = {k: v for k, v in meta.items() if k != DEFERRED_META_KEY}
    if mark is not None:
        meta[DEFERRED_META_KEY] = mark
    changed = {k: v for k, v in (params if isinstance(params, dict) else {}).items() if k != "_meta"}
    if meta:
        changed["_meta"] = meta
    return changed


def _defers(ctx: HostContext, decision: consent.Decision) -> bool:
    """Whether the request is left to the caller's home gateway: *ask*, and nobody to ask here.

    `_request_decide` has refused the case where the caller has no home gateway that gates.
    """
    return decision.action == ConsentDecision.ASK and (ctx.identity is None or ctx.identity.user_id is None)


def _for_caller(ctx: HostContext, call: UpstreamCall, kind: str, params: Any, defer: bool) -> Any:
    """Return the request's params as they go to our caller.

    Marked when the question is left to the user's home: we defer it (our mark names us, the
    upstream and the call, signed), or a peer gateway did and our caller is a gateway acting
    for a user of another (its mark travels on unchanged to the home). Unmarked where the
    request reaches the user's own host.
    """
    identity = ctx.identity
    to_gateway = identity is not None and identity.user_id is None and bool(identity.federated_issuer)
    if not to_gateway:
        return _with_mark(params, None)
    mark = _deferral(call, params)
    if defer and mark is None:
        mark = deferral.mark_create(
            identity=identity, gateway=settings.FEDMCP_GATEWAY_NAME, server=call.peer, call=call.name, kind=kind, params=params
        )
    return _with_mark(params, mark)


def _audit_request(
    ctx: HostContext, call: UpstreamCall, method: str, decision: str, error_code: int | None, started: float, *, input_required: bool = False
) -> None:
    audit_record(
        identity=ctx.identity, peer=call.peer, method=method, name=call.name,
        error_code=error_code, latency_ms=(time.monotonic() - started) * 1000, decision=decision, input_required=input_required,
    )


def _refused(kind: str, call: UpstreamCall, decision: str, why: str, data: JsonDict) -> jsonrpc.JsonRpcError:
    exc = jsonrpc.ConsentDeniedError(f"{why} the {kind} request peer '{call.peer}' sent during '{call.name}'", data)
    exc.consent_decision = decision  # type: ignore[attr-defined]
    return exc


def _request_message(prompt: ConsentPrompt, url: str) -> str:
    source = source_text(prompt.deferred_by) if prompt.deferred_by else f"'{prompt.peer}'"
    return f"fedmcp needs your approval to pass a {prompt.kind} request from {source} (during '{prompt.name}') to you: open {url}"


async def _request_decide(ctx: HostContext, call: UpstreamCall, kind: str, params: Any) -> consent.Decision | None:
    """Return the decision for an upstream request; refuse what a policy or nobody can allow.

    An *ask* comes back for a local user (asked here) and for a user whose home gateway gates
    such requests itself (`_defers`: left to it); anyone else is refused. None: an elicitation
    a believed peer gateway gated already that no policy of ours names (`_gated_at_peer`),
    relayed unasked.

    Raises:
        ConsentDeniedError: a policy denies it, or it must be asked and nobody here or at the
            caller's home gateway can answer.
    """
    at_peer = _gated_at_peer(call, kind, params)
    decision = await consent.consent_decide(
        identity=ctx.identity, peer=call.peer, kind=kind, name=call.name, default=ConsentDecision.ALLOW if at_peer else None
    )
    if at_peer and decision.policy_id is None:
        return None
    if decision.action == ConsentDecision.DENY:
        raise _refused(kind, call, "deny", "A consent policy refuses", {"reason": decision.reason})
    if _defers(ctx, decision) and await trust.home_gateway(ctx.identity) is None:
        raise _refused(kind, call, "deny", "No local user can be asked about", {"reason": "no local user to ask"})
    return decision


async def _request_prompt(
    ctx: HostContext, call: UpstreamCall, kind: str, method: str, params: Any, decision: consent.Decision, held: JsonDict | None = None
) -> ConsentPrompt:
    """Ask our user about an upstream's request, naming its source as far as we can vouch for it."""
    mark = _deferral(call, params)
    deferred_by = None
    if mark is not None:
        deferred_by = await deferral.source_of(
            mark=mark, identity=ctx.identity, peer=call.peer, peer_origin=call.peer_origin, kind=kind, params=params
        )
    return await prompt_or_refusal(
        ctx,
        consent.consent_prompt_create(
            identity=ctx.identity, peer=call.peer, kind=kind, name=call.name, arguments={}, decision=decision,
            timeout=consent.timeout_setting(), request=request_summary(method, params), held=held, deferred_by=deferred_by,
            call=call.call_id,
        ),
    )


async def _request_finish(prompt: ConsentPrompt, status: str, url: str) -> str:
    """Turn the prompt's final status into the audit word, or the refusal.

    Raises:
        ConsentDeniedError: the user denied it.
        ConsentTimeoutError: nobody answered in time.
        InvalidParamsError: the approval was already spent.
    """
    call = UpstreamCall(prompt.peer, "", prompt.name)
    if status == ConsentPrompt.Status.APPROVED:
        if not await consent.consent_prompt_use(prompt_id=prompt.id):
            raise jsonrpc.InvalidParamsError("this consent approval was already used")
        return "approved"
    if status == ConsentPrompt.Status.DENIED:
        raise _refused(prompt.kind, call, "denied", "The user denied", {"consentId": prompt.id})
    exc = jsonrpc.ConsentTimeoutError(
        f"Nobody answered the consent request for the {prompt.kind} request from peer '{prompt.peer}' in time; see {url}",
        {"consentId": prompt.id, "url": url},
    )
    exc.consent_decision = "timeout"  # type: ignore[attr-defined]
    raise exc


async def _request_ask_user(ctx: HostContext, call: UpstreamCall, kind: str, method: str, params: Any, decision: consent.Decision) -> str:
    """Hold a handshake-era request until the user answers on /consent; return the audit word."""
    prompt = await _request_prompt(ctx, call, kind, method, params, decision)
    url = consent_url(ctx, prompt.id)
    elicitation = {"mode": "url", "message": _request_message(prompt, url), "url": url, "elicitationId": prompt.id}
    status = await hold_for_answer(ctx, prompt, url, elicitation)
    return await _request_finish(prompt, status, url)


async def upstream_request_relay(ctx: HostContext, call: UpstreamCall, method: str, params: Any, ask: HostAsker) -> JsonDict:
    """Apply consent to a server->client request an upstream sent during `call`, then relay it.

    `ask` sends it to the host (forwarding.ask_host). Returns the reply for the upstream: the
    host's, or an error (-32017 refused, -32018 unanswered) the host never sees. A request
    left to the caller's home gateway goes to it marked; the home's answer, or its refusal, is
    the reply. Each gated request leaves one audit event: method, the call's peer and name,
    decision and outcome.
    """
    kind = _gated_kind(call, method, params)
    if kind is None:
        return await ask(ctx, method, params)
    started = time.monotonic()
    decision_word = ""
    error_code: int | None = None
    audited = True
    try:
        decision = await _request_decide(ctx, call, kind, params)
        if decision is None:
            audited = False
            return await ask(ctx, method, params)
        decision_word = decision.label
        defer = _defers(ctx, decision)
        if defer:
            # The caller's home gateway asks its user; its refusal comes back as the reply.
            decision_word = HOME
        elif decision.action == ConsentDecision.ASK:
            decision_word = await _request_ask_user(ctx, call, kind, method, params, decision)
        reply = await ask(ctx, method, _for_caller(ctx, call, kind, params, defer))
        if "error" in reply:
            code = reply["error"].get("code") if isinstance(reply["error"], dict) else None
            error_code = code if isinstance(code, int) and not isinstance(code, bool) else jsonrpc.UPSTREAM_ERROR
        return reply
    except jsonrpc.JsonRpcError as exc:
        error_code = exc.code
        decision_word = getattr(exc, "consent_decision", decision_word)
        return {"error": exc.to_error()}
    except asyncio.CancelledError:
        error_code = jsonrpc.REQUEST_CANCELLED
        raise
    except BaseException:
        error_code = jsonrpc.INTERNAL_ERROR
        raise
    finally:
        if audited:
            _audit_request(ctx, call, method, decision_word, error_code, started)


async def upstream_input_gate(ctx: HostContext, call: UpstreamCall, result: JsonDict) -> JsonDict:
    """Apply consent to the sampling/elicitation requests in an upstream's input_required result.

    For a 2026-07-28 host, which receives them inside the result. All allowed: the result goes
    on unchanged (but for the deferral marks, `_for_caller`). One refused: the call fails
    (-32017); MRTR servers keep no state, so nothing upstream waits. Any to ask: the host gets
    the gateway's own input_required instead, URL elicitations to the prompts, and the
    upstream's result stays in the database (never in the host's hands) until its retry with
    the signed `requestState` finds them approved. Any left to the caller's home gateway (a
    peer gateway calling for one of its users): passed on marked, for the home to gate.

    Raises:
        ConsentDeniedError: a policy refuses one of the requests.
    """
    requests = result.get("inputRequests")
    if result.get("resultType") != "input_required" or not isinstance(requests, dict):
        return result
    check_input_round(call.peer, call.name, requests)
    passed: JsonDict = {}
    to_ask: list[tuple[JsonDict, str, consent.Decision]] = []
    for key, request in requests.items():
        kind = _gated_kind(call, str(request.get("method")), request.get("params")) if isinstance(request, dict) else None
        if kind is None:
            passed[key] = request
            continue
        started = time.monotonic()
        try:
            decision = await _request_decide(ctx, call, kind, request.get("params"))
        except jsonrpc.JsonRpcError as exc:
            _audit_request(ctx, call, request["method"], getattr(exc, "consent_decision", "deny"), exc.code, started)
            raise
        if decision is None:
            passed[key] = request
            continue
        defer = _defers(ctx, decision)
        if decision.action == ConsentDecision.ASK and not defer:
            to_ask.append((request, kind, decision))
        else:
            _audit_request(ctx, call, request["method"], HOME if defer else decision.label, None, started)
        params = _for_caller(ctx, call, kind, request.get("params"), defer)
        passed[key] = request if params is request.get("params") else {**request, "params": params}
    if any(passed[key] is not request for key, request in requests.items()):
        result = {**result, "inputRequests": passed}
    if not to_ask:
        return result
    prompts: list[ConsentPrompt] = []
    started = time.monotonic()
    try:
        # All of the round's questions or none: a round the user has no room for is refused whole.
        await consent.consent_prompt_room(identity=ctx.identity, needed=len(to_ask))
        for request, kind, decision in to_ask:
            started = time.monotonic()
            prompts.append(await _request_prompt(ctx, call, kind, request["method"], request.get("params"), decision, None if prompts else result))
            # The host is sent to /consent (the gateway's own input_required), not handed the request.
            _audit_request(ctx, call, request["method"], "ask", None, started, input_required=True)
    except (consent.TooManyPendingPromptsError, jsonrpc.RateLimitedError) as exc:
        refusal = too_many_prompts(ctx, exc) if isinstance(exc, consent.TooManyPendingPromptsError) else exc
        # Another call of the user's may have taken the room meanwhile: take this round's questions back.
        for prompt in prompts:
            await consent.consent_prompt_expire(prompt_id=prompt.id)
        _audit_request(ctx, call, to_ask[len(prompts)][0]["method"], "deny", refusal.code, started)
        raise refusal from exc
    inputs: JsonDict = {}
    for index, prompt in enumerate(prompts):
        url = consent_url(ctx, prompt.id)
        params = {"mode": "url", "message": _request_message(prompt, url), "url": url, "elicitationId": prompt.id}
        inputs[f"{INPUT_KEY}-{index}"] = {"method": "elicitation/create", "params": params}
    state = request_states.issue(request_states.HELD, {"p": [p.id for p in prompts], "b": call.binding(ctx)}, salt=HELD_SALT)
    return {"resultType": "input_required", "inputRequests": inputs, "requestState": state}


def _held_prompt_ids(ctx: HostContext, call: UpstreamCall, state: str) -> list[str]:
    """Return the prompts a held state names, if it was issued for this very call by this caller.

    Raises:
        InvalidParamsError: not our state, or one for another call, arguments or client.
    """
    data = request_states.read(request_states.HELD, state, salt=HELD_SALT, max_age=consent.timeout_setting() + 3600)
    ids = data.get("p") if isinstance(data, dict) else None
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise jsonrpc.InvalidParamsError("requestState is not one this gateway issued")
    binding = data.get("b")
    if not isinstance(binding, str) or not hmac.compare_digest(binding, call.binding(ctx)):
        raise jsonrpc.InvalidParamsError("requestState does not belong to this call")
    return ids


async def upstream_input_resume(ctx: HostContext, call: UpstreamCall, params: JsonDict) -> JsonDict | None:
    """Answer a 2026-07-28 host's retry of a call whose upstream input requests were held.

    Returns None when the retry carries no such state (forward as usual); otherwise waits for
    the prompts and returns the upstream's held input_required result once all are approved.

    Raises:
        InvalidParamsError: the state is forged, someone else's, another call's, or spent.
        ConsentDeniedError / ConsentTimeoutError: the user denied, or nobody answered in time.
    """
    state = params.get("requestState")
    if ctx.era != "modern" or not request_states.is_ours(request_states.HELD, state):
        return None
    prompts: list[ConsentPrompt] = []
    for prompt_id in _held_prompt_ids(ctx, call, state):
        prompt = await consent.consent_prompt_for(prompt_id=prompt_id, identity=ctx.identity)
        if prompt is None or prompt.peer != call.peer or prompt.name != call.name or prompt.kind not in consent.REQUEST_KIND_FOR_METHOD.values():
            raise jsonrpc.InvalidParamsError("requestState does not belong to this call")
        prompts.append(prompt)
    held = prompts[0].held
    if not isinstance(held, dict):
        raise jsonrpc.InvalidParamsError("requestState does not belong to this call")
    for prompt in prompts:
        started = time.monotonic()
        method = (prompt.request or {}).get("method", "")
        url = consent_url(ctx, prompt.id)
        try:
            word = await _request_finish(prompt, await wait_for_answer(ctx, prompt, url, _request_message(prompt, url)), url)
        except jsonrpc.JsonRpcError as exc:
            _audit_request(ctx, call, method, getattr(exc, "consent_decision", ""), exc.code, started)
            raise
        _audit_request(ctx, call, method, word, None, started)
    return dict(held)


def _home_refused(message: str, data: JsonDict, audit_word: str) -> jsonrpc.ConsentDeniedError:
    exc = jsonrpc.ConsentDeniedError(message, data)
    exc.consent_decision = audit_word  # type: ignore[attr-defined]
    return exc


async def _ask_home(ctx: HostContext, peer: str, kind: str, name: str, arguments: Any, decision: consent.Decision) -> str:
    """Distributed consent, at the owner: settle the home gateway's decision, or send it our question.

    The first call gets -32019 with a challenge for the user's home gateway
    (identity/remote_consent.py); the home asks its user and calls again with its signed
    decision in `_meta["io.fedmcp/consent-decision"]`. Returns "approved" for an approval.

    Raises:
        ConsentRequiredAtHomeError: the question for the home gateway (-32019).
        ConsentDeniedError: the user denied at home, or the decision is not acceptable (-32017).
    """
    identity = ctx.identity
    raw = ctx.meta.get(remote_consent.DECISION_META_KEY)
    if raw is not None:
        try:
            settled = await remote_consent.remote_consent_settle(raw=raw, identity=identity, peer=peer, kind=kind, name=name, arguments=arguments)
        except remote_consent.RemoteConsentError as exc:
            raise _home_refused(f"The consent decision from the home gateway is not acceptable: {exc.description}", {"reason": exc.reason}, "rejected") from exc
        if settled.approved:
            return "approved"
        home = identity.federated_issuer
        raise _home_refused(
            f"The user denied the {kind} call '{name}' on peer '{peer}' at their home gateway", {"reason": "denied at home gateway", "home": home}, "denied"
        )
    try:
        issuer()
    except AssertionConfigError as exc:
        raise _home_refused(
            f"The {kind} call '{name}' on peer '{peer}' needs the consent of a user of another gateway, and this gateway "
            f"cannot ask it: {exc}",
            {"reason": "no local user to ask"},
            "deny",
        ) from exc
    challenge = await remote_consent.remote_consent_open(
        identity=identity, peer=peer, kind=kind, name=name, arguments=arguments,
        redacted=consent.redact(arguments, decision.redact_fields), expires_at=remote_consent.owner_expiry(consent.timeout_setting()),
    )
    exc = jsonrpc.ConsentRequiredAtHomeError(
        f"The {kind} call '{name}' on peer '{peer}' at gateway '{settings.FEDMCP_GATEWAY_NAME}' needs the consent of "
        f"{identity.federated_subject}, which their home gateway {identity.federated_issuer} asks for",
        {"challenge": challenge, "gateway": settings.FEDMCP_GATEWAY_NAME, "home": identity.federated_issuer},
    )
    exc.consent_decision = "ask-home"  # type: ignore[attr-defined]
    raise exc
