"""The edge of every MCP transport: Host/Origin checks, then the bearer token.

Wraps each MCP consumer. Order matters: a request with a foreign Host (421) or Origin (403) is
refused before anything about tokens is said, so DNS-rebinding probes learn nothing. Then the
`Authorization: Bearer` token is checked (RFC 6750, RFC 9728): a missing or bad token gets 401
with `WWW-Authenticate: Bearer resource_metadata="…", scope="…"`. Tokens in the query string are
refused, as the MCP spec requires. The identity is put in `scope["fedmcp.identity"]`.

WebSocket handshakes cannot carry a 401 through daphne; they are refused (HTTP 403) instead.
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import parse_qs

from django.db import Error as DatabaseError

from fedmcp_lib import caching, security
from identity.hostauth import scopes
from identity.hostauth.tokens import TokenError, authenticate, gateway_audience
from mcp_endpoint import jsonrpc

logger = logging.getLogger(__name__)
ASGIApp = Any

UNAVAILABLE_MESSAGE = jsonrpc.UNAVAILABLE_MESSAGE
UNAVAILABLE_HEADERS = [(b"retry-after", str(jsonrpc.UNAVAILABLE_RETRY_AFTER).encode())]


def public_base_url(scope: dict[str, Any]) -> str:
    """This gateway's origin as hosts address it: FEDMCP_PUBLIC_URL, else from the request."""
    scheme = {"ws": "http", "wss": "https"}.get(scope.get("scheme", "http"), scope.get("scheme", "http"))
    host = security.header(scope, b"host") or "127.0.0.1"
    return gateway_audience(f"{scheme}://{host}")


def resource_metadata_url(scope: dict[str, Any]) -> str:
    """RFC 9728 path-inserted metadata URL for the endpoint being called."""
    path = scope.get("path", "/").rstrip("/")
    return f"{public_base_url(scope)}/.well-known/oauth-protected-resource{path}"


def challenge(scope: dict[str, Any], *, error: str | None = None, description: str | None = None, scope_needed: str | None = None) -> str:
    """Return a `WWW-Authenticate: Bearer` value for this endpoint."""
    parts = [f'resource_metadata="{resource_metadata_url(scope)}"', f'scope="{scope_needed or " ".join(scopes.MCP_SCOPES)}"']
    if error:
        parts.insert(0, f'error="{error}"')
    if description:
        parts.append('error_description="{}"'.format(description.replace('"', "'")))
    return "Bearer " + ", ".join(parts)


async def _send_http(send: Any, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]]) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json"), *headers]})
    await send({"type": "http.response.body", "body": payload})


async def _drain(receive: Any) -> None:
    """Consume the request body we are refusing, so the server can finish the exchange."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return


class McpEdgeMiddleware:
    """Host/Origin validation and bearer authentication in front of one MCP consumer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        refusal = security.check_request(scope)
        if refusal is not None:
            await self._refuse(scope, receive, send, refusal[0], {"error": "forbidden", "error_description": refusal[1]})
            return
        query_string = scope.get("query_string", b"")
        if query_string and "access_token" in parse_qs(query_string.decode("latin-1")):
            await self._refuse(
                scope, receive, send, 400,
                {"error": "invalid_request", "error_description": "Tokens in the query string are refused; use the Authorization header"},
            )
            return
        authorization = security.header(scope, b"authorization") or ""
        kind, _, raw = authorization.partition(" ")
        if kind.lower() != "bearer" or not raw.strip():
            await self._refuse(
                scope, receive, send, 401,
                {"error": "invalid_token", "error_description": "Authentication required: send Authorization: Bearer <token>"},
                [(b"www-authenticate", challenge(scope).encode())],
            )
            return
        # Once per request: learn what changed in other processes before any cache is used.
        await caching.refresh()
        try:
            identity = await authenticate(raw.strip(), public_base_url(scope))
        except TokenError as exc:
            await self._refuse(
                scope, receive, send, 401,
                {"error": exc.error, "error_description": exc.description},
                [(b"www-authenticate", challenge(scope, error=exc.error, description=exc.description).encode())],
            )
            return
        except DatabaseError:
            # OperationalError, InterfaceError…: the database is down or the connection broke.
            # Django drops a broken connection and reconnects on a later request by itself.
            logger.warning("database unreachable while checking a bearer token", exc_info=True)
            await self._refuse(
                scope, receive, send, 503, jsonrpc.error_response(None, {"code": jsonrpc.INTERNAL_ERROR, "message": UNAVAILABLE_MESSAGE}),
                UNAVAILABLE_HEADERS,
            )
            return
        await self.app({**scope, "fedmcp.identity": identity}, receive, send)

    async def _refuse(
        self, scope: dict[str, Any], receive: Any, send: Any, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        if scope["type"] == "websocket":
            message = await receive()
            if message["type"] == "websocket.connect":
                await send({"type": "websocket.close", "code": 1008})
            return
        await _drain(receive)
        await _send_http(send, status, body, headers or [])


def authenticated(app: ASGIApp) -> McpEdgeMiddleware:
    return McpEdgeMiddleware(app)
