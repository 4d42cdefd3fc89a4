"""Further rounds of a call the user approved (docs/CONSENT.md "Further rounds of an approved call").

When the upstream answers an approved 2026-07-28 call with `input_required` of its own, the
host gets a continuation `requestState` instead of the upstream's (`continuation_wrap`), and
its retry is not asked about again while the continuation lasts (decide.py).
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from django.core import signing

from federation.upstream.base import JsonDict
from identity.consent.prompts import consent_continuation_spend, continue_timeout_setting
from mcp_endpoint import jsonrpc, request_states
from mcp_endpoint.pipeline.values import Approval

CONTINUE_SALT = "fedmcp.consent.continue-state"
CONTINUE_SEPARATOR = "~"
"""Ends the signed part of a continuation state (no signed value contains it); the upstream's
own requestState, if it sent one, follows verbatim."""
CONTINUED = "continued"
"""The audit word for a further input_required round of a call the user approved."""


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


def continue_prefix() -> str:
    """How this gateway's own continuation states begin (a peer gateway's, passed on through this one, is an upstream's state here)."""
    return request_states.prefix(request_states.CONTINUE)


def is_continuation(state: object) -> bool:
    return isinstance(state, str) and state.startswith(continue_prefix())


def continuation_wrap(approval: Approval, result: JsonDict) -> JsonDict:
    """Return an upstream's `input_required` result for an approved call, with a continuation state.

    The state is a signed part (a fresh single-use nonce, an expiry FEDMCP_CONSENT_CONTINUE_TIMEOUT
    from now, and `approval` bound to the upstream's requestState of this round) and, after
    CONTINUE_SEPARATOR, the upstream's requestState verbatim if it sent one. The host's retry
    with it is not asked about again (decide.py), and the upstream gets its own state back
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
        "e": int(time.time() + continue_timeout_setting()),
        "b": approval.binding(upstream_state),
    }
    state = continue_prefix() + signing.dumps(claims, salt=CONTINUE_SALT)
    if upstream_state is not None:
        state += CONTINUE_SEPARATOR + upstream_state
    return {**result, "requestState": state}


def continuation_read(approval: Approval, state: str) -> Continuation:
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


def with_upstream_state(params: JsonDict, upstream_state: str | None) -> JsonDict:
    """Return `params` with the continuation state replaced by the upstream's own (or none)."""
    params = {k: v for k, v in params.items() if k != "requestState"}
    if upstream_state is not None:
        params["requestState"] = upstream_state
    return params


async def continuation_spend(continuation: Continuation) -> None:
    """Spend a continuation's nonce.

    Raises:
        InvalidParamsError: it was spent before (a replay).
    """
    expires_at = datetime.fromtimestamp(continuation.expires, tz=UTC)
    if not await consent_continuation_spend(nonce=continuation.nonce, expires_at=expires_at):
        raise jsonrpc.InvalidParamsError("this requestState was already used")
