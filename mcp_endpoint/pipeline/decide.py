"""Step 3: decide a call: policy and grants, then ask the user (here, or at their home gateway) and wait.

Returns a `Verdict` (values.py): the call goes on, the host is answered now, or it is refused;
its audit word says which decision led there.

A call that must be asked creates a `ConsentPrompt` and points the host at /consent/<id>:

* handshake era: the call waits here (bounded by FEDMCP_CONSENT_TIMEOUT), sending progress
  notifications if the host sent a progressToken, and a URL-mode `elicitation/create` if the
  host declared `elicitation.url`;
* 2026-07-28: the call returns an `input_required` result whose input request is a URL
  elicitation to the consent page and whose `requestState` names the prompt and binds the
  exact call (signed); the retry of that same call waits for (or picks up) the answer.

A user asserted by a trusted peer gateway (and not linked to an account here) is asked at
their home gateway instead (`_ask_home`; docs/CONSENT.md "Distributed consent").
"""

from __future__ import annotations

import hmac
from typing import Any

from django.conf import settings

from federation.router import Route
from federation.upstream.base import JsonDict
from identity.consent import decisions
from identity.consent.policy import KIND_FOR_COMPLETION_REF, Decision, redact
from identity.consent.prompts import TooManyPendingPromptsError, consent_prompt_create, consent_prompt_for, consent_prompt_for_retry, timeout_setting
from identity.consent.remote import DECISION_META_KEY, RemoteConsentError, owner_expiry, remote_consent_open, remote_consent_settle
from identity.models import ConsentDecision, ConsentPrompt
from identity.trust.signing import AssertionConfigError, issuer
from mcp_endpoint import jsonrpc, request_states
from mcp_endpoint.context import HostContext
from mcp_endpoint.pipeline.asking import (
    asked_at_home,
    consent_url,
    hold_for_answer,
    input_required,
    settle,
    strip_state,
    too_many_prompts,
    url_elicitation,
    wait_for_answer,
)
from mcp_endpoint.pipeline.continuation import (
    CONTINUED,
    Continuation,
    continuation_read,
    continuation_spend,
    is_continuation,
    with_upstream_state,
)
from mcp_endpoint.pipeline.values import Approval, CallSubject, Verdict

STATE_SALT = "fedmcp.consent.request-state"


def _state_for(prompt: ConsentPrompt, approval: Approval) -> str:
    """The signed requestState of a prompt about the call `approval` describes (and no other)."""
    return request_states.issue(request_states.CONSENT, {"p": prompt.id, "b": approval.binding(None)}, salt=STATE_SALT)


def _consent_state(state: str) -> tuple[str, str]:
    """Return (prompt id, binding of the call it was issued for) from one of our consent states.

    A state issued before states were bound to their call has an empty binding, which no call matches.

    Raises:
        InvalidParamsError: not a consent state this gateway issued.
    """
    data = request_states.read(request_states.CONSENT, state, salt=STATE_SALT, max_age=timeout_setting() + 3600)
    if not isinstance(data, dict) or not isinstance(data.get("p"), str):
        raise jsonrpc.InvalidParamsError("requestState is not one this gateway issued")
    binding = data.get("b")
    return data["p"], binding if isinstance(binding, str) else ""


def _message(prompt: ConsentPrompt, url: str) -> str:
    return f"fedmcp needs your approval to call {prompt.kind} '{prompt.name}' on '{prompt.peer}': open {url}"


async def _settle_call(ctx: HostContext, prompt: ConsentPrompt, status: str, url: str) -> Verdict:
    return await settle(
        prompt, status,
        denied=jsonrpc.ConsentDeniedError(f"The user denied the {prompt.kind} call '{prompt.name}' on peer '{prompt.peer}'", {"consentId": prompt.id}),
        timeout=jsonrpc.ConsentTimeoutError(
            f"Nobody answered the consent request for '{prompt.name}' on peer '{prompt.peer}' in time; see {url}",
            {"consentId": prompt.id, "url": url},
        ),
    )


async def _answered(ctx: HostContext, state: str, approval: Approval, params: JsonDict) -> Verdict | None:
    """The user's answer to the prompt a 2026-07-28 retry's consent state names, if the retry is the call it was asked about (else None).

    Raises:
        InvalidParamsError: the state is not ours, or names a prompt of someone else's.
    """
    prompt_id, binding = _consent_state(state)
    prompt = await consent_prompt_for(prompt_id=prompt_id, identity=ctx.identity)
    if prompt is None or prompt.owner_gateway:
        raise jsonrpc.InvalidParamsError("requestState does not belong to this call")
    if not hmac.compare_digest(binding, approval.binding(None)):
        return None
    url = consent_url(ctx, prompt.id)
    verdict = await _settle_call(ctx, prompt, await wait_for_answer(ctx, prompt, url, _message(prompt, url)), url)
    return verdict if not verdict.goes_on else Verdict(word=verdict.word, params=strip_state(params), approval=approval)


