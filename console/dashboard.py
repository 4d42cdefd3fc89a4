"""The admin dashboard at /admin/dashboard/: peer health and traffic, updated live by polling."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template.response import TemplateResponse
from django.views.decorators.cache import never_cache

from console.selectors import WINDOW_MINUTES, dashboard_stats

POLL_SECONDS = 5


def _minutes(request: HttpRequest) -> int:
    try:
        return max(1, min(120, int(request.GET.get("minutes", WINDOW_MINUTES))))
    except ValueError:
        return WINDOW_MINUTES


@never_cache
def dashboard(request: HttpRequest) -> HttpResponse:
    context = {
        **admin.site.each_context(request),
        "title": "Dashboard",
        "stats": dashboard_stats(minutes=_minutes(request)),
        "poll_seconds": POLL_SECONDS,
    }
    return TemplateResponse(request, "console/dashboard.html", context)


@never_cache
def dashboard_data(request: HttpRequest) -> JsonResponse:
    return JsonResponse(dashboard_stats(minutes=_minutes(request)))
