"""Refresh tokens of public clients rotate on every use; replaying an old one is refused."""

from __future__ import annotations

from typing import Any

from django.test import Client

from tests.identity.oauth import (
    RESOURCE,
    TOKEN,
    OAuthTestCase,
    public_client,
    token_row,
)


class RefreshTokenTests(OAuthTestCase):
    def refresh(self, refresh_token: str, **extra: str) -> Any:
        data = {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": self.desk.client_id,
            **extra,
        }
        return Client().post(TOKEN, data)

    def test_each_refresh_returns_a_new_refresh_token(self) -> None:
        first = self.flow().tokens()

        response = self.refresh(first["refresh_token"])

        assert response.status_code == 200
        second = response.json()
        assert second["refresh_token"] != first["refresh_token"]
        assert second["access_token"] != first["access_token"]

    def test_the_new_access_token_keeps_the_resource_and_scope(self) -> None:
        first = self.flow().tokens()

        second = self.refresh(first["refresh_token"]).json()

        row = token_row(second["access_token"])
        assert row.resource == [RESOURCE]
        assert set(row.scope.split()) == set(first["scope"].split())

    def test_a_used_refresh_token_is_refused(self) -> None:
        first = self.flow().tokens()
        assert self.refresh(first["refresh_token"]).status_code == 200

        response = self.refresh(first["refresh_token"])

        assert response.status_code == 400
        assert response.json()["error"] == "invalid_grant"

    def test_replaying_a_used_refresh_token_revokes_its_successor(self) -> None:
        first = self.flow().tokens()
        second = self.refresh(first["refresh_token"]).json()

        self.refresh(first["refresh_token"])

        assert self.refresh(second["refresh_token"]).status_code == 400

    def test_a_refresh_cannot_move_the_token_to_another_resource(self) -> None:
        first = self.flow().tokens()

        response = self.refresh(first["refresh_token"], resource="https://elsewhere.example/mcp")

        assert response.status_code == 400
        assert response.json()["error"] == "invalid_target"

    def test_another_client_cannot_use_the_refresh_token(self) -> None:
        first = self.flow().tokens()
        other = self.flow(public_client("Other Host"))

        data = {"grant_type": "refresh_token", "refresh_token": first["refresh_token"], "client_id": other.client_id}
        assert Client().post(TOKEN, data).status_code == 400