async def consent_unasked(ctx: HostContext, peer: str, kind: str, name: str) -> Verdict:
    """Apply the policy to a request about a prompt or resource that is never asked about.

    `completion/complete` and `resources/subscribe` get the decision prompts/get and
    resources/read get: a deny refuses them (-32017). An ask lets them through unasked (the
    user is asked when the prompt is got or the resource read; a prompt for each completion
    would be no use), audited with no decision word; an allow as `allow` (or `grant`).
    """
    decision = await decisions.consent_decide(identity=ctx.identity, peer=peer, kind=kind, name=name)
    if decision.action == ConsentDecision.DENY:
        return Verdict.refuse(jsonrpc.ConsentDeniedError(f"A consent policy refuses the {kind} '{name}' on peer '{peer}'", {"reason": decision.reason}), "deny")
    return Verdict(word=decision.label if decision.action == ConsentDecision.ALLOW else "")


async def _completion(ctx: HostContext, peer: str, subject: CallSubject, params: JsonDict) -> Verdict:
    """`completion/complete` gets the policy of the prompt or resource it completes, never a question (`consent_unasked`)."""
    ref = params.get("ref") if subject.method == "completion/complete" and isinstance(params.get("ref"), dict) else {}
    ref_type = ref.get("type")
    kind = KIND_FOR_COMPLETION_REF.get(ref_type) if isinstance(ref_type, str) else None
    if kind is None:
        return Verdict(params=params)
    verdict = await consent_unasked(ctx, peer, kind, subject.name)
    return verdict if not verdict.goes_on else Verdict(word=verdict.word, params=params)


async def decide(ctx: HostContext, route: Route, subject: CallSubject, params: JsonDict) -> Verdict:
    """Apply consent to one call about to be forwarded.

    A 2026-07-28 retry carrying this gateway's consent state waits for the user's answer only
    when it is the exact call the prompt showed (`_answered`); any other is decided afresh.
    A retry carrying this gateway's continuation state (continuation.py) is not asked about
    again while the continuation lasts; policies still apply to it.

    Raises:
        InvalidParamsError: a requestState of this gateway's is forged, spent, or another call's (-32602).
    """
    kind, name, peer = subject.kind, subject.name, route.peer.name
    if kind is None:
        return await _completion(ctx, peer, subject, params)
    approval = Approval.of(ctx.identity, peer, kind, name, subject.arguments)
    state = params.get("requestState")
    if ctx.era == "modern" and request_states.is_ours(request_states.CONSENT, state):
        answered = await _answered(ctx, state, approval, params)
        if answered is not None:
            return answered
        # The user approves the exact call shown on /consent: this caller (user or federated
        # identity and client application), peer, tool and arguments. Any other call carrying
        # the state is a new call, decided and, if need be, asked about afresh; the approval
        # stays for the call it was given to.
        params = strip_state(params)
    continuation: Continuation | None = None
    if ctx.era == "modern" and is_continuation(state):
        # A further round of a call the user approved; it still passes the policies below.
        continuation = continuation_read(approval, state)
        params = with_upstream_state(params, continuation.upstream_state)

    decision = await decisions.consent_decide(identity=ctx.identity, peer=peer, kind=kind, name=name)
    if decision.action == ConsentDecision.ALLOW:
        return Verdict(word=decision.label, params=params)
    if decision.action == ConsentDecision.DENY:
        refusal = jsonrpc.ConsentDeniedError(f"A consent policy refuses the {kind} call '{name}' on peer '{peer}'", {"reason": decision.reason})
        return Verdict.refuse(refusal, "deny")
    if continuation is not None and not continuation.is_expired():
        await continuation_spend(continuation)
        return Verdict(word=CONTINUED, params=params, approval=continuation.approval)
    if continuation is not None:
        # The approval lapsed: asked afresh, and once approved the call starts over upstream
        # (the retry of the gateway's own input_required carries no upstream state).
        params = strip_state(params)

    if ctx.identity is not None and ctx.identity.is_federated_guest:
        # A user of a trusted gateway, not linked to an account here: their home gateway asks.
        verdict = await _ask_home(ctx, peer, kind, name, subject.arguments, decision)
        return verdict if not verdict.goes_on else Verdict(word=verdict.word, params=params, approval=approval)
    if ctx.identity is None or not ctx.identity.is_local_user:
        # Nobody could answer on /consent (a client-only token): refuse now rather than wait
        # out the timeout.
        return Verdict.refuse(
            jsonrpc.ConsentDeniedError(
                f"The {kind} call '{name}' on peer '{peer}' needs the user's consent, and no local user can be asked",
                {"reason": "no local user to ask"},
            ),
            "deny",
        )
    return await _ask_user(ctx, peer, subject, params, decision, approval)


