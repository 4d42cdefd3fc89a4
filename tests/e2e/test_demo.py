"""`make demo`: the gateway starts with the fixture (HTTP) and mcp-server-time (stdio) registered.

The host is alice, with a token from `manage.py token` for the demo's origin (the demo sets no
FEDMCP_PUBLIC_URL: the gateway's origin is the one hosts address it by).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.e2e.harness import PY, ROOT, copy_migrated_sqlite, free_port, mint_token, wait_http

pytestmark = pytest.mark.e2e

HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json", "MCP-Protocol-Version": "2026-07-28"}
META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}


def test_demo_starts_the_gateway_with_two_upstreams(tmp_path: Path) -> None:
    workdir = tmp_path
    # No consent prompt in the way of the scripted host (docs/CONSENT.md).
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{workdir / 'db.sqlite3'}", "FEDMCP_SECRET_KEY": "demo-test", "FEDMCP_CONSENT_DEFAULT": "allow"}
    env.pop("REDIS_URL", None)
    env.pop("FEDMCP_PUBLIC_URL", None)
    copy_migrated_sqlite(workdir / "db.sqlite3")  # `make demo` migrates first
    port = free_port()
    headers = {**HEADERS, "Authorization": f"Bearer {mint_token(env, resource=f'http://127.0.0.1:{port}')}"}
    log = open(workdir / "demo.log", "wb")  # noqa: SIM115
    demo = subprocess.Popen([PY, "scripts/demo.py", "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # A bound on a hang, not on speed: before daphne starts, the demo runs six Django
        # processes one after another (~30 s of CPU), and `make test` shares two cores among
        # the unit tests and two e2e workers.
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=180, process=demo)
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": META}}
        reply = httpx.post(f"http://127.0.0.1:{port}/mcp", json=body, headers={**headers, "Mcp-Method": "tools/list"}, timeout=30).json()
        names = {tool["name"] for tool in reply["result"]["tools"]}
        assert "fixture__add" in names
        assert "time__get_current_time" in names
        params = {"name": "time__get_current_time", "arguments": {"timezone": "UTC"}, "_meta": META}
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": params}
        reply = httpx.post(
            f"http://127.0.0.1:{port}/mcp", json=call,
            headers={**headers, "Mcp-Method": "tools/call", "Mcp-Name": "time__get_current_time"}, timeout=30,
        ).json()
        assert json.loads(reply["result"]["content"][0]["text"])["timezone"] == "UTC"
    finally:
        os.killpg(demo.pid, signal.SIGTERM)
        demo.wait(timeout=30)
        log.close()
    output = (workdir / "demo.log").read_text()
    assert f"http://127.0.0.1:{port}/mcp" in output, output[-3000:]
