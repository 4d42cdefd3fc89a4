"""Client credentials: machines (confidential clients an operator created) get their own tokens."""

from __future__ import annotations

import base64
from typing import Any

from asgiref.sync import async_to_sync
from django.test import Client, TransactionTestCase, override_settings

from identity.hostauth.tokens import authenticate
from tests.identity.oauth import (
    FAST_HASHERS,
    ORIGIN,
    RESOURCE,
    TOKEN,
    machine_client,
    public_client,
    token_row,
)


def basic(client_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


@override_settings(PASSWORD_HASHERS=FAST_HASHERS)
class ClientCredentialsTests(TransactionTestCase):
    def setUp(self) -> None:
        self.machine = machine_client(secret="s3cret")

    def request(self, secret: str = "s3cret", **data: str) -> Any:
        body = {"grant_type": "client_credentials", "scope": "mcp:tools", **data}
        return Client().post(TOKEN, body, HTTP_AUTHORIZATION=basic(self.machine.client_id, secret))

    def test_a_machine_gets_a_token_for_the_resource_it_names(self) -> None:
        response = self.request(resource=RESOURCE)

        assert response.status_code == 200
        tokens = response.json()
        assert "refresh_token" not in tokens
        row = token_row(tokens["access_token"])
        assert (row.user, row.application, row.resource, row.scope) == (None, self.machine, [RESOURCE], "mcp:tools")

    def test_the_token_is_accepted_by_the_gateway_as_the_machine(self) -> None:
        tokens = self.request().json()

        identity = async_to_sync(authenticate)(tokens["access_token"], ORIGIN)

        assert (identity.user_id, identity.client_id) == (None, self.machine.client_id)
        assert identity.scopes == frozenset({"mcp:tools"})

    def test_without_a_resource_the_audience_is_the_gateway(self) -> None:
        assert token_row(self.request().json()["access_token"]).resource == [ORIGIN]

    def test_the_secret_can_also_be_posted(self) -> None:
        body = {"grant_type": "client_credentials", "client_id": self.machine.client_id, "client_secret": "s3cret"}
        assert Client().post(TOKEN, body).status_code == 200

    def test_a_wrong_secret_is_refused(self) -> None:
        response = self.request(secret="wrong")

        assert response.status_code == 401
        assert response.json()["error"] == "invalid_client"

    def test_a_foreign_resource_is_refused(self) -> None:
        response = self.request(resource="https://elsewhere.example/mcp")

        assert response.status_code == 400
        assert response.json()["error"] == "invalid_target"

    def test_a_public_client_cannot_use_the_grant(self) -> None:
        host = public_client()
        body = {"grant_type": "client_credentials", "client_id": host.client_id}

        response = Client().post(TOKEN, body)

        assert response.status_code in (400, 401)
        assert response.json()["error"] in ("invalid_client", "unauthorized_client")
