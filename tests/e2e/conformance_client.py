"""fedmcp as the client under test of the conformance suite's client scenarios.

`conformance client --command "python -m tests.e2e.conformance_client" --scenario S` starts the
scenario's server and runs this program with that server's URL appended. The client the suite
judges is the gateway: this program adds the scenario server as a peer through the gateway's
REST API (so the gateway connects, discovers or initializes, and lists its catalog with its own
client code), then plays a host on `/peers/<peer>/mcp` with the official SDK client, in the era
the scenario runs at, and does what the scenario asks of a client: list, call the tools (the
calls `MCP_CONFORMANCE_CONTEXT` names, or each listed tool with arguments made from its schema),
answer elicitations with the requested schema's defaults. Every request the scenario server
sees was made by the gateway.

Environment: `FEDMCP_CONFORMANCE_GATEWAY` (the gateway's base URL), `FEDMCP_CONFORMANCE_TOKEN`
(a token with the `admin` and MCP scopes), and the suite's `MCP_CONFORMANCE_SCENARIO`,
`MCP_CONFORMANCE_CONTEXT`, `MCP_CONFORMANCE_PROTOCOL_VERSION`. Exits non-zero when the gateway
refuses the peer or a step fails, printing why.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import sys
from typing import Any

import httpx
import httpx2
import mcp_types as types
from mcp import Client
from mcp.client.session import ClientRequestContext
from mcp.client.streamable_http import streamable_http_client
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

JsonDict = dict[str, Any]
WAIT = 20.0
"""Bound on each step (seconds): the suite's own timeout for a client is 30 s."""
LIST_ONLY = frozenset({"initialize", "request-metadata", "json-schema-ref-no-deref"})
"""Scenarios that judge what the client sends while connecting and listing, and serve no tool call."""
ECHO_TOOL = "json_schema_echo"
FOCAL_TOOL = "json_schema_2020_12_tool"


def example(schema: Any) -> Any:
    """Return a value a JSON schema accepts: its default, first enum member, or one of its type."""
    if not isinstance(schema, dict):
        return "x"
    if "default" in schema:
        return schema["default"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties") or {}
        return {name: example(properties.get(name)) for name in schema.get("required") or []}
    return {"boolean": True, "integer": 1, "number": 1.5, "array": [], "null": None}.get(kind, "x")  # type: ignore[arg-type]


def accept_all(requested: Any) -> JsonDict:
    """The content of an elicitation accepted with every field the schema lists (SEP-1034 defaults first)."""
    properties = (requested or {}).get("properties") or {}
    return {name: example(schema) for name, schema in properties.items()}


async def elicit(context: ClientRequestContext, params: types.ElicitRequestParams) -> types.ElicitResult:
    requested = getattr(params, "requested_schema", None)
    schema = requested.model_dump(by_alias=True, exclude_none=True) if hasattr(requested, "model_dump") else requested
    return types.ElicitResult(action="accept", content=accept_all(schema))


async def sample(context: ClientRequestContext, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
    return types.CreateMessageResult(role="assistant", content=types.TextContent(type="text", text="sampled"), model="conformance")


def add_peer(gateway: str, token: str, name: str, url: str) -> tuple[int, JsonDict]:
    """Add the scenario server as a peer; return its id and the gateway's sync report."""
    reply = httpx.post(
        f"{gateway}/api/peers/", json={"name": name, "url": url, "connect_timeout": 10, "call_timeout": WAIT},
        headers={"Authorization": f"Bearer {token}"}, timeout=WAIT * 2,
    )
    if reply.status_code != 201:
        raise SystemExit(f"the gateway refused the peer ({reply.status_code}): {reply.text}")
    body = reply.json()
    return body["peer"]["id"], body.get("sync") or {}


def remove_peer(gateway: str, token: str, peer_id: int) -> None:
    """Remove the peer: the gateway closes its warm connections, and the scenario server can stop."""
    reply = httpx.delete(f"{gateway}/api/peers/{peer_id}/", headers={"Authorization": f"Bearer {token}"}, timeout=WAIT)
    if reply.status_code >= 300:
        print(f"removing the peer failed ({reply.status_code}): {reply.text}", file=sys.stderr)


def planned_calls(scenario: str, tools: list[types.Tool]) -> list[tuple[str, JsonDict]]:
    """Return the (tool, arguments) calls the scenario expects of a client."""
    context = json.loads(os.environ.get("MCP_CONFORMANCE_CONTEXT") or "{}")
    if isinstance(context.get("toolCalls"), list):
        return [(c["name"], c.get("arguments") or {}) for c in context["toolCalls"]]
    if scenario in LIST_ONLY:
        return []
    by_name = {tool.name: tool for tool in tools}
    if ECHO_TOOL in by_name and FOCAL_TOOL in by_name:
        # Round-trip the schema as the host got it through the gateway (SEP-1613, SEP-2106).
        return [(ECHO_TOOL, {"schema": by_name[FOCAL_TOOL].input_schema})]
    if scenario == "tools_call":
        return [("add_numbers", {"a": 5, "b": 3})]
    return [(tool.name, example(tool.input_schema)) for tool in tools]


async def drive(gateway: str, token: str, peer: str, scenario: str, version: str) -> None:
    # "auto" asks server/discover, which the gateway answers, so it settles on 2026-07-28 and
    # knows the capabilities (a fixed "2026-07-28" mode skips discovery and knows none).
    mode = "auto" if version in MODERN_PROTOCOL_VERSIONS else "legacy"
    timeout = httpx2.Timeout(WAIT, read=WAIT * 2)
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=timeout) as http,
        Client(
            streamable_http_client(f"{gateway}/peers/{peer}/mcp", http_client=http), mode=mode,
            elicitation_callback=elicit, sampling_callback=sample,
        ) as client,
    ):
        capabilities = client.server_capabilities
        tools = (await client.list_tools()).tools if capabilities and capabilities.tools is not None else []
        print(f"capabilities: {capabilities}; tools: {[t.name for t in tools]}")
        if capabilities and capabilities.resources is not None:
            resources = (await client.list_resources()).resources
            if resources:
                await client.read_resource(resources[0].uri)
        if capabilities and capabilities.prompts is not None:
            prompts = (await client.list_prompts()).prompts
            if prompts:
                await client.get_prompt(prompts[0].name, {})
        for name, arguments in planned_calls(scenario, tools):
            result = await asyncio.wait_for(client.call_tool(name, arguments), WAIT)
            print(f"called {name}: {'error' if getattr(result, 'is_error', False) else 'ok'}")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.e2e.conformance_client <server-url>", file=sys.stderr)
        return 2
    gateway = os.environ["FEDMCP_CONFORMANCE_GATEWAY"].rstrip("/")
    token = os.environ["FEDMCP_CONFORMANCE_TOKEN"]
    scenario = os.environ.get("MCP_CONFORMANCE_SCENARIO", "")
    version = os.environ.get("MCP_CONFORMANCE_PROTOCOL_VERSION") or "2025-11-25"
    peer = re.sub(r"[^a-z0-9]+", "-", scenario.lower()).strip("-")[:30] + "-" + secrets.token_hex(3)
    peer_id, report = add_peer(gateway, token, peer, argv[0])
    try:
        print(f"peer {peer}: {json.dumps(report)}")
        if not report.get("ok", False):
            return 1
        asyncio.run(drive(gateway, token, peer, scenario, version))
    finally:
        remove_peer(gateway, token, peer_id)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
