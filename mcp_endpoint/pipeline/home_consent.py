"""Distributed consent on the way to a peer gateway: asking our user, or relaying the question home.

`peer_request` sends one request to a peer gateway (exchange.py). When the peer owns the call
and must ask the user first, it answers -32019 with a signed challenge
(identity/consent/remote.py). Then, if the acting user is

* **ours** (a local user, or a federated identity linked to one): we are the user's home. We
  ask on /consent exactly as for a local prompt (showing the owner gateway and the path) and,
  on the answer, sign a decision and send the call again with it: a handshake-era host waits
  here; a 2026-07-28 host gets `input_required` and its retry carries our `requestState`;
* **a user another gateway asserted to us**: we cannot ask them, so we relay. We keep the
  peer's challenge, ask their home gateway with a challenge of our own, and when its decision
  comes back with the call, sign our own decision for the peer's question;
* **nobody** (a client-only token): refused with -32017, as for a local prompt.

A peer that asks again after its question was answered gets no second answer (-32010).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
from datetime import timedelta
from typing import Any

import jwt
from django.utils import timezone

from federation.credentials import peer_audience
from federation.upstream.base import JsonDict, UpstreamConnection, UpstreamError
from identity.consent.policy import KIND_FOR_METHOD
from identity.consent.prompts import TooManyPendingPromptsError, consent_prompt_for, consent_remote_prompt_create, timeout_setting
from identity.consent.remote import (
    DECISION_META_KEY,
    Question,
    RemoteConsentError,
    challenge_verify,
    decision_create,
    expires_at_of,
    relay_record_for,
    remote_consent_open,
    remote_consent_settle,
)
from identity.models import ConsentPrompt, RemoteConsent
from identity.trust.gateways import assertion_subject
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
from mcp_endpoint.pipeline.envelope import with_fresh_assertion
from mcp_endpoint.pipeline.values import Approval, CallSubject, Verdict

logger = logging.getLogger(__name__)

STATE_SALT = "fedmcp.consent.remote-request-state"
ANSWER_MARGIN = 10
"""Seconds before the owner's challenge expires that our prompt closes, so the answer still arrives in time."""


def _is_challenge(reply: JsonDict) -> bool:
    error = reply.get("error")
    return isinstance(error, dict) and error.get("code") == jsonrpc.CONSENT_REQUIRED_AT_HOME


def _with_decision(params: JsonDict, decision: str) -> JsonDict:
    params = strip_state(params)
    meta = params.get("_meta") if isinstance(params.get("_meta"), dict) else {}
    params["_meta"] = {**meta, DECISION_META_KEY: decision}
    return params


async def peer_request(ctx: HostContext, connection: UpstreamConnection, method: str, sent: JsonDict, relay: Any) -> Verdict:
    """Send `method` to the connection's peer; answer its consent challenge if it sends one.

    Returns the peer's reply ({"result"} or {"error"}) as `answer`, or an `input_required`
    result for a 2026-07-28 host that must answer on our consent page first; the word is our
    user's answer when asked here (`ask`, `approved`). Or the refusal: `denied` or `timeout`
    (our user), `deny` (nobody here can be asked), `ask-home` (-32019: the user's own home
    gateway must be asked), `rejected` (the home's decision is not acceptable).

    Raises:
        UpstreamFailedError: the peer's challenge is not acceptable, or it asked twice (-32010).
    """
    peer = connection.peer
    kind = KIND_FOR_METHOD.get(method)
    # Only a peer gateway this one believes may ask our users about its calls (identity/trust/gateways.py).
    if not peer.trusted_gateway or kind is None:
        return Verdict(answer=await connection.request(method, sent, on_message=relay))
    resumed, answered = await _resume(ctx, connection, method, kind, sent, relay)
    if resumed.refusal is not None:
        return resumed
    reply = await connection.request(method, resumed.params, on_message=relay)  # type: ignore[arg-type]
    if not _is_challenge(reply):
        return Verdict(word=resumed.word, answer=reply)
    if answered:
        raise jsonrpc.UpstreamFailedError(f"peer '{peer.name}' asked for consent again after it was answered")
    return await _answer_challenge(ctx, connection, method, kind, resumed.params, reply["error"], relay)  # type: ignore[arg-type]


