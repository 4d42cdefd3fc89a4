"""The connect pages: users connect their own accounts at per-user OAuth peers (federation/upstream_oauth.py).

    /connect                         the user's connections, with connect and disconnect buttons
    /connect/<peer>                  what connecting means; its form starts the OAuth flow
    /connect/callback                where the peer's authorization server sends the browser back
    /connect/<peer>/disconnect       forget the user's tokens there (POST)
    /connect/client-metadata.json    this gateway's Client ID Metadata Document (public)

Interface code only: the flow is `federation.upstream_oauth`. Every page but the metadata document
is login-required, never framed, never cached, and every POST is CSRF-protected.
"""

from __future__ import annotations

import logging
from typing import Any

from asgiref.sync import async_to_sync
from django.conf import settings
from django.contrib import messages
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from federation import upstream_oauth
from federation.models import Peer
from identity.models import UpstreamOAuthClient, UpstreamToken
from identity.pages import protected_page

logger = logging.getLogger(__name__)

# No scripts; no form-action either, because the connect form answers with a redirect to the
# peer's authorization server, and browsers apply form-action to that redirect.
CSP = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'"


_protected = protected_page(CSP)


def _base(request: HttpRequest) -> str:
    return upstream_oauth.public_base(f"{request.scheme}://{request.get_host()}")


def _context(**extra: Any) -> dict[str, Any]:
    return {"gateway_name": settings.FEDMCP_GATEWAY_NAME, **extra}


def _peer(name: str) -> Peer:
    return get_object_or_404(Peer, name=name, user_oauth=True, enabled=True)


@_protected
@require_GET
def connect_list(request: HttpRequest) -> HttpResponse:
    tokens = {t.peer_id: t for t in UpstreamToken.objects.filter(user=request.user)}
    peers = [
        {"peer": peer, "token": tokens.get(peer.pk), "issuer": getattr(getattr(peer, "oauth_client", None), "issuer", "")}
        for peer in Peer.objects.filter(user_oauth=True, enabled=True).select_related("oauth_client")
    ]
    return render(request, "connect/list.html", _context(peers=peers))


@_protected
@require_http_methods(["GET", "POST"])
def connect_peer(request: HttpRequest, peer_name: str) -> HttpResponse:
    peer = _peer(peer_name)
    if request.method == "POST":
        try:
            # The flow's state goes into the browser session; the session is read and written
            # here, in the view, not inside the async service (its storage is the sync ORM).
            flows = {upstream_oauth.SESSION_KEY: upstream_oauth.session_flows(request.session)}
            url = async_to_sync(upstream_oauth.connect_begin)(user=request.user, peer=peer, base=_base(request), session=flows)
            request.session[upstream_oauth.SESSION_KEY] = flows[upstream_oauth.SESSION_KEY]
        except upstream_oauth.UpstreamOAuthError as exc:
            logger.info("peer %s: connect flow could not start: %s", peer.name, exc)
            return _failure(request, str(exc), peer.name, status=502)
        # Not an open redirect: the target is the authorization endpoint from the peer's own metadata.
        return HttpResponseRedirect(url)
    client = UpstreamOAuthClient.objects.filter(peer=peer).first()
    token = UpstreamToken.objects.filter(user=request.user, peer=peer).first()
    return render(request, "connect/peer.html", _context(peer=peer, client=client, token=token))


@_protected
@require_GET
def connect_callback(request: HttpRequest) -> HttpResponse:
    params = {k: v for k, v in request.GET.items() if isinstance(v, str)}
    flows = {upstream_oauth.SESSION_KEY: upstream_oauth.session_flows(request.session)}
    try:
        token = async_to_sync(upstream_oauth.connect_finish)(user=request.user, session=flows, params=params)
    except upstream_oauth.UpstreamOAuthError as exc:
        return _failure(request, str(exc), None, status=400)
    finally:
        request.session[upstream_oauth.SESSION_KEY] = flows[upstream_oauth.SESSION_KEY]
    peer = token.peer
    if peer.last_synced_at is None:
        _first_catalog(peer)
    messages.success(request, f"Connected: your account at {peer.name}. Go back to your AI app and try again.")
    return redirect("connect")


def _first_catalog(peer: Peer) -> None:
    """List the peer's catalog with the first connection there: until now nobody could."""
    from federation.events import publish_catalog_changed
    from federation.services import LISTINGS, peer_sync_catalog

    report = async_to_sync(peer_sync_catalog)(peer=peer)
    if "connect" in report.errors:
        logger.warning("peer %s: first catalog sync failed: %s", peer.name, report.errors["connect"])
        return
    async_to_sync(publish_catalog_changed)(peer.name, [kind for kind, *_ in LISTINGS])


@_protected
@require_POST
def connect_disconnect(request: HttpRequest, peer_name: str) -> HttpResponse:
    peer = get_object_or_404(Peer, name=peer_name, user_oauth=True)
    if async_to_sync(upstream_oauth.connection_remove)(user=request.user, peer_id=peer.pk):
        messages.success(request, f"Disconnected: {peer.name} no longer acts with your account.")
    # Two pages offer this button; the way back is one of them by name, never a URL from the form.
    return redirect("consent-applications" if request.POST.get("from") == "applications" else "connect")


def _failure(request: HttpRequest, message: str, peer_name: str | None, *, status: int) -> HttpResponse:
    return render(request, "connect/failed.html", _context(message=message, peer_name=peer_name), status=status)


@require_GET
def client_metadata_document(request: HttpRequest) -> JsonResponse:
    """This gateway's Client ID Metadata Document: its client_id is the document's own URL."""
    base = _base(request)
    document = {
        "client_id": f"{base}{upstream_oauth.METADATA_DOCUMENT_PATH}",
        **upstream_oauth.client_metadata(base),
        "token_endpoint_auth_method": "none",
    }
    response = JsonResponse(document)
    response["Cache-Control"] = "public, max-age=3600"
    return response
