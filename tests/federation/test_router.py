"""Routing host-facing names to a peer: only the peer that listed a thing can be reached by it."""

from __future__ import annotations

import pytest

from federation.models import CatalogKind, Peer, Transport
from federation.router import NotRoutableError, peer_for_scope, resolve, template_regex
from tests.base import AsgiTestCase, add_catalog_entry


@pytest.mark.parametrize(
    ("template", "uri", "matches"),
    [
        ("test://template/{id}/data", "test://template/42/data", True),
        ("test://template/{id}/data", "test://template/4/2/data", False),  # simple values have no "/"
        ("test://template/{id}/data", "test://template//data", False),  # nor are they empty
        ("test://template/{id}/data", "test://template/42/data/more", False),  # anchored at the end
        ("test://template/{id}/data", "xtest://template/42/data", False),  # and at the start
        ("test://template/{id}/data", "test://template/42/data?x=1", False),
        ("test://{a}/{b}", "test://1/2", True),
        ("file:///{+path}", "file:///srv/data/a.txt", True),  # reserved expansion keeps "/"
        ("file:///{+path}", "file:///", False),
        ("docs://guide{#section}", "docs://guide#intro/setup", True),
        ("a.b/{x}", "a.b/1", True),
        ("a.b/{x}", "aXb/1", False),  # literal parts are literal, not regex
        ("static://only", "static://only", True),
        ("static://only", "static://only-not", False),
    ],
)
def test_template_regex_matches_rfc6570_levels_1_and_2(template: str, uri: str, matches: bool) -> None:
    assert bool(template_regex(template).match(uri)) is matches


def add_peer(name: str, *, enabled: bool = True) -> Peer:
    return Peer.objects.create(
        name=name, transport=Transport.STREAMABLE_HTTP, url=f"http://127.0.0.1:9/{name}", enabled=enabled
    )


class RouterTests(AsgiTestCase):
    def setUp(self) -> None:
        alpha = add_peer("alpha")
        add_catalog_entry(alpha, CatalogKind.TOOL, "add")
        add_catalog_entry(alpha, CatalogKind.TOOL, "hidden", enabled=False)
        add_catalog_entry(alpha, CatalogKind.PROMPT, "greet")
        add_catalog_entry(alpha, CatalogKind.RESOURCE, "test://static-text")
        add_catalog_entry(alpha, CatalogKind.RESOURCE_TEMPLATE, "test://template/{id}/data")
        add_catalog_entry(alpha, CatalogKind.RESOURCE_TEMPLATE, "file:///{+path}")
        add_catalog_entry(add_peer("beta"), CatalogKind.TOOL, "whoami")
        gamma = add_peer("gamma", enabled=False)
        add_catalog_entry(gamma, CatalogKind.TOOL, "add")
        add_catalog_entry(gamma, CatalogKind.RESOURCE, "test://static-text")

    async def test_it_routes_a_namespaced_tool_to_its_peer(self) -> None:
        route = await resolve("", CatalogKind.TOOL, "alpha__add")

        self.assertEqual((route.peer.name, route.upstream_name), ("alpha", "add"))
        self.assertEqual(route.entry_payload, {"name": "add", "inputSchema": {"type": "object"}})

    async def test_a_per_peer_endpoint_uses_upstream_names(self) -> None:
        route = await resolve("alpha", CatalogKind.PROMPT, "greet")

        self.assertEqual((route.peer.name, route.upstream_name), ("alpha", "greet"))

    async def test_it_routes_listed_resources_and_uris_matching_a_template(self) -> None:
        for qualified, upstream in [
            ("fedmcp://alpha/test://static-text", "test://static-text"),
            ("fedmcp://alpha/test://template/42/data", "test://template/42/data"),
            ("fedmcp://alpha/file:///srv/data/a.txt", "file:///srv/data/a.txt"),
        ]:
            route = await resolve("", CatalogKind.RESOURCE, qualified)
            self.assertEqual((route.peer.name, route.upstream_name), ("alpha", upstream))

    async def test_names_no_enabled_peer_listed_are_not_routable(self) -> None:
        unroutable = [
            ("", CatalogKind.TOOL, "beta__add"),  # alpha's tool, crafted under beta's prefix
            ("", CatalogKind.TOOL, "alpha__whoami"),  # beta's tool under alpha's prefix
            ("", CatalogKind.TOOL, "nobody__add"),
            ("", CatalogKind.TOOL, "add"),  # not namespaced on the aggregated endpoint
            ("", CatalogKind.TOOL, "alpha__greet"),  # a prompt is not a tool
            ("", CatalogKind.TOOL, "alpha__hidden"),  # disabled entry
            ("", CatalogKind.TOOL, "gamma__add"),  # disabled peer
            ("", CatalogKind.RESOURCE, "fedmcp://gamma/test://static-text"),  # disabled peer
            ("", CatalogKind.RESOURCE, "fedmcp://beta/test://static-text"),  # alpha's resource under beta
            (
                "",
                CatalogKind.RESOURCE,
                "fedmcp://beta/test://template/42/data",
            ),  # alpha's template under beta
            ("", CatalogKind.RESOURCE, "fedmcp://alpha/test://template/4/2/data"),
            ("", CatalogKind.RESOURCE, "test://static-text"),  # not namespaced
            ("beta", CatalogKind.TOOL, "add"),  # alpha's tool on beta's endpoint
            ("beta", CatalogKind.TOOL, "alpha__add"),  # a namespaced name means nothing per peer
            ("beta", CatalogKind.RESOURCE, "fedmcp://alpha/test://static-text"),
            ("gamma", CatalogKind.TOOL, "add"),  # a disabled peer's own endpoint
        ]
        routed = []
        for scope, kind, name in unroutable:
            try:
                await resolve(scope, kind, name)
            except NotRoutableError:
                continue
            routed.append((scope, kind, name))

        self.assertEqual(routed, [])

    async def test_a_disabled_peer_has_no_endpoint(self) -> None:
        self.assertIsNone(await peer_for_scope("gamma"))
        self.assertIsNone(await peer_for_scope("nobody"))
        config = await peer_for_scope("alpha")
        self.assertIsNotNone(config)
        assert config is not None
        self.assertEqual(config.name, "alpha")
