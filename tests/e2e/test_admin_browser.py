"""An operator runs the gateway from the admin in a real browser; a real host sees the effect.

One daphne worker, the fixture server as an upstream, headless Chromium as the operator: sign
in, add the fixture as peer `web` (the connection test lists its tools), disable one tool from
the catalog list. A handshake-era host connected over Streamable HTTP gets
`notifications/tools/list_changed` on its GET stream and no longer lists the tool. The
dashboard then shows the calls the host made, with its charts drawn (screenshot in
build/screenshots/dashboard.png).
"""

from __future__ import annotations

import json
import queue
import secrets
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.e2e import harness
from tests.e2e.browser import chromium, screenshot

pytestmark = [pytest.mark.e2e]

WAIT = 30.0
"""Upper bound for each wait (page, stream event); a healthy run needs a fraction of it."""
ADMIN = "operator"
TOOL = "web__add"


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    """Headless Chromium sized like a laptop."""
    with chromium(window_size=(1280, 900)) as driver:
        yield driver


class Host:
    """A handshake-era MCP host on /mcp: one session, its GET stream read by a thread."""

    def __init__(self, gateway: harness.Gateway) -> None:
        self.url = gateway.url("/mcp")
        self.headers = {**gateway.auth_headers(), "Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.http = httpx.Client(timeout=httpx.Timeout(WAIT))
        self._ids = 0
        self._stop = threading.Event()

    def post(self, message: dict[str, Any]) -> dict[str, Any] | None:
        reply = self.http.post(self.url, json=message, headers=self.headers)
        assert reply.status_code in (200, 202), reply.text
        if reply.status_code == 202:
            return None
        if reply.headers["content-type"].startswith("text/event-stream"):
            lines = [json.loads(line[5:]) for line in reply.text.splitlines() if line.startswith("data:") and line[5:].strip()]
            return next(m for m in lines if m.get("id") == message.get("id"))
        return reply.json()

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        self._ids += 1
        reply = self.post({"jsonrpc": "2.0", "id": self._ids, "method": method, "params": params or {}})
        assert reply is not None
        return reply

    def connect(self) -> None:
        self._ids += 1
        params = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "admin-e2e", "version": "0"}}
        reply = self.http.post(self.url, json={"jsonrpc": "2.0", "id": self._ids, "method": "initialize", "params": params}, headers=self.headers)
        assert reply.status_code == 200, reply.text
        self.headers["Mcp-Session-Id"] = reply.headers["mcp-session-id"]
        self.headers["MCP-Protocol-Version"] = "2025-11-25"
        self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        opened = threading.Event()
        threading.Thread(target=self._listen, args=(opened,), daemon=True).start()
        assert opened.wait(WAIT), "the GET stream did not open"

    def _listen(self, opened: threading.Event) -> None:
        headers = {**self.headers, "Accept": "text/event-stream"}
        try:
            with self.http.stream("GET", self.url, headers=headers, timeout=httpx.Timeout(WAIT, read=None)) as stream:
                opened.set()
                for line in stream.iter_lines():
                    if self._stop.is_set():
                        return
                    if line.startswith("data:"):
                        self.events.put(json.loads(line[5:]))
        except (httpx.HTTPError, RuntimeError):
            if not self._stop.is_set():
                raise  # the stream broke while the test still needed it

    def tool_names(self) -> set[str]:
        return {tool["name"] for tool in self.call("tools/list")["result"]["tools"]}

    def wait_for(self, method: str) -> dict[str, Any]:
        while True:
            event = self.events.get(timeout=WAIT)
            if event.get("method") == method:
                return event

    def close(self) -> None:
        self._stop.set()
        self.http.close()


@pytest.fixture(scope="module")
def admin_gateway() -> Iterator[tuple[harness.Gateway, str, str]]:
    """A gateway with a superuser and the fixture server running (not yet a peer)."""
    password = secrets.token_urlsafe(16)
    with harness.fixture_server("admin-e2e") as upstream_url, harness.Gateway(name="admin") as gateway:
        gateway.migrate()
        gateway.create_users({ADMIN: password}, superuser=True)
        gateway.start_worker()
        yield gateway, password, upstream_url


