"""Gateway-to-gateway trust: the operator commands, the peer gateway's token, and what goes on the wire.

The receiving side: `gateway trust` makes a client-credentials application for the peer
gateway. The calling side: a peer gateway registered with those credentials is called with a
token this gateway obtains for itself (`resource` = the peer's origin), never with the host's,
and every forwarded call carries a signed assertion of the acting user and is audited.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import tempfile
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock
from urllib.parse import parse_qs, unquote

import httpx
import jwt
import pytest
from asgiref.sync import async_to_sync
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client, TestCase, TransactionTestCase, override_settings
from oauth2_provider.models import AccessToken, Application
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request as WsRequest

from federation import credentials
from federation.client import ProviderAuth
from federation.credentials import ClientCredentials, PeerCredentialsError, discover_token_url, request_token
from federation.pool import pool
from federation.router import Route
from federation.upstream.base import PeerConfig
from federation.upstream.sse import SseConnection
from federation.upstream.websocket import WebSocketConnection
from fedmcp_site.runtime.lifecycle import release_worker
from identity.audit import audit_flush, audit_record
from identity.hostauth.tokens import Identity, authenticate
from identity.models import AuditEvent, TrustedGateway
from identity.trust.signing import signing_key
from mcp_endpoint.context import HostContext
from mcp_endpoint.pipeline.flow import forward
from tests.identity.oauth import FAST_HASHERS, ORIGIN, TOKEN

PEER_ORIGIN = "http://127.0.0.1:9"
PEER_URL = f"{PEER_ORIGIN}/mcp"
TOKEN_URL = f"{PEER_ORIGIN}/o/token/"
META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}


def basic(client_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


def trust_command(*args: str) -> tuple[str, str, str]:
    """Run `gateway trust`; return its output, client id and client secret."""
    out = io.StringIO()
    call_command("gateway", "trust", *args, stdout=out)
    text = out.getvalue()
    client_id = re.search(r"^client_id: (\S+)$", text, re.M)
    secret = re.search(r"^client_secret: (\S+)$", text, re.M)
    assert client_id and secret, text
    return text, client_id.group(1), secret.group(1)


@override_settings(PASSWORD_HASHERS=FAST_HASHERS)
class TrustCommandTests(TransactionTestCase):
    def test_trust_creates_a_client_credentials_application_and_prints_its_secret_once(self) -> None:
        _, client_id, secret = trust_command("acme", "--issuer", "https://mcp.acme.example/")

        gateway = TrustedGateway.objects.select_related("application").get(name="acme")
        app = gateway.application
        assert (gateway.issuer, gateway.keys_url()) == ("https://mcp.acme.example", "https://mcp.acme.example/.well-known/jwks.json")
        assert (app.client_id, app.client_type, app.authorization_grant_type) == (
            client_id, Application.CLIENT_CONFIDENTIAL, Application.GRANT_CLIENT_CREDENTIALS
        )
        assert app.client_secret != secret  # stored hashed

    def test_the_printed_credentials_get_a_gateway_token_for_this_gateway(self) -> None:
        _, client_id, secret = trust_command("acme", "--issuer", "https://mcp.acme.example")
        body = {"grant_type": "client_credentials", "scope": "gateway mcp:tools mcp:resources mcp:prompts", "resource": ORIGIN}

        response = Client().post(TOKEN, body, HTTP_AUTHORIZATION=basic(client_id, secret))

        assert response.status_code == 200
        identity = async_to_sync(authenticate)(response.json()["access_token"], ORIGIN)
        assert identity.has_scope("gateway") and identity.client_id == client_id and identity.user_id is None

    def test_an_inline_jwks_can_replace_fetching(self) -> None:
        path = self.enterContext(tempfile.TemporaryDirectory()) + "/jwks.json"
        with open(path, "w") as handle:
            json.dump({"keys": [signing_key().public_jwk]}, handle)

        trust_command("acme", "--issuer", "https://mcp.acme.example", "--jwks-file", path)

        assert TrustedGateway.objects.get(name="acme").jwks == {"keys": [signing_key().public_jwk]}

    def test_a_name_or_issuer_is_trusted_once(self) -> None:
        trust_command("acme", "--issuer", "https://mcp.acme.example")

        with pytest.raises(CommandError):
            call_command("gateway", "trust", "acme", "--issuer", "https://other.example", stdout=io.StringIO())
        with pytest.raises(CommandError):
            call_command("gateway", "trust", "other", "--issuer", "https://mcp.acme.example", stdout=io.StringIO())

    def test_list_shows_trusted_gateways_without_secrets(self) -> None:
        _, client_id, secret = trust_command("acme", "--issuer", "https://mcp.acme.example")
        out = io.StringIO()

        call_command("gateway", "list", stdout=out)

        assert "acme" in out.getvalue() and client_id in out.getvalue() and secret not in out.getvalue()

    def test_untrust_deletes_the_application_and_its_tokens(self) -> None:
        _, client_id, secret = trust_command("acme", "--issuer", "https://mcp.acme.example")
        body = {"grant_type": "client_credentials", "scope": "gateway"}
        assert Client().post(TOKEN, body, HTTP_AUTHORIZATION=basic(client_id, secret)).status_code == 200

        call_command("gateway", "untrust", "acme", stdout=io.StringIO())

        assert not TrustedGateway.objects.exists()
        assert not Application.objects.filter(client_id=client_id).exists()
        assert not AccessToken.objects.filter(application__client_id=client_id).exists()
        assert Client().post(TOKEN, body, HTTP_AUTHORIZATION=basic(client_id, secret)).status_code == 401


class FakeAuthorizationServer:
    """A peer gateway's metadata and token endpoint behind the outbound HTTP seam."""

    def __init__(self) -> None:
        self.token_requests: list[httpx.Request] = []
        self.issued = 0
        self.issuer = PEER_ORIGIN
        self.expires_in = 3600

    def handle(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        if url == f"{PEER_ORIGIN}/.well-known/oauth-protected-resource/mcp":
            return httpx.Response(200, json={"resource": PEER_URL, "authorization_servers": [PEER_ORIGIN]})
        if url == f"{PEER_ORIGIN}/.well-known/oauth-authorization-server":
            return httpx.Response(200, json={"issuer": self.issuer, "token_endpoint": TOKEN_URL})
        if url == TOKEN_URL and request.method == "POST":
            self.token_requests.append(request)
            self.issued += 1
            return httpx.Response(200, json={"access_token": f"peer-token-{self.issued}", "token_type": "Bearer", "expires_in": self.expires_in})
        return httpx.Response(404)

    def client(self, **_: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handle))


