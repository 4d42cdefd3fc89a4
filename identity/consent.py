"""Consent: which forwarded calls need the user's approval, the prompts that ask, and grants.

`decide` is the pure rule (policies in, decision out; docs/CONSENT.md states the precedence).
The rest are services: they read policies and grants, create and answer prompts, and carry an
answer to the worker whose call waits for it, through the channel layer (one group per prompt,
with a bounded database poll as the fallback should a message be lost).
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver
from django.utils import timezone
from oauth2_provider.models import Application
from prometheus_client.core import GaugeMetricFamily

from federation.naming import canonical_uri
from fedmcp_site import caching
from identity.models import (
    AuditEvent,
    ConsentDecision,
    ConsentGrant,
    ConsentPolicy,
    ConsentPrompt,
    UsedContinuation,
)
from identity.tokens import Identity
from identity.upstream_requests import source_text

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


def timeout_setting() -> float:
    return float(getattr(settings, "FEDMCP_CONSENT_TIMEOUT", 120.0))


def poll_setting() -> float:
    return float(getattr(settings, "FEDMCP_CONSENT_POLL_INTERVAL", 2.0))


def continue_timeout_setting() -> float:
    return float(getattr(settings, "FEDMCP_CONSENT_CONTINUE_TIMEOUT", 600.0))


def pending_limit_setting() -> int:
    """Most consent prompts one user may have waiting at once (FEDMCP_MAX_PENDING_PROMPTS_PER_USER)."""
    return max(1, int(getattr(settings, "FEDMCP_MAX_PENDING_PROMPTS_PER_USER", 50)))


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
        # Remembered at the user's home gateway (distributed consent, identity/remote_consent.py).
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

    The pipeline asks identity/consent_cache.py `consent_decide`, which calls this when its
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

    What `consent_hidden_names` is for the catalog, for items listed outside it (a per-user
    OAuth peer's resources, federation/user_lists.py).
    """
    if kind not in KIND_FOR_METHOD.values() or not items:
        return set()
    return await database_sync_to_async(_denied_among)(identity, scope, kind, items)


async def consent_hidden_names(*, identity: Identity | None, scope: str, kind: str) -> set[str]:
    """Return the names a list of `kind` must leave out for this caller: what policies deny.

    Names are as the endpoint lists them: upstream names on /peers/<scope>/, qualified on /mcp.
    """
    if kind not in KIND_FOR_METHOD.values():
        return set()
    return await database_sync_to_async(_hidden_names)(identity, scope, kind)


# --- prompts ---------------------------------------------------------------------------------


def prompt_group(prompt_id: str) -> str:
    """The channel-layer group the worker waiting on a prompt listens on."""
    return f"fedmcp.consent.{prompt_id}"


def user_group(user_id: int) -> str:
    """The channel-layer group of a user's open /consent pages."""
    return f"fedmcp.consent.user.{user_id}"


def prompt_summary(prompt: ConsentPrompt) -> dict[str, Any]:
    """What the consent page shows of a prompt (also pushed live to open pages)."""
    return {
        "id": prompt.id,
        "username": prompt.username,
        "federated": f"{prompt.federated_subject} @ {prompt.federated_issuer}" if prompt.federated_issuer else "",
        "client": prompt.client_name or prompt.client_id,
        "via": list(prompt.via or []),
        "owner": prompt.owner_gateway,
        "peer": prompt.peer,
        "kind": prompt.kind,
        "name": prompt.name,
        "arguments": prompt.arguments,
        "request": prompt.request or {},
        "source": prompt.deferred_by or {},
        "source_text": source_text(prompt.deferred_by) if prompt.deferred_by else "",
        "created_at": prompt.created_at.isoformat() if prompt.created_at else "",
        "expires_at": prompt.expires_at.isoformat(),
        "status": prompt.status,
        "call": prompt.call,
    }


def _publish(group: str, event: dict[str, Any]) -> None:
    layer = get_channel_layer()
    if layer is not None:
        try:
            async_to_sync(layer.group_send)(group, event)
        except Exception:  # the waiting worker also polls the database; never fail the answer
            logger.exception("could not publish %s to %s", event.get("type"), group)


class TooManyPendingPromptsError(Exception):
    """The user has as many prompts waiting as FEDMCP_MAX_PENDING_PROMPTS_PER_USER allows; no new one is made."""

    def __init__(self, pending: int, limit: int) -> None:
        super().__init__(f"{pending} consent requests are already waiting for this user (at most {limit})")
        self.pending = pending
        self.limit = limit


