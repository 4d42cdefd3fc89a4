"""URLs of the authorization server, its discovery documents and the sign-in pages.

Mounted at the site root: RFC 8414 and RFC 9728 put their documents under the origin's
`/.well-known/`, and the issuer is the bare origin. The OAuth endpoints live under `/o/`.
Every OAuth route is in DOT's `oauth2_provider` namespace, because DOT builds its metadata and
the RFC 9207 `iss` value by reversing those names.

Not mounted: DOT's device flow, token introspection (this gateway is its own resource server),
its application-management pages (the Django admin does that) and OIDC.
"""

from __future__ import annotations

from django.urls import include, path, re_path
from oauth2_provider import views as dot_views

from identity.hostauth import views

oauth_urlpatterns = [
    path(
        ".well-known/oauth-authorization-server",
        dot_views.OAuthServerMetadataView.as_view(),
        name="oauth-server-metadata",
    ),
    path(
        ".well-known/oauth-protected-resource",
        views.ProtectedResourceMetadataView.as_view(),
        name="oauth-resource-metadata",
    ),
    re_path(
        r"^\.well-known/oauth-protected-resource/(?P<resource_path>.+)$",
        views.ProtectedResourceMetadataView.as_view(),
        name="oauth-resource-metadata-path",
    ),
    path("o/authorize/", views.AuthorizationView.as_view(), name="authorize"),
    path("o/token/", views.TokenView.as_view(), name="token"),
    path("o/revoke_token/", dot_views.RevokeTokenView.as_view(), name="revoke-token"),
    path("o/register/", views.ClientRegistrationView.as_view(), name="dcr-register"),
    path("o/register/<str:client_id>/", views.ClientConfigurationView.as_view(), name="dcr-register-management"),
]

urlpatterns = [
    path("", include((oauth_urlpatterns, "oauth2_provider"))),
    path("accounts/login/", views.LoginView.as_view(), name="login"),
    path("accounts/logout/", views.LogoutView.as_view(), name="logout"),
]
