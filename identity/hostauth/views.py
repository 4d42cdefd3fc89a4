"""The authorization server's pages and documents, as thin layers over django-oauth-toolkit.

* `LoginView` and `AuthorizationView`: the sign-in and consent pages people see.
* `ProtectedResourceMetadataView`: RFC 9728 metadata for each MCP endpoint.
* `ClientRegistrationView` / `ClientConfigurationView`: RFC 7591/7592 with the MCP rules
  (`application_type` "native" or "web", defaulted from the redirect URIs when absent;
  redirect URIs https or loopback; no machine grants).

DOT's own views do the protocol work; these add the gateway's policy and presentation only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import wraps
from typing import Any
from urllib.parse import parse_qs, urlsplit

from django.conf import settings
from django.contrib.auth import views as auth_views
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.urls import reverse
from django.utils.decorators import method_decorator
from django.views.decorators.cache import never_cache
from django.views.decorators.clickjacking import xframe_options_deny
from oauth2_provider import views as dot_views
from oauth2_provider.exceptions import OAuthToolkitError
from oauth2_provider.models import get_application_model
from oauth2_provider.oauth2_backends import _add_iss_to_redirect
from oauth2_provider.settings import oauth2_settings
from oauthlib.oauth2.rfc6749.errors import CustomOAuth2Error, InvalidScopeError

from federation.models import PEER_NAME_WORD
from identity.hostauth import scopes as scope_names
from identity.hostauth.oauth_validators import (
    foreign_resources,
    gateway_origin,
    is_loopback_host,
    redirect_uri_acceptable,
)
from identity.hostauth.tokens import scopes_allowed

PAGE_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; base-uri 'none'; frame-ancestors 'none'"
)
"""Pages people see: no scripts at all, inline styles only, never framed (clickjacking).

No `form-action`: browsers apply it to the redirect that follows the consent form, and that
redirect goes to the client's own redirect URI.
"""

MCP_ENDPOINT_PATH = re.compile(rf"^(?:peers/{PEER_NAME_WORD}/)?(?:mcp|ws|sse|messages)$")
"""Endpoint paths (without the leading slash) that have RFC 9728 path-inserted metadata."""

DCR_APPLICATION_TYPES = ("native", "web")
DCR_GRANT_TYPES = frozenset({"authorization_code", "refresh_token"})
"""Grants open registration may ask for. Machine clients (client_credentials) are created by
an operator: open registration of one would hand anybody a token for this gateway."""


def protected_page(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Mark a page as never framed, never cached, script-free (login and consent pages)."""

    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> HttpResponse:
        response = view(*args, **kwargs)
        response["Content-Security-Policy"] = PAGE_CSP
        return response

    return never_cache(xframe_options_deny(wrapper))


def _gateway_name() -> str:
    return settings.FEDMCP_GATEWAY_NAME


def client_display_name(application: Any) -> str:
    """The name a person sees for a client: its registered name, else where it comes from."""
    if application is None:
        return ""
    if application.name:
        return application.name
    if application.client_id.startswith("https://"):
        return urlsplit(application.client_id).hostname or application.client_id
    return "An unnamed application"


# --- sign-in --------------------------------------------------------------------------------


@method_decorator(protected_page, name="dispatch")
class LoginView(auth_views.LoginView):
    """Sign-in page; when it stands before a consent page it says which client is asking."""

    template_name = "registration/login.html"
    redirect_authenticated_user = True

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        context["gateway_name"] = _gateway_name()
        context["client_name"] = self._asking_client()
        return context

    def _asking_client(self) -> str:
        """Name of the client in a pending /o/authorize `next` URL, if it is a known client."""
        parts = urlsplit(self.get_redirect_url())
        if parts.path != reverse("oauth2_provider:authorize"):
            return ""
        client_id = (parse_qs(parts.query).get("client_id") or [""])[0]
        application = get_application_model().objects.filter(client_id=client_id).first()
        return client_display_name(application) if application else ""


@method_decorator(protected_page, name="dispatch")
class LogoutView(auth_views.LogoutView):
    """Sign out (POST only, as Django requires) and go back to the sign-in page."""


# --- consent --------------------------------------------------------------------------------