async def _ask_user(ctx: HostContext, peer: str, subject: CallSubject, params: JsonDict, decision: Decision, approval: Approval) -> Verdict:
    """Ask our user on /consent, in the way the host can take it.

    A host shown the page (it declared URL elicitation) is sent there: a 2026-07-28 host at once
    (`ask`, input_required), a handshake-era call waits for the answer. Any other host is
    refused at once with the page's URL (-32032, `ask`: docs/CONSENT.md "Hosts that cannot show
    a URL"), unless FEDMCP_CONSENT_HOLD=all keeps handshake-era calls waiting; the same call
    sent again once the user approved goes through (`approved`), and while the question is
    open, sending it again asks nothing new.
    """
    prompt = await consent_prompt_for_retry(identity=ctx.identity, binding=approval.binding(None))
    if prompt is not None and prompt.status == ConsentPrompt.Status.APPROVED:
        verdict = await _settle_call(ctx, prompt, prompt.status, consent_url(ctx, prompt.id))
        return Verdict(word=verdict.word, params=params, approval=approval)
    shown = ctx.has_capability("elicitation", "url")
    if ctx.era == "modern":
        waits = shown
    else:
        waits = (shown and ctx.outbound.can_request) or settings.FEDMCP_CONSENT_HOLD == "all"
    if prompt is None or waits:
        # A call that waits (or is sent to the page) has a prompt of its own; a refused one
        # sent again while its question is open points at the same page.
        try:
            prompt = await consent_prompt_create(
                identity=ctx.identity, peer=peer, kind=approval.kind, name=subject.name, arguments=subject.arguments,
                decision=decision, timeout=timeout_setting(), binding=approval.binding(None),
            )
        except TooManyPendingPromptsError as exc:
            return Verdict.refuse(too_many_prompts(ctx, exc), "deny")
    url = consent_url(ctx, prompt.id)
    elicitation = url_elicitation(prompt, url, _message(prompt, url))
    if not waits:
        return Verdict.refuse(_approval_needed(prompt, url), "ask")
    if ctx.era == "modern":
        return Verdict(word="ask", answer=input_required(elicitation, _state_for(prompt, approval)))
    # Handshake era: this very call waits on the prompt it created, with its own params, so the
    # answer can't reach another call.
    verdict = await _settle_call(ctx, prompt, await hold_for_answer(ctx, prompt, url, elicitation), url)
    return verdict if not verdict.goes_on else Verdict(word=verdict.word, params=params, approval=approval)


def _approval_needed(prompt: ConsentPrompt, url: str) -> jsonrpc.ConsentRequiredError:
    """The refusal that tells a person where to approve the call, and that sending it again then works (-32032)."""
    return jsonrpc.ConsentRequiredError(
        f"Approval needed: fedmcp asks you before it calls {prompt.kind} '{prompt.name}' on '{prompt.peer}'. "
        f"Open {url} , approve, then send the same request again.",
        {
            "consentId": prompt.id,
            "url": url,
            "expiresAt": prompt.expires_at.isoformat(),
            # After SEP-2643 (structured authorization denials): why, and what remedies it.
            "authorization": {"status": "consent_required", "remediation": [{"type": "url", "url": url}], "retry": "same request"},
        },
    )


async def _ask_home(ctx: HostContext, peer: str, kind: str, name: str, arguments: Any, decision: Decision) -> Verdict:
    """Distributed consent, at the owner: settle the home gateway's decision, or send it our question.

    The first call is refused with -32019 (`ask-home`) carrying a challenge for the user's home
    gateway (identity/consent/remote.py); the home asks its user and calls again with its signed
    decision in `_meta["io.fedmcp/consent-decision"]`: `approved`, or refused `denied`, or
    `rejected` when the decision is not acceptable.
    """
    identity = ctx.identity
    raw = ctx.meta.get(DECISION_META_KEY)
    if raw is not None:
        try:
            settled = await remote_consent_settle(raw=raw, identity=identity, peer=peer, kind=kind, name=name, arguments=arguments)
        except RemoteConsentError as exc:
            return Verdict.refuse(
                jsonrpc.ConsentDeniedError(f"The consent decision from the home gateway is not acceptable: {exc.description}", {"reason": exc.reason}),
                "rejected",
            )
        if settled.approved:
            return Verdict(word="approved")
        return Verdict.refuse(
            jsonrpc.ConsentDeniedError(
                f"The user denied the {kind} call '{name}' on peer '{peer}' at their home gateway",
                {"reason": "denied at home gateway", "home": identity.federated_issuer},
            ),
            "denied",
        )
    try:
        issuer()
    except AssertionConfigError as exc:
        return Verdict.refuse(
            jsonrpc.ConsentDeniedError(
                f"The {kind} call '{name}' on peer '{peer}' needs the consent of a user of another gateway, and this gateway "
                f"cannot ask it: {exc}",
                {"reason": "no local user to ask"},
            ),
            "deny",
        )
    challenge = await remote_consent_open(
        identity=identity, peer=peer, kind=kind, name=name, arguments=arguments,
        redacted=redact(arguments, decision.redact_fields), expires_at=owner_expiry(timeout_setting()),
    )
    gateway = settings.FEDMCP_GATEWAY_NAME
    return asked_at_home(identity, challenge, gateway, f"The {kind} call '{name}' on peer '{peer}' at gateway '{gateway}'")
