"""Sampling and elicitation requests an upstream sends during a call, gated by consent before the host sees them.

Consent decides (kinds `sampling` / `elicitation`, named by the call's tool) with the same
function as for calls (identity/consent/decisions.py `consent_decide`): allowed requests are
relayed; refused ones are answered with an error the host never sees; asked ones wait for the
user on /consent, where the page shows what would be sent. A user of a trusted peer gateway,
who has nobody to ask here, is asked by that gateway instead: the request goes on to it marked
`DEFERRED_META_KEY` (audit word `home`). The gateway's own URL elicitation pointing at
/consent does not pass through here.

* handshake-era host: `relay_to` relays each request as it comes (`upstream_request_relay`);
* 2026-07-28 host: the requests come inside an `input_required` result (`upstream_input_gate`),
  and one the user must be asked about is held until the host's retry (`upstream_input_resume`).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings

from federation.upstream.base import JsonDict, error_reply
from identity.consent import decisions, deferral
from identity.consent.policy import KIND_FOR_METHOD, REQUEST_KIND_FOR_METHOD, Decision
from identity.consent.prompts import (
    TooManyPendingPromptsError,
    consent_prompt_create,
    consent_prompt_expire,
    consent_prompt_for,
    consent_prompt_room,
    timeout_setting,
)
from identity.consent.upstream_requests import request_summary, source_text
from identity.models import ConsentDecision, ConsentPrompt
from identity.trust import gateways
from mcp_endpoint import jsonrpc, request_states
from mcp_endpoint.context import HostContext
from mcp_endpoint.pipeline.asking import INPUT_KEY, consent_url, hold_for_answer, settle, too_many_prompts, url_elicitation, wait_for_answer
from mcp_endpoint.pipeline.host import ask_host, host_refusal
from mcp_endpoint.pipeline.record import record_request
from mcp_endpoint.pipeline.values import Approval, Verdict

logger = logging.getLogger(__name__)

HostAsker = Callable[[HostContext, str, Any], Awaitable[JsonDict]]

HELD_SALT = "fedmcp.consent.held-input"
DEFERRED_META_KEY = "io.fedmcp/consent-deferred"
"""Marks a request a gateway left to the caller's home gateway to ask about.

Its value says where the request comes from (gateway, server, call) with a signed proof
(identity/consent/deferral.py `mark_create`); older gateways set just their name. Set by a gateway whose
decision is *ask* for a user it cannot ask but whose home gateway gates (`gateways.home_gateway`);
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
    """A peer gateway's public origin: what signs as that peer (identity/consent/deferral.py)."""
    arguments: Any = field(default=None, compare=False)
    """The call's arguments as sent upstream: requests held for consent go back only to this call."""
    call_id: str = ""
    """Random, one per host call: the prompts it causes are shown together on /consent."""

    def binding(self, ctx: HostContext) -> str:
        """Digest of this call by this caller (as `Approval.binding`): a held request's state must match it."""
        kind = KIND_FOR_METHOD.get(self.method, self.method)
        return Approval.of(ctx.identity, self.peer, kind, self.name, self.arguments).binding(None)


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


async def ask_upstreams_request(ctx: HostContext, call: UpstreamCall, method: str, params: Any) -> JsonDict:
    """Relay a server->client request an upstream sent during `call`, consent permitting.

    What the host could not receive anyway is refused without asking anyone.
    """
    refusal = host_refusal(ctx, method)
    if refusal is not None:
        return refusal
    return await upstream_request_relay(ctx, call, method, params, ask_host)


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


def _defers(ctx: HostContext, decision: Decision) -> bool:
    """Whether the request is left to the caller's home gateway: *ask*, and nobody to ask here.

    `_request_decide` has refused the case where the caller has no home gateway that gates.
    """
    return decision.action == ConsentDecision.ASK and (ctx.identity is None or not ctx.identity.is_local_user)


def _for_caller(ctx: HostContext, call: UpstreamCall, kind: str, params: Any, defer: bool) -> Any:
    """Return the request's params as they go to our caller.

    Marked when the question is left to the user's home: we defer it (our mark names us, the
    upstream and the call, signed), or a peer gateway did and our caller is a gateway acting
    for a user of another (its mark travels on unchanged to the home). Unmarked where the
    request reaches the user's own host.
    """
    identity = ctx.identity
    if identity is None or not identity.is_federated_guest:
        return _with_mark(params, None)
    mark = _deferral(call, params)
    if defer and mark is None:
        mark = deferral.mark_create(
            identity=identity, gateway=settings.FEDMCP_GATEWAY_NAME, server=call.peer, call=call.name, kind=kind, params=params
        )
    return _with_mark(params, mark)


