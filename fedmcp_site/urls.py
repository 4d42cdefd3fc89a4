"""Django URLs: the admin and the health endpoints (MCP transports are routed in asgi.py)."""

from django.contrib import admin
from django.urls import path

from fedmcp_site import views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("healthz", views.healthz, name="healthz"),
    path("", views.index, name="index"),
]
