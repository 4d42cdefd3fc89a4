"""Consent decisions and hidden names, kept per worker in front of identity/consent/policy.py.

A decision depends on the consent policies, the user's groups and grants (domain "consent",
bumped by their signals and by `consent_grant_revoke`) and, for the default "ask-new-peers",
on whether a tool call of the user's that was allowed or approved has completed on the peer
(the audit trail, append-only: once used, a peer stays used). So:

* allow and deny are kept until a policy, grant, group or user changes in any process;
* an allow that comes from a remembered grant is kept no longer than the grant lasts;
* "ask" is never kept: it is the slow path (a user is asked), and a grant or the first
  successful call may turn it into allow at any moment;
* decisions for users a peer gateway asserts are not kept: their consent may be decided away
  from this gateway.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from channels.db import database_sync_to_async
from django.utils import timezone

from fedmcp_lib import caching
from identity import audit
from identity.consent import policy
from identity.hostauth.tokens import Identity
from identity.models import ConsentDecision, ConsentGrant

_decisions: caching.GenerationCache[tuple[policy.Decision, datetime | None]] = caching.GenerationCache("consent decisions", ("consent",))
_hidden: caching.GenerationCache[set[str]] = caching.GenerationCache("hidden names", ("consent", "catalog"), maxsize=1000)


def _subject(identity: Identity | None) -> tuple[Any, ...] | None:
    """What a decision may depend on about the caller, or None when it must not be kept."""
    if identity is None:
        return ()
    if identity.federated_issuer or identity.via:
        return None
    return (identity.user_id, identity.username, identity.client_id, identity.application_id)


@database_sync_to_async
def _grant_expiry(grant_id: int) -> datetime | None:
    return ConsentGrant.objects.active().filter(pk=grant_id).values_list("expires_at", flat=True).first()


async def consent_decide(*, identity: Identity | None, peer: str, kind: str, name: str, default: str | None = None) -> policy.Decision:
    """The one consent decision for a call or an upstream's request: `policy.decision_load`, answered from this worker's cache where that is safe.

    `default` replaces the setting that applies when no policy matches (an elicitation a
    believed peer gateway gated already is allowed unless a policy names it).
    """
    subject = _subject(identity)
    key = (subject, peer, kind, name, default or policy.default_setting())
    if subject is not None:
        hit = _decisions.get(key)
        if hit is not caching.MISSING and (hit[1] is None or timezone.now() < hit[1]):
            return hit[0]
    stamp = _decisions.stamp()
    decision = await policy.decision_load(identity=identity, peer=peer, kind=kind, name=name, default=default)
    if decision.action == ConsentDecision.ASK and decision.policy_id is None and audit.audit_pending():
        # "A peer the user has used" is read from the audit trail: let this worker's pending
        # rows land first, so a second call right after an approved first one is not asked.
        await audit.audit_flush()
        decision = await policy.decision_load(identity=identity, peer=peer, kind=kind, name=name, default=default)
    if subject is None or decision.action == ConsentDecision.ASK:
        return decision
    until = None
    if decision.grant_id is not None:
        until = await _grant_expiry(decision.grant_id)
        if until is None:
            return decision
    _decisions.put(key, (decision, until), stamp)
    return decision


async def consent_hidden_names(*, identity: Identity | None, scope: str, kind: str) -> set[str]:
    """`policy.hidden_names_load`, kept until consent or the catalog changes. Do not change the set."""
    subject = _subject(identity)
    if subject is None:
        return await policy.hidden_names_load(identity=identity, scope=scope, kind=kind)
    key = (subject, scope, kind)
    return await caching.cached(_hidden, key, lambda: policy.hidden_names_load(identity=identity, scope=scope, kind=kind))