@method_decorator(protected_page, name="dispatch")
class AuthorizationView(dot_views.AuthorizationView):
    """The consent page at /o/authorize/: DOT's flow with the gateway's policy and wording.

    Before anything is shown (GET) or granted (POST, whose hidden fields a user could edit):
    PKCE must use S256, every RFC 8707 resource must be this gateway, and staff-only scopes
    need a staff user.
    """

    template_name = "oauth2_provider/authorize.html"

    def get(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        refusal = self._refusal(
            request.GET.get("scope", ""), request.GET.getlist("resource"), request.GET.get("code_challenge_method"),
            request.GET.get("client_id", ""),
        )
        if refusal is not None:
            try:
                _scopes, credentials = self.validate_authorization_request(request)
            except OAuthToolkitError as error:
                return self.error_response(error, application=None)
            return self._refuse(refusal, credentials)
        return super().get(request, *args, **kwargs)

    def form_valid(self, form: Any) -> HttpResponse:
        data = form.cleaned_data
        refusal = self._refusal(
            data.get("scope") or "", (data.get("resource") or "").split(), data.get("code_challenge_method"),
            data.get("client_id") or "",
        )
        if refusal is not None:
            return self._refuse(refusal, data)
        return super().form_valid(form)

    def _refusal(
        self, scope: str, resources: list[str], challenge_method: str | None, client_id: str
    ) -> CustomOAuth2Error | None:
        # oauthlib refuses a missing code_challenge (PKCE_REQUIRED); DOT refuses "plain" only
        # once the user has approved. Refuse it (and a missing method, which means plain)
        # before the user is asked anything.
        if challenge_method != "S256":
            return CustomOAuth2Error(
                error="invalid_request", description="PKCE with code_challenge_method=S256 is required"
            )
        foreign = foreign_resources(resources, gateway_origin(self.request))
        if foreign:
            return CustomOAuth2Error(
                error="invalid_target",
                description=f"This gateway issues tokens for itself only, not for {foreign[0]}",
            )
        # Consent cannot give what the user lacks; the token endpoint applies the same rule again
        # (and again at every use), so this only spares the user a page that would lead nowhere.
        application = get_application_model().objects.filter(client_id=client_id).first()
        allowed = scopes_allowed(user=self.request.user, application=application)
        refused = set(scope.split()) & (set(scope_names.SCOPES) - allowed)
        if refused:
            return InvalidScopeError(
                description=f"You cannot grant {' '.join(sorted(refused))}: the admin scope is for gateway staff only"
            )
        return None

    def _refuse(self, error: CustomOAuth2Error, credentials: dict[str, Any]) -> HttpResponse:
        """Send `error` to the client's redirect URI with its state, or show it if that URI is not the client's.

        On POST the client and redirect URI come from hidden fields, so they are checked again
        here: an edited form must not turn the gateway into an open redirector.
        """
        error.state = credentials.get("state")
        application = get_application_model().objects.filter(client_id=credentials.get("client_id") or "").first()
        redirect_uri = credentials.get("redirect_uri") or ""
        if application is None or not (
            redirect_uri in application.redirect_uris.split() and redirect_uri_acceptable(redirect_uri)
        ):
            return self.render_to_response({"error": error}, status=400)
        return self.error_response(OAuthToolkitError(error=error, redirect_uri=redirect_uri), application)

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        application = context.get("application")
        context["client_name"] = client_display_name(application)
        context["client_is_url"] = bool(application and application.client_id.startswith("https://"))
        context["scope_items"] = [
            (scope, scope_names.SCOPES.get(scope, description))
            for scope, description in zip(
                context.get("scopes", []), context.get("scopes_descriptions", []), strict=False
            )
        ]
        context["resources"] = (context.get("resource") or "").split()
        return context

    def redirect(self, redirect_to: str, application: Any) -> HttpResponse:
        # RFC 9207 wants `iss` on every authorization response, error ones included; DOT adds it
        # to successful ones only. Its helper replaces an `iss` already there, so this is safe.
        if oauth2_settings.COMPLIANT_BCP_RFC9700_AUTHZ_RESPONSE_ISS:
            redirect_to = _add_iss_to_redirect(
                redirect_to, oauth2_settings.oauth2_authorization_server_issuer(self.request)
            )
        return super().redirect(redirect_to, application)

    def render_to_response(self, context: dict[str, Any], **response_kwargs: Any) -> HttpResponse:
        # DOT renders its error page through here too, without get_context_data.
        context.setdefault("gateway_name", _gateway_name())
        return super().render_to_response(context, **response_kwargs)


class TokenView(dot_views.TokenView):
    """POST /o/token/: DOT's token endpoint, with its errors always labelled as JSON.

    An error raised while DOT stores the token (e.g. `invalid_target`) reaches the client
    without a content type, which Django then labels text/html.
    """

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        response = super().post(request, *args, **kwargs)
        if response.status_code >= 400 and response["Content-Type"].startswith("text/html"):
            response["Content-Type"] = "application/json"
            response["Cache-Control"] = "no-store"
        return response


# --- RFC 9728 protected-resource metadata ---------------------------------------------------


class ProtectedResourceMetadataView(dot_views.OAuthProtectedResourceMetadataView):
    """RFC 9728 metadata for the gateway (root form) or one MCP endpoint (path-inserted form).

    `/.well-known/oauth-protected-resource/mcp` describes `<origin>/mcp`, and so on for `/ws`,
    `/sse`, `/messages` and each `/peers/<name>/...`: the URLs mcp_endpoint.auth puts in its
    `WWW-Authenticate` challenges. Other paths are not protected resources here (404).
    """

    resource_path = ""

    def get(self, request: HttpRequest, *args: Any, resource_path: str = "", **kwargs: Any) -> HttpResponse:
        self.resource_path = resource_path.strip("/")
        if self.resource_path and not MCP_ENDPOINT_PATH.match(self.resource_path):
            raise Http404("not a protected resource")
        return super().get(request, *args, **kwargs)

    def get_resource(self, request: HttpRequest) -> str:
        origin = gateway_origin(request)
        return f"{origin}/{self.resource_path}" if self.resource_path else origin

    def get_authorization_servers(self, request: HttpRequest) -> list[str]:
        return [oauth2_settings.oauth2_authorization_server_issuer(request)]

    def get_scopes_supported(self) -> list[str]:
        # An MCP endpoint takes the MCP scopes (and peer gateways' one); the origin as a whole
        # also serves the admin API. Never offline_access: refresh tokens come with the code grant.
        if self.resource_path:
            return [*scope_names.MCP_SCOPES, scope_names.GATEWAY]
        return list(scope_names.SCOPES)

    def get_resource_name(self) -> str:
        return f"{_gateway_name()} MCP gateway"


# --- RFC 7591 / 7592 dynamic client registration --------------------------------------------


def _registration_error(error: str, description: str) -> JsonResponse:
    return JsonResponse({"error": error, "error_description": description}, status=400)


def default_application_type(redirect_uris: Any) -> str:
    """The `application_type` of a registration that names none (RFC 7591 leaves it out; OIDC
    Dynamic Registration defaults it to "web", which would call every desktop host a web app).

    "native" when every redirect URI comes back to the user's own machine (http on loopback, or
    a custom scheme such as `cursor://`), "web" otherwise, as OpenID Connect registration
    servers tell the two apart. The MCP SDKs' `registerClient()` sends no application_type.
    """
    if not isinstance(redirect_uris, list) or not redirect_uris:
        return "web"
    for uri in redirect_uris:
        if not isinstance(uri, str):
            return "web"
        try:
            parts = urlsplit(uri)
        except ValueError:
            return "web"
        loopback = parts.scheme == "http" and bool(parts.hostname) and is_loopback_host(parts.hostname)
        if not (loopback or parts.scheme not in ("http", "https")):
            return "web"
    return "native"


def registration_refusal(body: bytes) -> JsonResponse | None:
    """Return the 400 for client metadata the gateway refuses, or None to let DOT register it.

    Malformed JSON is left to DOT, which answers it with the RFC 7591 error itself.
    """
    try:
        metadata = json.loads(body)
    except ValueError:
        return None
    if not isinstance(metadata, dict):
        return None
    application_type = metadata.get("application_type", default_application_type(metadata.get("redirect_uris")))
    if application_type not in DCR_APPLICATION_TYPES:
        return _registration_error("invalid_client_metadata", 'application_type must be "native" or "web"')
    grant_types = metadata.get("grant_types", ["authorization_code"])
    if not isinstance(grant_types, list) or not all(isinstance(g, str) and g in DCR_GRANT_TYPES for g in grant_types):
        return _registration_error(
            "invalid_client_metadata", "Only the authorization_code and refresh_token grants can be registered here"
        )
    redirect_uris = metadata.get("redirect_uris")
    if isinstance(redirect_uris, list):
        for uri in redirect_uris:
            if not isinstance(uri, str) or not redirect_uri_acceptable(uri):
                return _registration_error(
                    "invalid_redirect_uri", "Redirect URIs must be https, or http on localhost / a loopback address"
                )
    return None


class ClientRegistrationView(dot_views.DynamicClientRegistrationView):
    """POST /o/register/ (RFC 7591), open to anyone, with the gateway's metadata rules."""

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        return registration_refusal(request.body) or super().post(request, *args, **kwargs)


class ClientConfigurationView(dot_views.DynamicClientRegistrationManagementView):
    """GET/PUT/DELETE /o/register/<client_id>/ (RFC 7592); an update obeys the same rules."""

    def put(self, request: HttpRequest, client_id: str, *args: Any, **kwargs: Any) -> HttpResponse:
        # Authenticate first, so an unauthenticated caller learns nothing about the rules.
        auth = self._authenticate_registration_request(request, client_id)
        if isinstance(auth, HttpResponse):
            return auth
        return registration_refusal(request.body) or super().put(request, client_id, *args, **kwargs)
