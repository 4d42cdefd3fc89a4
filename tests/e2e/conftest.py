"""Shared fixtures for the end-to-end tests: one real gateway with two real upstream peers.

The `gateway` fixture is session-scoped: a single daphne worker on loopback, its own temp dir
and SQLite database, and two peers running the fixture server (tests/fixtures/README.md):

* `web`: the fixture over Streamable HTTP (its own process, a free loopback port);
* `local`: the fixture over stdio, spawned and supervised by the gateway itself.

So on the aggregated endpoints (`/mcp`, `/sse`, `/ws`) every fixture tool exists twice, as
`web__<tool>` and `local__<tool>`, resources as `fedmcp://web/<uri>` and `fedmcp://local/<uri>`,
and `whoami` tells the two apart. The per-peer endpoints are `/peers/web/...` and
`/peers/local/...`, with the upstream's own names.

Tests must not change what this shared gateway serves (add or remove peers, restart the
worker). A test that needs another topology (several workers, Redis, PostgreSQL, other
peers) builds its own `harness.Gateway`, and may reuse `register_fixture_peers()`.

Every test under tests/e2e is marked `e2e` here, so `-m "not e2e"` skips them all.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from selenium import webdriver

from tests.e2e import harness
from tests.e2e.browser import chromium

WEB_PEER = "web"
"""The fixture served over Streamable HTTP; `whoami` answers "web"."""
LOCAL_PEER = "local"
"""The fixture run by the gateway over stdio; `whoami` answers "local"."""
PEERS = (WEB_PEER, LOCAL_PEER)


SLOWEST_FIRST = (
    "test_distributed_consent.py",
    "test_conformance.py",
    "test_faults.py",
    "test_nginx_workers.py",
    "test_fault_isolation.py",
    "test_sdk_client.py",
    "test_scale_out.py",
    "test_service_bootstrap.py",
    "test_tls_peers.py",
    "test_audit_on_drain.py",
    "test_consent_browser.py",
    "test_federation.py",
    "test_fault_recovery.py",
    "test_cache_invalidation.py",
    "test_upstream_oauth.py",
    "test_demo.py",
    "test_db_outage.py",
)
"""The test files that take longest, longest first: they start first, so `make test`'s pytest-xdist
workers (`--dist loadfile --no-loadscope-reorder`, a file at a time each) end at about the same
time. The other files follow in their usual order. Only the balance depends on this list."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.e2e)
    rank = {name: place for place, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)) if here in item.path.parents else len(rank))


def pytest_configure(config: pytest.Config) -> None:
    """In a pytest-xdist controller: name this run, so its workers share the migrated templates (harness.py)."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        os.environ[harness.SHARED_TEMPLATES] = secrets.token_hex(8)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """In the pytest-xdist controller, once every worker is done: remove the templates they shared."""
    if os.environ.get(harness.SHARED_TEMPLATES) and not hasattr(session.config, "workerinput"):
        harness.remove_shared_templates()
        del os.environ[harness.SHARED_TEMPLATES]


def stdio_fixture_command(name: str) -> str:
    """Return the `peer add --command` string that runs the fixture over stdio as `name`."""
    return shlex.join(harness.fixture_command(stdio=True, name=name))


def register_fixture_peers(gateway: harness.Gateway, *, web_url: str) -> None:
    """Register the `web` (Streamable HTTP at `web_url`) and `local` (stdio) fixture peers.

    Stdio children get only a short allow-list of the gateway's environment
    (federation/upstream/stdio.py INHERITED_ENV) and run in the gateway's working directory;
    PYTHONPATH makes `-m tests.fixtures.everything_server` importable whatever that is.
    """
    gateway.command("peer", "add", WEB_PEER, "--url", web_url)
    gateway.command(
        "peer",
        "add",
        LOCAL_PEER,
        "--command",
        stdio_fixture_command(LOCAL_PEER),
        "--env",
        f"PYTHONPATH={harness.ROOT}",
    )


@contextlib.asynccontextmanager
async def sdk_client(url: str, *, headers: dict[str, str], mode: str = "auto", **kwargs: Any) -> AsyncIterator[Client]:
    """Connect the official SDK client over Streamable HTTP, sending `headers` on every request.

    Pass `gateway.auth_headers()` for alice's token; `kwargs` go to `Client` (callbacks, ...).
    """
    # The SDK's own defaults (30 s; 300 s to read a stream), plus the headers.
    timeout = httpx2.Timeout(30.0, read=300.0)
    async with (
        httpx2.AsyncClient(headers=headers, timeout=timeout) as http,
        Client(streamable_http_client(url, http_client=http), mode=mode, **kwargs) as client,
    ):
        yield client


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Run `@pytest.mark.anyio` tests on asyncio only (daphne and the SDK are tested on it)."""
    return "asyncio"


@pytest.fixture(scope="session")
def web_upstream_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Return the /mcp URL of the fixture server behind the `web` peer."""
    with harness.fixture_server(name=WEB_PEER, log_dir=tmp_path_factory.mktemp("fixture-web")) as url:
        yield url


@pytest.fixture(scope="session")
def gateway(request: pytest.FixtureRequest, web_upstream_url: str) -> Iterator[harness.Gateway]:
    """Return a running gateway (one worker) with the `web` and `local` fixture peers.

    Use `gateway.url("/mcp")`, `gateway.url("/peers/web/mcp")`, `gateway.ws_url("/ws")`, and
    send `gateway.auth_headers()` (alice's bearer token) on every MCP request.
    The worker logs are written to stderr at the end of a session that had failures.
    """
    gw = harness.Gateway(name="e2e")
    try:
        gw.migrate()
        gw.auth_headers()  # mint alice's token now, not inside the first test's event loop
        register_fixture_peers(gw, web_url=web_upstream_url)
        gw.start_worker()
        yield gw
    finally:
        if request.session.testsfailed:
            sys.stderr.write(gw.logs())
        gw.cleanup()


@pytest.fixture(scope="session")
def gateway_origin(gateway: harness.Gateway) -> str:
    """Return the gateway's own origin (`http://127.0.0.1:<port>`), as a browser would send it."""
    return gateway.url("")


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    """Headless Chromium for this test module (tests/e2e/browser.py), 1000x1100."""
    with chromium() as driver:
        yield driver
