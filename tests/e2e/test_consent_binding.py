"""A consent approval covers the exact call the user saw, on a real gateway with the shipped default.

One daphne worker with `FEDMCP_CONSENT_DEFAULT=ask-new-peers` (the product's default) and the
fixture server as peer `web`. A 2026-07-28 host that shows URL elicitations (plain HTTP) calls `web__add {"a": 1, "b": 2}`
and is sent to /consent; alice approves it there (signed in over HTTP, the page's forms). The
host then replays the approved `requestState` with `{"a": 1000, "b": 337}`: it must be asked
again, the tool must not run, and the audit trail must say so (issue 15, "Trust boundaries").
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from mcp_endpoint import jsonrpc
from tests.e2e import harness
from tests.e2e.test_distributed_consent import USERNAME, WAIT, ConsentPage, text_of, wait_for_audit
from tests.e2e.test_federation import modern_call

pytestmark = pytest.mark.e2e

ADD = "web__add"
ANSWERED = {"fedmcp-consent": {"action": "accept"}}


@pytest.fixture(scope="module")
def default_gateway(web_upstream_url: str) -> Iterator[tuple[harness.Gateway, str]]:
    password = secrets.token_urlsafe(16)
    env = {"FEDMCP_CONSENT_DEFAULT": "ask-new-peers", "FEDMCP_CONSENT_TIMEOUT": str(WAIT), "FEDMCP_CONSENT_POLL_INTERVAL": "1"}
    with harness.Gateway(name="binding", env=env) as gateway:
        gateway.migrate()
        gateway.create_users({USERNAME: password})
        gateway.command("peer", "add", "web", "--url", web_upstream_url)
        gateway.auth_headers(USERNAME)
        gateway.start_worker()
        yield gateway, password


SHOWS_URLS = {"io.modelcontextprotocol/clientCapabilities": {"elicitation": {"url": {}}}}
"""The host shows URL elicitations, so it is sent to /consent (input_required) rather than refused with the URL."""


def call_add(gateway: harness.Gateway, arguments: dict[str, Any], **extra: Any) -> dict[str, Any]:
    params = {"name": ADD, "arguments": arguments, **extra}
    return modern_call(gateway, "tools/call", params, name=ADD, headers=gateway.auth_headers(USERNAME), timeout=WAIT, meta=SHOWS_URLS)


def test_an_approved_state_replayed_with_other_arguments_is_asked_again(default_gateway: tuple[harness.Gateway, str]) -> None:
    gateway, password = default_gateway
    page = ConsentPage(gateway, password)
    try:
        first = call_add(gateway, {"a": 1, "b": 2})
        assert first["result"]["resultType"] == "input_required", first
        prompt_id, shown = page.wait_for_prompt()
        assert "&quot;a&quot;: 1," in shown, shown
        assert page.answer(prompt_id, "approve") == 302

        replay = call_add(gateway, {"a": 1000, "b": 337}, requestState=first["result"]["requestState"], inputResponses=ANSWERED)
        assert replay["result"]["resultType"] == "input_required", replay
        assert "1337" not in str(replay)
        _, asked_again = page.wait_for_prompt({prompt_id})
        assert "&quot;a&quot;: 1000," in asked_again, asked_again

        # The next plain call is asked too: nothing the user allowed has run on `web` yet.
        plain = call_add(gateway, {"a": 1000, "b": 337})
        assert plain["result"]["resultType"] == "input_required", plain

        # The call alice approved still runs, once.
        done = call_add(gateway, {"a": 1, "b": 2}, requestState=first["result"]["requestState"], inputResponses=ANSWERED)
        assert text_of(done) == "3"
        again = call_add(gateway, {"a": 1, "b": 2}, requestState=first["result"]["requestState"], inputResponses=ANSWERED)
        assert again["error"]["code"] == jsonrpc.INVALID_PARAMS
    finally:
        page.close()

    asked = wait_for_audit(gateway, {"peer": "web", "method": "tools/call", "decision": "ask"}, count=3)
    assert {e["outcome"] for e in asked} == {"input"}
    (approved,) = wait_for_audit(gateway, {"peer": "web", "method": "tools/call", "decision": "approved"})
    assert approved["outcome"] == "ok"
