"""The admin's "Try it" playground: call a tool, read a resource or get a prompt as yourself.

The call goes through the MCP dispatcher (mcp_endpoint/dispatcher.py `handle_request`) like any
host's: scopes, policy, consent, rate limits and audit all apply, with the signed-in staff user
as the caller and the client "fedmcp admin playground". It is a 2026-07-28 request without a
session, so a call that needs consent comes back `input_required` with the consent page's URL;
the page links it and offers to continue the call once it is answered.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from asgiref.sync import async_to_sync
from django import forms
from django.contrib import admin
from django.contrib.auth.models import AbstractBaseUser
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from mcp_types.version import LATEST_MODERN_VERSION
from oauth2_provider.models import Application

from console import schema
from federation.models import CatalogEntry, CatalogKind
from federation.upstream.base import modern_meta
from identity.audit import audit_flush
from identity.hostauth.tokens import Identity, gateway_application, scopes_allowed
from mcp_endpoint import dispatcher
from mcp_endpoint.context import HostContext

PLAYGROUND_APPLICATION = "fedmcp admin playground"
"""The OAuth application the playground's calls are made as (audit, consent and policies see its client id)."""
CLIENT_INFO = {"name": "fedmcp admin playground", "version": "1"}
MAX_SHOWN_CHARS = 200_000
"""A result larger than this is cut on the page (the audit log has the call either way)."""


def playground_application() -> Application:
    return gateway_application(PLAYGROUND_APPLICATION)


def playground_identity(user: AbstractBaseUser) -> Identity:
    """The caller a playground call is made as: the signed-in user, with the scopes a token of theirs would hold."""
    application = playground_application()
    return Identity(
        token_id=0,
        user_id=user.pk,
        username=user.get_username(),
        application_id=application.pk,
        client_id=application.client_id,
        scopes=scopes_allowed(user=user, application=application),
        expires=timezone.now() + timedelta(minutes=10),
    )


class Collected:
    """The outlet of a playground call: keeps the notifications (progress, logs) to show them."""

    can_request = False

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def send(self, message: dict[str, Any]) -> None:
        self.messages.append(message)


@dataclass
class Outcome:
    method: str
    params: dict[str, Any]
    reply: dict[str, Any]
    elapsed_ms: float
    notifications: list[dict[str, Any]]

    @property
    def error(self) -> dict[str, Any] | None:
        error = self.reply.get("error")
        return error if isinstance(error, dict) else None

    @property
    def result(self) -> dict[str, Any]:
        result = self.reply.get("result")
        return result if isinstance(result, dict) else {}

    @property
    def consent_url(self) -> str:
        """Where the user answers, when the call waits for consent (input_required or an error naming it)."""
        if self.result.get("resultType") == "input_required":
            for request in (self.result.get("inputRequests") or {}).values():
                url = (request.get("params") or {}).get("url") if isinstance(request, dict) else None
                if isinstance(url, str):
                    return url
        data = (self.error or {}).get("data")
        return data["url"] if isinstance(data, dict) and isinstance(data.get("url"), str) else ""

    @property
    def request_state(self) -> str:
        state = self.result.get("requestState") if self.result.get("resultType") == "input_required" else None
        return state if isinstance(state, str) else ""

    def texts(self) -> list[str]:
        """The readable parts of the result: text content, resource text, prompt messages."""
        out: list[str] = []
        for item in self.result.get("content") or []:
            if isinstance(item, dict) and isinstance(item.get("text"), str):
                out.append(item["text"])
        for item in self.result.get("contents") or []:
            if isinstance(item, dict) and isinstance(item.get("text"), str):
                out.append(item["text"])
        for message in self.result.get("messages") or []:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, dict) and isinstance(content.get("text"), str):
                out.append(f"{message.get('role', '')}: {content['text']}")
        return out

    def pretty(self) -> str:
        text = json.dumps(self.reply, indent=2, ensure_ascii=False)
        return text if len(text) <= MAX_SHOWN_CHARS else text[:MAX_SHOWN_CHARS] + "\n… (cut)"