def _pending_count(user_id: int) -> int:
    return ConsentPrompt.objects.filter(user_id=user_id, status=ConsentPrompt.Status.PENDING, expires_at__gt=timezone.now()).count()


def _make_room(user_id: int | None, needed: int = 1) -> None:
    """Refuse to add `needed` prompts for a user who would then have more waiting than allowed.

    Call inside the transaction that creates them: the user's row is locked (where the database
    can), so concurrent calls for one user count one after another.

    Raises:
        TooManyPendingPromptsError: there is no room for them.
    """
    if user_id is None:
        return
    from django.contrib.auth import get_user_model

    list(get_user_model().objects.select_for_update().filter(pk=user_id).values_list("pk", flat=True))
    pending, limit = _pending_count(user_id), pending_limit_setting()
    if pending + needed > limit:
        raise TooManyPendingPromptsError(pending, limit)


@database_sync_to_async
def consent_prompt_room(*, identity: Identity | None, needed: int) -> None:
    """Check, before asking a round of `needed` questions, that the user has room for all of them.

    Raises:
        TooManyPendingPromptsError: they would have more prompts waiting than allowed.
    """
    if identity is not None and identity.user_id is not None:
        pending, limit = _pending_count(identity.user_id), pending_limit_setting()
        if pending + needed > limit:
            raise TooManyPendingPromptsError(pending, limit)


@transaction.atomic
def _prompt_create(
    identity: Identity | None, peer: str, kind: str, name: str, arguments: Any, decision: Decision, timeout: float,
    request: dict[str, Any] | None = None, held: dict[str, Any] | None = None, deferred_by: dict[str, Any] | None = None,
    call: str = "", binding: str = "",
) -> ConsentPrompt:
    _make_room(identity.user_id if identity else None)
    client_name = ""
    if identity is not None and identity.application_id is not None:
        client_name = Application.objects.filter(pk=identity.application_id).values_list("name", flat=True).first() or ""
    return ConsentPrompt.objects.create(
        id=secrets.token_urlsafe(24),
        user_id=identity.user_id if identity else None,
        username=identity.username if identity else "",
        federated_issuer=identity.federated_issuer if identity else "",
        federated_subject=identity.federated_subject if identity else "",
        client_id=identity.client_id if identity else "",
        client_name=client_name,
        via=list(identity.via) if identity else [],
        peer=peer,
        kind=kind,
        name=name[:2000],
        arguments=redact(arguments if arguments is not None else {}, decision.redact_fields),
        request=redact(request or {}, decision.redact_fields),
        held=held,
        deferred_by=deferred_by or {},
        call=call,
        binding=binding,
        policy_id=decision.policy_id,
        expires_at=timezone.now() + timedelta(seconds=timeout),
    )


async def consent_prompt_create(
    *, identity: Identity | None, peer: str, kind: str, name: str, arguments: Any, decision: Decision, timeout: float,
    request: dict[str, Any] | None = None, held: dict[str, Any] | None = None, deferred_by: dict[str, Any] | None = None,
    call: str = "", binding: str = "",
) -> ConsentPrompt:
    """Create a pending prompt (arguments redacted) and show it on the user's open pages.

    `request` is what an upstream's sampling/elicitation request shows the user
    (identity/upstream_requests.py); `held` an input_required result kept for a 2026-07-28 host;
    `deferred_by` where a request left to us by a gateway further along comes from (identity/deferral.py);
    `call` the host call it came during, shown with the others of that call; `binding` the exact
    call asked about, by which its retry finds it (`consent_prompt_for_retry`).

    Raises:
        TooManyPendingPromptsError: the user has FEDMCP_MAX_PENDING_PROMPTS_PER_USER prompts waiting already.
    """
    prompt = await database_sync_to_async(_prompt_create)(
        identity, peer, kind, name, arguments, decision, timeout, request, held, deferred_by, call, binding
    )
    layer = get_channel_layer()
    if layer is not None and prompt.user_id is not None:
        await layer.group_send(user_group(prompt.user_id), {"type": "consent.prompt", "prompt": prompt_summary(prompt)})
    return prompt


