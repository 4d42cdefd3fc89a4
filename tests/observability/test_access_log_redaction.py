"""A token sent in the query string is refused, and not written to daphne's access log either.

Issue 15, item 9: `/mcp?access_token=…` got its 400, but daphne's access log had the whole
token. The log line is built the way daphne builds it (`daphne.access.AccessLogGenerator`, with
the details daphne's HTTP protocol passes), after the application module was loaded as daphne
loads it; tests/e2e/test_access_log.py reads a real worker's log.
"""

from __future__ import annotations

import io

from daphne.access import AccessLogGenerator

import fedmcp_site.asgi  # noqa: F401 - loading the application is what daphne does first
from fedmcp_site.runtime.access_log import redact_query

SECRET = "tok-3b1f9c0e7d2a"


def access_line(path: str) -> str:
    stream = io.StringIO()
    log = AccessLogGenerator(stream)
    log("http", "complete", {"path": path, "status": 400, "method": "GET", "client": "127.0.0.1:5000", "time_taken": 0.01, "size": 10})
    return stream.getvalue()


def test_a_token_in_the_query_string_is_redacted_in_the_access_log() -> None:
    line = access_line(f"/mcp?access_token={SECRET}&page=2")

    assert SECRET not in line
    assert '"GET /mcp?access_token=[redacted]&page=2" 400' in line


def test_every_token_like_parameter_is_redacted() -> None:
    names = ("access_token", "token", "refresh_token", "id_token", "client_secret", "password", "api_key", "code", "Access%5FToken")

    redacted = redact_query("/o/x?" + "&".join(f"{name}={SECRET}" for name in names) + "&state=s&scope=mcp%3Atools")

    assert SECRET not in redacted
    assert redacted.endswith("&state=s&scope=mcp%3Atools")


def test_paths_without_secrets_are_logged_as_they_are() -> None:
    for path in ("/mcp", "/api/audit/?page=2&page_size=50", "/o/authorize/?client_id=x&code_challenge=abc", "/x?flag"):
        assert f'"GET {path}" 400' in access_line(path)
