"""A real daphne worker's access log never holds a token sent in the query string (issue 15, item 9)."""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.harness import Gateway

pytestmark = pytest.mark.e2e

SECRET = "qs-token-5e0d1c7a9b"


def test_a_token_in_the_query_string_is_refused_and_redacted_in_the_access_log() -> None:
    with Gateway(name="access-log") as gateway:
        gateway.migrate()
        gateway.start_worker()

        reply = httpx.get(gateway.url(f"/mcp?access_token={SECRET}"), timeout=30.0)
        posted = httpx.post(gateway.url(f"/o/token/?client_secret={SECRET}"), data={}, timeout=30.0)
        gateway.stop()  # the log is complete once the worker has exited
        log = gateway.logs()

    assert reply.status_code == 400
    assert posted.status_code in (400, 401)
    assert "GET /mcp?access_token=[redacted]" in log, log
    assert SECRET not in log
