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

import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from tests.e2e import harness
from tests.e2e.browser import screenshot, sign_in_on_consent_page
from tests.e2e.hosts import BackgroundHost

pytestmark = pytest.mark.e2e

WAIT = 30.0
"""Upper bound for each wait (page, prompt, MCP call); a healthy run needs a fraction of it."""
USERNAME = "alice"
TOOL = "web__test_simple_text"


@pytest.fixture(scope="module")
def consent_gateway(web_upstream_url: str) -> Iterator[tuple[harness.Gateway, str]]:
    """A gateway that asks before every tool call, with user alice and the fixture as peer `web`."""
    password = secrets.token_urlsafe(16)
    # The host shows no URLs; FEDMCP_CONSENT_HOLD=all has its call wait for the page's answer (docs/CONSENT.md).
    env = {"FEDMCP_CONSENT_DEFAULT": "ask", "FEDMCP_CONSENT_HOLD": "all", "FEDMCP_CONSENT_TIMEOUT": str(WAIT * 2), "FEDMCP_CONSENT_POLL_INTERVAL": "1"}
    with harness.Gateway(name="consent", env=env) as gateway:
        gateway.migrate()
        gateway.create_users({USERNAME: password})
        gateway.command("peer", "add", "web", "--url", web_upstream_url)
        gateway.auth_headers(USERNAME)
        gateway.start_worker()
        yield gateway, password


def approve_live_prompt(browser: webdriver.Chrome, wait: WebDriverWait, host: BackgroundHost, *, screenshots: str = "") -> dict[str, Any]:
    """Have `host` call `TOOL`; wait for the prompt to appear (no reload), press "Approve once"; return the host's reply."""
    host.initialize()
    host.call_in_background({"name": TOOL, "arguments": {}})
    prompt = wait.until(expected_conditions.visibility_of_element_located((By.CSS_SELECTOR, "#prompts .prompt")))
    assert browser.execute_script("return window.__notReloaded === true"), "the page was reloaded"
    assert "test_simple_text" in prompt.text and "web" in prompt.text
    if screenshots:
        screenshot(browser, f"{screenshots}-pending.png")
    prompt.find_element(By.CSS_SELECTOR, "button[value=approve]").click()
    wait.until(expected_conditions.presence_of_element_located((By.ID, "consent-messages")))
    if screenshots:
        screenshot(browser, f"{screenshots}-approved.png")
    return host.wait()


def assert_tool_result(reply: dict[str, Any]) -> None:
    assert "result" in reply, reply
    assert reply["result"].get("isError") is not True
    assert reply["result"]["content"][0]["type"] == "text"


def test_prompt_appears_live_and_approval_completes_the_call(consent_gateway: tuple[harness.Gateway, str], browser: webdriver.Chrome) -> None:
    gateway, password = consent_gateway
    wait = sign_in_on_consent_page(browser, gateway.url("/consent"), password)
    host = BackgroundHost(gateway, wait=WAIT, user=USERNAME)
    try:
        reply = approve_live_prompt(browser, wait, host, screenshots="consent")
    finally:
        host.close()
    assert_tool_result(reply)


@pytest.fixture(scope="module")
def consent_cluster(web_upstream_url: str) -> Iterator[tuple[harness.Gateway, str]]:
    """Two workers on one PostgreSQL database and one Redis channel layer; database polling
    effectively off (FEDMCP_CONSENT_POLL_INTERVAL=600), so only the channel layer can deliver."""
    password = secrets.token_urlsafe(16)
    with harness.postgres_database() as database_url, harness.redis_prefix() as redis_prefix:
        env = {
            "REDIS_URL": harness.REDIS_URL,
            "FEDMCP_REDIS_PREFIX": redis_prefix,
            "FEDERATION_HEALTH_INTERVAL": "0",
            "FEDERATION_REFRESH_INTERVAL": "0",
            "FEDMCP_CONSENT_DEFAULT": "ask",
            # The host shows no URLs; with this its call waits for the page's answer (docs/CONSENT.md).
            "FEDMCP_CONSENT_HOLD": "all",
            "FEDMCP_CONSENT_TIMEOUT": str(WAIT * 2),
            "FEDMCP_CONSENT_POLL_INTERVAL": "600",
        }
        with harness.Gateway(name="consent-cluster", env=env, database_url=database_url) as gateway:
            gateway.migrate()
            gateway.create_users({USERNAME: password})
            gateway.command("peer", "add", "web", "--url", web_upstream_url)
            gateway.auth_headers(USERNAME)
            gateway.start_worker()
            gateway.start_worker()
            yield gateway, password


def test_prompt_and_answer_cross_workers(consent_cluster: tuple[harness.Gateway, str], browser: webdriver.Chrome) -> None:
    """The call waits on worker A; the page (and its live feed) is served by worker B."""
    gateway, password = consent_cluster
    wait = sign_in_on_consent_page(browser, gateway.url("/consent", worker=1), password)
    host = BackgroundHost(gateway, wait=WAIT, user=USERNAME, worker=0)
    try:
        reply = approve_live_prompt(browser, wait, host)
    finally:
        host.close()
    assert_tool_result(reply)
