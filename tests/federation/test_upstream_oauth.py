"""Per-user upstream credentials: discovery, PKCE, the connect flow's checks, refresh rotation.

The upstream (an MCP endpoint and its authorization server) is faked at the one outbound seam
(`federation.upstream_oauth.outbound_client`) with an httpx MockTransport that really checks PKCE,
`resource`, client authentication and refresh-token rotation.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import secrets
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import parse_qs, urlsplit

import httpx
from asgiref.sync import sync_to_async
from cryptography.fernet import Fernet
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import connection
from django.test import TestCase, TransactionTestCase, override_settings
from django.utils import timezone

from federation import upstream_oauth
from federation.client import ProviderAuth
from federation.services import peer_add
from federation.upstream.base import PeerConfig
from identity.crypto import fernet
from identity.models import UpstreamAuthorizationRequest, UpstreamOAuthClient, UpstreamToken
from tests.identity.oauth import FAST_HASHERS

UPSTREAM = "http://127.0.0.1:8999"
MCP_URL = f"{UPSTREAM}/tools/mcp"
ISSUER = f"{UPSTREAM}/as"
GATEWAY = "http://gateway.test"


class FakeUpstream:
    """An OAuth-protected MCP endpoint and its authorization server, in memory."""

    def __init__(self) -> None:
        self.iss_supported = True
        self.methods = ["S256"]
        self.metadata_issuer = ISSUER
        self.resource = MCP_URL
        self.clients: dict[str, dict[str, Any]] = {}
        self.codes: dict[str, dict[str, Any]] = {}
        self.access: dict[str, str] = {}  # access token -> user
        self.refresh: dict[str, str] = {}  # live refresh token -> user
        self.lifetime = 3600
        self.refuse_refresh = False
        self.requests: list[httpx.Request] = []

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        auth = kwargs.get("auth")
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handle), auth=ProviderAuth(auth) if auth else None)

    def approve(self, authorize_url: str, user: str = "alice") -> dict[str, str]:
        """What the authorization server does when `user` allows: remember the code, return the redirect's query."""
        query = {k: v[0] for k, v in parse_qs(urlsplit(authorize_url).query).items()}
        code = secrets.token_urlsafe(12)
        self.codes[code] = {**query, "user": user}
        answer = {"code": code, "state": query["state"]}
        if self.iss_supported:
            answer["iss"] = ISSUER
        return answer

    def issue(self, user: str) -> dict[str, Any]:
        access, refresh = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
        self.access[access] = user
        self.refresh[refresh] = user
        return {"access_token": access, "refresh_token": refresh, "token_type": "Bearer", "expires_in": self.lifetime, "scope": "mcp:tools"}

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if path == "/tools/mcp":
            user = self.access.get(request.headers.get("authorization", "").removeprefix("Bearer "))
            if user is None:
                challenge = f'Bearer resource_metadata="{UPSTREAM}/.well-known/oauth-protected-resource/tools/mcp", scope="mcp:tools"'
                return httpx.Response(401, headers={"WWW-Authenticate": challenge})
            return httpx.Response(200, json={"jsonrpc": "2.0", "id": 1, "result": {"user": user}})
        if path == "/.well-known/oauth-protected-resource/tools/mcp":
            return httpx.Response(200, json={"resource": self.resource, "authorization_servers": [ISSUER], "scopes_supported": ["mcp:tools", "gateway"]})
        if path == "/.well-known/oauth-authorization-server/as":
            return httpx.Response(200, json={
                "issuer": self.metadata_issuer,
                "authorization_endpoint": f"{ISSUER}/authorize",
                "token_endpoint": f"{ISSUER}/token",
                "registration_endpoint": f"{ISSUER}/register",
                "revocation_endpoint": f"{ISSUER}/revoke",
                "client_id_metadata_document_supported": True,
                "code_challenge_methods_supported": self.methods,
                "authorization_response_iss_parameter_supported": self.iss_supported,
                "token_endpoint_auth_methods_supported": ["client_secret_basic", "none"],
            })
        if path == "/as/register":
            body = json.loads(request.content)
            assert body["application_type"] == "web"
            client_id, secret = secrets.token_urlsafe(8), secrets.token_urlsafe(16)
            self.clients[client_id] = {"secret": secret, "redirect_uris": body["redirect_uris"]}
            return httpx.Response(201, json={"client_id": client_id, "client_secret": secret, "token_endpoint_auth_method": "client_secret_basic"})
        if path == "/as/token":
            return self._token(request)
        if path == "/as/revoke":
            token = parse_qs(request.content.decode())["token"][0]
            self.refresh.pop(token, None)
            self.access.pop(token, None)
            return httpx.Response(200)
        return httpx.Response(404)

    def _token(self, request: httpx.Request) -> httpx.Response:
        form = {k: v[0] for k, v in parse_qs(request.content.decode()).items()}
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        client_id, _, secret = base64.b64decode(credentials).decode().partition(":") if scheme == "Basic" else ("", "", "")
        if client_id not in self.clients or self.clients[client_id]["secret"] != secret:
            return httpx.Response(401, json={"error": "invalid_client"})
        if form.get("resource") != self.resource:
            return httpx.Response(400, json={"error": "invalid_target"})
        if form["grant_type"] == "authorization_code":
            grant = self.codes.pop(form.get("code", ""), None)
            if grant is None or grant["redirect_uri"] != form.get("redirect_uri"):
                return httpx.Response(400, json={"error": "invalid_grant"})
            digest = hashlib.sha256(form.get("code_verifier", "").encode()).digest()
            if base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != grant["code_challenge"]:
                return httpx.Response(400, json={"error": "invalid_grant", "error_description": "PKCE"})
            return httpx.Response(200, json=self.issue(grant["user"]))
        if form["grant_type"] == "refresh_token":
            user = self.refresh.pop(form.get("refresh_token", ""), None)  # rotation: each one works once
            if user is None or self.refuse_refresh:
                return httpx.Response(400, json={"error": "invalid_grant"})
            return httpx.Response(200, json=self.issue(user))
        return httpx.Response(400, json={"error": "unsupported_grant_type"})


