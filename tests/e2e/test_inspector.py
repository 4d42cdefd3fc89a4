"""The MCP Inspector CLI (Node, installed by `make tools`) lists and calls tools through the gateway.

Each run is one Inspector process against the shared gateway's /mcp, in the handshake era
(`--protocol-era legacy`, the Inspector's default) and in 2026-07-28 (`modern`), sending alice's
token with `--header "Authorization: Bearer …"`.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from tests.e2e.conftest import PEERS
from tests.e2e.harness import INSPECTOR_JS, NODE, ROOT, Gateway

pytestmark = pytest.mark.e2e

WAIT = 60.0
"""Upper bound for one Inspector run; a healthy one takes well under a second."""
ERAS = ["legacy", "modern"]


def inspector(gateway: Gateway, era: str, *args: str) -> Any:
    """Run the Inspector CLI against the gateway's /mcp; return its parsed JSON output."""
    if not (NODE.exists() and INSPECTOR_JS.exists()):
        pytest.skip("Node and the MCP Inspector are not installed; run `make tools`")
    command = [
        str(NODE),
        str(INSPECTOR_JS),
        "--cli",
        gateway.url("/mcp"),
        "--transport",
        "http",
        "--protocol-era",
        era,
        "--format",
        "json",
        *(f"--header={name}: {value}" for name, value in gateway.auth_headers().items()),
        *args,
    ]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=WAIT)
    assert run.returncode == 0, f"inspector exited {run.returncode}:\n{run.stdout}\n{run.stderr}"
    return json.loads(run.stdout)


@pytest.mark.parametrize("era", ERAS)
def test_the_inspector_lists_the_tools_of_both_peers(gateway: Gateway, era: str) -> None:
    output = inspector(gateway, era, "--method", "tools/list")
    names = {tool["name"] for tool in output["result"]["tools"]}
    for peer in PEERS:
        assert {f"{peer}__add", f"{peer}__whoami"} <= names


@pytest.mark.parametrize("era", ERAS)
def test_the_inspector_calls_a_tool(gateway: Gateway, era: str) -> None:
    output = inspector(
        gateway, era, "--method", "tools/call", "--tool-name", "web__add", "--tool-arg", "a=2", "--tool-arg", "b=3"
    )
    result = output["result"]
    assert result["isError"] is False
    assert [block["text"] for block in result["content"] if block["type"] == "text"] == ["5"]


def test_the_inspector_reaches_the_stdio_peer(gateway: Gateway) -> None:
    output = inspector(gateway, "legacy", "--method", "tools/call", "--tool-name", "local__whoami")
    assert [block["text"] for block in output["result"]["content"]] == ["local"]