def _refused(kind: str, call: UpstreamCall, word: str, why: str, data: JsonDict) -> Verdict:
    return Verdict.refuse(jsonrpc.ConsentDeniedError(f"{why} the {kind} request peer '{call.peer}' sent during '{call.name}'", data), word)


def _request_message(prompt: ConsentPrompt, url: str) -> str:
    source = source_text(prompt.deferred_by) if prompt.deferred_by else f"'{prompt.peer}'"
    return f"fedmcp needs your approval to pass a {prompt.kind} request from {source} (during '{prompt.name}') to you: open {url}"


async def _request_decide(ctx: HostContext, call: UpstreamCall, kind: str, params: Any) -> Decision | Verdict | None:
    """Return the decision for an upstream request, or the refusal of what a policy or nobody can allow.

    An *ask* comes back for a local user (asked here) and for a user whose home gateway gates
    such requests itself (`_defers`: left to it); anyone else is refused (`deny`). None: an
    elicitation a believed peer gateway gated already that no policy of ours names
    (`_gated_at_peer`), relayed unasked.
    """
    at_peer = _gated_at_peer(call, kind, params)
    decision = await decisions.consent_decide(
        identity=ctx.identity, peer=call.peer, kind=kind, name=call.name, default=ConsentDecision.ALLOW if at_peer else None
    )
    if at_peer and decision.policy_id is None:
        return None
    if decision.action == ConsentDecision.DENY:
        return _refused(kind, call, "deny", "A consent policy refuses", {"reason": decision.reason})
    if _defers(ctx, decision) and await gateways.home_gateway(ctx.identity) is None:
        return _refused(kind, call, "deny", "No local user can be asked about", {"reason": "no local user to ask"})
    return decision


async def _request_prompt(
    ctx: HostContext, call: UpstreamCall, kind: str, method: str, params: Any, decision: Decision, held: JsonDict | None = None
) -> ConsentPrompt:
    """Ask our user about an upstream's request, naming its source as far as we can vouch for it.

    Raises:
        TooManyPendingPromptsError: the user has as many prompts waiting as allowed.
    """
    mark = _deferral(call, params)
    deferred_by = None
    if mark is not None:
        deferred_by = await deferral.source_of(
            mark=mark, identity=ctx.identity, peer=call.peer, peer_origin=call.peer_origin, kind=kind, params=params
        )
    return await consent_prompt_create(
        identity=ctx.identity, peer=call.peer, kind=kind, name=call.name, arguments={}, decision=decision,
        timeout=timeout_setting(), request=request_summary(method, params), held=held, deferred_by=deferred_by,
        call=call.call_id,
    )


async def _request_settle(prompt: ConsentPrompt, status: str, url: str) -> Verdict:
    """Turn the prompt's final status into `approved`, or the refusal (`denied`, `timeout`)."""
    call = UpstreamCall(prompt.peer, "", prompt.name)
    return await settle(
        prompt, status,
        denied=_refused(prompt.kind, call, "denied", "The user denied", {"consentId": prompt.id}).refusal,  # type: ignore[arg-type]
        timeout=jsonrpc.ConsentTimeoutError(
            f"Nobody answered the consent request for the {prompt.kind} request from peer '{prompt.peer}' in time; see {url}",
            {"consentId": prompt.id, "url": url},
        ),
    )


async def _request_ask_user(ctx: HostContext, call: UpstreamCall, kind: str, method: str, params: Any, decision: Decision) -> Verdict:
    """Hold a handshake-era request until the user answers on /consent."""
    try:
        prompt = await _request_prompt(ctx, call, kind, method, params, decision)
    except TooManyPendingPromptsError as exc:
        return Verdict.refuse(too_many_prompts(ctx, exc), "deny")
    url = consent_url(ctx, prompt.id)
    status = await hold_for_answer(ctx, prompt, url, url_elicitation(prompt, url, _request_message(prompt, url)))
    return await _request_settle(prompt, status, url)