def playground_call(*, user: AbstractBaseUser, method: str, params: dict[str, Any], host: str) -> Outcome:
    """Run one request through the dispatcher as `user` and wait until its audit event is written."""
    # The page shows URLs: a call that needs consent is answered input_required with the page's URL.
    capabilities = {"elicitation": {"url": {}}}
    meta = modern_meta(capabilities, extra={"io.modelcontextprotocol/clientInfo": CLIENT_INFO})
    ctx = HostContext.of_envelope(
        protocol_version=LATEST_MODERN_VERSION, capabilities=capabilities, client_info=CLIENT_INFO, meta=meta, transport="admin", scope="",
        outbound=Collected(), identity=playground_identity(user), headers={"host": host},
    )
    message = {"jsonrpc": "2.0", "id": 1, "method": method, "params": {**params, "_meta": meta}}

    async def run() -> tuple[dict[str, Any], float]:
        started = time.monotonic()
        reply = await dispatcher.handle_request(ctx, message)
        elapsed = (time.monotonic() - started) * 1000
        await audit_flush()
        return reply, elapsed

    reply, elapsed = async_to_sync(run)()
    return Outcome(method, params, reply, elapsed, ctx.outbound.messages)  # type: ignore[attr-defined]


# --- views ---------------------------------------------------------------------------------------


def _item_form(entry: CatalogEntry, data: Any = None) -> forms.Form:
    payload = entry.payload if isinstance(entry.payload, dict) else {}
    if entry.kind == CatalogKind.TOOL:
        return schema.schema_form(payload.get("inputSchema"), data)
    if entry.kind == CatalogKind.PROMPT:
        return schema.prompt_form(payload.get("arguments"), data)
    if entry.kind == CatalogKind.RESOURCE_TEMPLATE:
        return schema.template_form(entry.name, data)
    return forms.Form(data)


def _request_for(entry: CatalogEntry, form: forms.Form) -> tuple[str, dict[str, Any]]:
    values = schema.arguments_of(form)
    if entry.kind == CatalogKind.TOOL:
        return "tools/call", {"name": entry.name, "arguments": values}
    if entry.kind == CatalogKind.PROMPT:
        return "prompts/get", {"name": entry.name, "arguments": {k: str(v) for k, v in values.items()}}
    if entry.kind == CatalogKind.RESOURCE_TEMPLATE:
        return "resources/read", {"uri": schema.expand_template(entry.name, values)}
    return "resources/read", {"uri": entry.name}


@never_cache
def playground(request: HttpRequest) -> HttpResponse:
    """Pick an item: every tool, resource, template and prompt hosts can see."""
    entries = CatalogEntry.objects.visible().select_related("peer").order_by("peer__name", "kind", "position")
    context = {
        **admin.site.each_context(request),
        "title": "Try it",
        "entries": entries,
    }
    return TemplateResponse(request, "console/playground.html", context)


@never_cache
def playground_item(request: HttpRequest, entry_id: int) -> HttpResponse:
    """The form of one item; a POST makes the call and shows the result and the time it took."""
    entry = get_object_or_404(CatalogEntry.objects.select_related("peer"), pk=entry_id)
    form = _item_form(entry, request.POST if request.method == "POST" else None)
    outcome = None
    if request.method == "POST" and form.is_valid():
        method, params = _request_for(entry, form)
        state = request.POST.get("requestState", "") if "continue" in request.POST else ""
        if state:
            # Continuing a call that waited for consent: the same call, with the state it was given.
            params["requestState"] = state
        outcome = playground_call(user=request.user, method=method, params=params, host=request.get_host())
    payload = entry.payload if isinstance(entry.payload, dict) else {}
    context = {
        **admin.site.each_context(request),
        "title": f"Try {entry.name}",
        "entry": entry,
        "description": payload.get("description") if isinstance(payload.get("description"), str) else "",
        "rows": schema.schema_rows(payload.get("inputSchema")) if entry.kind == CatalogKind.TOOL else [],
        "form": form,
        "outcome": outcome,
        "visible": entry.enabled and entry.peer.enabled,
    }
    return TemplateResponse(request, "console/playground_item.html", context)
