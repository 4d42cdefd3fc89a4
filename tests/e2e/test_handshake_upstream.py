"""A handshake-era host gets the handshake era from an upstream that offers it, as if no gateway stood between.

The upstream is the official SDK's `MCPServer` (tests/fixtures/context_server.py) over
Streamable HTTP, whose tools ask the client mid-call with the handshake-era API (`ctx.elicit`,
`ctx.session.create_message`). It lists only 2026-07-28 in `server/discover` but accepts
`initialize` too. A gateway that talked to it in 2026-07-28 for every host would leave those
tools without a back-channel; the gateway must open a handshake-era connection for a
handshake-era host, and relay the requests to that host.

The host is the SDK client in legacy mode (protocol 2025-11-25), on /mcp and on /peers/x/mcp.
The gateway keeps the shipped consent defaults (ask); alice, the host's user, has policies
allowing the peer's tools and its sampling and elicitation requests. bob has none: his calls
are still asked about, and time out unanswered.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mcp_types as types
import pytest
from mcp.client.session import ClientRequestContext
from mcp.shared.exceptions import MCPError
from mcp_types.version import LATEST_HANDSHAKE_VERSION

from mcp_endpoint import jsonrpc
from tests.e2e import harness
from tests.e2e.conftest import sdk_client

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

PEER = "x"
SSE_PEER = "y"
"""The same server over legacy HTTP+SSE: handshake era only."""
CONSENT_TIMEOUT = 3
"""Seconds an unanswered consent prompt waits (bob's calls); alice's calls never wait."""
ENDPOINTS = [pytest.param(("/mcp", f"{PEER}__"), id="aggregated"), pytest.param((f"/peers/{PEER}/mcp", ""), id="per-peer")]


@contextlib.contextmanager
def context_server(log_dir: Path, transport: str) -> Iterator[str]:
    """Run tests/fixtures/context_server.py over `transport`; yield its URL (/mcp, or /sse)."""
    port = harness.free_port()
    log = open(log_dir / f"context-{transport}.log", "wb")  # noqa: SIM115
    command = [harness.PY, "-m", "tests.fixtures.context_server", "--port", str(port), "--transport", transport]
    process = subprocess.Popen(command, cwd=harness.ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        path = "/sse" if transport == "sse" else "/mcp"
        # Not /sse itself: that answers with a stream that never ends.
        harness.wait_http(f"http://127.0.0.1:{port}{'/messages/' if transport == 'sse' else path}", process=process)
        yield f"http://127.0.0.1:{port}{path}"
    finally:
        harness.stop(process)
        log.close()


@pytest.fixture(scope="module")
def context_upstream_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with context_server(tmp_path_factory.mktemp("context-server"), "streamable-http") as url:
        yield url


@pytest.fixture(scope="module")
def context_sse_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with context_server(tmp_path_factory.mktemp("context-sse"), "sse") as url:
        yield url


@pytest.fixture(scope="module")
def gateway(context_upstream_url: str, context_sse_url: str) -> Iterator[harness.Gateway]:
    shipped_consent = {
        "FEDMCP_CONSENT_DEFAULT": "ask-new-peers",
        "FEDMCP_CONSENT_SAMPLING_DEFAULT": "ask",
        "FEDMCP_CONSENT_ELICITATION_DEFAULT": "ask",
        "FEDMCP_CONSENT_TIMEOUT": str(CONSENT_TIMEOUT),
    }
    with harness.Gateway(name="handshake-upstream", env=shipped_consent) as gw:
        gw.migrate()
        gw.command("peer", "add", PEER, "--url", context_upstream_url)
        gw.command("peer", "add", SSE_PEER, "--url", context_sse_url, "--transport", "sse")
        gw.python(
            "from identity.models import ConsentPolicy\n"
            + "".join(
                f"ConsentPolicy.objects.create(peer={peer!r}, kind={kind!r}, username='alice', decision='allow')\n"
                for peer in (PEER, SSE_PEER)
                for kind in ("", "sampling", "elicitation")
            )
        )
        gw.auth_headers("alice")
        gw.auth_headers("bob")
        gw.start_worker()
        yield gw


def text_of(result: types.CallToolResult) -> str:
    return " ".join(block.text for block in result.content if isinstance(block, types.TextContent))


async def answer_name(context: ClientRequestContext, params: types.ElicitRequestParams) -> types.ElicitResult:
    return types.ElicitResult(action="accept", content={"name": "Alice"})


async def answer_llm(context: ClientRequestContext, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
    return types.CreateMessageResult(role="assistant", content=types.TextContent(type="text", text="Paris"), model="test-model")


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_an_upstream_elicitation_reaches_a_handshake_era_host(gateway: harness.Gateway, endpoint: tuple[str, str]) -> None:
    path, prefix = endpoint
    async with sdk_client(gateway.url(path), headers=gateway.auth_headers("alice"), mode="legacy", elicitation_callback=answer_name) as client:
        assert client.protocol_version == LATEST_HANDSHAKE_VERSION
        result = await client.call_tool(f"{prefix}ask_name", {})
    assert not result.is_error, text_of(result)
    assert text_of(result) == "hello, Alice"


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_an_upstream_sampling_request_reaches_a_handshake_era_host(gateway: harness.Gateway, endpoint: tuple[str, str]) -> None:
    path, prefix = endpoint
    asked: list[types.CreateMessageRequestParams] = []

    async def sampling(context: ClientRequestContext, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        asked.append(params)
        return await answer_llm(context, params)

    async with sdk_client(gateway.url(path), headers=gateway.auth_headers("alice"), mode="legacy", sampling_callback=sampling) as client:
        result = await client.call_tool(f"{prefix}ask_llm", {"prompt": "Capital of France?"})
    assert not result.is_error, text_of(result)
    assert text_of(result) == "llm said: Paris"
    assert [m.content for m in asked[0].messages] == [types.TextContent(type="text", text="Capital of France?")]


async def test_a_2026_host_is_served_too(gateway: harness.Gateway) -> None:
    # The same upstream for a 2026-07-28 host: the tools list, and a call that asks nobody.
    async with sdk_client(gateway.url("/mcp"), headers=gateway.auth_headers("alice"), mode="2026-07-28") as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
    assert {f"{PEER}__ask_name", f"{PEER}__ask_llm"} <= names


async def test_a_2026_host_answers_a_handshake_only_upstream_in_input_required_rounds(gateway: harness.Gateway) -> None:
    # The server over HTTP+SSE speaks only the handshake era: its ctx.elicit and sampling wait
    # mid-call. The SDK's 2026-07-28 client gets them as input_required rounds of the same
    # call, answers through its callbacks, and the held upstream call completes.
    async with sdk_client(
        gateway.url("/mcp"), headers=gateway.auth_headers("alice"), mode="2026-07-28", elicitation_callback=answer_name, sampling_callback=answer_llm
    ) as client:
        named = await client.call_tool(f"{SSE_PEER}__ask_name", {})
        sampled = await client.call_tool(f"{SSE_PEER}__ask_llm", {"prompt": "Capital of France?"})
    assert not named.is_error and text_of(named) == "hello, Alice", text_of(named)
    assert not sampled.is_error and text_of(sampled) == "llm said: Paris", text_of(sampled)


async def test_without_a_policy_the_shipped_default_still_asks(gateway: harness.Gateway) -> None:
    # bob has no policy: the call waits for his consent, which nobody gives, and times out. His
    # host is pointed at the consent page (URL-mode elicitation); the upstream is never reached.
    asked: list[Any] = []

    async def elicitation(context: ClientRequestContext, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append(params)
        return await answer_name(context, params)

    async with sdk_client(gateway.url("/mcp"), headers=gateway.auth_headers("bob"), mode="legacy", elicitation_callback=elicitation) as client:
        with pytest.raises(MCPError) as failure:
            await client.call_tool(f"{PEER}__ask_name", {})
    assert failure.value.code == jsonrpc.CONSENT_TIMEOUT
    assert [(p.mode, "/consent/" in p.url) for p in asked] == [("url", True)]
