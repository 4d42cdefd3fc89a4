"""Django URLs: the admin, OAuth (identity.hostauth.urls) and the health endpoints (MCP transports are routed in asgi.py)."""

from django.contrib import admin
from django.urls import include, path

from fedmcp_site import views

urlpatterns = [
    path("", include("console.urls")),
    path("admin/", admin.site.urls),
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
    path("metrics", views.metrics_view, name="metrics"),
    path("favicon.ico", views.favicon_ico, name="favicon-ico"),
    path("favicon.svg", views.favicon_svg, name="favicon-svg"),
    path("", include("identity.hostauth.urls")),
    path("", include("identity.trust.urls")),
    path("", include("identity.consent.urls")),
    path("", include("federation.connect_urls")),
    path("", views.index, name="index"),
]
