"""URLs of the connect pages (federation/connect_views.py); fixed paths come before /connect/<peer>."""

from __future__ import annotations

from django.urls import path
from django.views.generic import RedirectView

from federation import connect_views

urlpatterns = [
    path("connect", connect_views.connect_list, name="connect"),
    path("connect/", RedirectView.as_view(pattern_name="connect", query_string=True)),
    path("connect/callback", connect_views.connect_callback, name="connect-callback"),
    path("connect/client-metadata.json", connect_views.client_metadata_document, name="connect-client-metadata"),
    path("connect/<str:peer_name>", connect_views.connect_peer, name="connect-peer"),
    path("connect/<str:peer_name>/disconnect", connect_views.connect_disconnect, name="connect-disconnect"),
]