async def upstream_request_relay(ctx: HostContext, call: UpstreamCall, method: str, params: Any, ask: HostAsker) -> JsonDict:
    """Apply consent to a server->client request an upstream sent during `call`, then relay it.

    `ask` sends it to the host (host.py `ask_host`). Returns the reply for the upstream: the
    host's, or an error (-32017 refused, -32018 unanswered) the host never sees. A request
    left to the caller's home gateway goes to it marked; the home's answer, or its refusal, is
    the reply. Each gated request leaves one audit event: method, the call's peer and name,
    decision and outcome.
    """
    kind = REQUEST_KIND_FOR_METHOD.get(method)
    if kind is None:
        return await ask(ctx, method, params)
    started = time.monotonic()
    word = ""
    error_code: int | None = None
    audited = True
    try:
        decided = await _request_decide(ctx, call, kind, params)
        if decided is None:
            audited = False
            return await ask(ctx, method, params)
        if isinstance(decided, Verdict):
            word, error_code = decided.word, decided.refusal.code  # type: ignore[union-attr]
            return {"error": decided.refusal.to_error()}  # type: ignore[union-attr]
        word = decided.label
        defer = _defers(ctx, decided)
        if defer:
            # The caller's home gateway asks its user; its refusal comes back as the reply.
            word = HOME
        elif decided.action == ConsentDecision.ASK:
            verdict = await _request_ask_user(ctx, call, kind, method, params, decided)
            word = verdict.word
            if verdict.refusal is not None:
                error_code = verdict.refusal.code
                return {"error": verdict.refusal.to_error()}
        reply = await ask(ctx, method, _for_caller(ctx, call, kind, params, defer))
        if "error" in reply:
            code = reply["error"].get("code") if isinstance(reply["error"], dict) else None
            error_code = code if isinstance(code, int) and not isinstance(code, bool) else jsonrpc.UPSTREAM_ERROR
        return reply
    except jsonrpc.JsonRpcError as exc:
        error_code = exc.code
        return {"error": exc.to_error()}
    except asyncio.CancelledError:
        error_code = jsonrpc.REQUEST_CANCELLED
        raise
    except BaseException:
        error_code = jsonrpc.INTERNAL_ERROR
        raise
    finally:
        if audited:
            record_request(ctx, call.peer, call.name, method, word, error_code, started)


async def upstream_input_gate(ctx: HostContext, call: UpstreamCall, result: JsonDict) -> Verdict:
    """Apply consent to the sampling/elicitation requests in an upstream's input_required result.

    For a 2026-07-28 host, which receives them inside the result. Returns the result to answer
    with (`answer`), or the refusal. All allowed: the result goes on unchanged (but for the
    deferral marks, `_for_caller`). One refused: the call fails (-32017, `deny`); MRTR servers
    keep no state, so nothing upstream waits. Any to ask: the host gets the gateway's own
    input_required instead, URL elicitations to the prompts, and the upstream's result stays
    in the database (never in the host's hands) until its retry with the signed `requestState`
    finds them approved. Any left to the caller's home gateway (a peer gateway calling for one
    of its users): passed on marked, for the home to gate.
    """
    requests = result.get("inputRequests")
    if result.get("resultType") != "input_required" or not isinstance(requests, dict):
        return Verdict(answer=result)
    check_input_round(call.peer, call.name, requests)
    passed: JsonDict = {}
    to_ask: list[tuple[JsonDict, str, Decision]] = []
    for key, request in requests.items():
        kind = REQUEST_KIND_FOR_METHOD.get(str(request.get("method"))) if isinstance(request, dict) else None
        if kind is None:
            passed[key] = request
            continue
        started = time.monotonic()
        decided = await _request_decide(ctx, call, kind, request.get("params"))
        if isinstance(decided, Verdict):
            record_request(ctx, call.peer, call.name, request["method"], decided.word, decided.refusal.code, started)  # type: ignore[union-attr]
            return decided
        if decided is None:
            passed[key] = request
            continue
        defer = _defers(ctx, decided)
        if decided.action == ConsentDecision.ASK and not defer:
            to_ask.append((request, kind, decided))
        else:
            record_request(ctx, call.peer, call.name, request["method"], HOME if defer else decided.label, None, started)
        params = _for_caller(ctx, call, kind, request.get("params"), defer)
        passed[key] = request if params is request.get("params") else {**request, "params": params}
    if any(passed[key] is not request for key, request in requests.items()):
        result = {**result, "inputRequests": passed}
    if not to_ask:
        return Verdict(answer=result)
    return await _held_for_prompts(ctx, call, result, to_ask)


