"""A rule for a user limits the user, through all their clients together (issue 15, item 9).

The identity bucket was keyed by user *and* client, so a user who registered one more OAuth
client (open registration makes that free) got a fresh bucket; and a rule for a client was a
bucket per user of it, so a trusted gateway inventing users escaped its own. Now the bucket is
whoever the matching rule names: a user (all their clients), a client (all its users), both,
or, for the default rule, each user (all their clients), each federated user, or each client
acting for no one.
"""

from __future__ import annotations

from channels.db import database_sync_to_async
from oauth2_provider.models import Application

from federation.models import RateLimitScope
from tests.base import BOB, McpClient, amint_token
from tests.observability.test_rate_limits import (
    RateLimitCase,
    add,
    assert_rate_limited,
    limit,
)


@database_sync_to_async
def application(name: str) -> Application:
    return Application.objects.create(
        name=name, client_type=Application.CLIENT_PUBLIC, authorization_grant_type=Application.GRANT_AUTHORIZATION_CODE,
        redirect_uris="http://127.0.0.1:33418/callback",
    )


class PerUserRateLimitTest(RateLimitCase):
    async def clients_of(self, user: str, *names: str) -> list[McpClient]:
        return [McpClient(token=await amint_token(user, application=await application(name))) for name in names]

    async def test_a_user_rule_limits_the_user_across_two_applications(self) -> None:
        await limit(RateLimitScope.IDENTITY, user=self.alice, burst=2)
        desk, ide = await self.clients_of("alice", "Desk Host", "IDE Host")

        assert (await add(desk)).error_code is None
        assert (await add(desk)).error_code is None
        assert_rate_limited(await add(ide), "identity")

    async def test_the_default_rule_limits_each_user_across_their_applications(self) -> None:
        await limit(RateLimitScope.IDENTITY, burst=1)
        desk, ide = await self.clients_of("alice", "Desk Host", "IDE Host")
        (bob,) = await self.clients_of(BOB, "Bob's Host")

        assert (await add(desk)).error_code is None
        assert_rate_limited(await add(ide), "identity")
        assert (await add(bob)).error_code is None

    async def test_a_client_rule_limits_the_client_across_its_users(self) -> None:
        shared = await application("Shared Host")
        await limit(RateLimitScope.IDENTITY, client_id=shared.client_id, burst=1)
        alice = McpClient(token=await amint_token("alice", application=shared))
        bob = McpClient(token=await amint_token(BOB, application=shared))

        assert (await add(alice)).error_code is None
        assert_rate_limited(await add(bob), "identity")

    async def test_a_user_and_client_rule_limits_only_that_pair(self) -> None:
        desk_app = await application("Desk Host")
        await limit(RateLimitScope.IDENTITY, user=self.alice, client_id=desk_app.client_id, burst=1)
        desk = McpClient(token=await amint_token("alice", application=desk_app))
        (ide,) = await self.clients_of("alice", "IDE Host")

        assert (await add(desk)).error_code is None
        assert_rate_limited(await add(desk), "identity")
        assert (await add(ide)).error_code is None  # no rule matches this client: no limit
