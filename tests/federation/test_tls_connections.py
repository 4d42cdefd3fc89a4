"""Peers over TLS on loopback: verified with the peer's CA bundle, client certificates, clear refusals.

The fixture MCP server serves HTTPS (Streamable HTTP, one instance requiring client
certificates; legacy HTTP+SSE requiring them); WebSocket peers are a small `websockets` server
with TLS in this process. Certificates come from a throwaway CA (tests/federation/pki.py).
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pytest
from mcp_types.version import LATEST_HANDSHAKE_VERSION
from websockets.asyncio.server import ServerConnection, serve

from federation import credentials
from federation.models import Peer
from federation.tls import PeerTls
from federation.upstream import CONNECTION_KINDS
from federation.upstream.base import PeerConfig, UpstreamUnavailableError, modern_meta
from tests.admin_ui.common import messages_of, staff_client
from tests.admin_ui.test_peer_admin import ADD_FORM
from tests.base import AsgiTestCase
from tests.federation.pki import Authority, Issued, Pki, https_fixture_server

TIMEOUT = 30.0
NAME = "secure"


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(TIMEOUT):
            return await coro

    return asyncio.run(bounded())


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki.create()


@pytest.fixture(scope="module")
def pem_files(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return pki.write(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def https_url(pem_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with https_fixture_server(pem_files, log_dir=tmp_path_factory.mktemp("https")) as url:
        yield url


@pytest.fixture(scope="module")
def mutual_url(pem_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with https_fixture_server(pem_files, mutual=True, log_dir=tmp_path_factory.mktemp("mutual")) as url:
        yield url


@pytest.fixture(scope="module")
def mutual_sse_url(pem_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with https_fixture_server(pem_files, transport="sse", mutual=True, log_dir=tmp_path_factory.mktemp("mutual-sse")) as url:
        yield url


def peer_at(url: str, transport: str = "streamable-http", **tls: str) -> PeerConfig:
    return PeerConfig(id=1, name=NAME, transport=transport, url=url, connect_timeout=10, call_timeout=10, **tls)


def with_ca(pki: Pki) -> dict[str, str]:
    return {"tls_ca_bundle": pki.ca.pem}


def with_client(pki: Pki, client: Issued | None = None) -> dict[str, str]:
    client = client or pki.client
    return {"tls_ca_bundle": pki.ca.pem, "tls_client_cert": client.cert, "tls_client_key": client.key}


async def tool_names(peer: PeerConfig) -> set[str]:
    """Connect, list the tools and close."""
    connection = CONNECTION_KINDS[peer.transport](peer)
    try:
        await connection.start()
        reply = await connection.request("tools/list", {"_meta": modern_meta()} if connection.era == "modern" else {})
        return {tool["name"] for tool in reply["result"]["tools"]}
    finally:
        await connection.close()


def refusal(peer: PeerConfig) -> str:
    with pytest.raises(UpstreamUnavailableError) as caught:
        run(tool_names(peer))
    return str(caught.value)


# --- Streamable HTTP -----------------------------------------------------------------------------


def test_a_peer_whose_ca_is_configured_lists_its_tools(pki: Pki, https_url: str) -> None:
    assert "add" in run(tool_names(peer_at(https_url, **with_ca(pki))))


def test_without_its_ca_the_peer_is_refused_naming_the_peer_the_reason_and_the_fix(https_url: str) -> None:
    message = refusal(peer_at(https_url))

    assert f"peer '{NAME}'" in message
    assert "TLS certificate verify failed" in message and "CA bundle" in message


def test_a_ca_bundle_is_the_only_trust_for_its_peer(https_url: str) -> None:
    assert "TLS certificate verify failed" in refusal(peer_at(https_url, tls_ca_bundle=Authority("another CA").pem))


def test_mutual_tls_works_with_the_client_certificate(pki: Pki, mutual_url: str) -> None:
    assert "add" in run(tool_names(peer_at(mutual_url, **with_client(pki))))


def test_mutual_tls_without_a_client_certificate_is_refused_clearly(pki: Pki, mutual_url: str) -> None:
    message = refusal(peer_at(mutual_url, **with_ca(pki)))

    assert f"peer '{NAME}'" in message and "client certificate" in message


def test_a_client_certificate_the_peer_does_not_trust_is_refused_clearly(pki: Pki, mutual_url: str) -> None:
    stranger = Authority("unknown CA").issue("stranger", client=True)

    assert "client certificate" in refusal(peer_at(mutual_url, **with_client(pki, stranger)))


def test_a_stored_certificate_without_its_key_says_what_is_missing(pki: Pki, https_url: str) -> None:
    message = refusal(peer_at(https_url, tls_ca_bundle=pki.ca.pem, tls_client_cert=pki.client.cert))

    assert "without its private key" in message


def test_plain_http_to_a_tls_port_fails_as_a_connection_failure(https_url: str) -> None:
    assert f"peer '{NAME}'" in refusal(peer_at(https_url.replace("https://", "http://")))


# --- legacy HTTP+SSE ----------------------------------------------------------------------------


def test_an_sse_peer_gets_the_client_certificate_on_its_stream_and_its_posts(pki: Pki, mutual_sse_url: str) -> None:
    assert "add" in run(tool_names(peer_at(mutual_sse_url, "sse", **with_client(pki))))


def test_an_sse_peer_is_verified_with_its_own_ca_only(mutual_sse_url: str) -> None:
    message = refusal(peer_at(mutual_sse_url, "sse"))

    assert f"peer '{NAME}'" in message
    assert "TLS certificate verify failed" in message and "CA bundle" in message


def test_an_sse_peer_that_requires_a_client_certificate_refuses_clearly_without_one(pki: Pki, mutual_sse_url: str) -> None:
    message = refusal(peer_at(mutual_sse_url, "sse", **with_ca(pki)))

    assert f"peer '{NAME}'" in message and "client certificate" in message


# --- WebSocket -----------------------------------------------------------------------------------


async def _answer(socket: ServerConnection) -> None:
    """A minimal handshake-era MCP server: initialize and tools/list."""
    async for frame in socket:
        message = json.loads(frame)
        if message.get("method") == "initialize":
            result: dict[str, Any] = {
                "protocolVersion": LATEST_HANDSHAKE_VERSION, "capabilities": {"tools": {}}, "serverInfo": {"name": "ws", "version": "1"},
            }
        elif message.get("method") == "tools/list":
            result = {"tools": [{"name": "echo", "inputSchema": {"type": "object"}}]}
        else:
            continue
        await socket.send(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}))


@asynccontextmanager
async def wss_server(pki: Pki, folder: Path, *, server: Issued | None = None, mutual: bool = False) -> AsyncIterator[str]:
    """Serve `_answer` over WSS on loopback with `server`'s certificate (default: the loopback one)."""
    issued = server or pki.server
    (folder / "ws_cert.pem").write_text(issued.cert)
    (folder / "ws_key.pem").write_text(issued.key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(folder / "ws_cert.pem", folder / "ws_key.pem")
    if mutual:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=pki.ca.pem)
    async with serve(_answer, "127.0.0.1", 0, ssl=context, subprotocols=["mcp"]) as running:  # type: ignore[list-item]
        port = next(iter(running.sockets)).getsockname()[1]
        yield f"wss://127.0.0.1:{port}/"