async def _held_for_prompts(ctx: HostContext, call: UpstreamCall, result: JsonDict, to_ask: list[tuple[JsonDict, str, Decision]]) -> Verdict:
    """Ask the user about `to_ask` (all of the round's questions or none) and keep `result` until they answer.

    The host gets the gateway's own input_required: URL elicitations to the prompts, and a
    signed state its retry carries (`upstream_input_resume`).
    """
    prompts: list[ConsentPrompt] = []
    started = time.monotonic()
    try:
        # A round the user has no room for is refused whole.
        await consent_prompt_room(identity=ctx.identity, needed=len(to_ask))
        for request, kind, decision in to_ask:
            started = time.monotonic()
            prompts.append(await _request_prompt(ctx, call, kind, request["method"], request.get("params"), decision, None if prompts else result))
            # The host is sent to /consent (the gateway's own input_required), not handed the request.
            record_request(ctx, call.peer, call.name, request["method"], "ask", None, started, input_required=True)
    except TooManyPendingPromptsError as exc:
        refusal = too_many_prompts(ctx, exc)
        # Another call of the user's may have taken the room meanwhile: take this round's questions back.
        for prompt in prompts:
            await consent_prompt_expire(prompt_id=prompt.id)
        record_request(ctx, call.peer, call.name, to_ask[len(prompts)][0]["method"], "deny", refusal.code, started)
        return Verdict.refuse(refusal, "deny")
    inputs: JsonDict = {}
    for index, prompt in enumerate(prompts):
        url = consent_url(ctx, prompt.id)
        inputs[f"{INPUT_KEY}-{index}"] = {"method": "elicitation/create", "params": url_elicitation(prompt, url, _request_message(prompt, url))}
    state = request_states.issue(request_states.HELD, {"p": [p.id for p in prompts], "b": call.binding(ctx)}, salt=HELD_SALT)
    return Verdict(answer={"resultType": "input_required", "inputRequests": inputs, "requestState": state})


def _held_prompt_ids(ctx: HostContext, call: UpstreamCall, state: str) -> list[str]:
    """Return the prompts a held state names, if it was issued for this very call by this caller.

    Raises:
        InvalidParamsError: not our state, or one for another call, arguments or client.
    """
    data = request_states.read(request_states.HELD, state, salt=HELD_SALT, max_age=timeout_setting() + 3600)
    ids = data.get("p") if isinstance(data, dict) else None
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise jsonrpc.InvalidParamsError("requestState is not one this gateway issued")
    binding = data.get("b")
    if not isinstance(binding, str) or not hmac.compare_digest(binding, call.binding(ctx)):
        raise jsonrpc.InvalidParamsError("requestState does not belong to this call")
    return ids


def holds_input(ctx: HostContext, params: JsonDict) -> bool:
    """Whether this is a 2026-07-28 host's retry of a call whose upstream input requests were held."""
    return ctx.era == "modern" and request_states.is_ours(request_states.HELD, params.get("requestState"))


async def upstream_input_resume(ctx: HostContext, call: UpstreamCall, params: JsonDict) -> Verdict:
    """Answer a 2026-07-28 host's retry of a call whose upstream input requests were held (`holds_input`).

    Waits for the prompts and answers with the upstream's held input_required result once all
    are approved; refused `denied` or `timeout` otherwise.

    Raises:
        InvalidParamsError: the state is forged, someone else's, another call's, or spent.
    """
    prompts: list[ConsentPrompt] = []
    for prompt_id in _held_prompt_ids(ctx, call, params["requestState"]):
        prompt = await consent_prompt_for(prompt_id=prompt_id, identity=ctx.identity)
        if prompt is None or prompt.peer != call.peer or prompt.name != call.name or prompt.kind not in REQUEST_KIND_FOR_METHOD.values():
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
            verdict = await _request_settle(prompt, await wait_for_answer(ctx, prompt, url, _request_message(prompt, url)), url)
        except jsonrpc.JsonRpcError as exc:
            record_request(ctx, call.peer, call.name, method, "", exc.code, started)
            raise
        record_request(ctx, call.peer, call.name, method, verdict.word, verdict.refusal.code if verdict.refusal else None, started)
        if verdict.refusal is not None:
            return verdict
    return Verdict(answer=dict(held))
