"""`manage.py peer …` run as an operator runs it: a process of its own, output on the terminal."""

from __future__ import annotations

import shlex
import sys
import textwrap
from pathlib import Path

import pytest

from tests.e2e import harness

# A handshake-era stdio server that keeps running after its input closes, started by a shell
# that waits for it: the shape of `npx -y some-server` (npx → node) or `uvx some-server`.
STUBBORN_SERVER = textwrap.dedent(
    """
    import json, sys, time
    for line in sys.stdin:
        message = json.loads(line)
        if "id" not in message:
            continue
        if message.get("method") == "initialize":
            result = {"protocolVersion": "2025-06-18", "capabilities": {"tools": {}}, "serverInfo": {"name": "stubborn", "version": "1"}}
        elif message.get("method") == "tools/list":
            result = {"tools": [{"name": "noop", "inputSchema": {"type": "object"}}]}
        else:
            print(json.dumps({"jsonrpc": "2.0", "id": message["id"], "error": {"code": -32601, "message": "no"}}), flush=True)
            continue
        print(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}), flush=True)
    time.sleep(120)
    """
)


def _processes_running(marker: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "cmdline").read_bytes().decode(errors="replace") and (proc / "stat").read_text().split(") ")[1][0] != "Z":
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


@pytest.fixture
def gateway() -> harness.Gateway:
    with harness.Gateway(name="cli") as gw:
        gw.migrate()
        yield gw


def test_refresh_of_a_server_with_children_prints_no_traceback_and_leaves_no_process(gateway: harness.Gateway, tmp_path: Path) -> None:
    script = tmp_path / "stubborn_server.py"
    script.write_text(STUBBORN_SERVER)
    command = shlex.join(["bash", "-c", f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}; echo done >&2"])
    gateway.manage("peer", "add", "stubborn", "--command", command)

    result = gateway.manage("peer", "refresh", "stubborn", check=False)

    assert result.returncode == 0, result.stderr
    assert "Synced stubborn" in result.stdout
    assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr, result.stderr
    assert _processes_running(str(script)) == []
