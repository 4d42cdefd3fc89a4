"""The per-worker cache of "which trusted gateway is this application" (identity/trust/gateways.py).

A peer gateway's calls no longer read its `TrustedGateway` row each time; what must not weaken:
disabling, deleting or creating a trust takes effect at the next call, whichever way the row
changed (model save, `QuerySet.update`, deletion with the application).
"""

from __future__ import annotations

from typing import Any
from unittest import mock

import pytest
from asgiref.sync import sync_to_async
from django.test import TransactionTestCase, override_settings

from fedmcp_lib import caching
from identity.hostauth.tokens import Identity
from identity.models import TrustedGateway
from identity.trust import gateways
from identity.trust.gateways import AssertionRejectedError, gateway_trust, gateway_untrust, identity_for_call
from tests.identity.oauth import FAST_HASHERS
from tests.identity.test_assertions import A, B, Signer, caller_for, meta_with


@override_settings(FEDMCP_PUBLIC_URL=B, PASSWORD_HASHERS=FAST_HASHERS)
class TrustedGatewayCacheTests(TransactionTestCase):
    def setUp(self) -> None:
        gateways._jwks_cache.clear()
        self.signer = Signer()
        self.gateway, _ = gateway_trust(name="a", issuer=A, jwks=self.signer.jwks)
        self.caller = caller_for(self.gateway)

    async def call(self, caller: Identity | None = None) -> Identity | None:
        await caching.refresh()  # as the MCP edge does before each request
        meta = meta_with(self.signer.sign())
        return await identity_for_call(caller=caller or self.caller, method="tools/call", meta=meta, hops=meta["io.fedmcp/hops"])

    async def refused(self) -> str:
        with pytest.raises(AssertionRejectedError) as caught:
            await self.call()
        return caught.value.reason

    async def test_a_warm_trust_is_not_read_from_the_database_again(self) -> None:
        await self.call()
        real = TrustedGateway.objects.filter

        def no_application_lookup(*args: Any, **kwargs: Any) -> Any:
            assert "application_id" not in kwargs, "the trusted gateway was read again"
            return real(*args, **kwargs)

        with mock.patch.object(TrustedGateway.objects, "filter", side_effect=no_application_lookup):
            identity = await self.call()
        assert identity is not None and identity.federated_subject == "alice"

    async def test_a_trust_disabled_by_save_applies_to_the_next_call(self) -> None:
        await self.call()
        self.gateway.enabled = False
        await self.gateway.asave()

        assert await self.refused() == "not_trusted"

    async def test_a_trust_disabled_by_a_queryset_update_applies_to_the_next_call(self) -> None:
        await self.call()
        await TrustedGateway.objects.filter(pk=self.gateway.pk).aupdate(enabled=False)

        assert await self.refused() == "not_trusted"

    async def test_an_untrusted_gateway_is_refused_at_the_next_call(self) -> None:
        await self.call()
        await sync_to_async(gateway_untrust)(gateway=await TrustedGateway.objects.select_related("application").aget(pk=self.gateway.pk))

        assert await self.refused() == "not_trusted"

    async def test_a_trust_created_after_a_miss_is_seen_at_the_next_call(self) -> None:
        await self.gateway.adelete()
        assert await self.refused() == "not_trusted"  # "not trusted" is cached for this application

        gateway = TrustedGateway(name="a", issuer=A, jwks=self.signer.jwks, application_id=self.caller.application_id)
        await gateway.asave()

        identity = await self.call()
        assert identity is not None and identity.federated_issuer == A
