"""Headless Chromium for the end-to-end tests, and the steps the browser tests share.

Debian's `chromium`, driven by its own `chromedriver` (`make tools` installs both). `chromium()`
starts one; the `browser` fixture (tests/e2e/conftest.py) gives each test module its own, so
no cookies or open pages leak from one module's gateways to another's. Screenshots go to
build/screenshots/.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from tests.e2e.harness import DEFAULT_USER, ROOT

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOTS = ROOT / "build" / "screenshots"
WAIT = 30.0
"""Upper bound for each wait on a page; a healthy run needs a fraction of it."""


@contextlib.contextmanager
def chromium(*, window_size: tuple[int, int] = (1000, 1100)) -> Iterator[webdriver.Chrome]:
    """Start headless Chromium with a window of `window_size` pixels; quit it afterwards.

    Fails the test if chromium or chromedriver is not installed.
    """
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail("chromium and chromedriver are needed: run `make tools` (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    width, height = window_size
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: webdriver.Chrome, name: str) -> Path:
    """Save what the browser shows as build/screenshots/`name`; return the path."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    assert driver.save_screenshot(str(path)), f"could not save {path}"
    return path


def submit_login_form(driver: webdriver.Chrome, username: str, password: str) -> None:
    """Fill in and submit the gateway's sign-in form (#login-form) on the page shown."""
    driver.find_element(By.ID, "id_username").send_keys(username)
    driver.find_element(By.ID, "id_password").send_keys(password)
    driver.find_element(By.ID, "sign-in").click()


def sign_in_on_consent_page(driver: webdriver.Chrome, url: str, password: str, username: str = DEFAULT_USER) -> WebDriverWait:
    """Open /consent at `url`, sign in, and wait until the live feed is connected.

    Marks the page (`window.__notReloaded`), so a test can tell that a prompt arrived without a
    reload; asserts that no prompt is showing yet.
    """
    wait = WebDriverWait(driver, WAIT)
    driver.get(url)
    wait.until(expected_conditions.presence_of_element_located((By.ID, "login-form")))
    submit_login_form(driver, username, password)
    wait.until(expected_conditions.presence_of_element_located((By.ID, "prompts")))
    wait.until(lambda d: d.execute_script("return document.body.dataset.consentLive === '1'"))
    driver.execute_script("window.__notReloaded = true;")
    assert not driver.find_elements(By.CSS_SELECTOR, "#prompts .prompt")
    return wait
