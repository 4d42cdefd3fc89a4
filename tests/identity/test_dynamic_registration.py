"""RFC 7591 dynamic client registration (deprecated by MCP, still used): open, with MCP's rules."""

from __future__ import annotations

import json
from typing import Any

from asgiref.sync import async_to_sync
from django.test import Client
from oauth2_provider.models import Application

from identity.hostauth.tokens import TokenError, authenticate
from tests.identity.oauth import ORIGIN, REDIRECT_URI, REGISTER, OAuthTestCase, OAuthTransactionTestCase


def host_metadata(**fields: Any) -> dict[str, Any]:
    """What an MCP host (the mcp SDK, say) registers with."""
    return {
        "client_name": "Registered Host",
        "redirect_uris": [REDIRECT_URI],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
        "application_type": "native",
        "scope": "mcp:tools mcp:resources mcp:prompts",
        **fields,
    }


def register(metadata: dict[str, Any]) -> Any:
    body = json.dumps({key: value for key, value in metadata.items() if value is not None})
    return Client().post(REGISTER, body, content_type="application/json")


class RegistrationTests(OAuthTestCase):
    def test_anyone_can_register_a_public_host(self) -> None:
        response = register(host_metadata())

        assert response.status_code == 201
        registered = response.json()
        assert registered["token_endpoint_auth_method"] == "none"
        assert registered["redirect_uris"] == [REDIRECT_URI]
        assert "client_secret" not in registered
        app = Application.objects.get(client_id=registered["client_id"])
        assert (app.name, app.client_type, app.registration_source) == ("Registered Host", "public", "dcr")

    def test_a_registered_host_completes_the_code_flow(self) -> None:
        client_id = register(host_metadata()).json()["client_id"]

        tokens = self.flow(Application.objects.get(client_id=client_id)).tokens()

        assert tokens["access_token"] and tokens["refresh_token"]

    def test_the_consent_page_says_the_name_is_unverified(self) -> None:
        client_id = register(host_metadata()).json()["client_id"]

        page = self.flow(Application.objects.get(client_id=client_id)).open_consent()

        assert page.status_code == 200
        assert page.context["client_name"] == "Registered Host"
        assert page.context["application"].registration_source == "dcr"

    def test_a_web_application_can_register(self) -> None:
        metadata = host_metadata(application_type="web", redirect_uris=["https://app.example/cb"])
        assert register(metadata).status_code == 201

    def test_application_type_must_be_native_or_web(self) -> None:
        # Absent is fine (test_registration_defaults.py); anything else but the two is refused.
        for value in ("", "service", ["native"]):
            response = register(host_metadata(application_type=value))
            assert response.status_code == 400, value
            assert response.json()["error"] == "invalid_client_metadata"

    def test_malformed_grant_types_are_refused(self) -> None:
        for value in ("authorization_code", [{"grant": "x"}], [["authorization_code"]]):
            response = register(host_metadata(grant_types=value))
            assert response.status_code == 400, value

    def test_plain_http_redirects_off_loopback_are_refused(self) -> None:
        response = register(host_metadata(redirect_uris=["http://app.example/cb"]))

        assert response.status_code == 400
        assert response.json()["error"] == "invalid_redirect_uri"

    def test_a_machine_client_cannot_register_itself(self) -> None:
        metadata = host_metadata(grant_types=["client_credentials"], token_endpoint_auth_method="client_secret_basic")

        response = register(metadata)

        assert response.status_code == 400
        assert response.json()["error"] == "invalid_client_metadata"
        assert not Application.objects.filter(authorization_grant_type="client-credentials").exists()

    def test_a_confidential_web_client_gets_a_secret(self) -> None:
        metadata = host_metadata(
            application_type="web",
            redirect_uris=["https://app.example/cb"],
            token_endpoint_auth_method="client_secret_basic",
        )

        registered = register(metadata).json()

        assert registered["client_secret"]
        assert Application.objects.get(client_id=registered["client_id"]).client_type == "confidential"

    def test_malformed_json_is_refused(self) -> None:
        response = Client().post(REGISTER, b"{not json", content_type="application/json")

        assert response.status_code == 400
        assert response.json()["error"] == "invalid_client_metadata"


class ConfigurationTests(OAuthTransactionTestCase):
    """RFC 7592: the registration access token manages the registration, under the same rules."""

    def setUp(self) -> None:
        super().setUp()
        self.registered = register(host_metadata()).json()
        self.url = self.registered["registration_client_uri"].removeprefix(ORIGIN)
        self.auth = {"HTTP_AUTHORIZATION": f"Bearer {self.registered['registration_access_token']}"}

    def put(self, metadata: dict[str, Any], **headers: str) -> Any:
        return Client().put(self.url, json.dumps(metadata), content_type="application/json", **headers)

    def test_the_registration_can_be_read_back(self) -> None:
        response = Client().get(self.url, **self.auth)

        assert response.status_code == 200
        assert response.json()["client_id"] == self.registered["client_id"]

    def test_an_update_cannot_turn_the_host_into_a_machine_client(self) -> None:
        metadata = host_metadata(grant_types=["client_credentials"], token_endpoint_auth_method="client_secret_basic")

        response = self.put(metadata, **self.auth)

        assert response.status_code == 400
        assert (
            Application.objects.get(client_id=self.registered["client_id"]).authorization_grant_type
            == "authorization-code"
        )

    def test_an_update_obeys_the_redirect_rules(self) -> None:
        assert self.put(host_metadata(redirect_uris=["http://app.example/cb"]), **self.auth).status_code == 400

    def test_a_valid_update_is_applied(self) -> None:
        response = self.put(host_metadata(client_name="Renamed Host"), **self.auth)

        assert response.status_code == 200
        assert Application.objects.get(client_id=self.registered["client_id"]).name == "Renamed Host"

    def test_an_update_without_the_registration_token_is_refused(self) -> None:
        assert self.put(host_metadata(grant_types=["client_credentials"])).status_code == 401

    def test_the_registration_token_is_not_an_access_token_for_mcp(self) -> None:
        with self.assertRaises(TokenError):
            async_to_sync(authenticate)(self.registered["registration_access_token"], ORIGIN)
