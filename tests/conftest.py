"""Fixtures shared by every test folder. Helpers and test case classes live in tests/base.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.harness import fixture_server


@pytest.fixture(scope="session")
def everything_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Run the fixture MCP server on loopback once per session; yield its /mcp URL."""
    with fixture_server("everything", log_dir=tmp_path_factory.mktemp("fixture-everything")) as url:
        yield url


@pytest.fixture(scope="class")
def everything_on_class(request: pytest.FixtureRequest, everything_url: str) -> None:
    """Give a test case class the fixture server's URL as `everything_url`."""
    request.cls.everything_url = everything_url


@pytest.fixture(autouse=True)
def consent_allows_by_default() -> Iterator[None]:
    """Let tool calls and upstream sampling/elicitation through unasked unless a test is about consent.

    The shipped defaults (FEDMCP_CONSENT_DEFAULT=ask-new-peers, FEDMCP_CONSENT_SAMPLING_DEFAULT
    and FEDMCP_CONSENT_ELICITATION_DEFAULT=ask) would make calls wait for a user. Consent
    tests override them in `setUp`, which runs later.
    """
    from django.test import override_settings

    allow = {"FEDMCP_CONSENT_DEFAULT": "allow", "FEDMCP_CONSENT_SAMPLING_DEFAULT": "allow", "FEDMCP_CONSENT_ELICITATION_DEFAULT": "allow"}
    with override_settings(**allow):
        yield


@pytest.fixture(autouse=True)
def fresh_worker_caches() -> Iterator[None]:
    """Start every test with empty per-worker caches and audit queue.

    A rolled-back test transaction sends no signals, so what an earlier test cached
    (fedmcp_site/caching.py) would otherwise look current to the next one.
    """
    from fedmcp_site import caching
    from identity import audit

    caching.clear_all()
    audit.audit_reset()
    yield
    caching.clear_all()
