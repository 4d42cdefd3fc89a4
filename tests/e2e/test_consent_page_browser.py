"""The consent page as its user sees it, in headless Chromium (issue 18, item 5).

* A call whose argument is a 2,000-character URL: the page (as pushed live, and as served after
  a reload) is never wider than the screen, at 1366 px and at 390 px (a phone, emulated with
  `Emulation.setDeviceMetricsOverride`), nor is the remembered approval's page; screenshots go
  to build/screenshots/.
* A prompt nobody answers leaves the live page when it expires, without a reload, even when no
  worker is left waiting on it (a 2026-07-28 host is sent to the page and the call returns).
* The authorised-applications page: revoking an application signs its tokens out, so the host's
  next request to /mcp is refused with 401.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from identity.hostauth.tokens import OPERATOR_APPLICATION
from tests.e2e import harness
from tests.e2e.browser import screenshot, sign_in_on_consent_page
from tests.e2e.hosts import BackgroundHost
from tests.e2e.test_consent_binding import SHOWS_URLS
from tests.e2e.test_federation import modern_call

pytestmark = pytest.mark.e2e

WAIT = 30.0
"""Upper bound for each wait (page, prompt, MCP call); a healthy run needs a fraction of it."""
USERNAME = "alice"
ECHO = "web__slow_echo"
LONG_URL = "https://docs.example.org/search?q=" + "federated-model-context-protocol-gateway" * 50
SCREENS = {"desktop": (1366, 900), "phone": (390, 844)}


def show_at(browser: webdriver.Chrome, width: int, height: int) -> None:
    """Make the page's viewport `width` x `height` CSS pixels (a phone's at 390)."""
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600}
    )


def overflow(browser: webdriver.Chrome) -> tuple[int, int, int]:
    """Return the document's width, the viewport's (less any scroll bar) and the window's, in CSS pixels."""
    widths = browser.execute_script(
        "var root = document.documentElement;"
        "return [Math.max(root.scrollWidth, document.body.scrollWidth), root.clientWidth, window.innerWidth];"
    )
    return int(widths[0]), int(widths[1]), int(widths[2])


def assert_fits(browser: webdriver.Chrome, name: str) -> None:
    """At each screen size: a screenshot, and the document is no wider than the viewport."""
    for screen, (width, height) in SCREENS.items():
        show_at(browser, width, height)
        screenshot(browser, f"{name}-{screen}.png")
        document, viewport, window = overflow(browser)
        assert window == width, f"the window is {window} px wide, not {width}"
        assert document <= viewport, f"{name} at {width} px: the page is {document} px wide, wider than the {viewport} px screen"
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


@pytest.fixture(scope="module")
def consent_gateway(web_upstream_url: str) -> Iterator[tuple[harness.Gateway, str]]:
    """A gateway that asks before every tool call, with user alice and the fixture as peer `web`."""
    password = secrets.token_urlsafe(16)
    # The host shows no URLs; FEDMCP_CONSENT_HOLD=all has its call wait for the page's answer.
    env = {"FEDMCP_CONSENT_DEFAULT": "ask", "FEDMCP_CONSENT_HOLD": "all", "FEDMCP_CONSENT_TIMEOUT": str(WAIT * 3), "FEDMCP_CONSENT_POLL_INTERVAL": "1"}
    with harness.Gateway(name="consent-page", env=env) as gateway:
        gateway.migrate()
        gateway.create_users({USERNAME: password})
        gateway.manage("peer", "add", "web", "--url", web_upstream_url)
        gateway.auth_headers(USERNAME)
        gateway.start_worker()
        yield gateway, password