def test_websocket_over_tls_verifies_the_peer_and_presents_the_client_certificate(pki: Pki, tmp_path: Path) -> None:
    async def scenario() -> tuple[set[str], str, str]:
        async with wss_server(pki, tmp_path, mutual=True) as url:
            names = await tool_names(peer_at(url, "websocket", **with_client(pki)))
            with pytest.raises(UpstreamUnavailableError) as unverified:
                await tool_names(peer_at(url, "websocket"))
            with pytest.raises(UpstreamUnavailableError) as no_client:
                await tool_names(peer_at(url, "websocket", **with_ca(pki)))
            return names, str(unverified.value), str(no_client.value)

    names, unverified, no_client = run(scenario())

    assert names == {"echo"}
    assert "TLS certificate verify failed" in unverified and f"peer '{NAME}'" in unverified
    assert "client certificate" in no_client


def test_a_certificate_for_another_host_is_refused_as_a_name_mismatch(pki: Pki, tmp_path: Path) -> None:
    elsewhere = pki.ca.issue("elsewhere", hosts=("other.example",))

    async def scenario() -> str:
        async with wss_server(pki, tmp_path, server=elsewhere) as url:
            with pytest.raises(UpstreamUnavailableError) as caught:
                await tool_names(peer_at(url, "websocket", **with_ca(pki)))
            return str(caught.value)

    assert "does not name the host" in run(scenario())


# --- token requests ------------------------------------------------------------------------------


def test_token_discovery_and_requests_use_the_peers_tls_settings(pki: Pki) -> None:
    seen: list[PeerTls | None] = []

    def client(**kwargs: Any) -> httpx.AsyncClient:
        seen.append(kwargs.get("tls"))

        def handle(request: httpx.Request) -> httpx.Response:
            if request.url.path.endswith("oauth-protected-resource"):
                return httpx.Response(200, json={"authorization_servers": ["https://127.0.0.1:9"]})
            if request.url.path.endswith("oauth-authorization-server"):
                return httpx.Response(200, json={"issuer": "https://127.0.0.1:9", "token_endpoint": "https://127.0.0.1:9/oauth/token/"})
            return httpx.Response(200, json={"access_token": "t", "token_type": "Bearer", "expires_in": 300})

        return httpx.AsyncClient(transport=httpx.MockTransport(handle))

    peer = PeerConfig(
        id=901, name=NAME, transport="streamable-http", url="https://127.0.0.1:9/mcp", client_id="gw", client_secret="s",
        **with_client(pki),
    )
    with mock.patch("federation.credentials.outbound_client", client), mock.patch("federation.credentials.check_url_allowed"):
        assert run(credentials.ClientCredentials(peer).token()) == "t"

    assert seen == [peer.tls, peer.tls]


# --- the admin's connection test -----------------------------------------------------------------


@pytest.fixture(scope="class")
def https_on_class(request: pytest.FixtureRequest, pki: Pki, https_url: str) -> None:
    request.cls.pki, request.cls.https_url = pki, https_url


@pytest.mark.usefixtures("https_on_class")
class TlsPeerAdminTest(AsgiTestCase):
    pki: Pki
    https_url: str

    def test_adding_an_https_peer_without_its_ca_shows_why_it_cannot_connect(self) -> None:
        reply = staff_client().post("/admin/federation/peer/add/", {**ADD_FORM, "name": NAME, "url": self.https_url}, follow=True)

        # Not added (as `peer add` without --force): the form says why, on the page.
        errors = reply.context["form"].non_field_errors()
        assert len(errors) == 1 and "TLS certificate verify failed" in errors[0], errors
        assert not Peer.objects.filter(name=NAME).exists()

    def test_adding_an_https_peer_with_its_ca_connects(self) -> None:
        form = {**ADD_FORM, "name": NAME, "url": self.https_url, "tls_ca_bundle": self.pki.ca.pem.replace("\n", "\r\n")}
        reply = staff_client().post("/admin/federation/peer/add/", form, follow=True)

        levels = [level for level, _ in messages_of(reply)]
        assert "success" in levels and "error" not in levels, messages_of(reply)
