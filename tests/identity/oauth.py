"""Helpers for the authorization-server tests: personas, clients, PKCE and the code flow.

Everything runs through Django's test client at `http://testserver`, so the gateway's origin
(the issuer and the only audience it mints tokens for) is `ORIGIN`.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.test import Client, TestCase, TransactionTestCase, override_settings
from oauth2_provider.models import AccessToken, Application

ORIGIN = "http://testserver"
RESOURCE = f"{ORIGIN}/mcp"
REDIRECT_URI = "http://127.0.0.1:33418/callback"
AUTHORIZE = "/o/authorize/"
TOKEN = "/o/token/"
REGISTER = "/o/register/"
MCP_SCOPE = "mcp:tools mcp:resources mcp:prompts"
FAST_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def public_url(url: str) -> override_settings:
    """Settings for a gateway published at `url` (FEDMCP_PUBLIC_URL, and the issuer derived from it)."""
    return override_settings(
        FEDMCP_PUBLIC_URL=url,
        OAUTH2_PROVIDER={**settings.OAUTH2_PROVIDER, "OIDC_ISS_ENDPOINT": url.rstrip("/")},
    )


def pkce_pair() -> tuple[str, str]:
    """Return (verifier, S256 challenge)."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).decode().rstrip("=")


def query(url: str) -> dict[str, str]:
    """The query parameters of a redirect URL, one value each."""
    return {key: values[0] for key, values in parse_qs(urlsplit(url).query).items()}


def strip_query(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def create_user(username: str, *, staff: bool = False, password: str | None = None) -> AbstractBaseUser:
    return get_user_model().objects.create_user(username=username, password=password, is_staff=staff)


def public_client(name: str = "Desk Host", *, redirect_uris: str = REDIRECT_URI) -> Application:
    """A public authorization-code client (as a desktop MCP host is)."""
    return Application.objects.create(
        name=name,
        client_type=Application.CLIENT_PUBLIC,
        authorization_grant_type=Application.GRANT_AUTHORIZATION_CODE,
        redirect_uris=redirect_uris,
    )


def machine_client(name: str = "Nightly Job", *, secret: str = "machine-secret") -> Application:
    """A confidential client-credentials client; DOT hashes `secret` when it saves it."""
    return Application.objects.create(
        name=name,
        client_type=Application.CLIENT_CONFIDENTIAL,
        authorization_grant_type=Application.GRANT_CLIENT_CREDENTIALS,
        client_secret=secret,
    )


def token_row(raw: str) -> AccessToken:
    """The stored access token for a raw token (only its checksum is stored)."""
    return AccessToken.objects.get(token_checksum=hashlib.sha256(raw.encode()).hexdigest())


@dataclass
class Flow:
    """One authorization-code + PKCE attempt by `client_id`, driven through a signed-in browser."""

    browser: Client
    client_id: str
    redirect_uri: str = REDIRECT_URI
    scope: str | None = MCP_SCOPE
    resource: str | None = RESOURCE
    state: str = "state-123"

    def __post_init__(self) -> None:
        self.verifier, self.challenge = pkce_pair()

    def params(self, **overrides: str | None) -> dict[str, str]:
        params: dict[str, str | None] = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": self.redirect_uri,
            "scope": self.scope,
            "state": self.state,
            "code_challenge": self.challenge,
            "code_challenge_method": "S256",
            "resource": self.resource,
        }
        params.update(overrides)
        return {key: value for key, value in params.items() if value is not None}

    def authorize_url(self, **overrides: str | None) -> str:
        return f"{AUTHORIZE}?{urlencode(self.params(**overrides))}"

    def open_consent(self, **overrides: str | None) -> Any:
        """GET the authorization endpoint (the consent page, or a redirect)."""
        return self.browser.get(self.authorize_url(**overrides))

    def consent_form(self, page: Any) -> dict[str, str]:
        """The hidden fields of a rendered consent page, as the browser would post them."""
        initial = page.context["form"].initial
        return {key: value for key, value in initial.items() if value is not None}

    def decide(self, *, allow: bool = True, tamper: dict[str, str] | None = None, **overrides: str | None) -> Any:
        """Open the consent page and press Allow (or Deny); return the final response."""
        page = self.open_consent(**overrides)
        assert page.status_code == 200, (page.status_code, page.get("Location"))
        data = {**self.consent_form(page), **(tamper or {})}
        if allow:
            data["allow"] = "Authorize"
        return self.browser.post(AUTHORIZE, data)

    def code(self, **overrides: str | None) -> str:
        """Approve and return the authorization code from the redirect."""
        response = self.decide(**overrides)
        assert response.status_code == 302, response.status_code
        assert strip_query(response["Location"]) == self.redirect_uri
        params = query(response["Location"])
        assert params["state"] == self.state
        return params["code"]

    def exchange(self, code: str, *, verifier: str | None = None, **extra: str) -> Any:
        data = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.redirect_uri,
            "client_id": self.client_id,
            "code_verifier": verifier if verifier is not None else self.verifier,
        }
        if self.resource is not None:
            data["resource"] = self.resource
        data.update(extra)
        return Client().post(TOKEN, data)

    def tokens(self, **overrides: str | None) -> dict[str, Any]:
        """Run the whole flow; return the token response JSON."""
        response = self.exchange(self.code(**overrides))
        assert response.status_code == 200, response.content
        return response.json()


class OAuthPersonas:
    """alice (a user) signed in to a browser, and `desk`, a public MCP host client."""

    def setUp(self) -> None:
        super().setUp()
        self.alice = create_user("alice")
        self.browser = Client()
        self.browser.force_login(self.alice)
        self.desk = public_client()

    def flow(self, application: Application | None = None, **fields: Any) -> Flow:
        return Flow(self.browser, (application or self.desk).client_id, **fields)


@override_settings(PASSWORD_HASHERS=FAST_HASHERS)
class OAuthTestCase(OAuthPersonas, TestCase):
    """`OAuthPersonas` in a `TestCase`: each test is rolled back."""


@override_settings(PASSWORD_HASHERS=FAST_HASHERS)
class OAuthTransactionTestCase(OAuthPersonas, TransactionTestCase):
    """`OAuthPersonas` with real commits, for tests that present the token to the gateway.

    The gateway's token check runs through `database_sync_to_async`, which closes a `TestCase`'s
    connection (tests/conftest.py `no_connection_closed_inside_a_transaction`).
    """
