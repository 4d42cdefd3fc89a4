"""Consent policy: which forwarded calls (and upstream requests) are allowed, asked or denied.

`decide` is the pure rule (policies in, decision out; docs/CONSENT.md states the precedence).
`decision_load` reads the policies, the user's groups and remembered grants and applies it; the
pipeline asks the cached front of it, identity/consent/decision.py `consent_decide`. Also here:
the names lists hide, grant revocation, and the `list_changed` a policy change announces.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver
from django.utils import timezone

from federation.naming import canonical_uri
from fedmcp_lib import caching
from identity.hostauth.tokens import Identity
from identity.models import AuditEvent, ConsentDecision, ConsentGrant, ConsentPolicy

logger = logging.getLogger(__name__)

KIND_FOR_METHOD = {"tools/call": "tool", "resources/read": "resource", "prompts/get": "prompt"}
"""The calls consent governs, and the policy `kind` each one is."""
KIND_FOR_COMPLETION_REF = {"ref/prompt": "prompt", "ref/resource": "resource"}
"""`completion/complete` (by its `ref.type`) and `resources/subscribe` are never asked about, but
a policy that denies the prompt or resource refuses them too (mcp_endpoint/pipeline/decide.py
`consent_unasked`)."""
REQUEST_KIND_FOR_METHOD = {"sampling/createMessage": "sampling", "elicitation/create": "elicitation"}
"""Server->client requests from upstreams that consent governs; their name is the call's."""
REQUEST_DEFAULT_SETTING = {"sampling": "FEDMCP_CONSENT_SAMPLING_DEFAULT", "elicitation": "FEDMCP_CONSENT_ELICITATION_DEFAULT"}
DEFAULTS = ("ask-new-peers", "allow", "ask", "deny")
SEVERITY = {ConsentDecision.ALLOW: 0, ConsentDecision.ASK: 1, ConsentDecision.DENY: 2}
"""The last precedence key: on a tie, deny beats ask beats allow."""
REDACTED = "[redacted]"
REMEMBER_CHOICES = ((3600, "1 hour"), (8 * 3600, "8 hours"), (86400, "1 day"), (7 * 86400, "7 days"), (30 * 86400, "30 days"))
"""How long "approve and remember" may last (seconds, label); anything else is refused."""


@dataclass(frozen=True)
class Decision:
    """What consent says about one call: `action` is allow, ask or deny."""

    action: str
    policy_id: int | None = None
    reason: str = ""
    redact_fields: tuple[str, ...] = ()
    grant_id: int | None = None

    @property
    def label(self) -> str:
        """The audit trail's word for it (AuditEvent.decision)."""
        return "grant" if self.grant_id is not None else self.action


def default_setting() -> str:
    value = getattr(settings, "FEDMCP_CONSENT_DEFAULT", "ask-new-peers")
    return value if value in DEFAULTS else "ask-new-peers"


def request_default_setting(kind: str) -> str:
    """What an upstream's sampling or elicitation request gets when no policy matches."""
    value = getattr(settings, REQUEST_DEFAULT_SETTING[kind], "ask")
    return value if value in ("allow", "ask", "deny") else "ask"


# --- the rule --------------------------------------------------------------------------------


def _name_matches(kind: str, name: str, pattern: str) -> bool:
    if kind == "resource":
        # Both in the one form the router sends upstream, whoever spelled them (naming.canonical_uri).
        name, pattern = canonical_uri(name), canonical_uri(pattern)
    return fnmatch.fnmatchcase(name, pattern)


def policy_matches(policy: ConsentPolicy, identity: Identity | None, peer: str, kind: str, name: str, groups: frozenset[int]) -> bool:
    """Whether every criterion `policy` names holds for this call (blank criteria match anything)."""
    if not policy.enabled:
        return False
    if policy.peer and policy.peer != peer:
        return False
    if policy.kind and policy.kind != kind:
        return False
    if not policy.kind and kind in REQUEST_KIND_FOR_METHOD.values():
        # A blank kind means the calls only: a broad "allow peer X" written for tools must not
        # silently let X's upstream sample the user's model.
        return False
    if policy.name_pattern and not _name_matches(kind, name, policy.name_pattern):
        return False
    username = identity.username if identity else ""
    if policy.username and policy.username != username:
        return False
    if policy.group_id and policy.group_id not in groups:
        return False
    if policy.federated_issuer and policy.federated_issuer != (identity.federated_issuer if identity else ""):
        return False
    if policy.federated_subject and policy.federated_subject != (identity.federated_subject if identity else ""):
        return False
    return not (policy.client_id and policy.client_id != (identity.client_id if identity else ""))