def gateway_peer(peer_id: int = 801, **overrides: Any) -> PeerConfig:
    fields: dict[str, Any] = {
        "id": peer_id, "name": "b", "transport": "streamable-http", "url": PEER_URL, "is_gateway": True, "remote_gateway": "b",
        "client_id": "a-at-b", "client_secret": "s3cret/with+odd=chars", "token_url": TOKEN_URL, "connect_timeout": 5, "call_timeout": 5,
    }
    fields.update(overrides)
    return PeerConfig(**fields)


class PeerTokenTests(TestCase):
    def setUp(self) -> None:
        credentials._tokens.clear()
        credentials._token_urls.clear()
        self.server = FakeAuthorizationServer()
        patcher = mock.patch("federation.credentials.outbound_client", self.server.client)
        patcher.start()
        self.addCleanup(patcher.stop)

    async def test_the_token_is_requested_with_client_credentials_for_the_peers_origin(self) -> None:
        headers = await ClientCredentials(gateway_peer()).headers()

        assert headers == {"Authorization": "Bearer peer-token-1"}
        (request,) = self.server.token_requests
        form = {k: v[0] for k, v in parse_qs(request.content.decode()).items()}
        assert form == {"grant_type": "client_credentials", "scope": "gateway mcp:tools mcp:resources mcp:prompts", "resource": PEER_ORIGIN}
        user, _, password = base64.b64decode(request.headers["authorization"].split()[1]).decode().partition(":")
        assert (unquote(user), unquote(password)) == ("a-at-b", "s3cret/with+odd=chars")

    async def test_the_token_is_cached_until_shortly_before_it_expires(self) -> None:
        provider = ClientCredentials(gateway_peer())
        await provider.headers()
        await ClientCredentials(gateway_peer()).headers()  # another connection of this worker
        assert self.server.issued == 1

        key = next(iter(credentials._tokens))
        credentials._tokens[key].expires_at -= 3600 - credentials.REFRESH_MARGIN + 1

        assert await provider.headers() == {"Authorization": "Bearer peer-token-2"}

    async def test_a_refused_token_is_replaced_once_and_the_request_retried_once(self) -> None:
        seen: list[str] = []

        def peer(request: httpx.Request) -> httpx.Response:
            seen.append(request.headers.get("authorization", ""))
            return httpx.Response(401 if len(seen) == 1 else 200, json={})

        async with httpx.AsyncClient(transport=httpx.MockTransport(peer), auth=ProviderAuth(ClientCredentials(gateway_peer()))) as client:
            response = await client.post(PEER_URL, content=b"{}")

        assert response.status_code == 200
        assert seen == ["Bearer peer-token-1", "Bearer peer-token-2"]

    async def test_a_peer_that_keeps_refusing_gets_no_third_attempt(self) -> None:
        seen: list[str] = []

        def peer(request: httpx.Request) -> httpx.Response:
            seen.append(request.headers["authorization"])
            return httpx.Response(401, json={})

        async with httpx.AsyncClient(transport=httpx.MockTransport(peer), auth=ProviderAuth(ClientCredentials(gateway_peer()))) as client:
            response = await client.post(PEER_URL, content=b"{}")

        assert response.status_code == 401 and len(seen) == 2

    async def test_the_token_endpoint_is_discovered_from_the_peers_metadata(self) -> None:
        assert await discover_token_url(PEER_URL) == TOKEN_URL

        headers = await ClientCredentials(gateway_peer(token_url="")).headers()

        assert headers == {"Authorization": "Bearer peer-token-1"}

    async def test_metadata_naming_another_issuer_is_refused(self) -> None:
        self.server.issuer = "https://evil.example"

        with pytest.raises(PeerCredentialsError):
            await discover_token_url(PEER_URL)

    async def test_a_refusal_at_the_token_endpoint_names_no_secret(self) -> None:
        def refuse(request: httpx.Request) -> httpx.Response:
            return httpx.Response(401, json={"error": "invalid_client"})

        with mock.patch("federation.credentials.outbound_client", lambda **_: httpx.AsyncClient(transport=httpx.MockTransport(refuse))):
            with pytest.raises(PeerCredentialsError) as caught:
                await request_token(token_url=TOKEN_URL, client_id="a-at-b", client_secret="s3cret", audience=PEER_ORIGIN)

        assert "invalid_client" in str(caught.value) and "s3cret" not in str(caught.value)


