"""Distributed consent in a real browser: B's question shows up live on A's /consent, alice approves there.

Two gateways (real daphne processes, own databases and keys): B owns the fixture as peer `tools`
and asks before `add`; B trusts A; A registers B. Headless Chromium, signed in as alice on A,
sits on A's /consent. A host on A calls `b.tools__add` and waits; the prompt must appear
WITHOUT a reload, naming the owner gateway `b` and the path a → b; alice presses "Approve
once"; the call completes on B, and B's audit has the approval for alice@A. Screenshots go to
build/screenshots/distributed-consent-*.png.

Replayed, forged and misdirected decisions are refused in tests/e2e/test_distributed_consent.py.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions

from tests.e2e.harness import Gateway, fixture_server
from tests.e2e.test_consent_browser import SCREENSHOTS, browser, sign_in_on_consent_page  # noqa: F401 - module-scoped fixture
from tests.e2e.test_distributed_consent import (
    ADD_AT_B,
    CONSENT_ENV,
    USERNAME,
    Host,
    ask_policy,
    text_of,
    wait_for_audit,
)
from tests.e2e.test_federation import own_keys, register, trust

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pair() -> Iterator[dict[str, Any]]:
    """A -> B, B with the fixture as `tools` (asks before `add`); alice with a password on A."""
    password = secrets.token_urlsafe(16)
    with fixture_server(name="fixture") as fixture_url:
        gateways = {name: Gateway(name=name, env={**own_keys(), **CONSENT_ENV}) for name in ("b", "a")}
        try:
            for gateway in gateways.values():
                gateway.migrate()
            b, a = gateways["b"], gateways["a"]
            a.manage("shell", "-c", f"from django.contrib.auth import get_user_model; get_user_model().objects.create_user({USERNAME!r}, password={password!r})")
            a.auth_headers(USERNAME)
            b.manage("peer", "add", "tools", "--url", fixture_url)
            ask_policy(b, "tools")
            b.start_worker()
            register(a, b, "b", trust(b, a, "a"))
            a.start_worker()
            yield {**gateways, "password": password}
        except BaseException:
            for gateway in gateways.values():
                print(gateway.logs())
            raise
        finally:
            for gateway in gateways.values():
                gateway.cleanup()


def test_bs_question_appears_live_on_as_page_and_the_approval_completes_the_call_on_b(
    pair: dict[str, Any], browser: webdriver.Chrome  # noqa: F811
) -> None:
    a, b = pair["a"], pair["b"]
    wait = sign_in_on_consent_page(browser, a.url("/consent"), pair["password"])
    host = Host(a)
    try:
        host.call_in_background(ADD_AT_B)
        prompt = wait.until(expected_conditions.visibility_of_element_located((By.CSS_SELECTOR, "#prompts .prompt")))
        assert browser.execute_script("return window.__notReloaded === true"), "the page was reloaded"
        assert "add" in prompt.text and "tools" in prompt.text
        assert prompt.find_element(By.CSS_SELECTOR, "[data-f=owner]").text == "gateway b, which owns this tool"
        assert prompt.find_element(By.CSS_SELECTOR, ".via").text == "a → b"
        assert '"b": "[redacted]"' in prompt.find_element(By.CSS_SELECTOR, "pre").text
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(SCREENSHOTS / "distributed-consent-pending.png"))

        prompt.find_element(By.CSS_SELECTOR, "button[value=approve]").click()
        wait.until(expected_conditions.presence_of_element_located((By.ID, "consent-messages")))
        browser.save_screenshot(str(SCREENSHOTS / "distributed-consent-approved.png"))
        reply = host.wait()
    finally:
        host.close()

    assert text_of(reply) == "42"
    (event,) = wait_for_audit(b, {"peer": "tools", "name": "add", "outcome": "ok"})
    assert (event["federated_subject"], event["federated_issuer"], event["decision"]) == ("alice", a.public_url, "approved")
