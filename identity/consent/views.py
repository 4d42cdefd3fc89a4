"""The consent pages: a user's pending prompts (/consent, /consent/<id>), grants (/consent/grants)
and the applications and accounts they connected (/consent/applications).

Interface code only: answering and revoking are `identity.consent` services (policy.py, prompts.py). Every page is
login-required, refuses framing (X-Frame-Options DENY and CSP frame-ancestors 'none'), and
every POST is CSRF-protected and redirects to a fixed page (no `next`, no open redirect).
"""

from __future__ import annotations

import json
from typing import Any

from django.conf import settings
from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_POST
from oauth2_provider.models import Application

from identity.consent.display import prompt_display
from identity.consent.policy import REMEMBER_CHOICES, consent_grant_revoke
from identity.consent.prompts import ConsentAnswerError, consent_prompt_answer, prompt_summary
from identity.hostauth import authorizations
from identity.models import ConsentGrant, ConsentPrompt, UpstreamToken
from identity.pages import protected_page

CSP = (
    "default-src 'self'; connect-src 'self'; style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)


_protected = protected_page(CSP)


def _shown(prompt: ConsentPrompt) -> dict[str, Any]:
    return {
        **prompt_summary(prompt),
        **prompt_display(prompt),
        # As a text block (consent/_text.html): a long argument is folded, so the buttons stay near.
        "arguments_block": {"text": json.dumps(prompt.arguments, indent=2, ensure_ascii=False)},
        "request": _shown_request(prompt.request),
    }


def _shown_request(request: Any) -> dict[str, Any]:
    """The upstream request's summary, with its loose texts shaped as blocks for _text.html."""
    if not isinstance(request, dict) or not request.get("method"):
        return {}
    preferences = request.get("modelPreferences") if isinstance(request.get("modelPreferences"), dict) else {}
    described = [f"hints: {', '.join(map(str, preferences['hints']))}"] if preferences.get("hints") else []
    described += [f"{key.removesuffix('Priority')} priority {value}" for key, value in preferences.items() if key != "hints"]
    return {
        **request,
        "systemPrompt_block": {"text": request.get("systemPrompt", "")},
        "message_block": {"text": request.get("message", "")},
        "schema_block": {"text": request.get("requestedSchema", "")},
        "model_preferences_text": "; ".join(described),
    }


def _context(**extra: Any) -> dict[str, Any]:
    return {"gateway_name": settings.FEDMCP_GATEWAY_NAME, "durations": REMEMBER_CHOICES, **extra}


def _by_call(prompts: Any) -> list[dict[str, Any]]:
    """The prompts in groups, one per host call (`ConsentPrompt.call`), in the order they were asked."""
    groups: dict[str, dict[str, Any]] = {}
    for prompt in prompts:
        key = prompt.call or f"prompt:{prompt.id}"
        group = groups.setdefault(key, {"call": prompt.call, "peer": prompt.peer, "name": prompt.name, "prompts": []})
        group["prompts"].append(_shown(prompt))
    return list(groups.values())


@_protected
@require_GET
def consent_list(request: HttpRequest) -> HttpResponse:
    prompts = list(ConsentPrompt.objects.pending_for(request.user).order_by("created_at"))
    return render(request, "consent/list.html", _context(prompts=prompts, calls=_by_call(prompts)))


@_protected
def consent_detail(request: HttpRequest, prompt_id: str) -> HttpResponse:
    if request.method == "POST":
        return _answer(request, prompt_id)
    if request.method != "GET":
        return HttpResponse(status=405, headers={"Allow": "GET, POST"})
    prompt = get_object_or_404(ConsentPrompt, pk=prompt_id, user=request.user)
    shown = {**_shown(prompt), "status": prompt.current_status()}
    return render(request, "consent/detail.html", _context(prompt=shown, pending=prompt.is_pending()))


def _answer(request: HttpRequest, prompt_id: str) -> HttpResponse:
    action = request.POST.get("action")
    remember: int | None = None
    if action == "remember":
        try:
            remember = int(request.POST.get("duration", ""))
        except ValueError:
            remember = -1
        if remember not in dict(REMEMBER_CHOICES):
            return HttpResponse("Choose one of the offered durations.", status=400, content_type="text/plain")
    elif action not in ("approve", "deny"):
        return HttpResponse("Unknown action.", status=400, content_type="text/plain")
    if not ConsentPrompt.objects.filter(pk=prompt_id, user=request.user).exists():
        raise Http404("no such consent request")
    try:
        prompt = consent_prompt_answer(prompt_id=prompt_id, user=request.user, approve=action != "deny", remember_seconds=remember)
    except ConsentAnswerError as exc:
        # Single-use: a second answer (another tab, a replayed form) changes nothing.
        return HttpResponse(str(exc), status=409, content_type="text/plain")
    verb = {"approve": "Approved once", "remember": "Approved and remembered", "deny": "Denied"}[action]
    if prompt.owner_gateway:
        # The owner gateway keeps a remembered approval, so it is not on this gateway's grants page.
        where = f"gateway {prompt.owner_gateway}" + (", which remembers it" if action == "remember" else "")
        messages.success(request, f"{verb}: {prompt.kind} {prompt.name} on {prompt.peer} ({where}).")
    else:
        messages.success(request, f"{verb}: {prompt.kind} {prompt.name} on {prompt.peer}.")
    return redirect("consent")


@_protected
@require_GET
def grant_list(request: HttpRequest) -> HttpResponse:
    grants = list(ConsentGrant.objects.active().filter(user=request.user))
    # Grants keep the client id; people know the application by its name.
    names = dict(Application.objects.filter(client_id__in={g.client_id for g in grants if g.client_id}).values_list("client_id", "name"))
    rows = [{"grant": g, "application": (names.get(g.client_id) or g.client_id) if g.client_id else "any application"} for g in grants]
    return render(request, "consent/grants.html", _context(grants=rows))


@_protected
@require_POST
def grant_revoke(request: HttpRequest, grant_id: int) -> HttpResponse:
    grant = get_object_or_404(ConsentGrant, pk=grant_id, user=request.user)
    consent_grant_revoke(grant=grant)
    messages.success(request, f"Revoked: {grant.kind} {grant.name} on {grant.peer}.")
    return redirect("consent-grants")


@_protected
@require_GET
def application_list(request: HttpRequest) -> HttpResponse:
    """The applications the user authorised over OAuth, and the accounts they connected at peers."""
    connections = UpstreamToken.objects.filter(user=request.user).select_related("peer").order_by("peer__name")
    return render(
        request,
        "consent/applications.html",
        _context(applications=authorizations.authorizations_for(request.user), connections=connections),
    )


@_protected
@require_POST
def application_revoke(request: HttpRequest, application_id: int) -> HttpResponse:
    application = get_object_or_404(Application, pk=application_id)
    if not authorizations.authorization_revoke(user=request.user, application_id=application.pk):
        raise Http404("this application holds no access of yours")
    messages.success(request, f"Revoked: {application.name or application.client_id} can no longer act as you; it has to ask you again.")
    return redirect("consent-applications")
