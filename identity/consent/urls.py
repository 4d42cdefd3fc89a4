"""URLs of the consent pages (identity/hostauth/views.py); the live feed is /consent/ws (asgi.py)."""

from __future__ import annotations

from django.urls import path
from django.views.generic import RedirectView

from identity.consent import views

urlpatterns = [
    path("consent", views.consent_list, name="consent"),
    # With a trailing slash too, as people type them (and the README once wrote them).
    path("consent/", RedirectView.as_view(pattern_name="consent", query_string=True)),
    path("consent/grants", views.grant_list, name="consent-grants"),
    path("consent/grants/", RedirectView.as_view(pattern_name="consent-grants", query_string=True)),
    path("consent/grants/<int:grant_id>/revoke", views.grant_revoke, name="consent-grant-revoke"),
    path("consent/applications", views.application_list, name="consent-applications"),
    path("consent/applications/", RedirectView.as_view(pattern_name="consent-applications", query_string=True)),
    path("consent/applications/<int:application_id>/revoke", views.application_revoke, name="consent-application-revoke"),
    path("consent/<str:prompt_id>", views.consent_detail, name="consent-detail"),
]