class FakePeerGateway:
    """A fedmcp peer gateway speaking 2026-07-28 over Streamable HTTP; only its own tokens pass."""

    def __init__(self, server: FakeAuthorizationServer) -> None:
        self.server = server
        self.calls: list[httpx.Request] = []
        self.refuse_next = False

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.method != "POST":
            return httpx.Response(405)
        valid = {f"Bearer peer-token-{n}" for n in range(1, self.server.issued + 1)}
        if request.headers.get("authorization") not in valid or self.refuse_next:
            self.refuse_next = False
            return httpx.Response(401, json={"error": "invalid_token"})
        body = json.loads(request.content)
        if body["method"] == "server/discover":
            result: dict[str, Any] = {
                "supportedVersions": ["2026-07-28"],
                "capabilities": {"tools": {}, "experimental": {"io.fedmcp/gateway": {"name": "b"}}},
                "_meta": {"io.modelcontextprotocol/serverInfo": {"name": "b", "version": "1"}},
            }
        else:
            self.calls.append(request)
            result = {"content": [{"type": "text", "text": "42"}], "resultType": "complete"}
        return httpx.Response(200, json={"jsonrpc": "2.0", "id": body["id"], "result": result})

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        """Stand-in for `outbound_client`, with the connection's credentials as the real one has them."""
        auth = ProviderAuth(kwargs["auth"]) if kwargs.get("auth") is not None else None
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handle), auth=auth)


