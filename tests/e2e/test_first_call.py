"""A fresh user's first tool call with the shipped consent defaults, from the official SDK client.

The SDK's clients declare no URL elicitation, in either era. The first call on a peer the user
has not used is refused at once with the consent page's URL (-32032), the user approves on that
page (signed in over HTTP, the page's form), and the same call sent again gives the result
(issue 18: before, the handshake-era call waited 120 s for -32018 and the 2026-07-28 one got an
elicitation the client could not show).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from mcp.shared.exceptions import MCPError

from mcp_endpoint import jsonrpc
from tests.e2e import harness
from tests.e2e.conftest import sdk_client
from tests.e2e.test_distributed_consent import USERNAME, ConsentPage

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

SHIPPED = {"FEDMCP_CONSENT_DEFAULT": "ask-new-peers", "FEDMCP_CONSENT_SAMPLING_DEFAULT": "ask", "FEDMCP_CONSENT_ELICITATION_DEFAULT": "ask"}
"""The product's defaults, which the test harness otherwise sets to allow."""


@pytest.fixture(scope="module")
def shipped_gateway(web_upstream_url: str) -> Iterator[tuple[harness.Gateway, str]]:
    password = secrets.token_urlsafe(16)
    with harness.Gateway(name="first-call", env=SHIPPED) as gateway:
        gateway.migrate()
        gateway.create_users({USERNAME: password})
        # A peer per era: once a call on a peer completed, the user has used it and is not asked again.
        gateway.manage("peer", "add", "web", "--url", web_upstream_url)
        gateway.manage("peer", "add", "web2", "--url", web_upstream_url)
        gateway.auth_headers(USERNAME)
        gateway.start_worker()
        yield gateway, password


@pytest.mark.parametrize(("mode", "peer"), [("legacy", "web"), ("2026-07-28", "web2")])
async def test_the_first_call_names_the_page_at_once_and_goes_through_after_the_approval(
    shipped_gateway: tuple[harness.Gateway, str], mode: str, peer: str
) -> None:
    gateway, password = shipped_gateway
    arguments = {"a": 20, "b": 22}
    page = ConsentPage(gateway, password)
    try:
        async with sdk_client(gateway.url("/mcp"), headers=gateway.auth_headers(USERNAME), mode=mode) as client:
            # Answered before anyone decided: held, the call would end in -32018, not -32032.
            with pytest.raises(MCPError) as refused:
                await client.call_tool(f"{peer}__add", arguments)
            assert refused.value.code == jsonrpc.CONSENT_REQUIRED
            url = refused.value.data["url"]
            assert url in refused.value.message  # the words the person reads name the page
            assert page.answer(url.rsplit("/", 1)[1], "approve") == 302

            result = await client.call_tool(f"{peer}__add", arguments)
        assert result.content[0].text == str(sum(arguments.values()))
    finally:
        page.close()
