"""2026-07-28 `requestState`s: this gateway's own are checked here, a peer gateway's go upstream.

A gateway asks the host some questions itself (consent, an account to connect, held upstream
questions) with a signed state `fedmcp-<kind>:<its name>:…`. Behind a chain of gateways the
question may be a peer's: its state passes through this gateway to the host and comes back with
the retry. It must reach the peer unchanged, not be refused as a forgery of ours (as it was
while the prefixes named no gateway). The upstream here is the fixture server (the MCP SDK seals
its states and refuses others with its own words, "Invalid or expired requestState"): its refusal
proves the state went upstream; ours says "requestState is not one this gateway issued".
"""

from __future__ import annotations

from typing import Any

import pytest
from django.test import override_settings

from mcp_endpoint import jsonrpc, request_states
from tests.base import MODERN, FixturePeerTestCase, McpClient, modern_meta, request
from tests.identity.consent.test_flow import CALL_TIMEOUT, final_message

ECHOED_STATE = "everything__test_input_required_result_request_state"
OURS_REFUSED = "requestState is not one this gateway issued"
UPSTREAM_REFUSED = "Invalid or expired requestState"
KINDS = [request_states.CONSENT, request_states.HELD, request_states.REMOTE_CONSENT, request_states.CONNECT, request_states.CONTINUE]
CHECKED_ON_EVERY_CALL = [request_states.CONSENT, request_states.HELD, request_states.CONTINUE]


class RequestStateTests(FixturePeerTestCase):
    async def call(self, **extra: Any) -> dict[str, Any]:
        client = McpClient()
        meta = modern_meta({"elicitation": {"form": {}, "url": {}}})
        params = {"name": ECHOED_STATE, "arguments": {}, **extra, "_meta": meta}
        headers = {"mcp-protocol-version": MODERN, "mcp-method": "tools/call", "mcp-name": ECHOED_STATE}
        return final_message(await client.post(request("tools/call", params, client.next_id()), headers, timeout=CALL_TIMEOUT))

    def test_this_gateways_states_name_it(self) -> None:
        with override_settings(FEDMCP_GATEWAY_NAME="alpha"):
            for kind in KINDS:
                state = request_states.issue(kind, {"p": "x"}, salt="s")
                assert state.startswith(f"fedmcp-{kind}:alpha:"), state
                assert request_states.is_ours(kind, state)
                assert request_states.read(kind, state, salt="s", max_age=60) == {"p": "x"}
            with override_settings(FEDMCP_GATEWAY_NAME="beta"):
                assert not request_states.is_ours(request_states.CONSENT, state)

    def test_a_state_signed_for_another_purpose_or_altered_is_refused(self) -> None:
        state = request_states.issue(request_states.CONSENT, {"p": "x"}, salt="consent")
        for forged in (state[:-4] + "AAAA", state):
            salt = "consent" if forged is not state else "held"
            with pytest.raises(jsonrpc.InvalidParamsError, match="not one this gateway issued"):
                request_states.read(request_states.CONSENT, forged, salt=salt, max_age=60)

    async def test_a_peer_gateways_states_of_every_kind_go_upstream(self) -> None:
        # As they come from a peer gateway `other` that asked its own question.
        answers = {}
        for kind in KINDS:
            reply = await self.call(requestState=f"fedmcp-{kind}:other:eyJwIjoieCJ9:1abc:sig", inputResponses={"confirm": {"action": "accept"}})
            answers[kind] = reply.get("error", {}).get("message")
        assert answers == {kind: UPSTREAM_REFUSED for kind in KINDS}

    async def test_forgeries_of_this_gateways_states_are_refused(self) -> None:
        # The kinds this call could carry (the connect and remote-consent states are checked on calls
        # to peers that need them: tests/federation/test_upstream_oauth_gate.py, tests/identity/consent/test_remote_flow.py).
        answers = {}
        for kind in CHECKED_ON_EVERY_CALL:
            reply = await self.call(requestState=f"{request_states.prefix(kind)}forged", inputResponses={"confirm": {"action": "accept"}})
            answers[kind] = (reply.get("error", {}).get("code"), reply.get("error", {}).get("message"))
        assert answers == {kind: (jsonrpc.INVALID_PARAMS, OURS_REFUSED) for kind in CHECKED_ON_EVERY_CALL}

    async def test_the_upstreams_own_state_still_completes_the_call(self) -> None:
        first = (await self.call())["result"]
        assert first["resultType"] == "input_required" and not first["requestState"].startswith("fedmcp-")

        done = (await self.call(requestState=first["requestState"], inputResponses={"confirm": {"action": "accept", "content": {"ok": True}}}))["result"]

        assert done["content"][0]["text"] == "state-ok: action=accept, ok=True"
