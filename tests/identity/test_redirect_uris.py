"""Redirect URIs: exact matches only, and only https or http on a loopback host."""

from __future__ import annotations

import pytest

from identity.hostauth.oauth_validators import redirect_uri_acceptable
from tests.identity.oauth import (
    REDIRECT_URI,
    OAuthTestCase,
    public_client,
    query,
    strip_query,
)


class ExactMatchTests(OAuthTestCase):
    def refused(self, redirect_uri: str) -> None:
        """The request is refused on the gateway's own page: nothing is sent to `redirect_uri`."""
        response = self.flow(redirect_uri=redirect_uri).open_consent()
        assert response.status_code == 400, (redirect_uri, response.get("Location"))
        assert response.context["error"].error in ("invalid_request", "mismatching_redirect_uri")

    def test_the_registered_uri_is_accepted(self) -> None:
        assert self.flow().open_consent().status_code == 200

    def test_another_port_on_loopback_is_refused(self) -> None:
        self.refused("http://127.0.0.1:33419/callback")

    def test_another_path_is_refused(self) -> None:
        self.refused("http://127.0.0.1:33418/callback/")
        self.refused("http://127.0.0.1:33418/callbackx")

    def test_an_added_query_is_refused(self) -> None:
        self.refused("http://127.0.0.1:33418/callback?x=1")

    def test_another_host_or_scheme_is_refused(self) -> None:
        self.refused("http://localhost:33418/callback")
        self.refused("https://127.0.0.1:33418/callback")
        self.refused("https://attacker.example/callback")

    def test_the_code_goes_to_the_registered_uri_only(self) -> None:
        response = self.flow().decide()
        assert strip_query(response["Location"]) == REDIRECT_URI

    def test_the_token_request_must_repeat_the_same_uri(self) -> None:
        app = public_client("Two Callbacks", redirect_uris=f"{REDIRECT_URI} http://127.0.0.1:33418/other")
        flow = self.flow(app)
        response = flow.exchange(flow.code(), redirect_uri="http://127.0.0.1:33418/other")

        assert response.status_code == 400
        assert response.json()["error"] == "invalid_request"


class SchemeTests(OAuthTestCase):
    def test_a_registered_plain_http_uri_off_loopback_is_never_used(self) -> None:
        app = public_client("Old Web App", redirect_uris="http://app.example/callback")
        response = self.flow(app, redirect_uri="http://app.example/callback").open_consent()

        assert response.status_code == 400

    def test_https_and_each_loopback_form_work(self) -> None:
        for uri in [
            "https://app.example/callback",
            "http://localhost:4000/cb",
            "http://[::1]:4000/cb",
            "http://127.0.0.1/cb",
        ]:
            app = public_client(f"App {uri}", redirect_uris=uri)
            response = self.flow(app, redirect_uri=uri).decide()
            assert response.status_code == 302, uri
            assert strip_query(response["Location"]) == uri
            assert "code" in query(response["Location"])


@pytest.mark.parametrize(
    ("uri", "acceptable"),
    [
        ("https://app.example/cb", True),
        ("http://127.0.0.1:9/cb", True),
        ("http://127.8.9.10/cb", True),
        ("http://localhost/cb", True),
        ("http://[::1]:80/cb", True),
        ("http://app.example/cb", False),
        ("http://10.0.0.1/cb", False),
        ("http://localhost.attacker.example/cb", False),
        ("http://127.0.0.1@attacker.example/cb", False),
        ("https://app.example/cb#frag", False),
        ("com.example.app:/cb", False),
        ("javascript:alert(1)", False),
        ("http://127.0.0.1:99999/cb", False),
    ],
)
def test_which_redirect_uris_are_acceptable(uri: str, acceptable: bool) -> None:
    assert redirect_uri_acceptable(uri) is acceptable
