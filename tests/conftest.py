"""Fixtures shared by every test folder. Helpers and test case classes live in tests/base.py."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
from channels.db import DatabaseSyncToAsync

from tests.e2e.harness import fixture_server


@pytest.fixture(scope="session")
def everything_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Run the fixture MCP server on loopback once per session; yield its /mcp URL."""
    with fixture_server("everything", log_dir=tmp_path_factory.mktemp("fixture-everything")) as url:
        yield url


@pytest.fixture(scope="session")
def handshake_only_url() -> Iterator[str]:
    """Run the fixture server over legacy HTTP+SSE (handshake era only) once per session; yield its GET /sse URL."""
    import subprocess

    from tests.e2e import harness

    port = harness.free_port()
    command = [*harness.fixture_command(port=port), "--transport", "sse"]
    process = subprocess.Popen(command, cwd=harness.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # Not /sse itself: that answers with a stream that never ends.
        harness.wait_http(f"http://127.0.0.1:{port}/", process=process)
        yield f"http://127.0.0.1:{port}/sse"
    finally:
        harness.stop(process)


@pytest.fixture(scope="class")
def handshake_only_on_class(request: pytest.FixtureRequest, handshake_only_url: str) -> None:
    """Give a test case class the handshake-era-only fixture server's URL as `handshake_only_url`."""
    request.cls.handshake_only_url = handshake_only_url


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
    (fedmcp_lib/caching.py) would otherwise look current to the next one.
    """
    from fedmcp_lib import caching
    from identity import audit

    caching.clear_all()
    audit.audit_reset()
    yield
    caching.clear_all()


@pytest.fixture(autouse=True)
def no_connection_closed_inside_a_transaction() -> Iterator[None]:
    """Fail a test during which a database connection was closed inside an atomic block.

    `database_sync_to_async` runs `close_old_connections()` around its call, on the caller's
    thread in tests. Inside a transaction (autocommit off) that closes the connection, and
    PostgreSQL then fails every later query with "the connection is closed", both in production
    (code run inside `transaction.atomic`) and in a `TestCase`, whose whole test is one
    transaction. SQLite ignores closing its in-memory test database, so without this check the
    suite would pass on SQLite and fail on PostgreSQL. The fix is a `TransactionTestCase` for the
    test, or, in the code, calling it after the commit (`transaction.on_commit`).
    """
    from django.db import connections

    closed_inside: list[str] = []
    patches = []
    for wrapper_class in {type(connection) for connection in connections.all()}:
        original = wrapper_class.close

        def close(connection: Any, original: Any = original) -> None:
            if connection.in_atomic_block:
                closed_inside.append(_closer())
            original(connection)

        patches.append(mock.patch.object(wrapper_class, "close", close))
    for patch in patches:
        patch.start()
    try:
        yield
    finally:
        for patch in patches:
            patch.stop()
    if closed_inside:
        pytest.fail(
            "the database connection was closed inside a transaction (the TestCase's, or the code's"
            f" own), by {closed_inside[0]}; on PostgreSQL every later query in it fails with"
            " 'the connection is closed'. Use a TransactionTestCase, or run that code after the commit.",
            pytrace=False,
        )


def _closer() -> str:
    """Name what closes the connection: the function database_sync_to_async runs, else our frames."""
    ours = []
    frame = inspect.currentframe()
    frame = frame.f_back.f_back if frame and frame.f_back else None  # past this and the close wrapper
    while frame is not None:
        runner = frame.f_locals.get("self")
        if frame.f_code.co_name == "thread_handler" and isinstance(runner, DatabaseSyncToAsync):
            func = runner.func
            return f"database_sync_to_async({getattr(func, '__module__', '')}.{getattr(func, '__qualname__', repr(func))})"
        if not any(part in frame.f_code.co_filename for part in ("site-packages", "/lib/python")):
            ours.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        frame = frame.f_back
    return "close() called from " + (" < ".join(ours[:6]) or "an unknown place")