def decide(
    identity: Identity | None,
    peer: str,
    kind: str,
    name: str,
    *,
    policies: Iterable[ConsentPolicy] = (),
    groups: frozenset[int] = frozenset(),
    peer_used: bool = False,
    default: str | None = None,
) -> Decision:
    """Return the decision for one call: the winning matching policy, else the default.

    Precedence among matching policies: most specific (most criteria named) first, then the
    higher priority, then deny over ask over allow. Without a match, resources and prompts are
    allowed; tools follow `default` (FEDMCP_CONSENT_DEFAULT): "ask-new-peers" asks only on a
    peer the user has not called a tool on yet (`peer_used`). Sensitive fields are the union
    of the matching policies' `redact_fields`, so a broad policy can't be hidden by a narrow one.
    Upstream sampling and elicitation requests (their `name` is the call's) follow `default`
    or else FEDMCP_CONSENT_SAMPLING_DEFAULT / FEDMCP_CONSENT_ELICITATION_DEFAULT, and are
    matched only by policies naming their kind.
    """
    matching = [p for p in policies if policy_matches(p, identity, peer, kind, name, groups)]
    redact = tuple(sorted({str(f) for p in matching for f in (p.redact_fields or []) if isinstance(f, str)}))
    if matching:
        best = max(matching, key=lambda p: (p.specificity(), p.priority, SEVERITY[ConsentDecision(p.decision)], -(p.pk or 0)))
        return Decision(best.decision, best.pk, f"policy #{best.pk}", redact)
    if kind in REQUEST_KIND_FOR_METHOD.values():
        mode = default if default in ("allow", "ask", "deny") else request_default_setting(kind)
        return Decision(mode, None, f"default for {kind}: {mode}", redact)
    if kind != "tool":
        return Decision(ConsentDecision.ALLOW, None, "default: resources and prompts are allowed", redact)
    mode = default or default_setting()
    if mode == "ask-new-peers":
        if peer_used:
            return Decision(ConsentDecision.ALLOW, None, "default: a peer the user has used", redact)
        return Decision(ConsentDecision.ASK, None, "default: first tool call on this peer", redact)
    return Decision(mode, None, f"default: {mode}", redact)


def redact(arguments: Any, fields: Iterable[str]) -> Any:
    """Return `arguments` with every key named in `fields` (at any depth) replaced by [redacted]."""
    names = set(fields)
    if isinstance(arguments, dict):
        return {k: REDACTED if k in names else redact(v, names) for k, v in arguments.items()}
    if isinstance(arguments, list):
        return [redact(v, names) for v in arguments]
    return arguments


# --- reading policies and grants -------------------------------------------------------------


def _group_ids(identity: Identity | None) -> frozenset[int]:
    if identity is None or identity.user_id is None:
        return frozenset()
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.filter(pk=identity.user_id).first()
    return frozenset(user.groups.values_list("pk", flat=True)) if user else frozenset()


PEER_USED_DECISIONS = ("allow", "grant", "approved", "continued")
"""Audit words of tool calls that count for "ask-new-peers": allowed, or approved by the user.

Never `ask` (the host was sent to /consent, an `input` outcome), `denied`, `timeout`, `deny`,
`rejected` or `ask-home`: a question nobody answered, or answered no, unlocks nothing.
"""


def _peer_used(identity: Identity | None, peer: str) -> bool:
    """Whether a tool call on `peer` that the user (or a policy) allowed has completed: the audit trail says."""
    if identity is None or (identity.user_id is None and not identity.federated_issuer):
        return False
    calls = AuditEvent.objects.filter(
        peer=peer, method="tools/call", outcome=AuditEvent.Outcome.OK, decision__in=PEER_USED_DECISIONS
    )
    if identity.user_id is not None:
        return calls.filter(user_id=identity.user_id).exists()
    return calls.filter(federated_issuer=identity.federated_issuer, federated_subject=identity.federated_subject).exists()


def _active_grant(identity: Identity | None, peer: str, kind: str, name: str) -> ConsentGrant | None:
    if identity is None:
        return None
    if identity.user_id is not None:
        owner = Q(user_id=identity.user_id)
    elif identity.federated_issuer:
        # Remembered at the user's home gateway (distributed consent, identity/consent/remote.py).
        owner = Q(user__isnull=True, federated_issuer=identity.federated_issuer, federated_subject=identity.federated_subject)
    else:
        return None
    return (
        ConsentGrant.objects.active()
        .filter(owner, peer=peer, kind=kind, name=name)
        .filter(Q(client_id="") | Q(client_id=identity.client_id))
        .first()
    )


def _policies_for(peer: str | None) -> list[ConsentPolicy]:
    rows = ConsentPolicy.objects.filter(enabled=True)
    if peer is not None:
        rows = rows.filter(Q(peer="") | Q(peer=peer))
    return list(rows)


