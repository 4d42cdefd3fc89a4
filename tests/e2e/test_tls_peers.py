"""Peers served over HTTPS with a test CA on loopback, behind a real gateway.

The fixture MCP server runs over HTTPS three times: Streamable HTTP, legacy HTTP+SSE, and
Streamable HTTP requiring client certificates (mutual TLS). The certificates come from a
throwaway CA made for this module (tests/federation/pki.py). The operator registers peers with
`manage.py peer add … --ca-file` (and `--client-cert-file/--client-key-file`), hosts call the
gateway's /mcp, and every refusal must say which peer failed and why: in `peer add`, in
`peer refresh` and to hosts as JSON-RPC -32010.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mcp_endpoint import jsonrpc
from tests.e2e.harness import BIN, ROOT, Gateway, fixture_server, own_keys, trust
from tests.federation.pki import Pki, https_fixture_server

pytestmark = pytest.mark.e2e

HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json", "MCP-Protocol-Version": "2026-07-28"}
META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
VERIFY_FAILED = "TLS certificate verify failed"


@pytest.fixture(scope="module")
def pem_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return Pki.create().write(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def upstreams(pem_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The HTTPS fixture servers by kind: "http", "sse" and "mutual" (Streamable HTTP with mTLS)."""
    logs = tmp_path_factory.mktemp("https-upstreams")
    with (
        https_fixture_server(pem_files, log_dir=logs) as http_url,
        https_fixture_server(pem_files, transport="sse", log_dir=logs) as sse_url,
        https_fixture_server(pem_files, mutual=True, log_dir=logs) as mutual_url,
    ):
        yield {"http": http_url, "sse": sse_url, "mutual": mutual_url}


@pytest.fixture(scope="module")
def gateway(upstreams: dict[str, str]) -> Iterator[Gateway]:
    """The hosts' gateway. It stops before the upstreams do (pytest tears fixtures down in the
    reverse order of setup): an HTTPS fixture still holding the gateway's streams would wait
    for them on SIGTERM until the harness kills it, 10 s later."""
    with Gateway(name="tls") as gw:
        gw.migrate()
        gw.start_worker()
        yield gw


