"""Every API endpoint needs an admin-scoped token (or a staff session): 401 without, 403 without the scope."""

from __future__ import annotations

from django.test import Client

from identity.hostauth import scopes
from tests.api.common import ApiTestCase, api_client
from tests.base import MCP_SCOPE, mint_token

ENDPOINTS = (
    ("get", "/api/peers/"),
    ("post", "/api/peers/"),
    ("get", "/api/peers/{peer}/"),
    ("patch", "/api/peers/{peer}/"),
    ("delete", "/api/peers/{peer}/"),
    ("post", "/api/peers/{peer}/refresh/"),
    ("get", "/api/catalog/"),
    ("post", "/api/catalog/{tool}/enable/"),
    ("post", "/api/catalog/{tool}/disable/"),
    ("get", "/api/audit/"),
    ("get", "/api/policies/"),
    ("post", "/api/policies/"),
    ("get", "/api/policies/{policy}/"),
    ("patch", "/api/policies/{policy}/"),
    ("delete", "/api/policies/{policy}/"),
    ("get", "/api/grants/"),
    ("post", "/api/grants/{grant}/revoke/"),
    ("get", "/api/config/export"),
    ("post", "/api/config/import"),
)


class ApiAuthTest(ApiTestCase):
    def paths(self) -> list[tuple[str, str]]:
        return [(m, p.format(peer=self.peer.pk, tool=self.tool.pk, policy=self.policy.pk, grant=self.grant.pk)) for m, p in ENDPOINTS]

    def call(self, client: Client, method: str, path: str) -> int:
        return getattr(client, method)(path, {}, content_type="application/json").status_code

    def test_it_answers_401_with_a_bearer_challenge_without_a_token(self) -> None:
        client = api_client()
        statuses = {(m, p): self.call(client, m, p) for m, p in self.paths()}
        assert set(statuses.values()) == {401}, statuses
        assert client.get("/api/peers/").headers["WWW-Authenticate"].startswith("Bearer")

    def test_it_answers_403_to_a_token_without_the_admin_scope(self) -> None:
        # Staff, but the token carries only the MCP scopes.
        client = api_client(mint_token("root", scope=MCP_SCOPE))
        statuses = {(m, p): self.call(client, m, p) for m, p in self.paths()}
        assert set(statuses.values()) == {403}, statuses

    def test_every_api_path_in_the_schema_is_in_this_table(self) -> None:
        schema = self.api.get("/api/schema/", {"format": "json"}).json()
        described = {(m, p) for p, item in schema["paths"].items() for m in item if m in ("get", "post", "patch", "put", "delete")}
        listed = {(m, p.replace("{peer}", "{peer_id}").replace("{tool}", "{entry_id}").replace("{policy}", "{policy_id}")
                   .replace("{grant}", "{grant_id}")) for m, p in ENDPOINTS}
        assert described == listed

    def test_it_answers_401_to_a_token_for_another_audience(self) -> None:
        token = mint_token("root", scope=scopes.ADMIN, resource="https://elsewhere.example")
        assert api_client(token).get("/api/peers/").status_code == 401

    def test_it_answers_401_to_an_unknown_token(self) -> None:
        assert api_client("not-a-token").get("/api/peers/").status_code == 401

    def test_it_accepts_a_staff_session_for_the_browsable_docs(self) -> None:
        client = api_client()
        client.force_login(self.peer_operator())
        assert client.get("/api/peers/").status_code == 200
        assert client.get("/api/schema/").status_code == 200
        assert client.get("/api/docs/").status_code == 200

    def test_it_refuses_a_signed_in_user_who_is_not_staff(self) -> None:
        client = api_client()
        from tests.base import persona

        client.force_login(persona("alice"))
        assert client.get("/api/peers/").status_code == 403

    def test_an_admin_scoped_token_is_enough(self) -> None:
        assert self.api.get("/api/peers/").status_code == 200
        assert scopes.ADMIN == "admin"

    def peer_operator(self):  # type: ignore[no-untyped-def]
        from tests.base import persona

        return persona("root")
