"""The `admin` scope is a property of the token: only a token acting for an active staff user has it.

Issue 15 (critical): a trusted gateway's client-credentials application asked `/o/token/` for
`scope=admin` and got it, then added a stdio peer through `/api/peers/`, which runs a command on
the gateway host. Everything here goes through the real endpoints: `/o/token/`, `/o/register/`,
`/o/authorize/` and `/api/peers/`.
"""

from __future__ import annotations

import base64
from typing import Any

from django.test import Client, override_settings
from oauth2_provider.models import Application

from federation.models import Peer
from identity.hostauth import scopes
from tests.identity.oauth import (
    FAST_HASHERS,
    ORIGIN,
    REDIRECT_URI,
    REGISTER,
    TOKEN,
    OAuthTransactionTestCase,
    create_user,
    machine_client,
    query,
    token_row,
)
from tests.identity.trust.test_gateways import trust_command

STDIO_PEER = {"name": "pwned", "transport": "stdio", "command": "/bin/true", "args": []}
"""What the attacker adds: a stdio peer is a command the gateway runs as itself (harmless here)."""


def basic(client_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


def client_credentials(client_id: str, secret: str, scope: str) -> Any:
    body = {"grant_type": "client_credentials", "scope": scope, "resource": ORIGIN}
    return Client().post(TOKEN, body, HTTP_AUTHORIZATION=basic(client_id, secret))


def add_stdio_peer(token: str) -> int:
    """POST a stdio peer to the admin API with `token`; return the HTTP status."""
    api = Client(headers={"authorization": f"Bearer {token}"})
    return api.post("/api/peers/", STDIO_PEER, content_type="application/json").status_code


@override_settings(PASSWORD_HASHERS=FAST_HASHERS)
class AdminScopeBoundaryTests(OAuthTransactionTestCase):
    def assert_no_admin_token(self, response: Any, refusal: str = "invalid_scope") -> None:
        """Either refused with `refusal`, or a token without `admin` that /api/ refuses."""
        if response.status_code == 200:
            token = response.json()
            assert scopes.ADMIN not in token.get("scope", "").split(), token
            assert scopes.ADMIN not in token_row(token["access_token"]).scope.split()
            assert add_stdio_peer(token["access_token"]) in (401, 403)
        else:
            assert response.status_code == 400, response.content
            assert response.json()["error"] == refusal
        assert not Peer.objects.filter(name="pwned").exists()

    # --- client credentials: no user, so never admin -------------------------------------------

    def test_a_trusted_gateway_cannot_get_the_admin_scope(self) -> None:
        _, client_id, secret = trust_command("acme", "--issuer", "https://mcp.acme.example")

        for scope in ("admin", "mcp:tools admin", "gateway mcp:tools admin"):
            response = client_credentials(client_id, secret, scope)
            assert response.status_code == 400, (scope, response.content)
            assert response.json()["error"] == "invalid_scope"
        assert not Peer.objects.filter(name="pwned").exists()

    def test_a_trusted_gateway_gets_exactly_the_scopes_its_documentation_promises(self) -> None:
        _, client_id, secret = trust_command("acme", "--issuer", "https://mcp.acme.example")

        response = client_credentials(client_id, secret, "gateway mcp:tools mcp:resources mcp:prompts")

        assert response.status_code == 200, response.content
        assert set(response.json()["scope"].split()) == {"gateway", "mcp:tools", "mcp:resources", "mcp:prompts"}
        assert add_stdio_peer(response.json()["access_token"]) == 403

    def test_an_operator_made_machine_client_cannot_get_the_admin_scope(self) -> None:
        machine = machine_client(secret="s3cret")

        for scope in ("admin", "mcp:tools admin"):
            response = client_credentials(machine.client_id, "s3cret", scope)
            assert response.status_code == 400, (scope, response.content)
            assert response.json()["error"] == "invalid_scope"

    def test_a_dynamically_registered_client_cannot_get_the_admin_scope(self) -> None:
        metadata = {
            "application_type": "web", "client_name": "Registered", "redirect_uris": [REDIRECT_URI],
            "grant_types": ["authorization_code", "refresh_token"], "token_endpoint_auth_method": "client_secret_basic",
        }
        registered = Client().post(REGISTER, metadata, content_type="application/json").json()

        for scope in ("admin", "mcp:tools admin"):
            # Open registration never yields a client-credentials client.
            response = client_credentials(registered["client_id"], registered["client_secret"], scope)
            self.assert_no_admin_token(response, refusal="unauthorized_client")
        # Nor through a user who is not staff.
        refused = self.flow(Application.objects.get(client_id=registered["client_id"]), scope="mcp:tools admin").open_consent()
        assert query(refused["Location"])["error"] == "invalid_scope"

    # --- users: admin only while staff --------------------------------------------------------

    def test_a_user_who_is_not_staff_cannot_authorize_the_admin_scope(self) -> None:
        response = self.flow(scope="mcp:tools admin", resource=ORIGIN).open_consent()

        assert response.status_code == 302
        assert query(response["Location"])["error"] == "invalid_scope"

    def staff_tokens(self) -> tuple[Any, dict[str, Any]]:
        root = create_user("root", staff=True)
        self.browser.force_login(root)
        tokens = self.flow(scope="mcp:tools admin", resource=ORIGIN).tokens()
        assert set(tokens["scope"].split()) == {"mcp:tools", "admin"}
        return root, tokens

    def refresh(self, refresh_token: str, **extra: str) -> Any:
        data = {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": self.desk.client_id, **extra}
        return Client().post(TOKEN, data)

    def test_a_staff_users_token_works_on_the_admin_api(self) -> None:
        _, tokens = self.staff_tokens()

        api = Client(headers={"authorization": f"Bearer {tokens['access_token']}"})
        assert api.get("/api/peers/").status_code == 200

    def test_a_staff_user_demoted_after_the_token_was_issued_is_refused_at_use(self) -> None:
        root, tokens = self.staff_tokens()
        root.is_staff = False
        root.save()

        assert add_stdio_peer(tokens["access_token"]) in (401, 403)
        assert not Peer.objects.filter(name="pwned").exists()

    def test_a_deactivated_staff_user_is_refused_at_use(self) -> None:
        root, tokens = self.staff_tokens()
        root.is_active = False
        root.save()

        assert add_stdio_peer(tokens["access_token"]) in (401, 403)
        assert not Peer.objects.filter(name="pwned").exists()

    def test_a_refresh_after_demotion_drops_the_admin_scope(self) -> None:
        root, tokens = self.staff_tokens()
        root.is_staff = False
        root.save()

        response = self.refresh(tokens["refresh_token"])

        assert response.status_code == 200, response.content
        assert set(response.json()["scope"].split()) == {"mcp:tools"}
        self.assert_no_admin_token(response)

    def test_a_refresh_asking_for_admin_after_demotion_is_refused(self) -> None:
        root, tokens = self.staff_tokens()
        root.is_staff = False
        root.save()

        response = self.refresh(tokens["refresh_token"], scope="mcp:tools admin")

        assert response.status_code == 400
        assert response.json()["error"] == "invalid_scope"

    def test_a_code_exchanged_after_demotion_gives_no_admin(self) -> None:
        root = create_user("root", staff=True)
        self.browser.force_login(root)
        flow = self.flow(scope="mcp:tools admin", resource=ORIGIN)
        code = flow.code()
        root.is_staff = False
        root.save()

        response = flow.exchange(code)

        self.assert_no_admin_token(response)
