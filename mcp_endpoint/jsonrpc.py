"""JSON-RPC envelopes, error codes and the errors handlers raise."""

from __future__ import annotations

import json
from typing import Any, ClassVar

from mcp.shared.inbound import ERROR_CODE_HTTP_STATUS
from mcp_types import jsonrpc as codes

from fedmcp_lib.json_types import JsonDict

PARSE_ERROR = codes.PARSE_ERROR
"""Invalid JSON was received (-32700)."""
INVALID_REQUEST = codes.INVALID_REQUEST
"""The JSON is not a valid request object (-32600)."""
METHOD_NOT_FOUND = codes.METHOD_NOT_FOUND
"""The method does not exist or is not available in this era (-32601)."""
INVALID_PARAMS = codes.INVALID_PARAMS
"""Invalid method parameters; also "resource not found" in 2026-07-28 (-32602)."""
INTERNAL_ERROR = codes.INTERNAL_ERROR
"""An error inside the gateway; details are logged, never sent (-32603)."""
RESOURCE_NOT_FOUND_LEGACY = -32002
"""Resource not found in the handshake era."""
UPSTREAM_ERROR = -32010
"""Implementation-defined: the upstream server is unavailable, timed out or misbehaved."""
REQUEST_CANCELLED = -32011
"""Implementation-defined: the request was cancelled before it finished."""
FEDERATION_LOOP = -32012
"""Implementation-defined: the request already passed through this gateway (a loop between gateways)."""
INSUFFICIENT_SCOPE = -32013
"""Implementation-defined: the token lacks the scope this method needs (HTTP 403 on Streamable HTTP)."""
TOKEN_REVOKED = -32014
"""Implementation-defined: the token was revoked or expired while the connection stayed open."""
INVALID_ASSERTION = -32015
"""Implementation-defined: a peer gateway's identity assertion is missing or not acceptable; `data.reason` says why."""
RATE_LIMITED = -32016
"""Implementation-defined: a rate limit refused the call; `data.retryAfterMs` says when to retry (HTTP 429 on Streamable HTTP)."""
CONSENT_DENIED = -32017
"""Implementation-defined: the user (or a consent policy) refused the call."""
CONSENT_TIMEOUT = -32018
"""Implementation-defined: the user did not answer the consent prompt in time."""
CONSENT_REQUIRED = -32032
"""Implementation-defined: the user must approve the call first, on the page `data.url`; the same call retried
after the approval goes through (a structured authorization denial after SEP-2643, docs/CONSENT.md)."""
TOO_MANY_SESSIONS = -32031
"""Implementation-defined: the user holds FEDMCP_MAX_SESSIONS_PER_USER open sessions or streams; `data.limit` (HTTP 429)."""
UPSTREAM_AUTHORIZATION_REQUIRED = -32030
"""Implementation-defined: the peer needs the user's own authorization; `data.connectUrl` is where to give it."""
URL_ELICITATION_REQUIRED = codes.URL_ELICITATION_REQUIRED
"""Handshake era (2025-11-25): the request needs the URL elicitations in `data.elicitations` completed first (-32042)."""
CONSENT_REQUIRED_AT_HOME = -32019
"""Implementation-defined, between gateways: the owner of the call needs the user's consent, which
only the user's home gateway can ask for; `data.challenge` is the owner's signed question (docs/CONSENT.md)."""
HEADER_MISMATCH = codes.HEADER_MISMATCH
"""An HTTP routing header disagrees with the body (-32020)."""
MISSING_REQUIRED_CLIENT_CAPABILITY = codes.MISSING_REQUIRED_CLIENT_CAPABILITY
"""The request needs a client capability the client did not declare (-32021)."""
UNSUPPORTED_PROTOCOL_VERSION = codes.UNSUPPORTED_PROTOCOL_VERSION
"""The protocol version is not one this gateway speaks (-32022)."""


UNAVAILABLE_RETRY_AFTER = 5
"""Seconds a host is asked to wait (Retry-After, `data.retryAfterMs`) while the gateway's database is unreachable."""
UNAVAILABLE_MESSAGE = "Service unavailable: the gateway's database is unreachable; retry later"
UNAVAILABLE_REASON = "database_unavailable"


class JsonRpcError(Exception):
    """An error answered to the client as a JSON-RPC error object."""

    code: ClassVar[int] = INTERNAL_ERROR
    default_message: ClassVar[str] = "Internal server error"

    def __init__(self, message: str | None = None, data: Any = None, *, code: int | None = None) -> None:
        self.message = message or self.default_message
        self.data = data
        if code is not None:
            self.code = code  # type: ignore[misc]
        super().__init__(self.message)

    def to_error(self) -> JsonDict:
        error: JsonDict = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