def raw_tokens() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT access_token, refresh_token FROM identity_upstreamtoken")
        return json.dumps(cursor.fetchall())


@override_settings(PASSWORD_HASHERS=FAST_HASHERS, FEDMCP_PUBLIC_URL=GATEWAY)
class UpstreamOAuthTestCase(TransactionTestCase):
    def setUp(self) -> None:
        self.upstream = FakeUpstream()
        patcher = mock.patch("federation.upstream_oauth.outbound_client", self.upstream.client)
        patcher.start()
        self.addCleanup(patcher.stop)
        self.peer = peer_add(name="files", transport="streamable-http", url=MCP_URL, user_oauth=True)
        self.alice = get_user_model().objects.create_user("alice")
        self.bob = get_user_model().objects.create_user("bob")

    async def connect(self, user: Any, session: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
        session = {} if session is None else session
        url = await upstream_oauth.connect_begin(user=user, peer=self.peer, base=GATEWAY, session=session)
        return session, self.upstream.approve(url, user.username)


class PkceAndChallengeTests(TestCase):
    def test_the_s256_challenge_is_the_rfc_7636_example(self) -> None:
        assert upstream_oauth.pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk") == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"

    def test_each_pair_is_new_and_matches(self) -> None:
        (v1, c1), (v2, _) = upstream_oauth.pkce_pair(), upstream_oauth.pkce_pair()
        assert v1 != v2 and len(v1) >= 43
        assert upstream_oauth.pkce_challenge(v1) == c1

    def test_it_reads_the_bearer_challenge_parameters(self) -> None:
        header = 'Basic realm="x", Bearer resource_metadata="https://a.example/.well-known/oauth-protected-resource/mcp", scope="a b", error=invalid_token'
        assert upstream_oauth.parse_bearer_challenge(header) == {
            "resource_metadata": "https://a.example/.well-known/oauth-protected-resource/mcp", "scope": "a b", "error": "invalid_token",
        }

    def test_a_resource_matches_itself_or_a_parent_on_the_same_origin_only(self) -> None:
        assert upstream_oauth.resource_matches("https://a.example/mcp", "https://a.example/mcp")
        assert upstream_oauth.resource_matches("https://a.example", "https://a.example/mcp")
        assert not upstream_oauth.resource_matches("https://a.example/mc", "https://a.example/mcp")
        assert not upstream_oauth.resource_matches("https://evil.example/mcp", "https://a.example/mcp")


class DiscoveryTests(UpstreamOAuthTestCase):
    async def test_it_follows_the_401_challenge_to_the_authorization_server(self) -> None:
        found = await upstream_oauth.discover(MCP_URL)

        assert (found.resource, found.issuer, found.token_endpoint) == (MCP_URL, ISSUER, f"{ISSUER}/token")
        assert found.iss_parameter_supported and found.registration_endpoint == f"{ISSUER}/register"
        assert found.scope == "mcp:tools"  # the challenge's scope, not everything the metadata lists

    async def test_it_refuses_a_server_without_s256_pkce(self) -> None:
        self.upstream.methods = ["plain"]
        with self.assertRaises(upstream_oauth.UpstreamOAuthError):
            await upstream_oauth.discover(MCP_URL)

    async def test_it_refuses_metadata_naming_another_issuer(self) -> None:
        self.upstream.metadata_issuer = "http://127.0.0.1:8999/other"
        with self.assertRaises(upstream_oauth.UpstreamOAuthError):
            await upstream_oauth.discover(MCP_URL)

    async def test_it_refuses_resource_metadata_for_another_resource(self) -> None:
        self.upstream.resource = "http://127.0.0.1:8999/elsewhere"
        with self.assertRaises(upstream_oauth.UpstreamOAuthError):
            await upstream_oauth.discover(MCP_URL)

    async def test_the_gateway_registers_itself_once_with_its_callback(self) -> None:
        await self.connect(self.alice)
        await self.connect(self.bob)

        client = await UpstreamOAuthClient.objects.aget(peer=self.peer)
        assert len(self.upstream.clients) == 1
        assert client.registration == UpstreamOAuthClient.Registration.DYNAMIC
        assert self.upstream.clients[client.client_id]["redirect_uris"] == [f"{GATEWAY}/connect/callback"]


class RegistrationTests(UpstreamOAuthTestCase):
    async def test_an_operator_supplied_client_is_used_without_registering(self) -> None:
        await sync_to_async(upstream_oauth.oauth_client_configure)(peer=self.peer, client_id="by-hand", client_secret="s3cret")
        self.upstream.clients["by-hand"] = {"secret": "s3cret", "redirect_uris": []}

        session, answer = await self.connect(self.alice)
        token = await upstream_oauth.connect_finish(user=self.alice, session=session, params=answer)

        assert list(self.upstream.clients) == ["by-hand"]
        assert self.upstream.access[token.access_token] == "alice"

    async def test_an_https_gateway_is_its_own_client_id_metadata_document(self) -> None:
        url = await upstream_oauth.connect_begin(user=self.alice, peer=self.peer, base="https://gw.example", session={})

        query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
        assert query["client_id"] == "https://gw.example/connect/client-metadata.json"
        assert self.upstream.clients == {}  # nothing registered

    async def test_a_peer_is_discovered_when_added_and_registered_on_first_connect(self) -> None:
        client = await upstream_oauth.oauth_client_discover(peer=self.peer)

        assert (client.issuer, client.resource, client.client_id) == (ISSUER, MCP_URL, "")
        await self.connect(self.alice)
        assert len(self.upstream.clients) == 1


class ConnectFlowTests(UpstreamOAuthTestCase):
    async def test_the_authorization_request_carries_pkce_state_and_resource(self) -> None:
        url = await upstream_oauth.connect_begin(user=self.alice, peer=self.peer, base=GATEWAY, session={})
        query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}

        assert url.startswith(f"{ISSUER}/authorize?")
        assert query["code_challenge_method"] == "S256" and len(query["code_challenge"]) == 43
        assert query["resource"] == MCP_URL and query["scope"] == "mcp:tools"
        assert query["redirect_uri"] == f"{GATEWAY}/connect/callback" and len(query["state"]) >= 32
        # Only the state's hash is stored.
        assert not await UpstreamAuthorizationRequest.objects.filter(state_hash=query["state"]).aexists()

    async def test_finishing_stores_the_users_tokens_encrypted(self) -> None:
        session, answer = await self.connect(self.alice)

        token = await upstream_oauth.connect_finish(user=self.alice, session=session, params=answer)

        assert self.upstream.access[token.access_token] == "alice"
        assert token.refresh_token in self.upstream.refresh
        stored = await sync_to_async(raw_tokens)()
        assert token.access_token not in stored and token.refresh_token not in stored
        assert fernet().decrypt(json.loads(stored)[0][0].encode()).decode() == token.access_token

    async def test_a_replayed_state_is_refused(self) -> None:
        session, answer = await self.connect(self.alice)
        await upstream_oauth.connect_finish(user=self.alice, session=session, params=answer)
        session[upstream_oauth.SESSION_KEY] = [upstream_oauth.state_hash(answer["state"])]  # even with the session restored

        with self.assertRaises(upstream_oauth.UpstreamOAuthError):
            await upstream_oauth.connect_finish(user=self.alice, session=session, params=answer)

    async def test_a_state_from_another_browser_session_is_refused(self) -> None:
        _, answer = await self.connect(self.alice)

        with self.assertRaises(upstream_oauth.UpstreamOAuthError):
            await upstream_oauth.connect_finish(user=self.alice, session={}, params=answer)
        assert not await UpstreamToken.objects.aexists()

    async def test_a_state_started_by_another_user_is_refused(self) -> None:
        session, answer = await self.connect(self.alice)

        with self.assertRaises(upstream_oauth.UpstreamOAuthError):
            await upstream_oauth.connect_finish(user=self.bob, session=session, params=answer)
        assert not await UpstreamToken.objects.aexists()

    async def test_a_mismatched_state_is_refused(self) -> None:
        session, answer = await self.connect(self.alice)

        with self.assertRaises(upstream_oauth.UpstreamOAuthError):
            await upstream_oauth.connect_finish(user=self.alice, session=session, params={**answer, "state": secrets.token_urlsafe(32)})

    async def test_a_wrong_iss_is_refused(self) -> None:
        session, answer = await self.connect(self.alice)

        with self.assertRaises(upstream_oauth.UpstreamOAuthError) as caught:
            await upstream_oauth.connect_finish(user=self.alice, session=session, params={**answer, "iss": "http://127.0.0.1:8999/evil"})
        assert "issuer" in str(caught.exception)
        assert not await UpstreamToken.objects.aexists()

    async def test_a_missing_iss_is_refused_when_the_server_promised_it(self) -> None:
        session, answer = await self.connect(self.alice)
        answer.pop("iss")

        with self.assertRaises(upstream_oauth.UpstreamOAuthError):
            await upstream_oauth.connect_finish(user=self.alice, session=session, params=answer)

    async def test_without_the_promise_a_missing_iss_is_accepted_but_a_wrong_one_never(self) -> None:
        self.upstream.iss_supported = False
        session, answer = await self.connect(self.alice)
        assert "iss" not in answer

        await upstream_oauth.connect_finish(user=self.alice, session=session, params=answer)
        session, answer = await self.connect(self.bob)
        with self.assertRaises(upstream_oauth.UpstreamOAuthError):
            await upstream_oauth.connect_finish(user=self.bob, session=session, params={**answer, "iss": "http://127.0.0.1:8999/evil"})

    async def test_an_expired_flow_is_refused(self) -> None:
        session, answer = await self.connect(self.alice)
        await UpstreamAuthorizationRequest.objects.all().aupdate(expires_at=timezone.now() - timedelta(seconds=1))

        with self.assertRaises(upstream_oauth.UpstreamOAuthError):
            await upstream_oauth.connect_finish(user=self.alice, session=session, params=answer)

    async def test_a_denial_at_the_server_stores_nothing(self) -> None:
        session, answer = await self.connect(self.alice)

        with self.assertRaises(upstream_oauth.UpstreamOAuthError) as caught:
            await upstream_oauth.connect_finish(user=self.alice, session=session, params={"state": answer["state"], "iss": ISSUER, "error": "access_denied"})
        assert "access_denied" in str(caught.exception)


