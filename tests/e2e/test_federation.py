"""Gateways peering gateways: A peers B, B peers C, C has the fixture upstream.

Each gateway is its own daphne process with its own database. Names on A say where a thing
lives (`c.fixture__add`) without prefixes piling up per hop; calls, progress, cancellation and
list_changed cross both hops; a loop between gateways is refused at once.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client

from mcp_endpoint import jsonrpc
from tests.e2e.harness import PY, ROOT, Gateway, fixture_server

pytestmark = pytest.mark.e2e

MODERN_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json", "MCP-Protocol-Version": "2026-07-28"}
META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}


def modern_call(url: str, method: str, params: dict[str, Any], *, name: str | None = None, timeout: float = 30) -> dict[str, Any]:
    headers = {**MODERN_HEADERS, "Mcp-Method": method}
    if name is not None:
        headers["Mcp-Name"] = name
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": {**params, "_meta": META}}
    response = httpx.post(url, json=body, headers=headers, timeout=timeout)
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:")]
        return next(e for e in events if e.get("id") == 1)
    return response.json()


def tool_names(url: str) -> set[str]:
    reply = modern_call(url, "tools/list", {})
    return {tool["name"] for tool in reply["result"]["tools"]}


@pytest.fixture(scope="module")
def chain() -> Iterator[dict[str, Gateway]]:
    """Three gateways: a -> b -> c -> fixture."""
    with fixture_server(name="fixture") as fixture_url:
        gateways = {name: Gateway(name=name) for name in ("c", "b", "a")}
        try:
            for gateway in gateways.values():
                gateway.migrate()
            c, b, a = gateways["c"], gateways["b"], gateways["a"]
            c.manage("peer", "add", "fixture", "--url", fixture_url)
            c.start_worker()
            b.manage("peer", "add", "c", "--url", c.url("/mcp"), "--gateway")
            b.start_worker()
            a.manage("peer", "add", "b", "--url", b.url("/mcp"), "--gateway")
            a.start_worker()
            yield gateways
        except BaseException:
            for gateway in gateways.values():
                print(gateway.logs())
            raise
        finally:
            for gateway in gateways.values():
                gateway.cleanup()


def test_a_host_on_a_sees_c_tools_under_their_home(chain: dict[str, Gateway]) -> None:
    names_on_a = tool_names(chain["a"].url("/mcp"))
    names_on_b = tool_names(chain["b"].url("/mcp"))

    assert "c.fixture__add" in names_on_a
    # The same name on every gateway but the owner: no prefix per hop.
    assert "c.fixture__add" in names_on_b
    assert not any(name.startswith(("b.", "a.")) for name in names_on_a)


def test_a_call_goes_a_to_b_to_c_and_back(chain: dict[str, Gateway]) -> None:
    reply = modern_call(chain["a"].url("/mcp"), "tools/call", {"name": "c.fixture__add", "arguments": {"a": 20, "b": 22}}, name="c.fixture__add")

    assert reply["result"]["content"][0]["text"] == "42"


def test_progress_crosses_both_hops_and_cancelling_on_a_cancels_on_c(chain: dict[str, Gateway]) -> None:
    progress: list[float] = []

    async def scenario() -> dict[str, Any]:
        async with Client(chain["a"].url("/mcp"), mode="legacy") as client:
            first_progress = anyio.Event()

            async def on_progress(value: float, total: float | None, message: str | None) -> None:
                progress.append(value)
                first_progress.set()

            async def slow_call() -> None:
                await client.call_tool("c.fixture__slow_echo", {"text": "never", "delay_ms": 60_000}, progress_callback=on_progress)

            async with anyio.create_task_group() as group:
                group.start_soon(slow_call)
                with anyio.fail_after(20):
                    await first_progress.wait()
                group.cancel_scope.cancel()

            # The cancellation travels A -> B -> C -> fixture; poll the fixture's counter.
            with anyio.fail_after(20):
                while True:
                    result = await client.call_tool("c.fixture__stats", {})
                    stats = json.loads(result.content[0].text)  # type: ignore[union-attr]
                    if stats["slow_echo_cancelled"] >= 1:
                        return stats
                    await anyio.sleep(0.1)

    stats = anyio.run(scenario)

    assert progress, "no progress notification crossed the two hops"
    assert stats["slow_echo_cancelled"] >= 1


def test_a_tool_added_at_c_reaches_a_host_on_a_with_list_changed(chain: dict[str, Gateway]) -> None:
    url = chain["a"].url("/mcp")

    async def scenario() -> set[str]:
        changed = anyio.Event()

        async def on_message(message: Any) -> None:
            if getattr(getattr(message, "root", message), "method", None) == "notifications/tools/list_changed":
                changed.set()

        async with Client(url, mode="legacy", message_handler=on_message) as client:
            await client.call_tool("c.fixture__register_tool", {"name": "brand_new"})
            with anyio.fail_after(30):
                await changed.wait()
            listed = await client.list_tools()
            return {tool.name for tool in listed.tools}

    names = anyio.run(scenario)

    assert "c.fixture__brand_new" in names


def test_a_loop_between_two_gateways_is_refused(chain: dict[str, Gateway]) -> None:
    a, b = chain["a"], chain["b"]
    # B also peers A, and both hold a stale entry for a tool whose owner is gone: each
    # routes it to the other. Without the hop record this call would bounce forever.
    b.manage("peer", "add", "a", "--url", a.url("/mcp"), "--gateway")
    stale = (
        "from federation.models import CatalogEntry, Peer;"
        "peer = Peer.objects.get(name='{peer}');"
        "CatalogEntry.objects.create(peer=peer, kind='tool', upstream_name='z.ghost__vanish', name='z.ghost__vanish', home='z.ghost',"
        " payload={{'name': 'z.ghost__vanish', 'inputSchema': {{'type': 'object'}}}})"
    )
    for gateway, peer in ((a, "b"), (b, "a")):
        subprocess.run([PY, "manage.py", "shell", "-c", stale.format(peer=peer)], cwd=ROOT, env=gateway.env, check=True, capture_output=True)
    try:
        # The short client timeout turns a hang into a failure; the refusal itself is immediate.
        reply = modern_call(a.url("/mcp"), "tools/call", {"name": "z.ghost__vanish", "arguments": {}}, name="z.ghost__vanish", timeout=5)
    finally:
        b.manage("peer", "remove", "a")

    assert reply["error"]["code"] == jsonrpc.FEDERATION_LOOP
    assert reply["error"]["data"]["hops"] == ["a", "b", "a"]
