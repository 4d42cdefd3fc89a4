"""Per-user upstream credentials against a real OAuth-protected MCP server.

The upstream is another fedmcp gateway, B, whose per-peer endpoint /peers/fixture/mcp is a
protected resource with B's own authorization server (django-oauth-toolkit: PKCE, dynamic
registration, `iss` in responses, rotating refresh tokens). Gateway A has it as peer `files`
with per-user OAuth (not as a peer gateway: no trust, no assertions). B is published at
`localhost`, A at `127.0.0.1`, so the browser keeps the two gateways' cookies apart.

The operator's account connects first (a scripted browser: httpx posting the forms), which
lists the catalog. Alice's first call is then refused with the connect page; she connects in
headless Chromium (signing in at A, then at B, allowing A at B's consent page); her calls then
run as alice at B. Bob, who has not connected, is refused and nothing runs at B for him.
"""

from __future__ import annotations

import html
import json
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from mcp_endpoint import jsonrpc
from tests.e2e.browser import screenshot, submit_login_form
from tests.e2e.harness import Gateway, fixture_server, gateways
from tests.e2e.test_federation import audit_events, modern_call, wait_for_audit

pytestmark = pytest.mark.e2e

WAIT = 30.0
TOOL = "files__add"
ADD = {"name": TOOL, "arguments": {"a": 20, "b": 22}}
HANDSHAKE_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@dataclass
class Pair:
    a: Gateway
    b: Gateway
    passwords: dict[str, str]
    """Everyone's password, the same at A and B (distinct accounts all the same)."""


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    with fixture_server(name="fixture") as fixture_url, gateways("a", "b") as made:
        a, b = made["a"], made["b"]
        b.env["FEDMCP_PUBLIC_URL"] = b.public_url = f"http://localhost:{b.port}"
        passwords = {user: secrets.token_urlsafe(12) for user in ("ops", "alice", "bob")}
        for gateway in (a, b):
            gateway.create_users(passwords)
        b.command("peer", "add", "fixture", "--url", fixture_url)
        b.start_worker()
        added = a.manage("peer", "add", "files", "--url", f"{b.public_url}/peers/fixture/mcp", "--user-oauth")
        assert f"Authorization server of files: {b.public_url}" in added.stdout, added.stdout + added.stderr
        for user in passwords:
            a.auth_headers(user)
        a.start_worker()
        yield Pair(a, b, passwords)


# --- a scripted browser: httpx following redirects by hand and posting the pages' forms ----------


def hidden_inputs(page: str, form_id: str) -> dict[str, str]:
    form = page[page.index(f'id="{form_id}"') :]
    form = form[: form.index("</form>")]
    return {
        html.unescape(name): html.unescape(value)
        for name, value in re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', form)
    }


def follow(client: httpx.Client, response: httpx.Response) -> httpx.Response:
    while response.is_redirect:
        response = client.get(urljoin(str(response.url), response.headers["location"]))
    return response


def sign_in_if_asked(client: httpx.Client, page: httpx.Response, user: str, password: str) -> httpx.Response:
    if 'id="login-form"' not in page.text:
        return page
    fields = {**hidden_inputs(page.text, "login-form"), "username": user, "password": password}
    return follow(client, client.post(str(page.url), data=fields))


def connect_scripted(pair: Pair, user: str) -> httpx.Response:
    """`user` connects their account at `files`, the way a browser would; return the last page."""
    password = pair.passwords[user]
    with httpx.Client(timeout=WAIT) as client:
        page = sign_in_if_asked(client, follow(client, client.get(f"{pair.a.public_url}/connect/files")), user, password)
        fields = {"csrfmiddlewaretoken": re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)}  # type: ignore[union-attr]
        at_b = sign_in_if_asked(client, follow(client, client.post(str(page.url), data=fields)), user, password)
        assert 'id="authorization-form"' in at_b.text, at_b.text[:2000]
        allowed = client.post(str(at_b.url), data={**hidden_inputs(at_b.text, "authorization-form"), "allow": "Authorize"})
        return follow(client, allowed)