async def _answer_challenge(
    ctx: HostContext, connection: UpstreamConnection, method: str, kind: str, sent: JsonDict, error: JsonDict, relay: Any
) -> Verdict:
    peer = connection.peer
    identity = ctx.identity
    subject = CallSubject.of(method, sent)
    data = error.get("data") if isinstance(error.get("data"), dict) else {}
    try:
        claims, question = await challenge_verify(
            raw=data.get("challenge"), peer_origin=peer_audience(peer.url),
            subject=assertion_subject(identity) if identity is not None else "", kind=kind, arguments=subject.arguments,
        )
    except RemoteConsentError as exc:
        logger.warning("peer %s sent an unacceptable consent challenge: %s", peer.name, exc.description)
        raise jsonrpc.UpstreamFailedError(
            f"peer '{peer.name}' asked for consent with a challenge this gateway cannot accept: {exc.description}", {"reason": exc.reason}
        ) from exc
    if identity is not None and identity.is_local_user:
        return await _ask_our_user(ctx, connection, method, sent, relay, data["challenge"], claims, question)
    if identity is not None and identity.federated_issuer:
        return await _relay_home(ctx, peer.name, kind, subject, claims, question)
    return Verdict.refuse(
        jsonrpc.ConsentDeniedError(
            f"Gateway '{question.owner}' needs the user's consent for the {kind} call '{question.name}', and no local user can be asked",
            {"reason": "no local user to ask"},
        ),
        "deny",
    )


# --- home: ask our user --------------------------------------------------------------------------


def _message(prompt: ConsentPrompt, url: str) -> str:
    return f"Gateway '{prompt.owner_gateway}' needs your approval to call {prompt.kind} '{prompt.name}' on '{prompt.peer}': open {url}"


async def _ask_our_user(
    ctx: HostContext, connection: UpstreamConnection, method: str, sent: JsonDict, relay: Any,
    challenge: str, claims: dict[str, Any], question: Question,
) -> Verdict:
    expires_at = min(
        timezone.now() + timedelta(seconds=timeout_setting()),
        expires_at_of(claims) - timedelta(seconds=ANSWER_MARGIN),
    )
    try:
        prompt = await consent_remote_prompt_create(identity=ctx.identity, question=question, challenge=challenge, expires_at=expires_at)
    except TooManyPendingPromptsError as exc:
        return Verdict.refuse(too_many_prompts(ctx, exc), "deny")
    url = consent_url(ctx, prompt.id)
    elicitation = url_elicitation(prompt, url, _message(prompt, url))
    if ctx.era == "modern":
        binding = _approval(ctx, connection, method, sent).binding(None)
        state = request_states.issue(request_states.REMOTE_CONSENT, {"p": prompt.id, "b": binding}, salt=STATE_SALT)
        return Verdict(word="ask", answer={"result": input_required(elicitation, state)})
    status = await hold_for_answer(ctx, prompt, url, elicitation)
    decided = await _decide(ctx, connection, method, sent, relay, prompt, claims, status, url)
    if decided.refusal is not None:
        return decided
    reply = await connection.request(method, decided.params, on_message=relay)  # type: ignore[arg-type]
    if _is_challenge(reply):
        raise jsonrpc.UpstreamFailedError(f"peer '{connection.peer.name}' asked for consent again after it was answered")
    return Verdict(word=decided.word, answer=reply)


async def _decide(
    ctx: HostContext, connection: UpstreamConnection, method: str, sent: JsonDict, relay: Any,
    prompt: ConsentPrompt, claims: dict[str, Any], status: str, url: str,
) -> Verdict:
    """Turn our user's answer into the params to send again (approved), or the refusal."""
    verdict = await settle(
        prompt, status,
        denied=jsonrpc.ConsentDeniedError(
            f"The user denied the {prompt.kind} call '{prompt.name}' on peer '{prompt.peer}' of gateway '{prompt.owner_gateway}'",
            {"consentId": prompt.id},
        ),
        timeout=jsonrpc.ConsentTimeoutError(
            f"Nobody answered the consent request for '{prompt.name}' of gateway '{prompt.owner_gateway}' in time; see {url}",
            {"consentId": prompt.id, "url": url},
        ),
    )
    if verdict.word == "denied":
        # Tell the owner, so its audit trail has the user's answer; the host's answer is ours.
        decision = decision_create(challenge=claims, approve=False)
        with contextlib.suppress(UpstreamError, jsonrpc.JsonRpcError):
            await connection.request(method, _with_decision(with_fresh_assertion(ctx, connection.peer, sent), decision), on_message=relay)
    if verdict.refusal is not None:
        return verdict
    remember = await ConsentPrompt.objects.filter(pk=prompt.id).values_list("remember_seconds", flat=True).afirst()
    decision = decision_create(challenge=claims, approve=True, remember_seconds=remember or 0)
    return Verdict(word="approved", params=_with_decision(with_fresh_assertion(ctx, connection.peer, sent), decision))