@transaction.atomic
def _remote_prompt_create(identity: Identity, question: Any, challenge: str, expires_at: Any) -> ConsentPrompt:
    _make_room(identity.user_id)
    client_name = ""
    if identity.application_id is not None:
        client_name = Application.objects.filter(pk=identity.application_id).values_list("name", flat=True).first() or ""
    return ConsentPrompt.objects.create(
        id=secrets.token_urlsafe(24),
        user_id=identity.user_id,
        username=identity.username,
        federated_issuer=identity.federated_issuer,
        federated_subject=identity.federated_subject,
        client_id=identity.client_id,
        client_name=client_name,
        via=list(question.path),
        owner_gateway=question.owner,
        challenge=challenge,
        peer=question.peer,
        kind=question.kind,
        name=question.name,
        arguments=question.arguments if question.arguments is not None else {},
        expires_at=expires_at,
    )


async def consent_remote_prompt_create(*, identity: Identity, question: Any, challenge: str, expires_at: Any) -> ConsentPrompt:
    """Create a pending prompt for a question another gateway (`question.owner`) asks our user.

    `question` is an `identity.remote_consent.Question` from a verified `challenge`; the
    arguments arrive already redacted by the owner's policies.

    Raises:
        TooManyPendingPromptsError: the user has FEDMCP_MAX_PENDING_PROMPTS_PER_USER prompts waiting already.
    """
    prompt = await database_sync_to_async(_remote_prompt_create)(identity, question, challenge, expires_at)
    layer = get_channel_layer()
    if layer is not None and prompt.user_id is not None:
        await layer.group_send(user_group(prompt.user_id), {"type": "consent.prompt", "prompt": prompt_summary(prompt)})
    return prompt


class ConsentAnswerError(Exception):
    """The prompt cannot be answered: unknown, someone else's, already answered or expired."""


def consent_prompt_answer(*, prompt_id: str, user: AbstractBaseUser, approve: bool, remember_seconds: int | None = None) -> ConsentPrompt:
    """Approve (once, or remembered as a grant) or deny a pending prompt of `user`.

    Raises:
        ConsentAnswerError: not this user's pending prompt (ids are single-use).
    """
    with transaction.atomic():
        prompt = ConsentPrompt.objects.select_for_update().filter(pk=prompt_id, user=user).first()
        if prompt is None or not prompt.is_pending():
            raise ConsentAnswerError("this consent request is unknown, was already answered, or expired")
        prompt.status = ConsentPrompt.Status.APPROVED if approve else ConsentPrompt.Status.DENIED
        prompt.decided_at = timezone.now()
        prompt.save(update_fields=["status", "decided_at"])
        if approve and remember_seconds:
            if remember_seconds not in dict(REMEMBER_CHOICES):
                raise ConsentAnswerError("choose one of the offered durations")
            if prompt.owner_gateway:
                # Another gateway owns the call: it keeps the grant, told so in the signed decision.
                prompt.remember_seconds = remember_seconds
                prompt.save(update_fields=["remember_seconds"])
            else:
                ConsentGrant.objects.create(
                    user=user, peer=prompt.peer, kind=prompt.kind, name=prompt.name, client_id=prompt.client_id,
                    expires_at=prompt.decided_at + timedelta(seconds=remember_seconds), prompt=prompt,
                )
    event = {"type": "consent.decided", "id": prompt.id, "status": prompt.status}
    _publish(prompt_group(prompt.id), event)
    _publish(user_group(user.pk), event)
    return prompt


@database_sync_to_async
def _prompt_status(prompt_id: str) -> str | None:
    return ConsentPrompt.objects.filter(pk=prompt_id).values_list("status", flat=True).first()


@database_sync_to_async
def _prompt_expire(prompt_id: str) -> str | None:
    """Mark a still-pending prompt expired; return the final status (an answer may have won)."""
    ConsentPrompt.objects.filter(pk=prompt_id, status=ConsentPrompt.Status.PENDING).update(status=ConsentPrompt.Status.EXPIRED)
    status = ConsentPrompt.objects.filter(pk=prompt_id).values_list("status", flat=True).first()
    if status == ConsentPrompt.Status.EXPIRED:
        user_id = ConsentPrompt.objects.filter(pk=prompt_id).values_list("user_id", flat=True).first()
        if user_id is not None:
            _publish(user_group(user_id), {"type": "consent.decided", "id": prompt_id, "status": status})
    return status


async def consent_prompt_expire(*, prompt_id: str) -> str | None:
    """Expire a prompt nobody waits for any more (unless it was answered already)."""
    return await _prompt_expire(prompt_id)