class ParseError(JsonRpcError):
    code = PARSE_ERROR
    default_message = "Parse error: the body is not valid JSON"


class InvalidRequestError(JsonRpcError):
    code = INVALID_REQUEST
    default_message = "Invalid request"


class MethodNotFoundError(JsonRpcError):
    code = METHOD_NOT_FOUND
    default_message = "Method not found"


class InvalidParamsError(JsonRpcError):
    code = INVALID_PARAMS
    default_message = "Invalid params"


class HeaderMismatchError(JsonRpcError):
    code = HEADER_MISMATCH
    default_message = "Header mismatch"


class UpstreamFailedError(JsonRpcError):
    code = UPSTREAM_ERROR
    default_message = "Upstream server error"


class FederationLoopError(JsonRpcError):
    code = FEDERATION_LOOP
    default_message = "Federation loop detected"


class InsufficientScopeError(JsonRpcError):
    code = INSUFFICIENT_SCOPE
    default_message = "Insufficient scope"


class RateLimitedError(JsonRpcError):
    code = RATE_LIMITED
    default_message = "Rate limit exceeded"


class TooManySessionsError(JsonRpcError):
    code = TOO_MANY_SESSIONS
    default_message = "Too many open sessions"


class InvalidAssertionError(JsonRpcError):
    code = INVALID_ASSERTION
    default_message = "Invalid identity assertion"


class CancelledError(JsonRpcError):
    code = REQUEST_CANCELLED
    default_message = "Request cancelled"


class ConsentDeniedError(JsonRpcError):
    code = CONSENT_DENIED
    default_message = "Consent denied"


class ConsentRequiredError(JsonRpcError):
    code = CONSENT_REQUIRED
    default_message = "Consent required"


class ConsentTimeoutError(JsonRpcError):
    code = CONSENT_TIMEOUT
    default_message = "Consent timed out"


class UpstreamAuthorizationRequiredError(JsonRpcError):
    code = UPSTREAM_AUTHORIZATION_REQUIRED
    default_message = "The peer needs your own authorization"


class UrlElicitationRequiredError(JsonRpcError):
    code = URL_ELICITATION_REQUIRED
    default_message = "URL elicitation required"


class DatabaseUnavailableError(JsonRpcError):
    """The gateway's own database failed while answering (-32603; HTTP 503 with Retry-After on Streamable HTTP)."""

    code = INTERNAL_ERROR
    default_message = UNAVAILABLE_MESSAGE

    def __init__(self) -> None:
        super().__init__(data={"reason": UNAVAILABLE_REASON, "retryAfterMs": UNAVAILABLE_RETRY_AFTER * 1000})


class ConsentRequiredAtHomeError(JsonRpcError):
    code = CONSENT_REQUIRED_AT_HOME
    default_message = "Consent required at the user's home gateway"


def response(request_id: Any, result: JsonDict) -> JsonDict:
    return {"jsonrpc": "2.0", "id": request_id, "result": result}


def error_response(request_id: Any, error: JsonDict) -> JsonDict:
    return {"jsonrpc": "2.0", "id": request_id, "error": error}


def notification(method: str, params: JsonDict | None = None) -> JsonDict:
    message: JsonDict = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        message["params"] = params
    return message


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
"""Built once: `json.dumps` with any non-default option builds an encoder on every call."""


def dumps(message: Any) -> str:
    return _ENCODER.encode(message)


def http_status_for(message: JsonDict) -> int:
    """Return the HTTP status for a 2026-07-28 reply (the SDK's table; 200 for results)."""
    error = message.get("error")
    if isinstance(error, dict):
        if error.get("code") == TOO_MANY_SESSIONS:
            return 429
        return ERROR_CODE_HTTP_STATUS.get(error.get("code"), 200)  # type: ignore[arg-type]
    return 200


def is_database_unavailable(error: Any) -> bool:
    """Whether a JSON-RPC error object is the gateway's "database unreachable" answer."""
    return isinstance(error, dict) and isinstance(error.get("data"), dict) and error["data"].get("reason") == UNAVAILABLE_REASON


def is_valid_id(value: Any) -> bool:
    """JSON-RPC ids are strings or integers (MCP forbids null ids on requests)."""
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))