class NullOutbound:
    can_request = False

    async def send(self, message: dict[str, Any]) -> None:
        pass


@override_settings(FEDMCP_PUBLIC_URL="http://a.example", FEDMCP_ISSUER="http://a.example", FEDMCP_GATEWAY_NAME="a")
class ForwardingToAPeerGatewayTests(TransactionTestCase):
    def setUp(self) -> None:
        credentials._tokens.clear()
        self.server = FakeAuthorizationServer()
        self.peer = FakePeerGateway(self.server)
        for target, stand_in in (
            ("federation.credentials.outbound_client", self.server.client),
            ("federation.upstream.streamable_http.outbound_client", self.peer.client),
        ):
            patcher = mock.patch(target, stand_in)
            patcher.start()
            self.addCleanup(patcher.stop)
        self.alice = Identity(
            token_id=1, user_id=None, username="alice", application_id=None, client_id="desk-host",
            scopes=frozenset({"mcp:tools"}), expires=datetime.now(UTC) + timedelta(hours=1),
        )

    async def call(self, peer: PeerConfig) -> dict[str, Any]:
        ctx = HostContext(
            era="modern", protocol_version="2026-07-28", transport="streamable-http", scope="", outbound=NullOutbound(),
            identity=self.alice, meta=dict(META),
        )
        try:
            return await forward(ctx, Route(peer, "c.fixture__add"), "tools/call", {"name": "c.fixture__add", "arguments": {}, "_meta": META})
        finally:
            await pool.close()

    async def test_the_peer_gets_this_gateways_token_and_a_signed_assertion_of_alice(self) -> None:
        result = await self.call(gateway_peer(peer_id=811))

        (request,) = self.peer.calls
        assert request.headers["authorization"] == "Bearer peer-token-1"
        meta = json.loads(request.content)["params"]["_meta"]
        assert meta["io.fedmcp/hops"] == ["a"]
        key = signing_key()
        claims = jwt.decode(meta["io.fedmcp/assertion"], key.private_key.public_key(), algorithms=[key.algorithm], audience=PEER_ORIGIN)
        assert (claims["iss"], claims["sub"], claims["client_id"], claims["via"]) == ("http://a.example", "alice", "desk-host", ["a"])
        assert result["content"][0]["text"] == "42"

    async def test_a_host_cannot_smuggle_its_own_assertion(self) -> None:
        ctx_meta = {**META, "io.fedmcp/assertion": "forged", "io.fedmcp/hops": []}
        ctx = HostContext(
            era="modern", protocol_version="2026-07-28", transport="streamable-http", scope="", outbound=NullOutbound(),
            identity=self.alice, meta={**META, "io.fedmcp/hops": []},
        )
        try:
            await forward(ctx, Route(gateway_peer(peer_id=812), "x"), "tools/call", {"name": "x", "arguments": {}, "_meta": ctx_meta})
        finally:
            await pool.close()

        sent = json.loads(self.peer.calls[0].content)["params"]["_meta"]["io.fedmcp/assertion"]
        assert sent != "forged"

    async def test_a_refused_token_is_replaced_and_the_call_goes_through(self) -> None:
        self.peer.refuse_next = True

        result = await self.call(gateway_peer(peer_id=813))

        assert result["content"][0]["text"] == "42"
        assert self.server.issued == 2

    async def test_every_forwarded_call_is_audited(self) -> None:
        await self.call(gateway_peer(peer_id=814))
        await audit_flush()

        event = await AuditEvent.objects.aget()
        assert (event.username, event.client_id, event.peer, event.method, event.name, event.outcome) == (
            "alice", "desk-host", "b", "tools/call", "c.fixture__add", "ok"
        )
        assert event.error_code is None and event.latency_ms >= 0

    async def test_audit_events_are_append_only(self) -> None:
        await self.call(gateway_peer(peer_id=815))
        await audit_flush()
        event = await AuditEvent.objects.aget()

        with pytest.raises(TypeError):
            await event.asave()
        with pytest.raises(TypeError):
            await AuditEvent.objects.filter(pk=event.pk).aupdate(outcome="error")