async def _resume(ctx: HostContext, connection: UpstreamConnection, method: str, kind: str, sent: JsonDict, relay: Any) -> tuple[Verdict, bool]:
    """Return the params to send (the verdict's `params`, or its refusal), and whether they answer the peer's question.

    Two cases: a 2026-07-28 host retrying with our `requestState` (we are the user's home),
    and a home gateway's decision for a question we relayed (we answer the far peer in turn).
    """
    state = sent.get("requestState")
    if ctx.era == "modern" and request_states.is_ours(request_states.REMOTE_CONSENT, state):
        prompt, binding = await _own_remote_prompt(ctx, state, kind)
        if not hmac.compare_digest(binding, _approval(ctx, connection, method, sent).binding(None)):
            # Our user approved the exact call shown (caller, client, peer, tool, arguments):
            # another call carrying the state goes to the peer as a new one, which asks afresh.
            return Verdict(params=strip_state(sent)), False
        url = consent_url(ctx, prompt.id)
        status = await wait_for_answer(ctx, prompt, url, _message(prompt, url))
        # Our own database's copy of a challenge we verified when it came.
        claims = jwt.decode(prompt.challenge, options={"verify_signature": False})
        return await _decide(ctx, connection, method, sent, relay, prompt, claims, status, url), True
    raw = ctx.meta.get(DECISION_META_KEY)
    identity = ctx.identity
    if raw is None or identity is None or not identity.federated_issuer:
        return Verdict(params=sent), False
    record = await relay_record_for(raw)
    if record is None or record.peer != connection.peer.name:
        return Verdict(params=sent), False
    subject = CallSubject.of(method, sent)
    try:
        settled = await remote_consent_settle(
            raw=raw, identity=identity, peer=record.peer, kind=kind, name=subject.name, arguments=subject.arguments,
            role=RemoteConsent.Role.RELAY,
        )
    except RemoteConsentError as exc:
        return Verdict.refuse(
            jsonrpc.ConsentDeniedError(f"The consent decision from the home gateway is not acceptable: {exc.description}", {"reason": exc.reason}),
            "rejected",
        ), True
    decision = decision_create(challenge=settled.record.upstream_claims, approve=settled.approved, remember_seconds=settled.remember_seconds)
    return Verdict(params=_with_decision(sent, decision)), True


async def _own_remote_prompt(ctx: HostContext, state: str, kind: str) -> tuple[ConsentPrompt, str]:
    """Return the caller's remote prompt a state of ours names, and the binding of the call it was issued for.

    Raises:
        InvalidParamsError: not our state, or not a remote prompt of this caller's.
    """
    data = request_states.read(request_states.REMOTE_CONSENT, state, salt=STATE_SALT, max_age=timeout_setting() + 3600)
    prompt_id = data.get("p") if isinstance(data, dict) else None
    prompt = await consent_prompt_for(prompt_id=prompt_id, identity=ctx.identity) if isinstance(prompt_id, str) else None
    if prompt is None or not prompt.owner_gateway or prompt.kind != kind:
        raise jsonrpc.InvalidParamsError("requestState does not belong to this call")
    binding = data.get("b")
    return prompt, binding if isinstance(binding, str) else ""


def _approval(ctx: HostContext, connection: UpstreamConnection, method: str, sent: JsonDict) -> Approval:
    """The call as our user approves it: caller, client, the peer gateway, kind, name and arguments as sent to it."""
    subject = CallSubject.of(method, sent)
    return Approval.of(ctx.identity, connection.peer.name, KIND_FOR_METHOD[method], subject.name, subject.arguments)


# --- relay: ask the user's home ------------------------------------------------------------------


async def _relay_home(
    ctx: HostContext, peer: str, kind: str, subject: CallSubject, claims: dict[str, Any], question: Question
) -> Verdict:
    """Ask the acting user's home gateway about the peer's question (we are only on the path): refused `ask-home`, with our own challenge."""
    identity = ctx.identity
    challenge = await remote_consent_open(
        identity=identity, peer=peer, kind=kind, name=subject.name, arguments=subject.arguments,
        redacted=question.arguments, expires_at=expires_at_of(claims) - timedelta(seconds=ANSWER_MARGIN),
        role=RemoteConsent.Role.RELAY, question=question, upstream_claims=claims,
    )
    return asked_at_home(identity, challenge, question.owner, f"Gateway '{question.owner}'")
