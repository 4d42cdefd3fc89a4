"""Request ids: chosen per MCP request, logged on every line, carried to peer gateways.

A call crossing a gateway hop keeps its id: the sending side puts it in
`_meta["io.fedmcp/requestId"]` (only for peer gateways), and the receiving side logs under the
id it finds there. Both halves are tested here; the log lines are the JSON ones operators ship.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from fedmcp_lib import observability
from fedmcp_lib.observability import REQUEST_ID_META_KEY, ContextFilter, JsonFormatter
from mcp_endpoint.context import HostContext
from mcp_endpoint.pipeline.envelope import HOPS_META_KEY, upstream_params
from tests.base import MODERN, FixturePeerTestCase, McpClient, modern_meta, request
from tests.e2e.harness import PY, ROOT

JSON_FIELDS = {"ts", "level", "logger", "message", "request_id", "peer", "method", "session", "user"}


class _Outbound:
    can_request = False

    async def send(self, message: dict[str, Any]) -> None:
        raise AssertionError("nothing is sent to the host here")


@dataclass
class _Connection:
    era: str = "legacy"


def host_context(*, headers: dict[str, str] | None = None, meta: dict[str, Any] | None = None) -> HostContext:
    return HostContext(
        era="modern", protocol_version=MODERN, transport="streamable-http", scope="", outbound=_Outbound(),
        headers=headers or {}, meta=meta or {},
    )


@contextmanager
def json_log(logger_name: str) -> Iterator[io.StringIO]:
    """Capture `logger_name` as the JSON handler of a deployment would write it."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield buffer
    finally:
        logger.removeHandler(handler)


def lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]


# --- choosing the id ---------------------------------------------------------------------------


def test_the_id_from_a_calling_gateway_wins_over_the_header() -> None:
    ctx = host_context(headers={"x-request-id": "from-header"}, meta={REQUEST_ID_META_KEY: "from-gateway"})

    with observability.request_scope(ctx, "tools/call") as request_id:
        assert observability.current_request_id() == "from-gateway"

    assert request_id == "from-gateway"
    assert observability.current_request_id() == ""


def test_a_sane_x_request_id_header_is_used_as_given() -> None:
    with observability.request_scope(host_context(headers={"x-request-id": "lb-1f2e3d"}), "tools/call") as request_id:
        pass

    assert request_id == "lb-1f2e3d"


def test_an_insane_header_is_replaced_by_a_generated_id() -> None:
    for bad in ("two words", "x" * 200, "line\nbreak", ""):
        with observability.request_scope(host_context(headers={"x-request-id": bad}), "tools/call") as request_id:
            pass
        assert request_id != bad
        assert observability.sane_request_id(request_id) == request_id


# --- the sending side of a hop -------------------------------------------------------------------


def test_forwarded_params_carry_the_id_to_peer_gateways_only() -> None:
    ctx = host_context(headers={"x-request-id": "hop-abc"})
    params = {"name": "tool", "_meta": {REQUEST_ID_META_KEY: "spoofed-by-host", "progressToken": 7}}

    with observability.request_scope(ctx, "tools/call"):
        to_gateway = upstream_params(ctx, _Connection(), params, {HOPS_META_KEY: ["here"]})  # type: ignore[arg-type]
        to_server = upstream_params(ctx, _Connection(), params, None)  # type: ignore[arg-type]

    assert to_gateway["_meta"][REQUEST_ID_META_KEY] == "hop-abc"
    assert to_gateway["_meta"][HOPS_META_KEY] == ["here"]
    assert REQUEST_ID_META_KEY not in to_server["_meta"]
    assert to_server["_meta"]["progressToken"] == 7


# --- the log line --------------------------------------------------------------------------------


def test_a_json_log_line_has_the_request_context() -> None:
    ctx = host_context(headers={"x-request-id": "ctx-42"})
    with json_log("fedmcp.test") as buffer, observability.request_scope(ctx, "tools/call"):
        with observability.peer_scope("time"):
            logging.getLogger("fedmcp.test").warning("something %s", "happened", extra={"outcome": "ok"})

    [entry] = lines(buffer)
    assert JSON_FIELDS <= set(entry)
    assert entry["request_id"] == "ctx-42"
    assert entry["method"] == "tools/call"
    assert entry["peer"] == "time"
    assert entry["message"] == "something happened"
    assert entry["level"] == "WARNING"
    assert entry["outcome"] == "ok"


def test_fedmcp_log_format_json_switches_the_console_to_json_lines() -> None:
    script = "import logging; logging.getLogger('fedmcp.test').warning('hello')"
    env = {**os.environ, "FEDMCP_LOG_FORMAT": "json", "DJANGO_SETTINGS_MODULE": "fedmcp_site.settings"}

    result = subprocess.run([PY, "manage.py", "shell", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    entry = json.loads(result.stderr.strip().splitlines()[-1])
    assert JSON_FIELDS <= set(entry)
    assert entry["message"] == "hello"
    assert entry["request_id"] is None


def test_an_unknown_log_format_is_refused_at_startup() -> None:
    env = {**os.environ, "FEDMCP_LOG_FORMAT": "xml", "DJANGO_SETTINGS_MODULE": "fedmcp_site.settings"}

    result = subprocess.run([PY, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr


# --- the receiving side of a hop, through the app ----------------------------------------------


class ReceivingGatewayLogsTest(FixturePeerTestCase):
    async def test_a_request_from_a_peer_gateway_is_logged_under_its_id(self) -> None:
        name = "everything__add"
        meta = {**modern_meta(), REQUEST_ID_META_KEY: "hop-7f3a"}
        body = request("tools/call", {"name": name, "arguments": {"a": 1, "b": 2}, "_meta": meta})
        headers = {"mcp-protocol-version": MODERN, "mcp-method": "tools/call", "mcp-name": name}

        with json_log("fedmcp.calls") as buffer:
            reply = await McpClient().post(body, headers)

        assert reply.status == 200, reply
        [entry] = lines(buffer)
        assert entry["request_id"] == "hop-7f3a"
        assert entry["peer"] == "everything"
        assert entry["method"] == "tools/call"
        assert entry["user"] == "alice"
        assert entry["outcome"] == "ok"

    async def test_a_host_request_is_logged_under_its_x_request_id_with_its_session(self) -> None:
        client = McpClient()
        await client.initialize()
        name = "everything__add"

        with json_log("fedmcp.calls") as buffer:
            reply = await client.post(request("tools/call", {"name": name, "arguments": {"a": 1, "b": 2}}, 9), {"x-request-id": "host-99"})

        assert reply.status == 200, reply
        [entry] = lines(buffer)
        assert entry["request_id"] == "host-99"
        assert client.session_id is not None and entry["session"] == client.session_id[: observability.SESSION_LOG_CHARS]
