"""Discovery documents: RFC 8414 authorization-server metadata and RFC 9728 resource metadata."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from asgiref.sync import async_to_sync
from django.test import Client, TestCase

from identity.hostauth import scopes
from tests.base import http
from tests.identity.oauth import ORIGIN, public_url

AS_METADATA = "/.well-known/oauth-authorization-server"
PR_METADATA = "/.well-known/oauth-protected-resource"
MCP_PATHS = ["mcp", "ws", "sse", "messages", "peers/web/mcp", "peers/web/ws", "peers/time-utc/sse"]


class AuthorizationServerMetadataTests(TestCase):
    def get(self, **extra: str) -> dict:
        response = Client().get(AS_METADATA, **extra)
        assert response.status_code == 200
        return response.json()

    def test_issuer_is_the_origin_the_document_was_fetched_from(self) -> None:
        assert self.get()["issuer"] == ORIGIN
        assert self.get(HTTP_HOST="127.0.0.1:8000")["issuer"] == "http://127.0.0.1:8000"

    @public_url("https://mcp.example.org/")
    def test_issuer_and_endpoints_follow_the_public_url(self) -> None:
        document = self.get()
        assert document["issuer"] == "https://mcp.example.org"
        assert document["authorization_endpoint"] == "https://mcp.example.org/o/authorize/"
        assert document["token_endpoint"] == "https://mcp.example.org/o/token/"

    def test_it_advertises_s256_only(self) -> None:
        assert self.get()["code_challenge_methods_supported"] == ["S256"]

    def test_it_advertises_what_the_server_serves(self) -> None:
        document = self.get()
        assert document["authorization_endpoint"] == f"{ORIGIN}/o/authorize/"
        assert document["token_endpoint"] == f"{ORIGIN}/o/token/"
        assert document["registration_endpoint"] == f"{ORIGIN}/o/register/"
        assert document["revocation_endpoint"] == f"{ORIGIN}/o/revoke_token/"
        assert document["response_types_supported"] == ["code"]
        assert set(document["grant_types_supported"]) == {"authorization_code", "refresh_token", "client_credentials"}
        assert "none" in document["token_endpoint_auth_methods_supported"]
        assert document["client_id_metadata_document_supported"] is True
        assert document["authorization_response_iss_parameter_supported"] is True
        assert set(document["scopes_supported"]) == set(scopes.SCOPES)
        assert "introspection_endpoint" not in document

    def test_it_can_be_read_cross_origin(self) -> None:
        assert Client().get(AS_METADATA)["Access-Control-Allow-Origin"] == "*"

    def test_a_foreign_host_is_refused(self) -> None:
        assert Client().get(AS_METADATA, HTTP_HOST="evil.example").status_code == 400


class ProtectedResourceMetadataTests(TestCase):
    def get(self, path: str = PR_METADATA) -> dict:
        response = Client().get(path)
        assert response.status_code == 200, path
        return response.json()

    def test_the_root_document_describes_the_whole_origin(self) -> None:
        document = self.get()
        assert document["resource"] == ORIGIN
        assert document["authorization_servers"] == [ORIGIN]
        assert document["bearer_methods_supported"] == ["header"]
        assert set(document["scopes_supported"]) == set(scopes.SCOPES)

    def test_each_endpoint_has_a_path_inserted_document_naming_it(self) -> None:
        for path in MCP_PATHS:
            document = self.get(f"{PR_METADATA}/{path}")
            assert document["resource"] == f"{ORIGIN}/{path}"
            assert document["authorization_servers"] == [ORIGIN]
            assert document["bearer_methods_supported"] == ["header"]
            assert set(scopes.MCP_SCOPES) <= set(document["scopes_supported"])
            assert scopes.ADMIN not in document["scopes_supported"]

    def test_offline_access_is_never_advertised(self) -> None:
        for path in ["", *(f"/{p}" for p in MCP_PATHS)]:
            assert "offline_access" not in self.get(f"{PR_METADATA}{path}")["scopes_supported"]

    def test_the_authorization_server_is_the_issuer_of_the_as_metadata(self) -> None:
        issuer = Client().get(AS_METADATA).json()["issuer"]
        assert self.get(f"{PR_METADATA}/mcp")["authorization_servers"] == [issuer]

    @public_url("https://mcp.example.org/")
    def test_the_resource_and_issuer_follow_the_public_url(self) -> None:
        document = self.get(f"{PR_METADATA}/mcp")
        assert document["resource"] == "https://mcp.example.org/mcp"
        assert document["authorization_servers"] == ["https://mcp.example.org"]

    def test_paths_that_are_not_mcp_endpoints_have_no_document(self) -> None:
        for path in ["admin", "peers/web", "peers/Bad_Name/mcp", "mcp/extra", "healthz"]:
            assert Client().get(f"{PR_METADATA}/{path}").status_code == 404, path


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("path", ["/mcp", "/peers/web/mcp", "/sse"])
def test_the_401_challenge_points_at_a_document_for_the_same_endpoint(path: str) -> None:
    reply = async_to_sync(http)("POST" if path != "/sse" else "GET", path, b"{}", {"content-type": "application/json"})
    assert reply.status == 401
    challenge = reply.headers["www-authenticate"]
    metadata_url = challenge.split('resource_metadata="', 1)[1].split('"', 1)[0]
    parts = urlsplit(metadata_url)
    document = Client().get(parts.path, HTTP_HOST=parts.netloc).json()
    assert document["resource"] == f"{parts.scheme}://{parts.netloc}{path}"
