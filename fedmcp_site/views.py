"""Small site-wide views: the landing page and the liveness probe."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render

from federation.models import Peer


def healthz(request: HttpRequest) -> HttpResponse:
    """Liveness: the process answers and the database is reachable."""
    return JsonResponse({"status": "ok", "peers": Peer.objects.count()})


def index(request: HttpRequest) -> HttpResponse:
    return render(request, "index.html", {"peers": Peer.objects.all()})
