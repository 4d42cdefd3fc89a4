"""Consent prompts: asking a user, and carrying the answer to the call that waits for it.

Services that create and answer prompts and carry an answer to the worker whose call waits for
it, through the channel layer (one group per prompt, with a bounded database poll as the fallback
should a message be lost); the single-use spending of approvals and continuations.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.utils import timezone
from oauth2_provider.models import Application
from prometheus_client.core import GaugeMetricFamily

from identity.consent.policy import REMEMBER_CHOICES, Decision, redact
from identity.consent.upstream_requests import source_text
from identity.hostauth.tokens import Identity
from identity.models import ConsentGrant, ConsentPrompt, UsedContinuation

logger = logging.getLogger(__name__)


# --- settings --------------------------------------------------------------------------------


def timeout_setting() -> float:
    return float(getattr(settings, "FEDMCP_CONSENT_TIMEOUT", 120.0))


def poll_setting() -> float:
    return float(getattr(settings, "FEDMCP_CONSENT_POLL_INTERVAL", 2.0))


def continue_timeout_setting() -> float:
    return float(getattr(settings, "FEDMCP_CONSENT_CONTINUE_TIMEOUT", 600.0))


def pending_limit_setting() -> int:
    """Most consent prompts one user may have waiting at once (FEDMCP_MAX_PENDING_PROMPTS_PER_USER)."""
    return max(1, int(getattr(settings, "FEDMCP_MAX_PENDING_PROMPTS_PER_USER", 50)))


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
    (identity/consent/upstream_requests.py); `held` an input_required result kept for a 2026-07-28 host;
    `deferred_by` where a request left to us by a gateway further along comes from (identity/consent/deferral.py);
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

    `question` is an `identity.consent.remote.Question` from a verified `challenge`; the
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


def pending_prompts_metric() -> Iterable[GaugeMetricFamily]:
    """`fedmcp_consent_prompts_pending` at scrape time (registered in IdentityConfig.ready)."""
    waiting = ConsentPrompt.objects.filter(status=ConsentPrompt.Status.PENDING, expires_at__gt=timezone.now()).count()
    yield GaugeMetricFamily("fedmcp_consent_prompts_pending", "Consent prompts waiting for a user's decision.", value=waiting)