def legacy_host_call(gateway: Gateway, user: str, capabilities: dict[str, Any]) -> dict[str, Any]:
    """Initialize a handshake-era session as `user` declaring `capabilities`, then call the tool."""
    headers = {**HANDSHAKE_HEADERS, **gateway.auth_headers(user)}
    with httpx.Client(timeout=WAIT) as client:
        init = {"protocolVersion": "2025-11-25", "capabilities": capabilities, "clientInfo": {"name": "e2e", "version": "0"}}
        reply = client.post(gateway.url("/mcp"), json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init}, headers=headers)
        headers = {**headers, "Mcp-Session-Id": reply.headers["mcp-session-id"], "MCP-Protocol-Version": "2025-11-25"}
        client.post(gateway.url("/mcp"), json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers)
        reply = client.post(gateway.url("/mcp"), json={"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": ADD}, headers=headers)
        if reply.headers.get("content-type", "").startswith("text/event-stream"):
            return [json.loads(line[5:]) for line in reply.text.splitlines() if line.startswith("data:") and line[5:].strip()][-1]
        return reply.json()


def call_as(pair: Pair, user: str) -> dict[str, Any]:
    return modern_call(pair.a, "tools/call", ADD, name=TOOL, headers=pair.a.auth_headers(user))


def calls_at_b(pair: Pair, username: str) -> list[dict[str, Any]]:
    return [e for e in audit_events(pair.b) if e["method"] == "tools/call" and e["username"] == username]


# --- the tests, in order: each builds on the state the previous left ----------------------------


def test_the_operator_connects_and_the_catalog_is_listed(pair: Pair) -> None:
    page = connect_scripted(pair, "ops")

    assert "status-connected" in page.text, page.text[:2000]
    listed = modern_call(pair.a, "tools/list", {}, headers=pair.a.auth_headers("ops"))
    assert TOOL in {tool["name"] for tool in listed["result"]["tools"]}


def test_alice_is_sent_to_the_connect_page_before_she_connects(pair: Pair) -> None:
    elicited = legacy_host_call(pair.a, "alice", {"elicitation": {"url": {}}})
    plain = legacy_host_call(pair.a, "alice", {})

    assert elicited["error"]["code"] == jsonrpc.URL_ELICITATION_REQUIRED
    (elicitation,) = elicited["error"]["data"]["elicitations"]
    assert elicitation["mode"] == "url" and elicitation["url"] == f"{pair.a.public_url}/connect/files"
    assert plain["error"]["code"] == jsonrpc.UPSTREAM_AUTHORIZATION_REQUIRED
    assert f"{pair.a.public_url}/connect/files" in plain["error"]["message"]
    assert calls_at_b(pair, "alice") == []


def test_alice_connects_in_the_browser_and_her_calls_run_as_her_at_b(pair: Pair, browser: webdriver.Chrome) -> None:
    wait = WebDriverWait(browser, WAIT)
    browser.get(f"{pair.a.public_url}/connect/files")
    for _ in range(2):  # signing in at A, then at B
        wait.until(expected_conditions.presence_of_element_located((By.ID, "login-form")))
        submit_login_form(browser, "alice", pair.passwords["alice"])
        if _ == 0:
            wait.until(expected_conditions.element_to_be_clickable((By.ID, "connect"))).click()
    wait.until(expected_conditions.element_to_be_clickable((By.ID, "allow"))).click()
    wait.until(expected_conditions.presence_of_element_located((By.ID, "connections")))
    assert browser.find_elements(By.CSS_SELECTOR, "#peer-files .status-connected")
    screenshot(browser, "connect-list.png")
    browser.get(f"{pair.a.public_url}/connect/files")
    screenshot(browser, "connect-peer.png")

    reply = call_as(pair, "alice")

    assert reply["result"]["content"][0]["text"] == "42"
    at_b = wait_for_audit(pair.b, {"method": "tools/call", "username": "alice", "peer": "fixture"})
    client_id = pair.a.shell("from identity.models import UpstreamOAuthClient; print(UpstreamOAuthClient.objects.get().client_id)")
    # B saw its own user alice, through the client A registered there: not A's host token, not ops.
    assert at_b["client_id"] == client_id and at_b["outcome"] == "ok"


