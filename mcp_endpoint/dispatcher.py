"""The one dispatcher every transport hands decoded JSON-RPC messages to.

Order of checks (as the SDK's runner): envelope (-32600), method lookup in the caller's era
(-32601), session initialised (-32600), params validated with the official `mcp-types`
models (-32602), then the handler. A database failure is answered as -32603 "Service
unavailable" with `data.retryAfterMs` (HTTP 503 on Streamable HTTP); any other unexpected
exception is logged and answered as -32603 without its text.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from django.db import Error as DatabaseError
from mcp_types.methods import validate_client_request
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, LATEST_HANDSHAKE_VERSION
from pydantic import ValidationError

from federation.pool import pool
from fedmcp_lib import observability
from fedmcp_lib.json_types import JsonDict
from identity.hostauth.scopes import required_scope
from identity.hostauth.tokens import Identity
from identity.trust import gateways
from mcp_endpoint import jsonrpc, sessions, tasks
from mcp_endpoint.context import HostContext
from mcp_endpoint.correlation import correlator
from mcp_endpoint.handlers import HANDLERS, fit_result_to_era
from mcp_endpoint.methods import ERAS
from mcp_endpoint.pipeline.envelope import HOPS_META_KEY

logger = logging.getLogger(__name__)


def classify(message: Any) -> str:
    """Return "request", "notification", "response" or "invalid" for one decoded message."""
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0":
        return "invalid"
    if "method" in message:
        if not isinstance(message["method"], str):
            return "invalid"
        return "request" if "id" in message else "notification"
    if "id" in message and ("result" in message or "error" in message):
        return "response"
    return "invalid"


def params_of(message: JsonDict) -> JsonDict:
    """Return a message's params as an object ({} when absent or null): the one check of their shape.

    Everything that reads params (the dispatcher, a consumer choosing the era) reads them
    through here, so a string, number or list never reaches code that expects an object.

    Raises:
        InvalidParamsError: params are present and not an object.
    """
    params = message.get("params")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise jsonrpc.InvalidParamsError("Invalid params: params must be an object")
    return params


def has_modern_envelope(message: Any) -> bool:
    """Whether a message carries the 2026-07-28 `_meta` envelope (its params are then an object)."""
    if not isinstance(message, dict):
        return False
    try:
        meta = params_of(message).get("_meta")
    except jsonrpc.InvalidParamsError:
        return False
    return isinstance(meta, dict) and "io.modelcontextprotocol/protocolVersion" in meta


def _validation_details(exc: ValidationError) -> list[JsonDict]:
    return [
        {"field": ".".join(str(p) for p in err["loc"] if p not in ("params",)), "problem": err["msg"]}
        for err in exc.errors(include_url=False, include_input=False)[:20]
    ]


def validate_params(method: str, version: str, params: JsonDict) -> None:
    """Check params against the official wire model for `method` at `version`.

    Raises:
        InvalidParamsError: the params do not match the model.
    """
    if version not in HANDSHAKE_PROTOCOL_VERSIONS and method == "initialize":
        version = LATEST_HANDSHAKE_VERSION
    try:
        validate_client_request(method, version or LATEST_HANDSHAKE_VERSION, params)
    except KeyError as exc:
        raise jsonrpc.MethodNotFoundError(f"Method not found: {method}", {"method": method}) from exc
    except ValidationError as exc:
        raise jsonrpc.InvalidParamsError(f"Invalid params for {method}", _validation_details(exc)) from exc
    except (ValueError, RecursionError) as exc:
        raise jsonrpc.InvalidParamsError(f"Invalid params for {method}") from exc


Handler = Callable[[HostContext, JsonDict], Awaitable[JsonDict]]


@dataclass(frozen=True)
class MethodSpec:
    handler: Handler
    eras: frozenset[str]


METHODS: dict[str, MethodSpec] = {name: MethodSpec(HANDLERS[name], eras) for name, eras in ERAS.items()}
"""The method table (methods.py) with who answers each method (handlers.py)."""


async def call(ctx: HostContext, method: str, params: JsonDict) -> JsonDict:
    """Run one request through the method table.

    Raises:
        JsonRpcError: any error to answer to the host.
    """
    spec = METHODS.get(method)
    if spec is None or ctx.era not in spec.eras:
        raise jsonrpc.MethodNotFoundError(f"Method not found: {method}", {"method": method})
    if ctx.era == "legacy" and method not in ("initialize", "ping"):
        if ctx.session is None or not ctx.session.protocol_version:
            raise jsonrpc.InvalidRequestError("Session not initialized: send initialize first")
    if method in tasks.MODERN_METHODS | tasks.LEGACY_METHODS:
        # An extension's methods (2026-07-28) and 2025-11-25's experimental ones: the official models know neither.
        tasks.check_request(ctx, method, params)
    else:
        validate_params(method, ctx.protocol_version, params)
    ctx.identity = await _acting_identity(ctx, method)
    needed = required_scope(method, params)
    if needed is not None and (ctx.identity is None or not ctx.identity.has_scope(needed)):
        raise jsonrpc.InsufficientScopeError(f"Insufficient scope: {method} needs the '{needed}' scope", {"requiredScope": needed})
    return await spec.handler(ctx, params)


async def _acting_identity(ctx: HostContext, method: str) -> Identity | None:
    """Return who acts: the caller, or the user a trusted peer gateway asserts (identity/trust/gateways.py).

    Raises:
        InvalidAssertionError: a peer gateway's assertion is missing or not acceptable.
    """
    try:
        return await gateways.identity_for_call(caller=ctx.identity, method=method, meta=ctx.meta, hops=ctx.meta.get(HOPS_META_KEY))
    except gateways.AssertionRejectedError as exc:
        raise jsonrpc.InvalidAssertionError(f"Invalid identity assertion: {exc.description}", {"reason": exc.reason}) from exc


async def handle_request(ctx: HostContext, message: JsonDict) -> JsonDict:
    """Answer one request message with a response message (never raises, but for cancellation)."""
    request_id = message.get("id")
    if not jsonrpc.is_valid_id(request_id):
        return jsonrpc.error_response(None, jsonrpc.InvalidRequestError("Invalid request: id must be a string or an integer").to_error())
    try:
        params = params_of(message)
    except jsonrpc.InvalidParamsError as exc:
        return jsonrpc.error_response(request_id, exc.to_error())
    ctx.request_id = request_id
    meta = params.get("_meta")
    ctx.meta = meta if isinstance(meta, dict) else {}
    # Logs while this runs carry the request id (and it travels on to peer gateways).
    with observability.request_scope(ctx, message["method"]):
        try:
            result = await call(ctx, message["method"], params)
            if isinstance(result, dict):
                result = fit_result_to_era(ctx, result)
        except jsonrpc.JsonRpcError as exc:
            return jsonrpc.error_response(request_id, exc.to_error())
        except asyncio.CancelledError:
            raise
        except DatabaseError:
            # The database went away mid-call (a catalog read, a session or consent write):
            # a clear, retryable answer (HTTP 503 on Streamable HTTP), not an internal error.
            logger.warning("database unreachable while answering %s", message.get("method"), exc_info=True)
            return jsonrpc.error_response(request_id, jsonrpc.DatabaseUnavailableError().to_error())
        except Exception:
            logger.exception("internal error answering %s", message.get("method"))
            return jsonrpc.error_response(request_id, jsonrpc.JsonRpcError().to_error())
    return jsonrpc.response(request_id, result)


async def handle_notification(ctx: HostContext, message: JsonDict) -> None:
    method = message["method"]
    try:
        params = params_of(message)
    except jsonrpc.InvalidParamsError:
        logger.debug("ignoring notification %s: its params are not an object", method)
        return
    if method == "notifications/initialized" and ctx.session is not None:
        await sessions.session_mark_initialized(session=ctx.session)
    elif method == "notifications/cancelled" and ctx.session is not None:
        request_id = params.get("requestId")
        if jsonrpc.is_valid_id(request_id):
            await correlator.cancel(ctx.session.id, request_id)
    elif method == "notifications/roots/list_changed" and ctx.identity is not None:
        # To the user's own handshake-era upstream sessions (federation/pool.py
        # `connection_owner`): an upstream that keeps roots asks again on its next call.
        await pool.notify_owner(ctx.identity.subject_key(), method)
    else:
        logger.debug("ignoring notification %s", method)


async def handle_message(ctx: HostContext, message: Any) -> JsonDict | None:
    """Answer one decoded message: a response for requests, None for anything else."""
    kind = classify(message)
    if kind == "request":
        return await handle_request(ctx, message)
    if kind == "notification":
        await handle_notification(ctx, message)
        return None
    if kind == "response":
        await correlator.deliver_reply(message)
        return None
    request_id = message.get("id") if isinstance(message, dict) and jsonrpc.is_valid_id(message.get("id")) else None
    return jsonrpc.error_response(request_id, jsonrpc.InvalidRequestError("Invalid request: not a JSON-RPC 2.0 message").to_error())


SHUTDOWN_REASON = "worker_shutdown"


def shutdown_error(request_id: Any) -> JsonDict:
    """The answer to a request this worker cancelled because it is shutting down."""
    return jsonrpc.error_response(request_id, {
        "code": jsonrpc.INTERNAL_ERROR, "message": "The gateway worker handling this request is shutting down; send it again",
        "data": {"reason": SHUTDOWN_REASON},
    })


async def run_tracked(ctx: HostContext, message: JsonDict) -> JsonDict | None:
    """Handle a request in its own task, registered so notifications/cancelled can stop it.

    Returns None when the host cancelled the request: the spec says no response is sent. When
    the worker's shutdown cancelled it, the host is told so (`shutdown_error`), not left with
    no answer (a handshake-era POST would have been answered 202, which no host expects).
    """
    task = asyncio.ensure_future(handle_request(ctx, message))
    if ctx.session is not None and jsonrpc.is_valid_id(message.get("id")):
        await correlator.track(ctx.session.id, message["id"], task)
    try:
        return await task
    except asyncio.CancelledError:
        if task.cancelled() and not _current_task_cancelling():
            return None if correlator.cancelled_by_host(task) else shutdown_error(message.get("id"))
        raise


def _current_task_cancelling() -> bool:
    current = asyncio.current_task()
    return bool(current and current.cancelling())