def peer(gateway: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    return gateway.manage("peer", *args, check=False)


def call(gateway: Gateway, method: str, params: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    """Send one 2026-07-28 request to the gateway's /mcp as alice; return the JSON-RPC reply."""
    headers = {**HEADERS, **gateway.auth_headers(), "Mcp-Method": method} | ({"Mcp-Name": name} if name else {})
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": {**params, "_meta": META}}
    response = httpx.post(gateway.url("/mcp"), json=body, headers=headers, timeout=60)
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:")]
        return next(e for e in events if e.get("id") == 1)
    return response.json()


def add_42(gateway: Gateway, peer_name: str) -> dict[str, Any]:
    tool = f"{peer_name}__add"
    return call(gateway, "tools/call", {"name": tool, "arguments": {"a": 20, "b": 22}}, name=tool)


def assert_works(gateway: Gateway, peer_name: str) -> None:
    tools = {t["name"] for t in call(gateway, "tools/list", {})["result"]["tools"]}
    assert f"{peer_name}__add" in tools
    reply = add_42(gateway, peer_name)
    assert reply.get("result", {}).get("content", [{}])[0].get("text") == "42", reply


def test_a_streamable_http_peer_over_https_works_once_its_ca_is_configured(
    gateway: Gateway, upstreams: dict[str, str], pem_files: dict[str, Path]
) -> None:
    refused = peer(gateway, "add", "web-noca", "--url", upstreams["http"], "--force")
    added = peer(gateway, "add", "web", "--url", upstreams["http"], "--ca-file", str(pem_files["ca"]))

    assert refused.returncode == 0, refused.stderr  # kept, to be fixed with `peer tls`
    assert "peer 'web-noca'" in refused.stderr and VERIFY_FAILED in refused.stderr and "CA bundle" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert added.returncode == 0 and "Synced web" in added.stdout, added.stderr
    assert_works(gateway, "web")
    fixed = peer(gateway, "tls", "web-noca", "--ca-file", str(pem_files["ca"]))
    assert fixed.returncode == 0 and "Synced web-noca" in fixed.stdout, fixed.stderr


def test_an_sse_peer_over_https_works_with_its_ca(gateway: Gateway, upstreams: dict[str, str], pem_files: dict[str, Path]) -> None:
    added = peer(gateway, "add", "legacy", "--transport", "sse", "--url", upstreams["sse"], "--ca-file", str(pem_files["ca"]))

    assert added.returncode == 0 and "Synced legacy" in added.stdout, added.stderr
    assert_works(gateway, "legacy")


def test_a_peer_whose_certificate_stops_verifying_fails_calls_with_32010_and_refresh_says_why(
    gateway: Gateway, upstreams: dict[str, str], pem_files: dict[str, Path]
) -> None:
    peer(gateway, "add", "revoked", "--url", upstreams["http"], "--ca-file", str(pem_files["ca"]))
    assert_works(gateway, "revoked")

    # The operator drops the CA: the catalog stays, but nothing verifies the peer any more.
    dropped = peer(gateway, "tls", "revoked", "--no-ca")
    reply = add_42(gateway, "revoked")
    refresh = peer(gateway, "refresh", "revoked")

    assert dropped.returncode == 1 and VERIFY_FAILED in dropped.stderr
    assert reply["error"]["code"] == jsonrpc.UPSTREAM_ERROR, reply
    assert "peer 'revoked'" in reply["error"]["message"] and VERIFY_FAILED in reply["error"]["message"]
    assert refresh.returncode == 1 and VERIFY_FAILED in refresh.stderr and "Traceback" not in refresh.stderr


def test_a_peer_requiring_client_certificates_works_with_one_and_is_refused_clearly_without(
    gateway: Gateway, upstreams: dict[str, str], pem_files: dict[str, Path]
) -> None:
    ca = ["--ca-file", str(pem_files["ca"])]
    without = peer(gateway, "add", "mutual-nocert", "--url", upstreams["mutual"], *ca)
    added = peer(
        gateway, "add", "mutual", "--url", upstreams["mutual"], *ca,
        "--client-cert-file", str(pem_files["client_cert"]), "--client-key-file", str(pem_files["client_key"]),
    )
    listed = peer(gateway, "list")

    assert "peer 'mutual-nocert'" in without.stderr and "client certificate" in without.stderr, without.stderr
    assert added.returncode == 0 and "Synced mutual" in added.stdout, added.stderr
    assert_works(gateway, "mutual")
    assert "PRIVATE KEY" not in listed.stdout and "tls=ca-bundle,client-cert" in listed.stdout


# --- fedmcp itself behind TLS, as a peer gateway ---------------------------------------------------


def serve_over_tls(gateway: Gateway, pem_files: dict[str, Path]) -> str:
    """Start a daphne worker of `gateway` on its own TLS endpoint (docs/DEPLOYMENT.md); return its origin."""
    endpoint = (
        f"ssl:port={gateway.port}:interface=127.0.0.1:privateKey={pem_files['server_key']}:certKey={pem_files['server_cert']}"
    )
    log_path = gateway.dir / f"daphne-tls-{gateway.port}.log"
    gateway._logs.append(log_path)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(BIN / "daphne"), "-e", endpoint, "fedmcp_site.asgi:application"],
            cwd=ROOT, env=gateway.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    gateway.workers.append((process, gateway.port))  # stopped with the gateway
    origin = f"https://127.0.0.1:{gateway.port}"
    verify = ssl.create_default_context(cafile=str(pem_files["ca"]))
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"daphne with TLS exited with {process.returncode}:\n{gateway.logs()}")
        try:
            if httpx.get(f"{origin}/healthz", verify=verify, timeout=2).status_code == 200:
                return origin
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"daphne with TLS did not answer:\n{gateway.logs()}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def tls_gateway(pem_files: dict[str, Path]) -> Iterator[Gateway]:
    """A second gateway, served by daphne over TLS, with the plain fixture server as its peer."""
    with fixture_server(name="fixture") as fixture_url, Gateway(name="b-tls", env=own_keys()) as gw:
        gw.env["FEDMCP_PUBLIC_URL"] = gw.public_url = f"https://127.0.0.1:{gw.port}"
        gw.migrate()
        gw.command("peer", "add", "fixture", "--url", fixture_url)
        serve_over_tls(gw, pem_files)
        yield gw


def test_a_gateway_served_by_daphne_over_tls_is_a_peer_over_https_and_wss(
    gateway: Gateway, tls_gateway: Gateway, pem_files: dict[str, Path], request: pytest.FixtureRequest
) -> None:
    client_id, secret = trust(tls_gateway, gateway, "tls")
    # The mutual half: the gateway trusts b-tls in turn, so it believes b-tls's names (b-tls.*).
    trust(gateway, tls_gateway, "b-tls")
    request.addfinalizer(lambda: gateway.manage("gateway", "untrust", "b-tls"))
    secret_file = gateway.dir / "b-tls.client-secret"
    secret_file.write_text(secret)
    credentials = ["--gateway", "--client-id", client_id, "--client-secret-file", str(secret_file), "--ca-file", str(pem_files["ca"])]
    tool = {"name": "b-tls.fixture__add", "arguments": {"a": 20, "b": 22}}

    # Token discovery and the token request go to the TLS gateway with the peer's CA too.
    over_https = peer(gateway, "add", "b-https", "--url", f"{tls_gateway.public_url}/mcp", *credentials)
    assert over_https.returncode == 0 and "Synced b-https" in over_https.stdout, over_https.stderr
    assert call(gateway, "tools/call", tool, name=tool["name"])["result"]["content"][0]["text"] == "42"

    peer(gateway, "remove", "b-https")
    ws_url = tls_gateway.public_url.replace("https://", "wss://") + "/ws"
    over_wss = peer(gateway, "add", "b-wss", "--transport", "websocket", "--url", ws_url, *credentials)
    assert over_wss.returncode == 0 and "Synced b-wss" in over_wss.stdout, over_wss.stderr
    assert call(gateway, "tools/call", tool, name=tool["name"])["result"]["content"][0]["text"] == "42"

    unverified = peer(gateway, "add", "b-unverified", "--transport", "websocket", "--url", ws_url, *credentials[:-2])
    assert "peer 'b-unverified'" in unverified.stderr and VERIFY_FAILED in unverified.stderr, unverified.stderr
    assert "Traceback" not in unverified.stderr