class AuditShutdownTests(TransactionTestCase):
    async def test_pending_audit_events_are_written_when_the_worker_shuts_down(self) -> None:
        audit_record(identity=None, peer="b", method="tools/call", name="x", error_code=-32011, latency_ms=1.0)
        await release_worker()

        event = await AuditEvent.objects.aget()
        assert (event.peer, event.outcome, event.error_code) == ("b", "error", -32011)


INITIALIZE_RESULT = {"protocolVersion": "2025-11-25", "capabilities": {"tools": {}}, "serverInfo": {"name": "b", "version": "1"}}


class SingleStreamCredentialsTests(TestCase):
    """HTTP+SSE and WebSocket upstreams carry the peer token too (every request, the handshake)."""

    def setUp(self) -> None:
        credentials._tokens.clear()
        self.server = FakeAuthorizationServer()
        patcher = mock.patch("federation.credentials.outbound_client", self.server.client)
        patcher.start()
        self.addCleanup(patcher.stop)

    async def test_an_sse_peer_gets_the_token_on_the_stream_and_on_every_post(self) -> None:
        seen: list[tuple[str, str]] = []
        outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        async def handle(request: httpx.Request) -> httpx.Response:
            seen.append((request.method, request.headers.get("authorization", "")))
            if request.method == "GET":

                async def stream() -> AsyncIterator[bytes]:
                    yield b"event: endpoint\ndata: /messages/?session_id=1\n\n"
                    while True:
                        yield f"event: message\ndata: {json.dumps(await outbox.get())}\n\n".encode()

                return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=stream())
            message = json.loads(request.content)
            if message.get("method") == "initialize":
                await outbox.put({"jsonrpc": "2.0", "id": message["id"], "result": INITIALIZE_RESULT})
            return httpx.Response(202)

        def client(**kwargs: Any) -> httpx.AsyncClient:
            return httpx.AsyncClient(transport=httpx.MockTransport(handle), auth=ProviderAuth(kwargs["auth"]))

        peer = gateway_peer(peer_id=821, transport="sse", url="http://127.0.0.1:9/sse")
        with mock.patch("federation.upstream.sse.outbound_client", client):
            connection = SseConnection(peer, auth=credentials.auth_for(peer))
            await connection.start()
            await connection.close()

        assert [method for method, _ in seen] == ["GET", "POST", "POST"]
        assert {token for _, token in seen} == {"Bearer peer-token-1"}

    async def test_a_websocket_peer_gets_the_token_in_the_handshake_and_a_refused_one_is_replaced(self) -> None:
        seen: list[str] = []

        def check(socket: ServerConnection, request: WsRequest) -> Any:
            seen.append(request.headers.get("Authorization", ""))
            if len(seen) == 1:
                return socket.respond(403, "refused\n")  # as fedmcp refuses a stale token
            return None

        async def handle(socket: ServerConnection) -> None:
            async for frame in socket:
                message = json.loads(frame)
                if message.get("method") == "initialize":
                    await socket.send(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": INITIALIZE_RESULT}))

        async with serve(handle, "127.0.0.1", 0, subprotocols=["mcp"], process_request=check) as server:  # type: ignore[list-item]
            port = next(iter(server.sockets)).getsockname()[1]
            peer = gateway_peer(peer_id=822, transport="websocket", url=f"ws://127.0.0.1:{port}/ws")
            connection = WebSocketConnection(peer, auth=credentials.auth_for(peer))
            await connection.start()
            await connection.close()

        assert seen == ["Bearer peer-token-1", "Bearer peer-token-2"]