class DisconnectTests(UpstreamOAuthTestCase):
    async def test_disconnecting_forgets_the_tokens_and_revokes_them_at_the_server(self) -> None:
        session, answer = await self.connect(self.alice)
        token = await upstream_oauth.connect_finish(user=self.alice, session=session, params=answer)

        assert await upstream_oauth.connection_remove(user=self.alice, peer_id=self.peer.pk)

        assert not await UpstreamToken.objects.aexists()
        assert token.refresh_token not in self.upstream.refresh
        assert not await upstream_oauth.connection_remove(user=self.alice, peer_id=self.peer.pk)


class ProviderTests(UpstreamOAuthTestCase):
    async def connected(self, user: Any) -> UpstreamToken:
        session, answer = await self.connect(user)
        return await upstream_oauth.connect_finish(user=user, session=session, params=answer)

    def provider(self, user: Any | None) -> upstream_oauth.UserOAuthProvider:
        peer = PeerConfig.from_peer(self.peer)
        return upstream_oauth.UserOAuthProvider(peer, user.pk if user is not None else None)

    async def test_each_user_gets_their_own_token(self) -> None:
        await self.connected(self.alice)
        await self.connected(self.bob)

        alice = await self.provider(self.alice).access_token()
        bob = await self.provider(self.bob).access_token()

        assert (self.upstream.access[alice], self.upstream.access[bob]) == ("alice", "bob")

    async def test_a_user_who_has_not_connected_is_told_to(self) -> None:
        await self.connected(self.alice)

        with self.assertRaises(upstream_oauth.UpstreamAuthorizationRequiredError):
            await self.provider(self.bob).headers()

    async def test_an_expiring_token_is_refreshed_and_the_refresh_token_rotated(self) -> None:
        first = await self.connected(self.alice)
        await UpstreamToken.objects.filter(pk=first.pk).aupdate(expires_at=timezone.now() + timedelta(seconds=5))

        access = await self.provider(self.alice).access_token()

        stored = await UpstreamToken.objects.aget(pk=first.pk)
        assert access != first.access_token and access == stored.access_token
        assert stored.refresh_token != first.refresh_token and stored.generation == first.generation + 1
        assert first.refresh_token not in self.upstream.refresh  # the old one was used up

    async def test_a_refused_refresh_disconnects_the_user(self) -> None:
        first = await self.connected(self.alice)
        await UpstreamToken.objects.filter(pk=first.pk).aupdate(expires_at=timezone.now() - timedelta(seconds=1))
        self.upstream.refuse_refresh = True

        with self.assertRaises(upstream_oauth.UpstreamAuthorizationRequiredError) as caught:
            await self.provider(self.alice).access_token()
        assert "connect again" in caught.exception.reason
        assert not await UpstreamToken.objects.aexists()

    async def test_a_401_from_the_upstream_refreshes_once_and_retries(self) -> None:
        first = await self.connected(self.alice)
        self.upstream.access.pop(first.access_token)  # the upstream forgot it (revoked, restarted)

        async with self.upstream.client(auth=self.provider(self.alice)) as client:
            response = await client.post(MCP_URL, json={})

        assert response.status_code == 200 and response.json()["result"]["user"] == "alice"
        assert (await UpstreamToken.objects.aget(pk=first.pk)).generation == first.generation + 1

    async def test_another_worker_holding_the_refresh_lease_is_waited_for(self) -> None:
        first = await self.connected(self.alice)
        await UpstreamToken.objects.filter(pk=first.pk).aupdate(
            expires_at=timezone.now() - timedelta(seconds=1), refreshing_until=timezone.now() + timedelta(seconds=30)
        )

        async def other_worker_finishes(*args: Any) -> None:
            await UpstreamToken.objects.filter(pk=first.pk).aupdate(generation=first.generation + 1, access_token="new", refreshing_until=None)

        with mock.patch("federation.upstream_oauth.asyncio.sleep", other_worker_finishes):
            access = await self.provider(self.alice).access_token()

        assert access == "new"
        assert not [r for r in self.upstream.requests if r.url.path == "/as/token" and b"refresh_token=" in r.content]

    async def test_the_catalog_uses_the_first_connected_user_unless_one_is_designated(self) -> None:
        await self.connected(self.alice)
        await self.connected(self.bob)

        assert self.upstream.access[await self.provider(None).access_token()] == "alice"
        await UpstreamOAuthClient.objects.filter(peer=self.peer).aupdate(catalog_user=self.bob)
        assert self.upstream.access[await self.provider(None).access_token()] == "bob"


