"""Request ids, log context and structured logs.

Every MCP request the dispatcher answers runs inside `request_scope`: it picks the request id
(the one a peer gateway sent in `_meta["io.fedmcp/requestId"]`, else a sane `X-Request-Id`
header, else a new one) and puts it, with the method, session, user and peer, in context
variables. `ContextFilter` copies them onto every log record, so any line logged while the
request runs (here, in the call pipeline, in an upstream connection) carries them, and
`JsonFormatter` writes one JSON object per line (`FEDMCP_LOG_FORMAT=json`).

Forwarded requests to peer gateways carry the id in `_meta["io.fedmcp/requestId"]`
(`mcp_endpoint.pipeline.envelope.upstream_params`): the same id is logged on every gateway a call
crosses.

This module is loaded while Django configures logging, before apps are ready: it must not
import models (or anything that does).
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import json
import logging
import os
import re
from typing import Any

REQUEST_ID_META_KEY = "io.fedmcp/requestId"
"""The `_meta` key that carries the request id to peer gateways."""
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+=-]{0,127}")
"""Request ids taken from callers: short, printable, no spaces (safe in logs and headers)."""
SESSION_LOG_CHARS = 8
"""Only a prefix of a session id is logged: enough to correlate, useless to replay."""

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("fedmcp_request_id", default="")
method_var: contextvars.ContextVar[str] = contextvars.ContextVar("fedmcp_method", default="")
peer_var: contextvars.ContextVar[str] = contextvars.ContextVar("fedmcp_peer", default="")
session_var: contextvars.ContextVar[str] = contextvars.ContextVar("fedmcp_session", default="")
user_var: contextvars.ContextVar[str] = contextvars.ContextVar("fedmcp_user", default="")

CONTEXT_FIELDS = {
    "request_id": request_id_var,
    "peer": peer_var,
    "method": method_var,
    "session": session_var,
    "user": user_var,
}

STREAM_METHODS = frozenset({"subscriptions/listen"})
"""Requests that hold a stream open until the host leaves: a graceful shutdown does not wait for them."""

_in_flight: set[asyncio.Task[Any]] = set()
"""Tasks answering an MCP request on this worker (what a graceful shutdown waits for)."""
_streaming: set[asyncio.Task[Any]] = set()
"""Tasks answering a STREAM_METHODS request on this worker."""


def sane_request_id(value: Any) -> str | None:
    """Return `value` if it can be used as a request id as given, else None."""
    if isinstance(value, str) and _SANE_REQUEST_ID.fullmatch(value):
        return value
    return None


def new_request_id() -> str:
    """32 random hex digits (as `uuid4().hex` gave, at a fifth of the cost)."""
    return os.urandom(16).hex()


def current_request_id() -> str:
    """The id of the MCP request being answered ("" outside one)."""
    return request_id_var.get()


def identity_label(identity: Any) -> str:
    """Who is calling, for logs: the username, else the OAuth client id."""
    if identity is None:
        return ""
    return getattr(identity, "username", "") or getattr(identity, "client_id", "") or ""


def in_flight_tasks(*, streams: bool = False) -> set[asyncio.Task[Any]]:
    """The tasks answering MCP requests on this worker right now (with `streams`: listen streams too)."""
    tasks = _in_flight | _streaming if streams else _in_flight
    return {task for task in tasks if not task.done()}


class request_scope:  # noqa: N801 - used like a function: `with request_scope(ctx, method) as request_id:`
    """Run one MCP request with its id and context in the log context; yield the id.

    `ctx` is the request's `HostContext`. The id comes from the calling gateway
    (`_meta["io.fedmcp/requestId"]`), else the `X-Request-Id` header, else is generated.
    (A class rather than a generator-based context manager: it runs for every request.)
    """

    __slots__ = ("_ctx", "_method", "_tokens", "_task", "_tracked")

    def __init__(self, ctx: Any, method: str) -> None:
        self._ctx = ctx
        self._method = method

    def __enter__(self) -> str:
        ctx = self._ctx
        method = self._method
        request_id = (
            sane_request_id(ctx.meta.get(REQUEST_ID_META_KEY))
            or sane_request_id(ctx.headers.get("x-request-id"))
            or new_request_id()
        )
        session = ctx.session.id[:SESSION_LOG_CHARS] if ctx.session is not None else ""
        self._tokens = (
            request_id_var.set(request_id),
            method_var.set(method),
            peer_var.set(ctx.scope),
            session_var.set(session),
            user_var.set(identity_label(ctx.identity)),
        )
        try:
            task = asyncio.current_task()
        except RuntimeError:  # no event loop: nothing for a shutdown to wait for
            task = None
        self._task = task
        self._tracked = _streaming if method in STREAM_METHODS else _in_flight
        if task is not None:
            self._tracked.add(task)
        return request_id

    def __exit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._tracked.discard(self._task)
        request_id, method, peer, session, user = self._tokens
        user_var.reset(user)
        session_var.reset(session)
        peer_var.reset(peer)
        method_var.reset(method)
        request_id_var.reset(request_id)


class peer_scope:  # noqa: N801 - used like a function: `with peer_scope(peer):`
    """Log what happens inside the block as concerning `peer`."""

    __slots__ = ("_peer", "_token")

    def __init__(self, peer: str) -> None:
        self._peer = peer

    def __enter__(self) -> None:
        self._token = peer_var.set(self._peer)

    def __exit__(self, *exc_info: object) -> None:
        peer_var.reset(self._token)


# --- logging -------------------------------------------------------------------------------------


class ContextFilter(logging.Filter):
    """Copy the request context onto every record (set on handlers, so every logger gets it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in CONTEXT_FIELDS.items():
            if not hasattr(record, name):
                setattr(record, name, var.get())
        return True


_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, the request context, extras.

    Context fields are always present (null outside a request). Values passed with
    `extra=` are included when JSON can represent them.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, tz=dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            entry[name] = getattr(record, name, "") or None
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and key not in entry and isinstance(value, str | int | float | bool | type(None)):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class PlainFormatter(logging.Formatter):
    """The classic line, followed by the request context when there is one."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(f"{name}={value}" for name in CONTEXT_FIELDS if (value := getattr(record, name, "")))
        if not context:
            return line
        head, newline, rest = line.partition("\n")
        return f"{head} [{context}]{newline}{rest}"
