"""A host signs in through the gateway's own OAuth pages, then calls a tool: all of it real.

The official `mcp` SDK client (`OAuthClientProvider`) meets a real gateway (one daphne worker,
bearer tokens required) with the fixture server registered as peer `web`. On its first 401 it
discovers the RFC 9728 and RFC 8414 documents, registers itself (RFC 7591), and sends the
user to /o/authorize with PKCE S256 and `resource`. Headless Chromium plays the user: signs in
on the login page, presses Allow on the consent page. The browser lands on the host's loopback
callback server, the SDK checks `state` and `iss`, exchanges the code, and the retried MCP
request goes through. Refresh-token rotation is exercised against the same real server.
"""

from __future__ import annotations

import queue
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.auth import OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import (
    AuthorizationCodeResult,
    OAuthClientInformationFull,
    OAuthClientMetadata,
    OAuthToken,
)
from pydantic import AnyUrl
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from tests.e2e import harness
from tests.e2e.browser import submit_login_form

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

WAIT = 30.0
"""Upper bound for each wait (page, callback, MCP call); a healthy run needs a fraction of it."""
USERNAME = "alice"
HOST_NAME = "fedmcp e2e host"


# --- the real things ------------------------------------------------------------------------


@dataclass
class OAuthGateway:
    gateway: harness.Gateway
    password: str


@pytest.fixture(scope="module")
def oauth_gateway(web_upstream_url: str) -> Iterator[OAuthGateway]:
    """A gateway that requires bearer tokens, with user alice and the fixture as peer `web`."""
    password = secrets.token_urlsafe(16)
    with harness.Gateway(name="oauth") as gateway:
        gateway.migrate()
        gateway.create_users({USERNAME: password})
        gateway.command("peer", "add", "web", "--url", web_upstream_url)
        gateway.start_worker()
        yield OAuthGateway(gateway, password)


class CallbackServer:
    """The host's loopback redirect URI, as a desktop app would run it: records each callback."""

    def __init__(self) -> None:
        self.received: queue.Queue[dict[str, str]] = queue.Queue()
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                received.put({key: values[0] for key, values in parse_qs(urlsplit(self.path).query).items()})
                body = b"<!doctype html><title>Done</title><p>You can close this window."
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/callback"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> CallbackServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(WAIT)


@pytest.fixture
def callback_server() -> Iterator[CallbackServer]:
    with CallbackServer() as server:
        yield server


# --- the host -------------------------------------------------------------------------------


@dataclass
class MemoryStorage:
    """The SDK's TokenStorage, kept in memory (a real host would use its keychain)."""

    tokens: OAuthToken | None = None
    client_info: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client_info

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client_info = client_info


@dataclass
class User:
    """The person at the browser: signs in and approves; remembers what the consent page showed."""

    driver: webdriver.Chrome
    password: str
    authorize_urls: list[str] = field(default_factory=list)
    consent: dict[str, str] = field(default_factory=dict)

    def sign_in_and_allow(self, url: str) -> None:
        self.authorize_urls.append(url)
        wait = WebDriverWait(self.driver, WAIT)
        self.driver.get(url)
        # The browser may still be signed in from an earlier test: then it goes straight to consent.
        wait.until(
            expected_conditions.any_of(
                expected_conditions.presence_of_element_located((By.ID, "login-form")),
                expected_conditions.presence_of_element_located((By.ID, "authorization-form")),
            )
        )
        if self.driver.find_elements(By.ID, "login-form"):
            submit_login_form(self.driver, USERNAME, self.password)
            wait.until(expected_conditions.presence_of_element_located((By.ID, "authorization-form")))
        self.consent = {
            "client_name": self.driver.find_element(By.ID, "client-name").text,
            "redirect_uri": self.driver.find_element(By.ID, "redirect-uri").text,
        }
        self.driver.find_element(By.ID, "allow").click()


def host_provider(server_url: str, user: User, callback: CallbackServer, storage: MemoryStorage) -> OAuthClientProvider:
    async def redirect_handler(url: str) -> None:
        await anyio.to_thread.run_sync(user.sign_in_and_allow, url)

    async def callback_handler() -> AuthorizationCodeResult:
        params = await anyio.to_thread.run_sync(lambda: callback.received.get(timeout=WAIT))
        return AuthorizationCodeResult(code=params.get("code", ""), state=params.get("state"), iss=params.get("iss"))

    metadata = OAuthClientMetadata(
        client_name=HOST_NAME,
        redirect_uris=[AnyUrl(callback.url)],
        grant_types=["authorization_code", "refresh_token"],
        response_types=["code"],
        token_endpoint_auth_method="none",
    )
    return OAuthClientProvider(
        server_url=server_url,
        client_metadata=metadata,
        storage=storage,
        redirect_handler=redirect_handler,
        callback_handler=callback_handler,
    )