def wait(driver: webdriver.Chrome) -> WebDriverWait:
    return WebDriverWait(driver, WAIT)


def page_problems(driver: webdriver.Chrome) -> str:
    """What the admin page says went wrong (form errors, messages), for assertion messages."""
    found = driver.find_elements(By.CSS_SELECTOR, ".errornote, .errorlist, .messagelist li")
    return f"{driver.current_url}: " + " | ".join(e.text for e in found)


def test_an_operator_adds_a_peer_disables_a_tool_and_watches_the_dashboard(
    admin_gateway: tuple[harness.Gateway, str, str], browser: webdriver.Chrome
) -> None:
    gateway, password, upstream_url = admin_gateway
    base = gateway.url("")

    # Sign in.
    browser.get(f"{base}/admin/login/?next=/admin/")
    browser.find_element(By.NAME, "username").send_keys(ADMIN)
    browser.find_element(By.NAME, "password").send_keys(password)
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    wait(browser).until(expected_conditions.presence_of_element_located((By.ID, "fedmcp-dashboard-link")))

    # Add the fixture server as peer `web`: the connection test reports what it found.
    browser.get(f"{base}/admin/federation/peer/add/")
    browser.find_element(By.NAME, "name").send_keys("web")
    Select(browser.find_element(By.NAME, "transport")).select_by_value("streamable-http")
    browser.find_element(By.NAME, "url").send_keys(upstream_url)
    browser.find_element(By.NAME, "_save").click()
    success = wait(browser).until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".messagelist .success, .errornote, .messagelist .error"))
    )
    assert "success" in success.get_attribute("class"), page_problems(browser)
    assert not browser.find_elements(By.CSS_SELECTOR, ".messagelist .error")

    # Its tools appear in the catalog.
    browser.get(f"{base}/admin/federation/catalogentry/?q={TOOL}")
    row = wait(browser).until(expected_conditions.presence_of_element_located((By.XPATH, f"//tr[.//*[text()='{TOOL}']]")))

    host = Host(gateway)
    try:
        host.connect()
        assert TOOL in host.tool_names()
        for a in range(3):
            result = host.call("tools/call", {"name": TOOL, "arguments": {"a": a, "b": 1}})
            assert "result" in result, result

        # Disable it with the list action.
        row.find_element(By.CSS_SELECTOR, "input.action-select").click()
        Select(browser.find_element(By.NAME, "action")).select_by_value("disable_entries")
        browser.find_element(By.CSS_SELECTOR, "button[name=index]").click()
        wait(browser).until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".messagelist .success")))

        assert host.wait_for("notifications/tools/list_changed")
        assert TOOL not in host.tool_names()
    finally:
        host.close()

    # The dashboard shows the host's calls, with the chart drawn.
    browser.get(f"{base}/admin/dashboard/")
    card = wait(browser).until(lambda d: d.find_element(By.CSS_SELECTOR, "#dash-peers[data-updated] section[data-peer='web']"))
    wait(browser).until(lambda d: "3 calls" in d.find_element(By.CSS_SELECTOR, "section[data-peer='web']").text)
    card = browser.find_element(By.CSS_SELECTOR, "section[data-peer='web']")
    assert card.find_elements(By.CSS_SELECTOR, "svg.dash-chart polyline.calls")
    assert card.find_element(By.CSS_SELECTOR, "svg.dash-chart").size["width"] > 100
    screenshot(browser, "dashboard.png")

    # Readable on a phone too: the cards stack and stay inside the viewport.
    browser.set_window_size(390, 844)
    card = browser.find_element(By.CSS_SELECTOR, "section[data-peer='web']")
    assert card.size["width"] <= browser.execute_script("return document.documentElement.clientWidth")
    screenshot(browser, "dashboard-phone.png")