KEY_1 = Fernet.generate_key().decode()
KEY_2 = Fernet.generate_key().decode()


class SecretsAtRestTests(TestCase):
    """Upstream tokens and the upstream client secret are encrypted, dumped as ciphertext, rotatable."""

    def setUp(self) -> None:
        self.enterContext(override_settings(FEDMCP_SECRETS_KEYS=KEY_1))
        peer = peer_add(name="files", transport="streamable-http", url=MCP_URL, user_oauth=True)
        alice = get_user_model().objects.create_user("alice")
        UpstreamOAuthClient.objects.create(peer=peer, client_id="gw", client_secret="upstream-client-secret-never-seen")
        UpstreamToken.objects.create(
            user=alice, peer=peer, issuer=ISSUER, access_token="upstream-access-never-seen", refresh_token="upstream-refresh-never-seen"
        )

    def test_a_dump_holds_ciphertext_only_and_loads_back(self) -> None:
        out = io.StringIO()
        call_command("dumpdata", "identity.upstreamtoken", "identity.upstreamoauthclient", stdout=out)
        dump = out.getvalue()

        assert "never-seen" not in dump
        UpstreamToken.objects.all().delete()
        fixture = Path(self.enterContext(tempfile.TemporaryDirectory())) / "tokens.json"
        fixture.write_text(dump)
        call_command("loaddata", str(fixture), verbosity=0)
        assert UpstreamToken.objects.get().access_token == "upstream-access-never-seen"

    def test_rotate_secrets_reencrypts_the_upstream_tokens(self) -> None:
        with override_settings(FEDMCP_SECRETS_KEYS=f"{KEY_2},{KEY_1}"):
            call_command("rotate_secrets", stdout=io.StringIO())

        with override_settings(FEDMCP_SECRETS_KEYS=KEY_2):
            token = UpstreamToken.objects.get()
            assert (token.access_token, token.refresh_token) == ("upstream-access-never-seen", "upstream-refresh-never-seen")
            assert UpstreamOAuthClient.objects.get().client_secret == "upstream-client-secret-never-seen"


