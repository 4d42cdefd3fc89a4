"""Authorization code + PKCE: what a host gets, and every way the flow is refused."""

from __future__ import annotations

from asgiref.sync import async_to_sync
from django.test import Client

from identity.hostauth.tokens import Identity, TokenError, authenticate
from tests.identity.oauth import (
    ORIGIN,
    RESOURCE,
    OAuthTestCase,
    OAuthTransactionTestCase,
    create_user,
    pkce_pair,
    query,
    strip_query,
    token_row,
)


class AuthorizationCodeTests(OAuthTransactionTestCase):
    def test_it_issues_a_token_for_the_resource_the_host_asked_for(self) -> None:
        tokens = self.flow().tokens()

        assert tokens["token_type"] == "Bearer"
        assert set(tokens["scope"].split()) == {"mcp:tools", "mcp:resources", "mcp:prompts"}
        assert tokens["refresh_token"]
        row = token_row(tokens["access_token"])
        assert row.resource == [RESOURCE]
        assert (row.user, row.application) == (self.alice, self.desk)

    def test_the_token_is_accepted_by_the_gateways_mcp_endpoints(self) -> None:
        tokens = self.flow().tokens()

        identity = async_to_sync(authenticate)(tokens["access_token"], ORIGIN)

        assert isinstance(identity, Identity)
        assert (identity.username, identity.client_id) == ("alice", self.desk.client_id)
        assert identity.has_scope("mcp:tools")

    def test_the_token_is_refused_by_another_origin(self) -> None:
        tokens = self.flow().tokens()
        with self.assertRaises(TokenError):
            async_to_sync(authenticate)(tokens["access_token"], "http://other.example")

    def test_a_host_that_names_no_resource_gets_the_gateway_as_audience(self) -> None:
        tokens = self.flow(resource=None).tokens()
        assert token_row(tokens["access_token"]).resource == [ORIGIN]

    def test_the_redirect_carries_the_issuer(self) -> None:
        response = self.flow().decide()
        assert query(response["Location"])["iss"] == ORIGIN

    def test_deny_sends_access_denied_with_state_and_issuer(self) -> None:
        response = self.flow().decide(allow=False)

        assert response.status_code == 302
        assert strip_query(response["Location"]) == self.flow().redirect_uri
        params = query(response["Location"])
        assert (params["error"], params["state"], params["iss"]) == ("access_denied", "state-123", ORIGIN)

    def test_a_code_works_once(self) -> None:
        flow = self.flow()
        code = flow.code()
        assert flow.exchange(code).status_code == 200
        assert flow.exchange(code).status_code == 400


class SignInTests(OAuthTestCase):
    def test_the_authorization_endpoint_requires_sign_in(self) -> None:
        url = self.flow().authorize_url()
        response = Client().get(url)

        assert response.status_code == 302
        location = response["Location"]
        assert location.startswith("/accounts/login/?")
        assert query(location)["next"] == url


class PkceTests(OAuthTestCase):
    def test_a_request_without_a_code_challenge_is_refused(self) -> None:
        response = self.flow().open_consent(code_challenge=None, code_challenge_method=None)

        assert response.status_code == 302
        assert query(response["Location"])["error"] == "invalid_request"

    def test_the_plain_method_is_refused(self) -> None:
        flow = self.flow()
        response = flow.open_consent(code_challenge=flow.verifier, code_challenge_method="plain")

        assert response.status_code == 302
        assert query(response["Location"])["error"] == "invalid_request"

    def test_a_challenge_without_a_method_means_plain_and_is_refused(self) -> None:
        response = self.flow().open_consent(code_challenge_method=None)

        assert response.status_code == 302
        assert query(response["Location"])["error"] == "invalid_request"

    def test_plain_slipped_into_the_consent_form_is_refused(self) -> None:
        flow = self.flow()
        response = flow.decide(tamper={"code_challenge": flow.verifier, "code_challenge_method": "plain"})

        assert response.status_code == 302
        assert query(response["Location"])["error"] == "invalid_request"

    def test_a_refusal_is_never_redirected_to_an_unregistered_uri(self) -> None:
        flow = self.flow()
        tamper = {"code_challenge_method": "plain", "redirect_uri": "https://attacker.example/cb"}

        response = flow.decide(tamper=tamper)

        assert response.status_code == 400
        assert response.context["error"].error == "invalid_request"

    def test_a_wrong_verifier_is_refused(self) -> None:
        flow = self.flow()
        other_verifier, _ = pkce_pair()
        response = flow.exchange(flow.code(), verifier=other_verifier)

        assert response.status_code == 400
        assert response.json()["error"] == "invalid_grant"

    def test_a_missing_verifier_is_refused(self) -> None:
        flow = self.flow()
        response = flow.exchange(flow.code(), verifier="")

        assert response.status_code == 400


class AudienceTests(OAuthTestCase):
    def test_a_foreign_resource_is_refused_before_consent(self) -> None:
        response = self.flow().open_consent(resource="https://elsewhere.example/mcp")

        assert response.status_code == 302
        params = query(response["Location"])
        assert (params["error"], params["state"], params["iss"]) == ("invalid_target", "state-123", ORIGIN)

    def test_a_foreign_resource_slipped_into_the_consent_form_is_refused(self) -> None:
        response = self.flow().decide(tamper={"resource": "https://elsewhere.example/mcp"})

        assert response.status_code == 302
        assert query(response["Location"])["error"] == "invalid_target"

    def test_a_foreign_resource_at_the_token_endpoint_is_refused(self) -> None:
        flow = self.flow(resource=None)
        response = flow.exchange(flow.code(), resource="https://elsewhere.example/mcp")

        assert response.status_code == 400
        assert response.json()["error"] == "invalid_target"

    def test_the_token_request_cannot_widen_the_granted_resource(self) -> None:
        flow = self.flow()
        response = flow.exchange(flow.code(), resource=f"{ORIGIN}/peers/web/mcp")

        assert response.status_code == 400
        assert response.json()["error"] == "invalid_target"


class ScopeTests(OAuthTestCase):
    def test_only_staff_can_grant_the_admin_scope(self) -> None:
        response = self.flow(scope="mcp:tools admin").open_consent()

        assert response.status_code == 302
        assert query(response["Location"])["error"] == "invalid_scope"

    def test_the_admin_scope_slipped_into_the_consent_form_is_refused(self) -> None:
        response = self.flow(scope="mcp:tools").decide(tamper={"scope": "mcp:tools admin"})

        assert response.status_code == 302
        assert query(response["Location"])["error"] == "invalid_scope"

    def test_staff_can_grant_the_admin_scope(self) -> None:
        staff = Client()
        staff.force_login(create_user("root", staff=True))
        flow = self.flow(scope="mcp:tools admin")
        flow.browser = staff

        assert set(flow.tokens()["scope"].split()) == {"mcp:tools", "admin"}

    def test_an_unknown_scope_is_refused(self) -> None:
        response = self.flow(scope="mcp:tools offline_access").open_consent()

        assert response.status_code == 302
        assert query(response["Location"])["error"] == "invalid_scope"

    def test_without_a_scope_the_host_gets_the_mcp_scopes(self) -> None:
        tokens = self.flow(scope=None).tokens()
        assert set(tokens["scope"].split()) == {"mcp:tools", "mcp:resources", "mcp:prompts"}
