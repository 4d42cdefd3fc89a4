"""Per-user upstream sessions: nothing one user's host told an upstream session reaches another user.

The fixture server's `session_roots` keeps the client's roots as session state, as the reference
server-everything's `get-roots-list` does: asked with `roots/list` on the session's first call,
then kept until `notifications/roots/list_changed`. Two users (two tokens, two handshake-era
host sessions declaring roots) call it through the one peer `everything`.
"""

from __future__ import annotations

import json
from dataclasses import replace

from federation.pool import UpstreamPool
from federation.upstream.base import PeerConfig
from tests.base import BOB, TIMEOUT, FixturePeerTestCase, HttpExchange, McpClient, mint_token, request

TOOL = "everything__session_roots"
ROOTS_CAPABILITY = {"roots": {"listChanged": True}}
CALL_TIMEOUT = 30.0


async def call_answering_roots(client: McpClient, root: str) -> tuple[str, int]:
    """Call the tool on `client`'s session, answering each `roots/list` with `root`.

    Returns the tool's text and how many times this host was asked for its roots.
    """
    call_id = client.next_id()
    body = json.dumps(request("tools/call", {"name": TOOL, "arguments": {}}, call_id)).encode()
    asked = 0
    message: dict = {}
    async with HttpExchange("POST", client.path, client.headers(), body) as exchange:
        assert await exchange.start(CALL_TIMEOUT) == 200
        if exchange.headers.get("content-type", "").startswith("application/json"):
            # Nothing was relayed during the call: the answer came as one JSON body.
            message = (await exchange.read_all(CALL_TIMEOUT)).json()
        while "id" not in message or message["id"] != call_id:
            message = await exchange.next_event(CALL_TIMEOUT)
            assert message is not None, "the call's stream ended without its answer"
            if message.get("method") == "roots/list":
                asked += 1
                answer = {"jsonrpc": "2.0", "id": message["id"], "result": {"roots": [{"uri": root, "name": "workspace"}]}}
                delivered = await client.post(answer, timeout=TIMEOUT)
                assert delivered.status == 202, delivered
    assert "result" in message, message
    return message["result"]["content"][0]["text"], asked


class PerUserUpstreamSessionTests(FixturePeerTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.bob_token = mint_token(BOB)

    async def hosts(self) -> tuple[McpClient, McpClient]:
        alice, bob = McpClient(), McpClient(token=self.bob_token)
        await alice.initialize(capabilities=ROOTS_CAPABILITY)
        await bob.initialize(capabilities=ROOTS_CAPABILITY)
        return alice, bob

    async def test_a_second_user_gets_their_own_roots_not_the_first_users(self) -> None:
        alice, bob = await self.hosts()

        alice_text, alice_asked = await call_answering_roots(alice, "file:///home/alice/project")
        bob_text, bob_asked = await call_answering_roots(bob, "file:///home/bob/project")

        self.assertEqual((alice_text, alice_asked), ("Client roots: file:///home/alice/project", 1))
        self.assertNotIn("alice", bob_text)
        self.assertEqual((bob_text, bob_asked), ("Client roots: file:///home/bob/project", 1))

    async def test_each_user_keeps_their_own_session_state_across_calls(self) -> None:
        alice, bob = await self.hosts()
        await call_answering_roots(alice, "file:///home/alice/project")
        await call_answering_roots(bob, "file:///home/bob/project")

        # The upstream asked each user once; what it kept is each user's own.
        alice_again, asked_again = await call_answering_roots(alice, "file:///elsewhere")

        self.assertEqual((alice_again, asked_again), ("Client roots: file:///home/alice/project", 0))

    async def test_a_hosts_roots_list_changed_reaches_its_users_upstream_session(self) -> None:
        alice, bob = await self.hosts()
        await call_answering_roots(alice, "file:///home/alice/project")
        await call_answering_roots(bob, "file:///home/bob/project")

        changed = await bob.post({"jsonrpc": "2.0", "method": "notifications/roots/list_changed"})
        self.assertEqual(changed.status, 202)
        bob_text, bob_asked = await call_answering_roots(bob, "file:///home/bob/other")
        alice_text, alice_asked = await call_answering_roots(alice, "file:///never-asked")

        self.assertEqual((bob_text, bob_asked), ("Client roots: file:///home/bob/other", 1))
        self.assertEqual((alice_text, alice_asked), ("Client roots: file:///home/alice/project", 0))


class ConnectionOwnerTests(FixturePeerTestCase):
    """Which connection the pool hands each user of the fixture peer (Streamable HTTP, both eras)."""

    async def connections(self, *, per_identity: bool, prefer: str) -> tuple[object, object, object]:
        peer = replace(PeerConfig.from_peer(self.peer), per_identity=per_identity)
        pool = UpstreamPool()
        try:
            alice = await pool.get(peer, prefer=prefer, identity_key="user:1")  # type: ignore[arg-type]
            bob = await pool.get(peer, prefer=prefer, identity_key="user:2")  # type: ignore[arg-type]
            nobody = await pool.get(peer, prefer=prefer)  # type: ignore[arg-type]
            return alice, bob, nobody
        finally:
            await pool.close()

    async def test_handshake_era_sessions_are_each_users_own(self) -> None:
        alice, bob, nobody = await self.connections(per_identity=False, prefer="legacy")

        self.assertEqual({alice.era, bob.era, nobody.era}, {"legacy"})  # type: ignore[attr-defined]
        self.assertEqual(len({id(alice), id(bob), id(nobody)}), 3)

    async def test_2026_connections_keep_nothing_and_are_shared(self) -> None:
        alice, bob, nobody = await self.connections(per_identity=False, prefer="modern")

        self.assertEqual(alice.era, "modern")  # type: ignore[attr-defined]
        self.assertIs(alice, bob)
        self.assertIs(alice, nobody)

    async def test_a_per_identity_network_peer_gives_each_user_their_own_in_both_eras(self) -> None:
        alice, bob, nobody = await self.connections(per_identity=True, prefer="modern")

        self.assertEqual(alice.era, "modern")  # type: ignore[attr-defined]
        self.assertEqual(len({id(alice), id(bob), id(nobody)}), 3)
