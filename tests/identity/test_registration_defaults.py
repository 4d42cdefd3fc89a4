"""RFC 7591 registration without `application_type`, as the MCP SDKs' `registerClient()` sends it.

RFC 7591 has no `application_type`; OpenID Connect registration defaults it. The gateway
defaults it from the redirect URIs: "native" when they all come back to the user's machine
(http on loopback), "web" otherwise. A value that is neither is still refused.
"""

from __future__ import annotations

from oauth2_provider.models import Application

from identity.hostauth.views import default_application_type
from tests.identity.oauth import OAuthTestCase
from tests.identity.test_dynamic_registration import host_metadata, register


class DefaultApplicationTypeTests(OAuthTestCase):
    def test_a_loopback_host_registers_without_application_type(self) -> None:
        response = register(host_metadata(application_type=None, redirect_uris=["http://127.0.0.1:33418/callback"]))

        assert response.status_code == 201, response.content
        assert Application.objects.filter(client_id=response.json()["client_id"]).exists()

    def test_a_web_host_registers_without_application_type(self) -> None:
        response = register(
            host_metadata(application_type=None, redirect_uris=["https://app.example/cb"], token_endpoint_auth_method="client_secret_basic")
        )

        assert response.status_code == 201, response.content
        assert response.json()["client_secret"]

    def test_the_redirect_rules_still_apply_without_application_type(self) -> None:
        response = register(host_metadata(application_type=None, redirect_uris=["http://app.example/cb"]))

        assert response.status_code == 400
        assert response.json()["error"] == "invalid_redirect_uri"


def test_the_default_follows_the_redirect_uris() -> None:
    assert default_application_type(["http://127.0.0.1:8080/cb", "http://localhost/cb", "http://[::1]:9/cb"]) == "native"
    assert default_application_type(["cursor://anysphere.cursor-retrieval/oauth/callback"]) == "native"
    assert default_application_type(["https://app.example/cb"]) == "web"
    assert default_application_type(["http://127.0.0.1/cb", "https://app.example/cb"]) == "web"
    assert default_application_type(None) == "web"
    assert default_application_type([]) == "web"
    assert default_application_type([7]) == "web"
