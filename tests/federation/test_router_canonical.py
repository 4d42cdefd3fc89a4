"""The router takes any spelling of a resource URI to its one canonical route (issue 15, finding 1)."""

from __future__ import annotations

from federation.models import CatalogEntry, CatalogKind, Peer, Transport
from federation.router import AmbiguousUriError, resolve
from tests.base import AsgiTestCase, add_catalog_entry


class CanonicalRoutingTests(AsgiTestCase):
    def setUp(self) -> None:
        super().setUp()
        local = Peer.objects.create(name="alpha", transport=Transport.STREAMABLE_HTTP, url="http://127.0.0.1:9/alpha")
        add_catalog_entry(local, CatalogKind.RESOURCE, "test://static-text")
        add_catalog_entry(local, CatalogKind.RESOURCE_TEMPLATE, "test://template/{id}/data")
        gateway = Peer.objects.create(
            name="b", transport=Transport.STREAMABLE_HTTP, url="http://127.0.0.1:9/b", is_gateway=True, remote_gateway="b"
        )
        CatalogEntry.objects.create(
            peer=gateway, kind=CatalogKind.RESOURCE_TEMPLATE, upstream_name="fedmcp://fixture/test://template/{id}/data",
            name="fedmcp://b.fixture/test://template/{id}/data", home="b.fixture",
            payload={"uriTemplate": "fedmcp://fixture/test://template/{id}/data"},
        )

    async def test_every_spelling_reaches_the_same_route_in_canonical_form(self) -> None:
        cases = [
            ("", "FEDMCP://alpha/TEST://template/4%32/data", "alpha", "test://template/42/data"),
            ("", "fedmcp://alpha/test://template/x/../42/data", "alpha", "test://template/42/data"),
            ("", "fedmcp://alpha/test://static%2Dtext", "alpha", "test://static-text"),
            ("alpha", "test://TEMPLATE/./4%32/data", "alpha", "test://template/42/data"),
            ("", "fedmcp://b.fixture/test://template/%34%32/data", "b", "fedmcp://fixture/test://template/42/data"),
            ("b", "fedmcp://fixture/TEST://template/4%32/data", "b", "fedmcp://fixture/test://template/42/data"),
        ]
        routes = []
        for scope, uri, *_ in cases:
            route = await resolve(scope, CatalogKind.RESOURCE, uri)
            routes.append((scope, uri, route.peer.name, route.upstream_name))
        self.assertEqual(routes, cases)

    async def test_a_dot_segment_next_to_an_encoded_slash_is_not_routed(self) -> None:
        with self.assertRaises(AmbiguousUriError):
            await resolve("alpha", CatalogKind.RESOURCE, "test://template/a%2F..%2F42/data")
