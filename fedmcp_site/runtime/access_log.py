"""daphne's access log without credentials: token-like query parameters are redacted.

The MCP transports refuse a token sent in the query string (`?access_token=…`, RFC 6750 §2.3
is forbidden by the MCP authorization spec), but daphne had already written the request line,
query and all, to its access log (`daphne/access.py`, one line per HTTP request). Anyone who
reads the log could then use the token. `install()` (called from asgi.py) makes that log write
`access_token=[redacted]` instead; the path and the other parameters are kept as they were.

Only HTTP lines carry a query: daphne logs WebSocket handshakes with the path alone.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote_plus

TARGETS = {"daphne": "4.2.3"}
"""The versions this module was written against (tests/architecture/test_runtime_patches.py)."""

REDACTED = "[redacted]"
SECRET_PARAMETER = re.compile(r"(?:.*token|.*secret|password|passwd|api[-_]?key|apikey|code|assertion)", re.IGNORECASE)
"""Query parameter names whose values are credentials: any *token (access_token, refresh_token,
id_token, token), *secret (client_secret), passwords, API keys, OAuth codes (/connect/callback)."""


def redact_query(target: str) -> str:
    """Return a request target (`/path?query`) with the values of credential-like parameters replaced."""
    path, mark, query = target.partition("?")
    if not mark:
        return target
    parts = []
    for part in query.split("&"):
        name, equals, _value = part.partition("=")
        if equals and SECRET_PARAMETER.fullmatch(unquote_plus(name).strip()):
            part = f"{name}={REDACTED}"
        parts.append(part)
    return f"{path}?{'&'.join(parts)}"


def install() -> None:
    """Redact daphne's access log lines (a no-op where daphne is not installed)."""
    try:
        from daphne.access import AccessLogGenerator
    except ImportError:  # pragma: no cover - daphne is a requirement; be safe for other servers
        return
    if getattr(AccessLogGenerator.__call__, "fedmcp_redacts", False):
        return
    original = AccessLogGenerator.__call__

    def redacting_call(self: AccessLogGenerator, protocol: str, action: str, details: dict[str, Any]) -> None:
        path = details.get("path")
        if isinstance(path, str) and "?" in path:
            details = {**details, "path": redact_query(path)}
        original(self, protocol, action, details)

    redacting_call.fedmcp_redacts = True  # type: ignore[attr-defined]
    AccessLogGenerator.__call__ = redacting_call  # type: ignore[method-assign]