class OperatorTests(UpstreamOAuthTestCase):
    async def test_before_anyone_connects_the_health_check_fails_without_opening_the_circuit(self) -> None:
        from federation.health import CircuitState, breakers, check_peer

        config = PeerConfig.from_peer(self.peer)
        for _ in range(10):
            assert not await check_peer(config)

        assert breakers.for_peer(config).state == CircuitState.CLOSED
        last = await self.peer.health_checks.afirst()
        assert last is not None and "no user has connected" in last.error


@override_settings(FEDMCP_PUBLIC_URL=GATEWAY)
class PeerCommandTests(TransactionTestCase):
    """`manage.py peer add --user-oauth` (a transaction test: the command runs its own event loop and threads)."""

    def setUp(self) -> None:
        self.upstream = FakeUpstream()
        patcher = mock.patch("federation.upstream_oauth.outbound_client", self.upstream.client)
        patcher.start()
        self.addCleanup(patcher.stop)

    def test_peer_add_user_oauth_discovers_and_says_where_users_connect(self) -> None:
        secret_file = Path(self.enterContext(tempfile.TemporaryDirectory())) / "secret"
        secret_file.write_text("hand-made-secret\n")
        out, err = io.StringIO(), io.StringIO()

        call_command(
            "peer", "add", "docs", "--url", MCP_URL, "--user-oauth", "--oauth-client-id", "by-hand",
            "--oauth-client-secret-file", str(secret_file), "--oauth-scope", "docs:read", stdout=out, stderr=err,
        )

        client = UpstreamOAuthClient.objects.get(peer__name="docs")
        assert client.peer.user_oauth and client.registration == UpstreamOAuthClient.Registration.OPERATOR
        assert (client.client_id, client.client_secret, client.scope, client.issuer) == ("by-hand", "hand-made-secret", "docs:read", ISSUER)
        assert f"{GATEWAY}/connect/docs" in out.getvalue() and not err.getvalue()

    def test_per_user_oauth_is_refused_for_stdio_and_peer_gateways(self) -> None:
        from federation.services import PeerConfigError

        with self.assertRaises(PeerConfigError):
            peer_add(name="local", transport="stdio", command="mcp-server-time", user_oauth=True)
        with self.assertRaises(PeerConfigError):
            peer_add(name="gw", transport="streamable-http", url=MCP_URL, is_gateway=True, user_oauth=True)
