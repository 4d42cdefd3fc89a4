"""Client ID Metadata Documents: an https client_id is the URL of the client's own metadata.

The document fetch is faked at DOT's documented seam, the `CIMD_METADATA_FETCHER` setting:
DOT's real fetcher (`SafeMetadataFetcher`) only talks https to public addresses, so no
loopback server can stand in for a client's website. That the real fetcher refuses loopback
and plain http is tested below, without any network traffic.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.conf import settings
from django.core.cache import cache
from django.test import override_settings
from oauth2_provider.cimd import CIMDError, SafeMetadataFetcher
from oauth2_provider.models import Application

from tests.identity.oauth import REDIRECT_URI, OAuthTestCase, token_row

CLIENT_ID = "https://host.example/oauth/client.json"
DOCUMENTS: dict[str, dict[str, Any]] = {}
"""What the fake web serves, by URL; each test fills it."""


class StaticFetcher:
    """Stands in for DOT's SafeMetadataFetcher: `fetch(url)` -> (metadata, max_age seconds)."""

    def fetch(self, client_id: str) -> tuple[dict[str, Any], int]:
        if client_id not in DOCUMENTS:
            raise CIMDError("404")
        return DOCUMENTS[client_id], 300


def document(**fields: Any) -> dict[str, Any]:
    return {
        "client_id": CLIENT_ID,
        "client_name": "Metadata Host",
        "redirect_uris": [REDIRECT_URI],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
        **fields,
    }


@override_settings(OAUTH2_PROVIDER={**settings.OAUTH2_PROVIDER, "CIMD_METADATA_FETCHER": f"{__name__}.StaticFetcher"})
class CimdTests(OAuthTestCase):
    def setUp(self) -> None:
        super().setUp()
        DOCUMENTS.clear()
        cache.clear()  # DOT remembers failed fetches (backoff) in the cache

    def flow_for(self, client_id: str = CLIENT_ID, **fields: Any) -> Any:
        flow = self.flow(**fields)
        flow.client_id = client_id
        return flow

    def test_a_host_known_only_by_its_metadata_url_completes_the_flow(self) -> None:
        DOCUMENTS[CLIENT_ID] = document()

        tokens = self.flow_for().tokens()

        app = Application.objects.get(client_id=CLIENT_ID)
        assert (app.name, app.client_type, app.registration_source) == ("Metadata Host", "public", "cimd")
        assert token_row(tokens["access_token"]).application == app
        assert tokens["refresh_token"]

    def test_the_consent_page_names_the_client_from_its_document(self) -> None:
        DOCUMENTS[CLIENT_ID] = document()

        page = self.flow_for().open_consent()

        assert page.status_code == 200
        assert page.context["client_name"] == "Metadata Host"
        assert page.context["client_is_url"] is True

    def test_a_document_naming_another_client_id_is_refused(self) -> None:
        DOCUMENTS[CLIENT_ID] = document(client_id="https://other.example/client.json")

        assert self.flow_for().open_consent().status_code == 400
        assert not Application.objects.filter(client_id=CLIENT_ID).exists()

    def test_an_unreachable_document_means_an_unknown_client(self) -> None:
        assert self.flow_for().open_consent().status_code == 400

    def test_a_redirect_uri_not_in_the_document_is_refused(self) -> None:
        DOCUMENTS[CLIENT_ID] = document()

        response = self.flow_for(redirect_uri="http://127.0.0.1:33418/elsewhere").open_consent()

        assert response.status_code == 400

    def test_plain_http_redirects_off_loopback_in_a_document_are_never_used(self) -> None:
        DOCUMENTS[CLIENT_ID] = document(redirect_uris=["http://host.example/cb"])

        assert self.flow_for(redirect_uri="http://host.example/cb").open_consent().status_code == 400

    def test_a_document_with_a_secret_is_refused(self) -> None:
        DOCUMENTS[CLIENT_ID] = document(client_secret="shh")

        assert self.flow_for().open_consent().status_code == 400


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1:8443/client.json",
        "https://[::1]/client.json",
        "https://localhost/client.json",
        "http://host.example/client.json",
    ],
)
def test_dots_real_fetcher_refuses_loopback_and_plain_http(url: str) -> None:
    with pytest.raises(CIMDError):
        SafeMetadataFetcher().fetch(url)
