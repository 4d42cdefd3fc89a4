"""Small site-wide views: the landing page, the liveness and readiness probes, the metrics."""

from __future__ import annotations

import logging

from django.db import Error as DatabaseError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from federation.models import Peer
from fedmcp_lib import metrics
from fedmcp_site import favicon
from fedmcp_site.runtime import lifecycle

logger = logging.getLogger(__name__)


def healthz(request: HttpRequest) -> HttpResponse:
    """Liveness: the process answers and the database is reachable (503 with a JSON body if not).

    Anyone may ask, so the answer says only "ok": the query proves the database answers, and
    its result (how many peers there are) is nobody's business here.
    """
    try:
        Peer.objects.count()
    except DatabaseError as exc:
        logger.warning("healthz: database unreachable", exc_info=True)
        return JsonResponse({"status": "unavailable", "error": type(exc).__name__}, status=503)
    return JsonResponse({"status": "ok"})


@never_cache
@require_GET
async def readyz(request: HttpRequest) -> HttpResponse:
    """Readiness: 200 while this worker can serve (database and migrations, not draining).

    503 otherwise. The JSON body names the failed checks; a channel-layer outage leaves the
    worker ready with `status: degraded` (fedmcp_site/runtime/lifecycle.py `readiness`).
    """
    ready, report = await lifecycle.readiness()
    return JsonResponse(report, status=200 if ready else 503)


@never_cache
@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    """This worker's Prometheus metrics, for clients in FEDMCP_METRICS_ALLOWED_NETWORKS only."""
    if not metrics.scrape_allowed(request.META.get("REMOTE_ADDR")):
        return HttpResponse("Forbidden: /metrics is served to the monitoring network only\n", status=403, content_type="text/plain")
    return HttpResponse(generate_latest(REGISTRY), content_type=CONTENT_TYPE_LATEST)


ICON_MAX_AGE = 86400


@require_GET
def favicon_ico(request: HttpRequest) -> HttpResponse:
    response = HttpResponse(favicon.ico(), content_type="image/x-icon")
    response["Cache-Control"] = f"public, max-age={ICON_MAX_AGE}"
    return response


@require_GET
def favicon_svg(request: HttpRequest) -> HttpResponse:
    response = HttpResponse(favicon.SVG, content_type="image/svg+xml")
    response["Cache-Control"] = f"public, max-age={ICON_MAX_AGE}"
    return response


def index(request: HttpRequest) -> HttpResponse:
    return render(request, "index.html", {"peers": Peer.objects.all()})