def test_bob_who_has_not_connected_is_refused_and_nothing_runs_at_b_for_him(pair: Pair) -> None:
    before = len([e for e in audit_events(pair.b) if e["method"] == "tools/call"])

    reply = call_as(pair, "bob")

    # A 2026-07-28 host that declared no URL elicitation: an error naming the connect page.
    assert reply["error"]["code"] == jsonrpc.UPSTREAM_AUTHORIZATION_REQUIRED
    assert reply["error"]["data"]["connectUrl"] == f"{pair.a.public_url}/connect/files"
    assert len([e for e in audit_events(pair.b) if e["method"] == "tools/call"]) == before


def test_an_expired_token_is_refreshed_with_rotation_without_alice_noticing(pair: Pair) -> None:
    read = "from identity.models import UpstreamToken; t = UpstreamToken.objects.get(user__username='alice'); print(t.generation, t.refresh_token)"
    generation, refresh = pair.a.shell(read).split()
    pair.a.shell(
        "from django.utils import timezone; from identity.models import UpstreamToken; "
        "UpstreamToken.objects.filter(user__username='alice').update(expires_at=timezone.now())"
    )

    reply = call_as(pair, "alice")

    assert reply["result"]["content"][0]["text"] == "42"
    new_generation, new_refresh = pair.a.shell(read).split()
    assert int(new_generation) == int(generation) + 1 and new_refresh != refresh


def test_a_token_b_no_longer_accepts_is_refreshed_once_on_the_401(pair: Pair) -> None:
    # B ends alice's access token early; A still thinks it good, until B answers 401.
    expire = "from datetime import timedelta; from django.utils import timezone; from oauth2_provider.models import AccessToken;"
    pair.b.shell(expire + "AccessToken.objects.filter(user__username='alice').update(expires=timezone.now() - timedelta(seconds=1))")

    reply = call_as(pair, "alice")

    assert reply.get("result", {}).get("content", [{}])[0].get("text") == "42", reply


def test_when_b_refuses_to_refresh_alice_is_asked_to_connect_again(pair: Pair) -> None:
    revoke = (
        "from oauth2_provider.models import AccessToken, RefreshToken; u = 'alice'; "
        "AccessToken.objects.filter(user__username=u).delete(); RefreshToken.objects.filter(user__username=u).delete()"
    )
    pair.b.shell(revoke)

    reply = legacy_host_call(pair.a, "alice", {})

    assert reply["error"]["code"] == jsonrpc.UPSTREAM_AUTHORIZATION_REQUIRED
    assert "connect again" in reply["error"]["message"]
    assert pair.a.shell("from identity.models import UpstreamToken; print(UpstreamToken.objects.filter(user__username='alice').count())") == "0"


def test_no_dump_of_a_holds_an_upstream_token_or_client_secret(pair: Pair) -> None:
    read = (
        "import json; from identity.models import UpstreamOAuthClient, UpstreamToken; t = UpstreamToken.objects.get(user__username='ops');"
        "print(json.dumps([t.access_token, t.refresh_token, UpstreamOAuthClient.objects.get().client_secret]))"
    )
    secrets_ = json.loads(pair.a.shell(read))
    assert all(secrets_)

    dump = pair.a.command("dumpdata", "--natural-foreign").stdout
    raw = (pair.a.dir / "db.sqlite3").read_bytes()

    for value in secrets_:
        assert value not in dump and value.encode() not in raw
    rows = [row for row in json.loads(dump) if row["model"] == "identity.upstreamtoken"]
    assert rows and all(row["fields"]["access_token"].startswith("gAAAAA") for row in rows)