def _consent_decide(identity: Identity | None, peer: str, kind: str, name: str, default: str | None = None) -> Decision:
    decision = decide(
        identity, peer, kind, name,
        policies=_policies_for(peer), groups=_group_ids(identity), peer_used=kind == "tool" and _peer_used(identity, peer),
        default=default,
    )
    if decision.action == ConsentDecision.ASK:
        # A remembered approval answers "ask", never "deny": a later deny policy still wins.
        grant = _active_grant(identity, peer, kind, name)
        if grant is not None:
            return Decision(ConsentDecision.ALLOW, decision.policy_id, f"grant #{grant.pk}", decision.redact_fields, grant.pk)
    return decision


async def decision_load(*, identity: Identity | None, peer: str, kind: str, name: str, default: str | None = None) -> Decision:
    """Read the decision for one call from the database, with the user's active grants applied.

    The pipeline asks identity/consent/decisions.py `consent_decide`, which calls this when its
    cache cannot answer. `default` replaces the setting that applies when no policy matches (`decide`).
    """
    return await database_sync_to_async(_consent_decide)(identity, peer, kind, name, default)


def _hidden_names(identity: Identity | None, scope: str, kind: str) -> set[str]:
    from federation.models import CatalogEntry

    policies = _policies_for(scope or None)
    if not any(p.decision == ConsentDecision.DENY for p in policies):
        return set()
    groups = _group_ids(identity)
    rows = CatalogEntry.objects.visible().filter(kind=kind)
    if scope:
        rows = rows.filter(peer__name=scope)
    hidden: set[str] = set()
    for peer, upstream, name in rows.values_list("peer__name", "upstream_name", "name"):
        # `peer_used` does not matter: only a policy can deny, and the default never does here.
        if decide(identity, peer, kind, upstream, policies=policies, groups=groups, default="allow").action == ConsentDecision.DENY:
            hidden.add(upstream if scope else name)
    return hidden


def _denied_among(identity: Identity | None, scope: str, kind: str, items: list[tuple[str, str]]) -> set[tuple[str, str]]:
    policies = _policies_for(scope or None)
    if not any(p.decision == ConsentDecision.DENY for p in policies):
        return set()
    groups = _group_ids(identity)
    return {
        (peer, upstream)
        for peer, upstream in items
        if decide(identity, peer, kind, upstream, policies=policies, groups=groups, default="allow").action == ConsentDecision.DENY
    }


async def consent_denied_among(*, identity: Identity | None, scope: str, kind: str, items: list[tuple[str, str]]) -> set[tuple[str, str]]:
    """Return which of `items` ((peer, upstream name) pairs) policies deny this caller.

    What `hidden_names_load` is for the catalog, for items listed outside it (a per-user
    OAuth peer's resources, federation/user_lists.py).
    """
    if kind not in KIND_FOR_METHOD.values() or not items:
        return set()
    return await database_sync_to_async(_denied_among)(identity, scope, kind, items)


async def hidden_names_load(*, identity: Identity | None, scope: str, kind: str) -> set[str]:
    """Return the names a list of `kind` must leave out for this caller: what policies deny.

    Names are as the endpoint lists them: upstream names on /peers/<scope>/, qualified on /mcp.
    """
    if kind not in KIND_FOR_METHOD.values():
        return set()
    return await database_sync_to_async(_hidden_names)(identity, scope, kind)


# --- grants ----------------------------------------------------------------------------------


def consent_grant_revoke(*, grant: ConsentGrant) -> None:
    """Revoke a remembered approval; the next matching call is asked again."""
    ConsentGrant.objects.filter(pk=grant.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    caching.bump("consent")  # every worker's cached decisions (fedmcp_lib/caching.py)


# --- list_changed when policies change -------------------------------------------------------


def _announce_policy_change(policy: ConsentPolicy) -> None:
    from federation.events import publish_catalog_changed
    from federation.models import Peer

    if policy.kind in REQUEST_KIND_FOR_METHOD.values():
        return  # sampling/elicitation policies hide nothing from lists
    kinds = [policy.kind] if policy.kind else ["tool", "resource", "prompt"]
    peers = [policy.peer] if policy.peer else list(Peer.objects.values_list("name", flat=True))
    for peer in peers:
        try:
            async_to_sync(publish_catalog_changed)(peer, kinds)
        except Exception:
            logger.exception("could not announce a consent policy change")


@receiver(post_save, sender=ConsentPolicy)
@receiver(post_delete, sender=ConsentPolicy)
def _policy_changed(sender: type, instance: ConsentPolicy, **kwargs: Any) -> None:
    # Lists hide what policies deny, so a policy change is a list change for hosts.
    transaction.on_commit(lambda: _announce_policy_change(instance))
