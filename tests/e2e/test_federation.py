"""Gateways peering gateways: A peers B, B peers C, C has the fixture upstream.

Each gateway is its own daphne process with its own database, signing key and secrets key,
published at its own origin (FEDMCP_PUBLIC_URL). Names on A say where a thing lives
(`c.fixture__add`) without prefixes piling up per hop; calls, progress, cancellation and
list_changed cross both hops; a loop between gateways is refused at once.

Trust is real, set up with the operator commands: C trusts B and B trusts A (`gateway trust`),
each registers the other with the client credentials it was given (`peer add --gateway
--client-id --client-secret-file`), and trusts it in turn, so it believes the names it lists. Hosts send alice's token to A only; A calls B with its own
client-credentials token and a signed assertion that alice acts, B calls C likewise. No gateway
accepts anonymous requests.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest

from mcp_endpoint import jsonrpc
from tests.e2e.conftest import sdk_client
from tests.e2e.harness import Gateway, fixture_server, gateways, peer_gateway, trust_in_turn

pytestmark = pytest.mark.e2e

MODERN_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json", "MCP-Protocol-Version": "2026-07-28"}
META = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}
GATEWAY_SCOPE = "gateway mcp:tools mcp:resources mcp:prompts"
ADD = {"name": "c.fixture__add", "arguments": {"a": 20, "b": 22}}


def post(url: str, body: dict[str, Any], headers: dict[str, str], timeout: float = 30) -> httpx.Response:
    return httpx.post(url, json=body, headers={**MODERN_HEADERS, **headers}, timeout=timeout)


def reply_of(response: httpx.Response) -> dict[str, Any]:
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:")]
        return next(e for e in events if e.get("id") == 1)
    return response.json()


def modern_call(
    gateway: Gateway, method: str, params: dict[str, Any], *, name: str | None = None, timeout: float = 30,
    headers: dict[str, str] | None = None, meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Send one 2026-07-28 request to `gateway`'s /mcp (as alice unless `headers` say otherwise)."""
    extra = {**(headers or gateway.auth_headers()), "Mcp-Method": method}
    if name is not None:
        extra["Mcp-Name"] = name
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": {**params, "_meta": {**META, **(meta or {})}}}
    return reply_of(post(gateway.url("/mcp"), body, extra, timeout))


def tool_names(gateway: Gateway) -> set[str]:
    reply = modern_call(gateway, "tools/list", {})
    return {tool["name"] for tool in reply["result"]["tools"]}


