"""Consent for an upstream's sampling request, for real: held until the user approves in Chromium.

A real gateway (one daphne worker, FEDMCP_CONSENT_SAMPLING_DEFAULT=ask, tools allowed) with the
fixture server as peer `old` over legacy HTTP+SSE (handshake era only, so the upstream sends
sampling/createMessage mid-call). A host (plain HTTP client in a thread, declaring `sampling`
and `elicitation.url`) calls `old__test_sampling` and records every message on the call's
stream. Headless Chromium, signed in as alice, sits on /consent.

* approve: the prompt appears live and shows the message the upstream wants sent (escaped,
  long text folded behind "Show all"); until the user presses "Approve once" the host has
  received only the gateway's pointer to the page, never the sampling request; afterwards it
  gets it, answers, and the tool completes. Screenshot: build/screenshots/consent-sampling.png.
* deny: the host never sees the request, the tool fails, and the audit log says "denied".
"""

from __future__ import annotations

import json
import secrets
import threading
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

WAIT = 30.0
"""Upper bound for each wait (page, prompt, MCP call); a healthy run needs a fraction of it."""
USERNAME = "alice"
PEER = "old"
TOOL = f"{PEER}__test_sampling"
LONG = "Please summarise the following carefully. " * 20
HOSTILE = '<img src=x onerror="document.body.dataset.pwned=1"> What is the capital of France?'
SAMPLED = {"role": "assistant", "content": {"type": "text", "text": "Paris"}, "model": "e2e-model", "stopReason": "endTurn"}


@pytest.fixture(scope="module")
def sampling_gateway(handshake_only_url: str) -> Iterator[tuple[harness.Gateway, str]]:
    password = secrets.token_urlsafe(16)
    env = {
        "FEDMCP_CONSENT_DEFAULT": "allow",
        "FEDMCP_CONSENT_SAMPLING_DEFAULT": "ask",
        "FEDMCP_CONSENT_TIMEOUT": str(WAIT * 2),
        "FEDMCP_CONSENT_POLL_INTERVAL": "1",
    }
    with harness.Gateway(name="consent-sampling", env=env) as gateway:
        gateway.migrate()
        gateway.create_users({USERNAME: password})
        gateway.command("peer", "add", PEER, "--url", handshake_only_url, "--transport", "sse", "--call-timeout", str(WAIT * 3))
        gateway.auth_headers(USERNAME)
        gateway.start_worker()
        yield gateway, password


class StreamingHost(BackgroundHost):
    """A handshake-era host that reads its tools/call stream and answers sampling requests."""

    client_name = "sampling-e2e-host"

    def __init__(self, gateway: harness.Gateway) -> None:
        super().__init__(gateway, wait=WAIT, user=USERNAME)
        self.received: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def initialize(self, capabilities: dict[str, Any] | None = None) -> None:
        super().initialize(capabilities or {"sampling": {}, "elicitation": {"url": {}}})

    def methods(self) -> list[str]:
        with self.lock:
            return [m["method"] for m in self.received if "method" in m]

    def call_tool_in_background(self, prompt: str) -> None:
        self.call_in_background({"name": TOOL, "arguments": {"prompt": prompt}})

    def exchange(self, message: dict[str, Any]) -> dict[str, Any]:
        """Read the call's stream, answering sampling requests, until its response comes."""
        with self.client.stream("POST", self.url, json=message, headers=self.headers) as response:
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                return json.loads(response.read())
            for line in response.iter_lines():
                if not line.startswith("data:") or not line[5:].strip():
                    continue
                received = json.loads(line[5:])
                with self.lock:
                    self.received.append(received)
                if received.get("method") == "sampling/createMessage":
                    answer = {"jsonrpc": "2.0", "id": received["id"], "result": SAMPLED}
                    assert self.post(answer).status_code == 202
                elif "method" not in received:
                    return received
        raise AssertionError("the call's stream ended without a response")


def audit_decisions(gateway: harness.Gateway) -> list[tuple[str, str, str, str]]:
    script = (
        "from identity.models import AuditEvent; import json; "
        "print(json.dumps(list(AuditEvent.objects.filter(method='sampling/createMessage').order_by('at')"
        ".values_list('name', 'decision', 'outcome', 'username'))))"
    )
    output = gateway.python(script).splitlines()[-1]
    return [tuple(row) for row in json.loads(output)]


def wait_for_decision(gateway: harness.Gateway, row: tuple[str, str, str, str]) -> None:
    """The audit trail is written just after the answer: wait for `row` to be in it."""
    harness.wait_until(lambda: row in audit_decisions(gateway), what=f"the audit row {row}")


