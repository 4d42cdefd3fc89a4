"""The connect pages: sign-in required, CSRF, no framing, the flow through the browser's redirects, disconnect.

The peer's authorization server is `FakeUpstream` (tests/federation/test_upstream_oauth.py) at
the outbound seam.
"""

from __future__ import annotations

from typing import Any
from unittest import mock

from django.contrib.auth import get_user_model
from django.test import Client, TransactionTestCase, override_settings

from federation.services import peer_add
from identity.models import UpstreamOAuthClient, UpstreamToken
from tests.federation.test_upstream_oauth import GATEWAY, ISSUER, MCP_URL, FakeUpstream
from tests.identity.oauth import FAST_HASHERS


@override_settings(PASSWORD_HASHERS=FAST_HASHERS, FEDMCP_PUBLIC_URL=GATEWAY, ALLOWED_HOSTS=["gateway.test", "testserver"])
class ConnectPageTests(TransactionTestCase):
    def setUp(self) -> None:
        self.upstream = FakeUpstream()
        for target in ("federation.upstream_oauth.outbound_client",):
            patcher = mock.patch(target, self.upstream.client)
            patcher.start()
            self.addCleanup(patcher.stop)
        # The first connection lists the catalog; that sync is not what these tests are about.
        patcher = mock.patch("federation.connect_views._first_catalog")
        self.first_catalog = patcher.start()
        self.addCleanup(patcher.stop)
        self.peer = peer_add(name="files", transport="streamable-http", url=MCP_URL, user_oauth=True)
        self.alice = get_user_model().objects.create_user("alice")
        self.browser = Client(HTTP_HOST="gateway.test")
        self.browser.force_login(self.alice)

    def connect(self, browser: Client | None = None, user: str = "alice") -> Any:
        browser = browser or self.browser
        started = browser.post("/connect/files")
        assert started.status_code == 302 and started["Location"].startswith(f"{ISSUER}/authorize?"), started
        return browser.get("/connect/callback", self.upstream.approve(started["Location"], user))

    def test_every_page_needs_sign_in(self) -> None:
        anonymous = Client(HTTP_HOST="gateway.test")
        for path in ("/connect", "/connect/files", "/connect/callback?state=x&code=y"):
            response = anonymous.get(path)
            assert response.status_code == 302 and response["Location"].startswith("/accounts/login/"), path

    def test_the_peer_page_explains_and_is_never_framed_or_cached(self) -> None:
        response = self.browser.get("/connect/files")

        assert response.status_code == 200
        assert b"Continue to sign in" in response.content and b"alice" in response.content
        assert response["X-Frame-Options"] == "DENY"
        assert "frame-ancestors 'none'" in response["Content-Security-Policy"]
        assert response["Cache-Control"] == "no-store"

    def test_starting_needs_the_csrf_token(self) -> None:
        browser = Client(HTTP_HOST="gateway.test", enforce_csrf_checks=True)
        browser.force_login(self.alice)

        assert browser.post("/connect/files").status_code == 403

    def test_a_peer_without_per_user_oauth_has_no_connect_page(self) -> None:
        peer_add(name="plain", transport="streamable-http", url="http://127.0.0.1:8999/plain")

        assert self.browser.get("/connect/plain").status_code == 404

    def test_connecting_stores_the_token_and_lists_the_connection(self) -> None:
        finished = self.connect()

        assert finished.status_code == 302 and finished["Location"] == "/connect"
        token = UpstreamToken.objects.get(user=self.alice, peer=self.peer)
        listing = self.browser.get("/connect")
        assert b"status-connected" in listing.content and b"Disconnect" in listing.content
        assert token.access_token.encode() not in listing.content and token.refresh_token.encode() not in listing.content
        self.first_catalog.assert_called_once()

    def test_the_callback_used_twice_is_refused_with_a_clear_page(self) -> None:
        started = self.browser.post("/connect/files")
        answer = self.upstream.approve(started["Location"])
        assert self.browser.get("/connect/callback", answer).status_code == 302

        replayed = self.browser.get("/connect/callback", answer)

        assert replayed.status_code == 400
        assert b"connect-error" in replayed.content and b"already used" in replayed.content

    def test_a_callback_from_another_issuer_is_refused(self) -> None:
        started = self.browser.post("/connect/files")
        answer = {**self.upstream.approve(started["Location"]), "iss": "http://evil.example"}

        response = self.browser.get("/connect/callback", answer)

        assert response.status_code == 400 and b"issuer mismatch" in response.content
        assert not UpstreamToken.objects.exists()

    def test_a_callback_in_another_browser_is_refused(self) -> None:
        started = self.browser.post("/connect/files")
        answer = self.upstream.approve(started["Location"])
        other = Client(HTTP_HOST="gateway.test")
        other.force_login(self.alice)

        assert other.get("/connect/callback", answer).status_code == 400
        assert not UpstreamToken.objects.exists()

    def test_an_unreachable_authorization_server_gives_a_clear_page(self) -> None:
        self.upstream.methods = []  # no S256: the gateway refuses to proceed

        response = self.browser.post("/connect/files")

        assert response.status_code == 502 and b"PKCE" in response.content

    def test_disconnecting_forgets_the_tokens(self) -> None:
        self.connect()

        response = self.browser.post("/connect/files/disconnect")

        assert response.status_code == 302
        assert not UpstreamToken.objects.exists()
        assert b"status-not-connected" in self.browser.get("/connect").content

    def test_the_client_metadata_document_names_its_own_url_and_the_callback(self) -> None:
        document = Client(HTTP_HOST="gateway.test").get("/connect/client-metadata.json").json()

        assert document["client_id"] == f"{GATEWAY}/connect/client-metadata.json"
        assert document["redirect_uris"] == [f"{GATEWAY}/connect/callback"]
        assert document["token_endpoint_auth_method"] == "none"

    def test_the_admin_never_shows_tokens_or_the_client_secret(self) -> None:
        self.connect()
        admin = get_user_model().objects.create_superuser("root", password="x")
        self.browser.force_login(admin)
        token = UpstreamToken.objects.get()
        client = UpstreamOAuthClient.objects.get()

        pages = [
            self.browser.get(f"/admin/identity/upstreamtoken/{token.pk}/change/"),
            self.browser.get("/admin/identity/upstreamtoken/"),
            self.browser.get(f"/admin/identity/upstreamoauthclient/{client.pk}/change/"),
        ]

        for page in pages:
            assert page.status_code == 200
            for secret in (token.access_token, token.refresh_token, client.client_secret):
                assert secret.encode() not in page.content
