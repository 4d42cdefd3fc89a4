"""Consent in a real browser: the prompt appears live on /consent, the user approves, the host gets its result.

A real gateway (one daphne worker, FEDMCP_CONSENT_DEFAULT=ask) with the fixture as peer `web`;
headless Chromium signed in as alice sits on /consent. A host (plain HTTP client, in a thread)
calls `web__test_simple_text` and waits. The prompt must appear WITHOUT a reload (pushed over
/consent/ws); the user presses "Approve once"; the host's call completes with the tool's
result. Screenshots of the pending and approved page go to build/screenshots/.

The same again on two workers (PostgreSQL + Redis) with the database fallback poll turned off:
the call waits on worker A while the page, its live feed and the approval are on worker B.
"""

from __future__ import annotations

import json
import secrets
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from tests.e2e import harness
from tests.e2e.test_scale_out import (  # noqa: F401 - module-scoped fixtures
    REDIS_URL,
    database_url,
    redis_prefix,
)

pytestmark = pytest.mark.e2e

WAIT = 30.0
"""Upper bound for each wait (page, prompt, MCP call); a healthy run needs a fraction of it."""
USERNAME = "alice"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "build" / "screenshots"
TOOL = "web__test_simple_text"


@pytest.fixture(scope="module")
def consent_gateway(web_upstream_url: str) -> Iterator[tuple[harness.Gateway, str]]:
    """A gateway that asks before every tool call, with user alice and the fixture as peer `web`."""
    password = secrets.token_urlsafe(16)
    env = {"FEDMCP_CONSENT_DEFAULT": "ask", "FEDMCP_CONSENT_TIMEOUT": str(WAIT * 2), "FEDMCP_CONSENT_POLL_INTERVAL": "1"}
    with harness.Gateway(name="consent", env=env) as gateway:
        gateway.migrate()
        create_user = f"from django.contrib.auth import get_user_model; get_user_model().objects.create_user({USERNAME!r}, password={password!r})"
        gateway.manage("shell", "-c", create_user)
        gateway.manage("peer", "add", "web", "--url", web_upstream_url)
        gateway.auth_headers(USERNAME)
        gateway.start_worker()
        yield gateway, password


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail("chromium and chromedriver are needed: run `make tools` (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage", "--window-size=1000,1100"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


class Host:
    """A handshake-era host over Streamable HTTP; `call_in_background` runs one tools/call in a thread."""

    def __init__(self, gateway: harness.Gateway, worker: int = 0) -> None:
        self.url = gateway.url("/mcp", worker)
        self.headers = {**gateway.auth_headers(USERNAME), "Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
        self.client = httpx.Client(timeout=httpx.Timeout(WAIT * 3))
        self.result: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None

    def post(self, message: dict[str, Any]) -> httpx.Response:
        return self.client.post(self.url, json=message, headers=self.headers)

    def initialize(self) -> None:
        params = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "consent-e2e-host", "version": "0"}}
        reply = self.post({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": params})
        assert reply.status_code == 200, reply.text
        self.headers["Mcp-Session-Id"] = reply.headers["mcp-session-id"]
        self.headers["Mcp-Protocol-Version"] = final(reply)["result"]["protocolVersion"]
        assert self.post({"jsonrpc": "2.0", "method": "notifications/initialized"}).status_code == 202

    def call_in_background(self, name: str) -> None:
        def run() -> None:
            try:
                self.result = final(self.post({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": name, "arguments": {}}}))
            except BaseException as exc:  # handed to the test thread
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def wait(self) -> dict[str, Any]:
        assert self.thread is not None
        self.thread.join(WAIT * 2)
        assert not self.thread.is_alive(), "the host's call did not finish"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    def close(self) -> None:
        self.client.close()


def final(reply: httpx.Response) -> dict[str, Any]:
    """The JSON-RPC response of a POST, answered as JSON or as an SSE stream."""
    if reply.headers.get("content-type", "").startswith("text/event-stream"):
        messages = [json.loads(line[5:].strip()) for line in reply.text.splitlines() if line.startswith("data:") and line[5:].strip()]
        return [m for m in messages if "method" not in m][-1]
    return reply.json()


def sign_in_on_consent_page(browser: webdriver.Chrome, url: str, password: str) -> WebDriverWait:
    """Open /consent at `url`, sign in as alice, and wait until the live feed is connected."""
    wait = WebDriverWait(browser, WAIT)
    browser.get(url)
    wait.until(expected_conditions.presence_of_element_located((By.ID, "login-form")))
    browser.find_element(By.ID, "id_username").send_keys(USERNAME)
    browser.find_element(By.ID, "id_password").send_keys(password)
    browser.find_element(By.ID, "sign-in").click()
    wait.until(expected_conditions.presence_of_element_located((By.ID, "prompts")))
    wait.until(lambda d: d.execute_script("return document.body.dataset.consentLive === '1'"))
    browser.execute_script("window.__notReloaded = true;")
    assert not browser.find_elements(By.CSS_SELECTOR, "#prompts .prompt")
    return wait


def approve_live_prompt(browser: webdriver.Chrome, wait: WebDriverWait, host: Host, *, screenshots: str = "") -> dict[str, Any]:
    """Wait for the host's prompt to appear (no reload), press "Approve once", return the host's reply."""
    host.initialize()
    host.call_in_background(TOOL)
    prompt = wait.until(expected_conditions.visibility_of_element_located((By.CSS_SELECTOR, "#prompts .prompt")))
    assert browser.execute_script("return window.__notReloaded === true"), "the page was reloaded"
    assert "test_simple_text" in prompt.text and "web" in prompt.text
    if screenshots:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(SCREENSHOTS / f"{screenshots}-pending.png"))
    prompt.find_element(By.CSS_SELECTOR, "button[value=approve]").click()
    wait.until(expected_conditions.presence_of_element_located((By.ID, "consent-messages")))
    if screenshots:
        browser.save_screenshot(str(SCREENSHOTS / f"{screenshots}-approved.png"))
    return host.wait()


def assert_tool_result(reply: dict[str, Any]) -> None:
    assert "result" in reply, reply
    assert reply["result"].get("isError") is not True
    assert reply["result"]["content"][0]["type"] == "text"


def test_prompt_appears_live_and_approval_completes_the_call(consent_gateway: tuple[harness.Gateway, str], browser: webdriver.Chrome) -> None:
    gateway, password = consent_gateway
    wait = sign_in_on_consent_page(browser, gateway.url("/consent"), password)
    host = Host(gateway)
    try:
        reply = approve_live_prompt(browser, wait, host, screenshots="consent")
    finally:
        host.close()
    assert_tool_result(reply)


@pytest.fixture(scope="module")
def consent_cluster(web_upstream_url: str, database_url: str, redis_prefix: str) -> Iterator[tuple[harness.Gateway, str]]:  # noqa: F811
    """Two workers on one PostgreSQL database and one Redis channel layer; database polling
    effectively off (FEDMCP_CONSENT_POLL_INTERVAL=600), so only the channel layer can deliver."""
    password = secrets.token_urlsafe(16)
    env = {
        "REDIS_URL": REDIS_URL,
        "FEDMCP_REDIS_PREFIX": redis_prefix,
        "FEDERATION_HEALTH_INTERVAL": "0",
        "FEDERATION_REFRESH_INTERVAL": "0",
        "FEDMCP_CONSENT_DEFAULT": "ask",
        "FEDMCP_CONSENT_TIMEOUT": str(WAIT * 2),
        "FEDMCP_CONSENT_POLL_INTERVAL": "600",
    }
    with harness.Gateway(name="consent-cluster", env=env, database_url=database_url) as gateway:
        gateway.migrate()
        create_user = f"from django.contrib.auth import get_user_model; get_user_model().objects.create_user({USERNAME!r}, password={password!r})"
        gateway.manage("shell", "-c", create_user)
        gateway.manage("peer", "add", "web", "--url", web_upstream_url)
        gateway.auth_headers(USERNAME)
        gateway.start_worker()
        gateway.start_worker()
        yield gateway, password


def test_prompt_and_answer_cross_workers(consent_cluster: tuple[harness.Gateway, str], browser: webdriver.Chrome) -> None:
    """The call waits on worker A; the page (and its live feed) is served by worker B."""
    gateway, password = consent_cluster
    wait = sign_in_on_consent_page(browser, gateway.url("/consent", worker=1), password)
    host = Host(gateway, worker=0)
    try:
        reply = approve_live_prompt(browser, wait, host)
    finally:
        host.close()
    assert_tool_result(reply)