def open_consent_page(browser: webdriver.Chrome, url: str, password: str) -> WebDriverWait:
    """Open /consent (signing in the first time) and wait until its live feed is connected."""
    if not browser.get_cookie("sessionid"):
        return sign_in_on_consent_page(browser, url, password)
    wait = WebDriverWait(browser, WAIT)
    browser.get(url)
    wait.until(lambda d: d.execute_script("return document.body.dataset.consentLive === '1'"))
    browser.execute_script("window.__notReloaded = true;")
    return wait


def wait_for_prompt(browser: webdriver.Chrome, wait: Any) -> Any:
    return wait.until(expected_conditions.visibility_of_element_located((By.CSS_SELECTOR, "#prompts .prompt[data-kind=sampling]")))


def test_sampling_is_held_until_approved_and_the_page_shows_the_messages(
    sampling_gateway: tuple[harness.Gateway, str], browser: webdriver.Chrome
) -> None:
    gateway, password = sampling_gateway
    wait = open_consent_page(browser, gateway.url("/consent"), password)
    host = StreamingHost(gateway)
    try:
        host.initialize()
        host.call_tool_in_background(HOSTILE + "\n" + LONG)
        prompt = wait_for_prompt(browser, wait)
        assert browser.execute_script("return window.__notReloaded === true"), "the page was reloaded"

        heading = prompt.find_element(By.TAG_NAME, "h2").text
        assert "Sampling request from" in heading and PEER in heading and "test_sampling" in heading
        message = prompt.find_element(By.CSS_SELECTOR, ".request-messages .message")
        assert message.find_element(By.CSS_SELECTOR, ".role").text.lower() == "user"
        preview = message.find_element(By.CSS_SELECTOR, "pre.text").text
        assert preview.startswith(HOSTILE[:60])  # the markup is shown as text...
        assert not prompt.find_elements(By.TAG_NAME, "img")  # ...never rendered
        assert browser.execute_script("return document.body.dataset.pwned === undefined")
        assert prompt.find_element(By.CSS_SELECTOR, ".request-max-tokens").text == "100"
        full = message.find_element(By.CSS_SELECTOR, "details pre.full")
        assert not full.is_displayed()  # the long text is folded...
        screenshot(browser, "consent-sampling.png")
        message.find_element(By.CSS_SELECTOR, "details summary").click()
        wait.until(lambda _: full.is_displayed())  # ...and expands, in place of the preview
        assert LONG.strip()[-40:] in full.text
        assert not message.find_element(By.CSS_SELECTOR, "pre.preview").is_displayed()
        screenshot(browser, "consent-sampling-expanded.png")

        # Held: so far the host has only been pointed at the consent page.
        wait.until(lambda _: "elicitation/create" in host.methods())
        assert "sampling/createMessage" not in host.methods()

        prompt.find_element(By.CSS_SELECTOR, "button[value=approve]").click()
        wait.until(expected_conditions.presence_of_element_located((By.ID, "consent-messages")))
        reply = host.wait()
    finally:
        host.close()
    assert host.methods() == ["elicitation/create", "sampling/createMessage"]
    sampled = [m for m in host.received if m.get("method") == "sampling/createMessage"][0]
    assert sampled["params"]["messages"][0]["content"]["text"] == HOSTILE + "\n" + LONG
    assert reply["result"]["content"][0]["text"] == "LLM response: Paris"
    wait_for_decision(gateway, ("test_sampling", "approved", "ok", USERNAME))


def test_denied_sampling_never_reaches_the_host(sampling_gateway: tuple[harness.Gateway, str], browser: webdriver.Chrome) -> None:
    gateway, password = sampling_gateway
    wait = open_consent_page(browser, gateway.url("/consent"), password)
    host = StreamingHost(gateway)
    try:
        host.initialize()
        host.call_tool_in_background("Tell me a secret")
        prompt = wait_for_prompt(browser, wait)
        assert "Tell me a secret" in prompt.text
        prompt.find_element(By.CSS_SELECTOR, "button[value=deny]").click()
        wait.until(expected_conditions.presence_of_element_located((By.ID, "consent-messages")))
        reply = host.wait()
    finally:
        host.close()
    assert "sampling/createMessage" not in host.methods()
    assert "error" in reply or reply["result"].get("isError") is True, reply
    wait_for_decision(gateway, ("test_sampling", "denied", "error", USERNAME))
