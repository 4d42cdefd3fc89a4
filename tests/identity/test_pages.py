"""The sign-in and consent pages: what they show, CSRF, and that nobody can frame them."""

from __future__ import annotations

from html import escape
from typing import Any
from urllib.parse import urlencode

from django.test import Client, override_settings

from identity.hostauth import scopes
from tests.identity.oauth import (
    FAST_HASHERS,
    REDIRECT_URI,
    RESOURCE,
    OAuthTestCase,
    create_user,
    query,
)

LOGIN = "/accounts/login/"
LOGOUT = "/accounts/logout/"


def assert_unframeable(response: Any) -> None:
    assert response["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in response["Content-Security-Policy"]
    assert "no-store" in response["Cache-Control"]


@override_settings(PASSWORD_HASHERS=FAST_HASHERS)
class LoginPageTests(OAuthTestCase):
    def setUp(self) -> None:
        super().setUp()
        create_user("bob", password="correct horse")

    def test_the_login_page_cannot_be_framed(self) -> None:
        assert_unframeable(Client().get(LOGIN))

    def test_it_names_the_gateway(self) -> None:
        with self.settings(FEDMCP_GATEWAY_NAME="acme-gw"):
            page = Client().get(LOGIN)
        assert page.context["gateway_name"] == "acme-gw"
        assert b"acme-gw" in page.content

    def test_before_consent_it_names_the_asking_client(self) -> None:
        page = Client().get(LOGIN, {"next": self.flow().authorize_url()})

        assert page.context["client_name"] == "Desk Host"
        assert b"Desk Host" in page.content

    def test_signing_in_continues_to_the_authorization_request(self) -> None:
        url = self.flow().authorize_url()

        response = Client().post(LOGIN, {"username": "bob", "password": "correct horse", "next": url})

        assert response.status_code == 302
        assert response["Location"] == url

    def test_a_wrong_password_shows_the_form_again(self) -> None:
        response = Client().post(LOGIN, {"username": "bob", "password": "wrong"})

        assert response.status_code == 200
        assert response.context["form"].errors

    def test_an_offsite_next_is_ignored(self) -> None:
        response = Client().post(
            LOGIN, {"username": "bob", "password": "correct horse", "next": "https://evil.example/"}
        )

        assert response.status_code == 302
        assert response["Location"] == "/"

    def test_signing_in_needs_the_csrf_token(self) -> None:
        browser = Client(enforce_csrf_checks=True)

        assert browser.post(LOGIN, {"username": "bob", "password": "correct horse"}).status_code == 403

        browser.get(LOGIN)
        token = browser.cookies["csrftoken"].value
        response = browser.post(LOGIN, {"username": "bob", "password": "correct horse", "csrfmiddlewaretoken": token})
        assert response.status_code == 302


class ConsentPageTests(OAuthTestCase):
    def test_the_consent_page_cannot_be_framed(self) -> None:
        assert_unframeable(self.flow().open_consent())

    def test_the_error_page_cannot_be_framed(self) -> None:
        page = self.browser.get("/o/authorize/?" + urlencode({"client_id": "nope", "response_type": "code"}))

        assert page.status_code == 400
        assert_unframeable(page)

    def test_it_shows_the_client_the_scopes_the_resource_and_the_redirect(self) -> None:
        page = self.flow().open_consent()
        html = page.content.decode()

        assert page.status_code == 200
        assert 'id="client-name">Desk Host<' in html
        for scope in scopes.MCP_SCOPES:
            assert escape(scopes.SCOPES[scope]) in html
        assert RESOURCE in html
        assert f'id="redirect-uri">{REDIRECT_URI}<' in html
        assert 'id="allow"' in html and 'id="deny"' in html
        assert "csrfmiddlewaretoken" in html

    def test_it_shows_who_is_signed_in(self) -> None:
        page = self.flow().open_consent()
        assert page.context["user"] == self.alice
        assert b"alice" in page.content

    def test_a_client_without_a_name_is_shown_as_unnamed(self) -> None:
        self.desk.name = ""
        self.desk.save()

        page = self.flow().open_consent()

        assert page.context["client_name"]
        assert self.desk.client_id in page.content.decode()

    def test_approving_needs_the_csrf_token(self) -> None:
        browser = Client(enforce_csrf_checks=True)
        browser.force_login(self.alice)
        flow = self.flow()
        flow.browser = browser
        page = flow.open_consent()
        form = flow.consent_form(page)

        assert browser.post("/o/authorize/", {**form, "allow": "Authorize"}).status_code == 403

        token = browser.cookies["csrftoken"].value
        response = browser.post("/o/authorize/", {**form, "allow": "Authorize", "csrfmiddlewaretoken": token})
        assert response.status_code == 302
        assert "code" in query(response["Location"])

    def test_signing_out_from_the_consent_page_returns_to_sign_in(self) -> None:
        url = self.flow().authorize_url()

        response = self.browser.post(LOGOUT, {"next": url})

        assert response.status_code == 302
        follow = self.browser.get(response["Location"])
        assert follow.status_code == 302
        assert follow["Location"].startswith(LOGIN)