def test_a_long_url_argument_never_makes_the_page_wider_than_the_screen(
    consent_gateway: tuple[harness.Gateway, str], browser: webdriver.Chrome
) -> None:
    gateway, password = consent_gateway
    wait = sign_in_on_consent_page(browser, gateway.url("/consent"), password)
    host = BackgroundHost(gateway, wait=WAIT, user=USERNAME)
    try:
        host.initialize()
        host.call_in_background({"name": ECHO, "arguments": {"text": LONG_URL, "delay_ms": 0}})
        prompt = wait.until(expected_conditions.visibility_of_element_located((By.CSS_SELECTOR, "#prompts .prompt")))
        assert LONG_URL[:60] in prompt.text
        assert_fits(browser, "consent-live")
        # What the tool does, from the catalog, and how long the call waits.
        assert "then return" in prompt.text, prompt.text
        assert prompt.find_element(By.CSS_SELECTOR, "[data-countdown]").text.strip()

        browser.refresh()
        prompt = wait.until(expected_conditions.visibility_of_element_located((By.CSS_SELECTOR, "#prompts .prompt")))
        assert_fits(browser, "consent")

        prompt.find_element(By.CSS_SELECTOR, "button[value=remember]").click()
        wait.until(expected_conditions.presence_of_element_located((By.ID, "consent-messages")))
        reply = host.wait()
    finally:
        host.close()
    assert reply["result"]["content"][0]["text"] == LONG_URL, reply

    # The approval it remembers, named by application, readable on a phone too.
    browser.find_element(By.CSS_SELECTOR, "nav a[href='/consent/grants']").click()
    row = wait.until(expected_conditions.visibility_of_element_located((By.CSS_SELECTOR, "#grants tbody tr")))
    assert OPERATOR_APPLICATION in row.find_element(By.CSS_SELECTOR, ".application").text
    assert_fits(browser, "consent-grants")


@pytest.fixture(scope="module")
def expiring_gateway(web_upstream_url: str) -> Iterator[tuple[harness.Gateway, str]]:
    """A gateway whose prompts expire after a few seconds."""
    password = secrets.token_urlsafe(16)
    env = {"FEDMCP_CONSENT_DEFAULT": "ask", "FEDMCP_CONSENT_TIMEOUT": "6", "FEDMCP_CONSENT_POLL_INTERVAL": "1"}
    with harness.Gateway(name="consent-expiry", env=env) as gateway:
        gateway.migrate()
        gateway.create_users({USERNAME: password})
        gateway.manage("peer", "add", "web", "--url", web_upstream_url)
        gateway.auth_headers(USERNAME)
        gateway.start_worker()
        yield gateway, password


def test_an_expired_prompt_leaves_the_live_page(expiring_gateway: tuple[harness.Gateway, str], browser: webdriver.Chrome) -> None:
    """A 2026-07-28 host that shows URLs is sent to the page and its call returns: no worker waits to say the prompt expired."""
    gateway, password = expiring_gateway
    wait = sign_in_on_consent_page(browser, gateway.url("/consent"), password)
    params = {"name": "web__add", "arguments": {"a": 1, "b": 2}}
    reply = modern_call(gateway, "tools/call", params, name="web__add", headers=gateway.auth_headers(USERNAME), timeout=WAIT, meta=SHOWS_URLS)
    assert reply["result"]["resultType"] == "input_required", reply
    wait.until(expected_conditions.visibility_of_element_located((By.CSS_SELECTOR, "#prompts .prompt")))

    WebDriverWait(browser, WAIT).until(expected_conditions.invisibility_of_element_located((By.CSS_SELECTOR, "#prompts .prompt")))
    assert browser.execute_script("return window.__notReloaded === true"), "the page was reloaded"
    assert browser.find_element(By.ID, "empty").is_displayed()


def test_revoking_an_application_signs_its_tokens_out(consent_gateway: tuple[harness.Gateway, str], browser: webdriver.Chrome) -> None:
    gateway, password = consent_gateway
    headers = {"Authorization": f"Bearer {gateway.token(USERNAME)}", "Accept": "application/json, text/event-stream"}
    params = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "revoked-host", "version": "0"}}
    ping = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": params}
    assert httpx.post(gateway.url("/mcp"), json=ping, headers=headers, timeout=WAIT).status_code == 200

    wait = sign_in_on_consent_page(browser, gateway.url("/consent"), password)
    browser.find_element(By.CSS_SELECTOR, "a[href='/consent/applications']").click()
    row = wait.until(expected_conditions.visibility_of_element_located((By.CSS_SELECTOR, "#applications tbody tr")))
    assert OPERATOR_APPLICATION in row.text, row.text
    assert_fits(browser, "consent-applications")
    row.find_element(By.CSS_SELECTOR, "button.danger").click()
    wait.until(expected_conditions.presence_of_element_located((By.ID, "consent-messages")))
    assert not browser.find_elements(By.CSS_SELECTOR, "#applications tbody tr")

    refused = httpx.post(gateway.url("/mcp"), json=ping, headers=headers, timeout=WAIT)
    assert refused.status_code == 401, refused.text
