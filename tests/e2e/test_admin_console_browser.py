"""The admin as an operator's console, in headless Chromium against a real gateway worker.

The add-peer form shows only the chosen transport's fields; a good peer is added and its page
shows the catalog with each tool's input schema as a table; a broken stdio server is not added,
and the page shows its error and what it wrote to stderr, with no "added successfully" beside
it; the playground calls a tool through the gateway and shows the result and the time it took.
Screenshots: build/screenshots/admin-add-peer*.png, admin-peer-page.png, admin-peer-catalog.png,
admin-playground.png.
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterator

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import Select, WebDriverWait

from tests.e2e import harness
from tests.e2e.browser import chromium, screenshot

pytestmark = [pytest.mark.e2e]

WAIT = 30.0
ADMIN = "operator"


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    with chromium(window_size=(1280, 1000)) as driver:
        yield driver


@pytest.fixture(scope="module")
def console() -> Iterator[tuple[harness.Gateway, str]]:
    """A gateway with a signed-in-able superuser and the fixture server running (not yet a peer)."""
    password = secrets.token_urlsafe(16)
    with harness.fixture_server("console-e2e") as upstream_url, harness.Gateway(name="console") as gateway:
        gateway.migrate()
        gateway.create_users({ADMIN: password}, superuser=True)
        gateway.start_worker()
        gateway.upstream_url = upstream_url  # type: ignore[attr-defined]
        yield gateway, password


def wait(driver: webdriver.Chrome) -> WebDriverWait:
    return WebDriverWait(driver, WAIT)


def submit(driver: webdriver.Chrome, button: WebElement) -> None:
    """Press a button that loads a new page, and wait until the old page is gone: an element
    looked for next (a message list) may be on both pages."""
    page = driver.find_element(By.TAG_NAME, "html")
    button.click()
    wait(driver).until(expected_conditions.staleness_of(page))


def sign_in(driver: webdriver.Chrome, gateway: harness.Gateway, password: str) -> None:
    driver.get(gateway.url("/admin/login/?next=/admin/"))
    if driver.find_elements(By.NAME, "username"):
        driver.find_element(By.NAME, "username").send_keys(ADMIN)
        driver.find_element(By.NAME, "password").send_keys(password)
        driver.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    wait(driver).until(expected_conditions.presence_of_element_located((By.ID, "fedmcp-dashboard-link")))


def problems(driver: webdriver.Chrome) -> str:
    found = driver.find_elements(By.CSS_SELECTOR, ".errornote, .errorlist, .messagelist li")
    return f"{driver.current_url}: " + " | ".join(e.text for e in found)


def shown(driver: webdriver.Chrome, name: str) -> bool:
    return driver.find_element(By.NAME, name).is_displayed()


def test_a_good_peer_is_added_and_its_catalog_is_readable(console: tuple[harness.Gateway, str], browser: webdriver.Chrome) -> None:
    gateway, password = console
    sign_in(browser, gateway, password)
    assert "fedmcp" in browser.title and "Django administration" not in browser.page_source

    browser.get(gateway.url("/admin/federation/peer/add/"))
    transport = Select(browser.find_element(By.NAME, "transport"))
    transport.select_by_value("stdio")
    assert shown(browser, "command") and not shown(browser, "url")
    transport.select_by_value("streamable-http")
    assert shown(browser, "url") and not shown(browser, "command") and not shown(browser, "env")
    browser.find_element(By.NAME, "name").send_keys("web")
    browser.find_element(By.NAME, "url").send_keys(gateway.upstream_url)  # type: ignore[attr-defined]
    screenshot(browser, "admin-add-peer.png")
    submit(browser, browser.find_element(By.NAME, "_save"))

    wait(browser).until(expected_conditions.presence_of_element_located((By.ID, "peer-catalog")))
    assert "/change/" in browser.current_url, problems(browser)
    assert browser.find_elements(By.CSS_SELECTOR, ".messagelist .success"), problems(browser)
    assert not browser.find_elements(By.CSS_SELECTOR, ".messagelist .error, .errornote")
    add = browser.find_element(By.CSS_SELECTOR, "article.fedmcp-item[data-name='web__add']")
    assert add.find_elements(By.CSS_SELECTOR, "table.schema td code")
    browser.execute_script("arguments[0].scrollIntoView();", add)
    screenshot(browser, "admin-peer-catalog.png")

    submit(browser, browser.find_element(By.ID, "peer-test"))
    message = wait(browser).until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".messagelist li")))
    assert "reachable, answered in" in message.text, problems(browser)
    screenshot(browser, "admin-peer-page.png")


def test_a_broken_peer_is_not_added_and_the_page_says_why(console: tuple[harness.Gateway, str], browser: webdriver.Chrome) -> None:
    gateway, password = console
    sign_in(browser, gateway, password)

    browser.get(gateway.url("/admin/federation/peer/add/"))
    Select(browser.find_element(By.NAME, "transport")).select_by_value("streamable-http")
    browser.find_element(By.NAME, "name").send_keys("nourl")
    submit(browser, browser.find_element(By.NAME, "_save"))
    error = wait(browser).until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".field-url .errorlist")))
    assert "needs the URL" in error.text

    browser.get(gateway.url("/admin/federation/peer/add/"))
    Select(browser.find_element(By.NAME, "transport")).select_by_value("stdio")
    browser.find_element(By.NAME, "name").send_keys("broken")
    failing = f"{sys.executable} -c \"import sys; sys.stderr.write('npm error 404 Not Found - @nope/server'); sys.exit(1)\""
    browser.find_element(By.NAME, "command").send_keys(failing)
    submit(browser, browser.find_element(By.NAME, "_save"))

    note = wait(browser).until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".errornote")))
    assert "Could not reach 'broken'" in note.text and "was not added" in note.text
    assert "npm error 404" in browser.find_element(By.ID, "peer-diagnostics").text
    assert "added successfully" not in browser.page_source
    assert not browser.find_elements(By.CSS_SELECTOR, ".messagelist .success")
    screenshot(browser, "admin-add-peer-broken.png")

    browser.get(gateway.url("/admin/federation/peer/"))
    assert "broken" not in browser.find_element(By.ID, "result_list").text


def test_the_playground_calls_a_tool_through_the_gateway(console: tuple[harness.Gateway, str], browser: webdriver.Chrome) -> None:
    gateway, password = console  # the first test added peer `web`
    sign_in(browser, gateway, password)
    browser.get(gateway.url("/admin/playground/"))
    link = wait(browser).until(expected_conditions.presence_of_element_located((By.LINK_TEXT, "web__add")))
    link.click()

    wait(browser).until(expected_conditions.presence_of_element_located((By.NAME, "arg_a"))).send_keys("20")
    browser.find_element(By.NAME, "arg_b").send_keys("22")
    submit(browser, browser.find_element(By.ID, "playground-run"))

    result = wait(browser).until(expected_conditions.presence_of_element_located((By.ID, "playground-result")))
    assert result.get_attribute("data-outcome") == "ok", result.text
    assert "42" in result.text
    assert browser.find_element(By.ID, "playground-elapsed").text.endswith(" ms")
    screenshot(browser, "admin-playground.png")

    submit(browser, browser.find_element(By.LINK_TEXT, "See it in the audit log"))
    rows = wait(browser).until(expected_conditions.presence_of_element_located((By.ID, "result_list")))
    assert ADMIN in rows.text and "add" in rows.text