def gateway_token(host: Gateway, credentials: tuple[str, str]) -> str:
    """Obtain a `gateway`-scoped client-credentials token at `host`, as a peer gateway does."""
    response = httpx.post(
        f"{host.public_url}/o/token/",
        data={"grant_type": "client_credentials", "scope": GATEWAY_SCOPE, "resource": host.public_url},
        auth=credentials,
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def sign_assertion(signer: Gateway, *, audience: str, via: list[str], issuer: str | None = None) -> str:
    """An assertion that alice acts, signed with `signer`'s own key (claiming `issuer` if given)."""
    code = (
        "import jwt, time, secrets; from identity.trust.signing import JWT_TYPE, issuer, signing_key; key = signing_key(); now = int(time.time());"
        f"claims = {{'iss': {issuer!r} or issuer(), 'sub': 'alice', 'aud': {audience!r}, 'iat': now, 'exp': now + 60,"
        f" 'jti': secrets.token_urlsafe(16), 'client_id': 'host', 'via': {via!r}}};"
        "print(jwt.encode(claims, key.private_key, algorithm=key.algorithm, headers={'kid': key.kid, 'typ': JWT_TYPE}))"
    )
    return signer.python(code)


def audit_events(gateway: Gateway, *, poll: bool = False) -> list[dict[str, Any]]:
    """`gateway`'s audit trail, oldest first; `poll` reads it through the gateway's interpreter (for polling loops)."""
    code = (
        "import json; from identity.models import AuditEvent;"
        "print(json.dumps(list(AuditEvent.objects.order_by('at').values("
        "'username', 'federated_issuer', 'federated_subject', 'client_id', 'via', 'peer', 'method', 'name', 'outcome', 'error_code'))))"
    )
    return json.loads((gateway.python if poll else gateway.shell)(code))


def wait_for_audit(gateway: Gateway, match: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
    """Poll `gateway`'s audit trail (written off the response path) for an event with `match`."""
    deadline = time.monotonic() + timeout
    while True:
        for event in audit_events(gateway, poll=True):
            if all(event.get(k) == v for k, v in match.items()):
                return event
        if time.monotonic() > deadline:
            raise AssertionError(f"no audit event {match} on {gateway.env['FEDMCP_GATEWAY_NAME']}: {audit_events(gateway)}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def chain() -> Iterator[dict[str, Any]]:
    """Three gateways: a -> b -> c -> fixture, each trusting the one before it."""
    with fixture_server(name="fixture") as fixture_url, gateways("c", "b", "a") as made:
        c, b, a = made["c"], made["b"], made["a"]
        a.auth_headers()  # alice's token on A, minted before any test runs
        c.command("peer", "add", "fixture", "--url", fixture_url)
        c.start_worker()
        b_at_c = peer_gateway(b, c)  # B discovers C's token endpoint from its metadata
        b.start_worker()
        a_at_b = peer_gateway(a, b)
        a.start_worker()
        yield {**made, "a_at_b": a_at_b, "b_at_c": b_at_c}


def test_a_host_on_a_sees_c_tools_under_their_home(chain: dict[str, Any]) -> None:
    names_on_a = tool_names(chain["a"])
    names_on_b = tool_names(chain["b"])

    assert "c.fixture__add" in names_on_a
    # The same name on every gateway but the owner: no prefix per hop.
    assert "c.fixture__add" in names_on_b
    assert not any(name.startswith(("b.", "a.")) for name in names_on_a)


def test_a_call_goes_a_to_b_to_c_and_back(chain: dict[str, Any]) -> None:
    reply = modern_call(chain["a"], "tools/call", ADD, name="c.fixture__add")

    assert reply["result"]["content"][0]["text"] == "42"


def test_each_gateway_audits_the_call_as_alice_from_her_home_gateway(chain: dict[str, Any]) -> None:
    a, b, c = chain["a"], chain["b"], chain["c"]
    reply = modern_call(a, "tools/call", {"name": "c.fixture__whoami", "arguments": {}}, name="c.fixture__whoami")
    assert reply["result"]["content"][0]["text"] == "fixture"

    # Each audits the name as the peer it forwarded to knows it.
    on_a = wait_for_audit(a, {"name": "c.fixture__whoami", "peer": "b"})
    on_b = wait_for_audit(b, {"name": "fixture__whoami", "peer": "c"})
    on_c = wait_for_audit(c, {"name": "whoami", "peer": "fixture"})

    assert (on_a["username"], on_a["federated_issuer"], on_a["outcome"]) == ("alice", "", "ok")
    # B knows alice only as A vouches for her: alice of A's issuer, come through A.
    assert (on_b["federated_issuer"], on_b["federated_subject"], on_b["via"]) == (a.public_url, "alice", ["a"])
    assert on_b["username"] == "" and on_b["outcome"] == "ok"
    # C trusts B, not A: B names alice as the user A asserted to it.
    assert (on_c["federated_issuer"], on_c["federated_subject"], on_c["via"]) == (b.public_url, f"alice@{a.public_url}", ["a", "b"])


def test_alices_token_for_a_is_refused_at_b(chain: dict[str, Any]) -> None:
    a, b = chain["a"], chain["b"]
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {**ADD, "_meta": META}}

    response = post(b.url("/mcp"), body, {**a.auth_headers(), "Mcp-Method": "tools/call", "Mcp-Name": ADD["name"]})

    assert response.status_code == 401


def test_a_gateway_token_without_an_assertion_may_list_but_not_call(chain: dict[str, Any]) -> None:
    b = chain["b"]
    headers = {"Authorization": f"Bearer {gateway_token(b, chain['a_at_b'])}"}

    listed = modern_call(b, "tools/list", {}, headers=headers)
    called = modern_call(b, "tools/call", ADD, name=ADD["name"], headers=headers, meta={"io.fedmcp/hops": ["a"]})

    assert "c.fixture__add" in {tool["name"] for tool in listed["result"]["tools"]}
    assert called["error"]["code"] == jsonrpc.INVALID_ASSERTION
    assert called["error"]["data"]["reason"] == "missing"


def test_an_assertion_is_good_once_and_only_for_its_audience(chain: dict[str, Any]) -> None:
    a, b, c = chain["a"], chain["b"], chain["c"]
    headers = {"Authorization": f"Bearer {gateway_token(b, chain['a_at_b'])}"}
    assertion = sign_assertion(a, audience=b.public_url, via=["a"])
    meta = {"io.fedmcp/hops": ["a"], "io.fedmcp/assertion": assertion}

    first = modern_call(b, "tools/call", ADD, name=ADD["name"], headers=headers, meta=meta)
    replayed = modern_call(b, "tools/call", ADD, name=ADD["name"], headers=headers, meta=meta)
    for_c = {**meta, "io.fedmcp/assertion": sign_assertion(a, audience=c.public_url, via=["a"])}
    misaddressed = modern_call(b, "tools/call", ADD, name=ADD["name"], headers=headers, meta=for_c)

    assert first["result"]["content"][0]["text"] == "42"
    assert replayed["error"]["code"] == jsonrpc.INVALID_ASSERTION
    assert replayed["error"]["data"]["reason"] == "replayed"
    assert misaddressed["error"]["code"] == jsonrpc.INVALID_ASSERTION
    assert misaddressed["error"]["data"]["reason"] == "audience"


def test_b_cannot_assert_users_of_as_issuer_to_c(chain: dict[str, Any]) -> None:
    a, b, c = chain["a"], chain["b"], chain["c"]
    headers = {"Authorization": f"Bearer {gateway_token(c, chain['b_at_c'])}"}
    # Signed with B's own (trusted) key, but naming A's issuer: C trusts B for B's users only.
    forged = sign_assertion(b, audience=c.public_url, via=["a", "b"], issuer=a.public_url)

    reply = modern_call(
        c, "tools/call", {"name": "fixture__add", "arguments": {"a": 1, "b": 2}}, name="fixture__add", headers=headers,
        meta={"io.fedmcp/hops": ["a", "b"], "io.fedmcp/assertion": forged},
    )

    assert reply["error"]["code"] == jsonrpc.INVALID_ASSERTION
    assert reply["error"]["data"]["reason"] == "issuer"


def test_progress_crosses_both_hops_and_cancelling_on_a_cancels_on_c(chain: dict[str, Any]) -> None:
    progress: list[float] = []

    async def scenario() -> dict[str, Any]:
        a = chain["a"]
        async with sdk_client(a.url("/mcp"), headers=a.auth_headers(), mode="legacy") as client:
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


def test_a_tool_added_at_c_reaches_a_host_on_a_with_list_changed(chain: dict[str, Any]) -> None:
    a = chain["a"]

    async def scenario() -> set[str]:
        changed = anyio.Event()

        async def on_message(message: Any) -> None:
            if getattr(getattr(message, "root", message), "method", None) == "notifications/tools/list_changed":
                changed.set()

        async with sdk_client(a.url("/mcp"), headers=a.auth_headers(), mode="legacy", message_handler=on_message) as client:
            await client.call_tool("c.fixture__register_tool", {"name": "brand_new"})
            with anyio.fail_after(30):
                await changed.wait()
            listed = await client.list_tools()
            return {tool.name for tool in listed.tools}

    names = anyio.run(scenario)

    assert "c.fixture__brand_new" in names


def test_a_loop_between_two_gateways_is_refused(chain: dict[str, Any]) -> None:
    a, b = chain["a"], chain["b"]
    # B also peers A (with trust both ways), and both hold a stale entry for a tool whose owner
    # is gone: each routes it to the other. Without the hop record this call would bounce forever.
    peer_gateway(b, a)
    stale = (
        "from federation.models import CatalogEntry, Peer;"
        "peer = Peer.objects.get(name='{peer}');"
        "CatalogEntry.objects.create(peer=peer, kind='tool', upstream_name='z.ghost__vanish', name='z.ghost__vanish', home='z.ghost',"
        " payload={{'name': 'z.ghost__vanish', 'inputSchema': {{'type': 'object'}}}})"
    )
    for gateway, peer in ((a, "b"), (b, "a")):
        gateway.shell(stale.format(peer=peer))
    try:
        # The short client timeout turns a hang into a failure; the refusal itself is immediate.
        reply = modern_call(a, "tools/call", {"name": "z.ghost__vanish", "arguments": {}}, name="z.ghost__vanish", timeout=5)
    finally:
        b.command("peer", "remove", "a")
        a.command("gateway", "untrust", "b")
        trust_in_turn(a, b)  # A believes its peer B again, as the chain set it up

    assert reply["error"]["code"] == jsonrpc.FEDERATION_LOOP
    assert reply["error"]["data"]["hops"] == ["a", "b", "a"]


def test_no_database_holds_a_peer_secret_or_an_access_token_in_the_clear(chain: dict[str, Any]) -> None:
    a, b, c = chain["a"], chain["b"], chain["c"]
    # Tokens the test knows: alice's on A, and gateway tokens it obtained as A at B and as B at C.
    tokens = [
        a.auth_headers()["Authorization"].split()[1],
        gateway_token(b, chain["a_at_b"]),
        gateway_token(c, chain["b_at_c"]),
    ]
    secrets = [chain["a_at_b"][1], chain["b_at_c"][1]]
    assert modern_call(a, "tools/call", ADD, name=ADD["name"])["result"]  # A and B hold live peer tokens now

    for gateway in (a, b, c):
        dump = gateway.command("dumpdata", "--natural-foreign").stdout
        raw = (gateway.dir / "db.sqlite3").read_bytes()
        for value in [*secrets, *tokens]:
            assert value not in dump
            assert value.encode() not in raw
        rows = json.loads(dump)
        # Every access token row, also those issued to peer gateways at run time, holds no token.
        assert all(row["fields"]["token"] == "" for row in rows if row["model"] == "oauth2_provider.accesstoken")
        assert any(row["model"] == "oauth2_provider.accesstoken" for row in rows)
        for row in rows:
            if row["model"] == "federation.peer" and row["fields"]["client_id"]:
                assert row["fields"]["client_secret"].startswith("gAAAAA")  # a Fernet token