def texts(result: types.CallToolResult) -> list[str]:
    return [block.text for block in result.content if isinstance(block, types.TextContent)]


async def call_tool(
    url: str, provider: OAuthClientProvider, name: str, arguments: dict[str, Any]
) -> types.CallToolResult:
    async with httpx2.AsyncClient(auth=provider, timeout=httpx2.Timeout(WAIT)) as http_client:
        with anyio.fail_after(WAIT * 3):
            async with Client(streamable_http_client(url, http_client=http_client)) as client:
                return await client.call_tool(name, arguments)


# --- the tests ------------------------------------------------------------------------------


async def test_the_sdk_client_signs_in_through_the_browser_and_calls_a_tool(
    oauth_gateway: OAuthGateway, browser: webdriver.Chrome, callback_server: CallbackServer
) -> None:
    gateway = oauth_gateway.gateway
    user = User(browser, oauth_gateway.password)
    storage = MemoryStorage()
    provider = host_provider(gateway.url("/mcp"), user, callback_server, storage)

    result = await call_tool(gateway.url("/mcp"), provider, "web__add", {"a": 2, "b": 3})

    assert not result.is_error and texts(result) == ["5"]
    # One trip through the browser, with the request the MCP spec asks of a host.
    assert len(user.authorize_urls) == 1
    request = {key: values[0] for key, values in parse_qs(urlsplit(user.authorize_urls[0]).query).items()}
    assert request["code_challenge_method"] == "S256"
    assert request["resource"] == gateway.url("/mcp")
    assert request["redirect_uri"] == callback_server.url
    # The consent page named the self-registered client and where the code would go.
    assert user.consent["client_name"] == HOST_NAME
    assert user.consent["redirect_uri"] == callback_server.url
    assert storage.client_info is not None and storage.client_info.client_id == request["client_id"]
    assert storage.tokens is not None and storage.tokens.refresh_token


async def test_the_token_is_reused_on_a_peer_endpoint_and_refreshed_by_rotation(
    oauth_gateway: OAuthGateway, browser: webdriver.Chrome, callback_server: CallbackServer
) -> None:
    gateway = oauth_gateway.gateway
    user = User(browser, oauth_gateway.password)
    storage = MemoryStorage()
    provider = host_provider(gateway.url("/mcp"), user, callback_server, storage)
    await call_tool(gateway.url("/mcp"), provider, "web__whoami", {})
    assert len(user.authorize_urls) == 1
    first = storage.tokens
    assert first is not None and first.refresh_token

    # Same origin, same audience: the per-peer endpoint takes the same token, no new consent.
    peer_provider = host_provider(gateway.url("/peers/web/mcp"), user, callback_server, storage)
    who = await call_tool(gateway.url("/peers/web/mcp"), peer_provider, "whoami", {})
    assert texts(who) == ["web"]
    assert len(user.authorize_urls) == 1

    # The host's clock says the token expired: the SDK refreshes, and the server rotates.
    provider.context.token_expiry_time = 1.0  # the epoch's first second: long past
    result = await call_tool(gateway.url("/mcp"), provider, "web__add", {"a": 1, "b": 1})
    assert texts(result) == ["2"]
    second = storage.tokens
    assert second is not None and second.refresh_token
    assert second.refresh_token != first.refresh_token and second.access_token != first.access_token
    assert len(user.authorize_urls) == 1

    # The used refresh token is dead; replaying it revokes the family (RFC 9700 §4.14.2).
    async with httpx2.AsyncClient(timeout=WAIT) as http:
        token_url = gateway.url("/o/token/")
        replay = {
            "grant_type": "refresh_token",
            "refresh_token": first.refresh_token,
            "client_id": storage.client_info.client_id,
        }
        assert (await http.post(token_url, data=replay)).status_code == 400
        current = {**replay, "refresh_token": second.refresh_token}
        assert (await http.post(token_url, data=current)).status_code == 400


async def test_without_a_token_the_gateway_points_to_its_metadata(oauth_gateway: OAuthGateway) -> None:
    gateway = oauth_gateway.gateway
    async with httpx2.AsyncClient(timeout=WAIT) as http:
        response = await http.post(gateway.url("/mcp"), json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
        assert response.status_code == 401
        challenge = response.headers["www-authenticate"]
        metadata_url = challenge.split('resource_metadata="', 1)[1].split('"', 1)[0]
        resource = (await http.get(metadata_url)).json()
        server = (await http.get(gateway.url("/.well-known/oauth-authorization-server"))).json()
    assert resource["resource"] == gateway.url("/mcp")
    assert resource["authorization_servers"] == [server["issuer"]] == [gateway.url("")]
    assert server["code_challenge_methods_supported"] == ["S256"]