async def consent_prompt_wait(prompt_id: str, *, until: Any, on_tick: Callable[[], Awaitable[None]] | None = None) -> str:
    """Wait until the prompt is answered or `until` (a datetime) passes; return its status.

    The answer arrives on the prompt's group from whichever worker took it; the database is
    re-read every FEDMCP_CONSENT_POLL_INTERVAL seconds as well, so a lost message costs at most
    one interval. `on_tick` runs at each interval (progress notifications).
    """
    layer = get_channel_layer()
    channel = await layer.new_channel() if layer is not None else ""
    if layer is not None:
        await layer.group_add(prompt_group(prompt_id), channel)
    try:
        while True:
            status = await _prompt_status(prompt_id)
            if status != ConsentPrompt.Status.PENDING:
                return status or ConsentPrompt.Status.EXPIRED
            remaining = (until - timezone.now()).total_seconds()
            if remaining <= 0:
                return await _prompt_expire(prompt_id) or ConsentPrompt.Status.EXPIRED
            interval = min(poll_setting(), remaining)
            try:
                if layer is None:
                    raise TimeoutError
                await asyncio.wait_for(layer.receive(channel), interval)
            except TimeoutError:
                if on_tick is not None:
                    await on_tick()
    finally:
        if layer is not None:
            await asyncio.shield(layer.group_discard(prompt_group(prompt_id), channel))


@database_sync_to_async
def consent_prompt_for_retry(*, identity: Identity, binding: str) -> ConsentPrompt | None:
    """The user's prompt about this very call that its retry may use: approved (not yet used) within
    FEDMCP_CONSENT_TIMEOUT of the answer, else one still waiting; None if there is neither."""
    if not binding or identity.user_id is None:
        return None
    now = timezone.now()
    mine = ConsentPrompt.objects.filter(user_id=identity.user_id, client_id=identity.client_id, binding=binding, owner_gateway="")
    approved = mine.filter(
        status=ConsentPrompt.Status.APPROVED, used_at__isnull=True, decided_at__gt=now - timedelta(seconds=timeout_setting())
    ).order_by("-decided_at").first()
    return approved or mine.filter(status=ConsentPrompt.Status.PENDING, expires_at__gt=now).order_by("-created_at").first()


@database_sync_to_async
def consent_prompt_use(*, prompt_id: str) -> bool:
    """Spend an approved prompt: True once, False if it was already used (single use)."""
    return bool(
        ConsentPrompt.objects.filter(pk=prompt_id, status=ConsentPrompt.Status.APPROVED, used_at__isnull=True).update(used_at=timezone.now())
    )


PRUNE_INTERVAL = 60.0
"""Seconds between deletions of expired continuation nonces (each worker, on its next spend)."""
_last_prune = 0.0


@database_sync_to_async
def consent_continuation_spend(*, nonce: str, expires_at: datetime) -> bool:
    """Spend the nonce of a continuation of an approved call: True once, False if it was spent before.

    A spent nonce is kept until its continuation expires; after that the continuation is refused
    as expired anyway, so expired ones are pruned now and then.
    """
    global _last_prune
    now = time.monotonic()
    if now - _last_prune > PRUNE_INTERVAL:
        _last_prune = now
        UsedContinuation.objects.filter(expires_at__lt=timezone.now()).delete()
    try:
        with transaction.atomic():
            UsedContinuation.objects.create(nonce=nonce, expires_at=expires_at)
    except IntegrityError:
        return False
    return True


@database_sync_to_async
def consent_prompt_for(*, prompt_id: str, identity: Identity | None) -> ConsentPrompt | None:
    """Return the caller's own prompt `prompt_id`, or None."""
    prompt = ConsentPrompt.objects.filter(pk=prompt_id).first()
    if prompt is None or identity is None:
        return None
    if prompt.user_id != identity.user_id or prompt.federated_issuer != identity.federated_issuer or prompt.federated_subject != identity.federated_subject:
        return None
    return prompt


# --- grants ----------------------------------------------------------------------------------


def consent_grant_revoke(*, grant: ConsentGrant) -> None:
    """Revoke a remembered approval; the next matching call is asked again."""
    ConsentGrant.objects.filter(pk=grant.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    caching.bump("consent")  # every worker's cached decisions (fedmcp_site/caching.py)


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


def pending_prompts_metric() -> Iterable[GaugeMetricFamily]:
    """`fedmcp_consent_prompts_pending` at scrape time (registered in IdentityConfig.ready)."""
    waiting = ConsentPrompt.objects.filter(status=ConsentPrompt.Status.PENDING, expires_at__gt=timezone.now()).count()
    yield GaugeMetricFamily("fedmcp_consent_prompts_pending", "Consent prompts waiting for a user's decision.", value=waiting)

