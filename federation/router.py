"""Resolve host-facing names to a peer and the upstream's own name.

A request can only reach the peer that listed the thing it names: a tool or prompt must be in
that peer's catalog, a resource URI must be listed or match one of that peer's templates. The
resources of a per-user OAuth peer, each account's own, are not in the catalog: their URI names
the peer, and the upstream decides with the caller's own token (`_per_user_route`).

Routes (with the peer's decrypted credentials) are kept per worker until the catalog, any
peer or any gateway trust changes in any process (fedmcp_lib/caching.py, domain "catalog"); so are unknown names,
so a host repeating a bad name costs no query either.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import lru_cache

from channels.db import database_sync_to_async
from mcp.shared.inbound import find_invalid_x_mcp_header, x_mcp_header_map

from federation import naming
from federation.models import CatalogEntry, CatalogKind, Peer
from federation.upstream.base import PeerConfig
from fedmcp_lib import caching
from identity.trust.gateways import peer_gateway_standing


class NotRoutableError(Exception):
    """The name does not belong to any enabled peer's catalog (message is safe for hosts)."""


class AmbiguousUriError(NotRoutableError):
    """The resource URI could name another resource on a server that decodes "%2F" (see `naming.is_ambiguous_uri`)."""


ParamHeaders = dict[tuple[str, ...], str]
"""A tool's `x-mcp-header` declarations (SEP-2243): argument path -> header token (`Mcp-Param-<token>`)."""


@dataclass(frozen=True)
class Route:
    peer: PeerConfig
    upstream_name: str
    entry_payload: dict | None = None
    param_headers: ParamHeaders | None = None
    """For a tool: the arguments its input schema mirrors into `Mcp-Param-*` headers (empty: none)."""


def tool_param_headers(payload: dict | None) -> ParamHeaders:
    """Return the `x-mcp-header` declarations of a listed tool; none when they are invalid.

    The catalog sync leaves out tools with invalid declarations (services.py), so an invalid
    one here is an entry stored before that rule: it gets no headers, as conforming clients do.
    """
    schema = (payload or {}).get("inputSchema")
    if find_invalid_x_mcp_header(schema) is not None:
        return {}
    return x_mcp_header_map(schema)


@lru_cache(maxsize=1024)
def template_regex(template: str) -> re.Pattern[str]:
    """Compile an RFC 6570 URI template (levels 1-2) into a matching regex."""
    pattern = ""
    for literal, expression in re.findall(r"([^{]*)(\{[^}]*\})?", template):
        pattern += re.escape(literal)
        if expression:
            operator = expression[1:2]
            # Reserved ("+") and fragment ("#") expansions may contain slashes; simple ones not.
            pattern += ".+" if operator in ("+", "#") else "[^/?#]+"
    return re.compile(pattern + r"\Z")


def peer_config(peer: Peer) -> PeerConfig:
    """The peer's configuration for a route: its gateway name only while this gateway still believes it.

    The name stored at the last sync is checked against the trust records again
    (identity/trust/gateways.py `peer_gateway_standing`), so revoking trust takes effect at once.
    """
    config = PeerConfig.from_peer(peer)
    if config.remote_gateway:
        standing = peer_gateway_standing(is_gateway=peer.is_gateway, url=peer.url, claimed=peer.remote_gateway)
        config = replace(config, remote_gateway=standing.name)
    return config


def _upstream_uri(entry: CatalogEntry, uri: str) -> str:
    """Translate an aggregated URI that matched `entry`'s template into the peer's own form."""
    rest = uri[len(naming.qualify_uri(entry.home, "")) :]
    if naming.is_remote_home(entry.home):
        upstream_home = (naming.split_uri(entry.upstream_name) or (entry.home, ""))[0]
        return naming.qualify_uri(upstream_home, rest)
    return rest


def _per_user_route(scope: str, qualified: str) -> Route | None:
    """Route a resource URI of a per-user OAuth peer: by the peer it names, with no catalog entry.

    Such a peer's resources are each account's own and never in the catalog
    (federation/user_lists.py): `fedmcp://<peer>/<uri>` on /mcp, any URI on the peer's own
    endpoint, goes to that peer on the caller's own connection, and the upstream decides with
    the caller's token whether it exists for them.
    """
    if scope:
        peer_name, upstream_uri = scope, qualified
    elif (parts := naming.split_uri(qualified)) is not None:
        peer_name, upstream_uri = parts
    else:
        return None
    peer = Peer.objects.filter(name=peer_name, enabled=True, user_oauth=True).first()
    return Route(peer_config(peer), upstream_uri) if peer is not None else None


def _lookup(scope: str, kind: str, qualified: str) -> Route:
    noun = {"tool": "tool", "prompt": "prompt", "resource": "resource"}[kind]
    entries = CatalogEntry.objects.visible().select_related("peer").order_by("id")
    if kind == CatalogKind.RESOURCE:
        # A per-user OAuth peer's resources are routed by their name alone (`_per_user_route`).
        entries = entries.exclude(peer__user_oauth=True)
    if scope:
        entry = entries.filter(peer__name=scope, kind=kind, upstream_name=qualified).first()
    else:
        entry = entries.filter(kind=kind, name=qualified).first()
    if entry is not None:
        headers = tool_param_headers(entry.payload) if kind == CatalogKind.TOOL else None
        return Route(peer_config(entry.peer), entry.upstream_name, entry.payload, headers)
    if kind == CatalogKind.RESOURCE:
        if (own := _per_user_route(scope, qualified)) is not None:
            return own
        templates = entries.filter(kind=CatalogKind.RESOURCE_TEMPLATE)
        if scope:
            for template in templates.filter(peer__name=scope):
                if template_regex(template.upstream_name).match(qualified):
                    return Route(peer_config(template.peer), qualified)
        elif (parts := naming.split_uri(qualified)) is not None:
            for template in templates.filter(home=parts[0]):
                if template_regex(template.name).match(qualified):
                    return Route(peer_config(template.peer), _upstream_uri(template, qualified))
    raise NotRoutableError(f"unknown {noun} {qualified!r}")


_routes: caching.GenerationCache[Route | NotRoutableError] = caching.GenerationCache("routes", ("catalog",))
_scopes: caching.GenerationCache[PeerConfig | None] = caching.GenerationCache("peer scopes", ("catalog",), maxsize=1000)


def _lookup_or_error(scope: str, kind: str, qualified: str) -> Route | NotRoutableError:
    try:
        return _lookup(scope, kind, qualified)
    except NotRoutableError as exc:
        return exc


async def resolve(scope: str, kind: str, qualified: str) -> Route:
    """Return the route for a tool name, prompt name or resource URI.

    A resource URI is routed in its canonical form (`naming.canonical_uri`), and the route's
    `upstream_name` is canonical too: policies, grants, audit and the upstream all see that.

    Raises:
        AmbiguousUriError: a resource URI with a dot segment next to an encoded separator.
        NotRoutableError: no enabled peer listed it.
    """
    if kind == CatalogKind.RESOURCE:
        qualified = naming.canonical_uri(qualified)
        if naming.is_ambiguous_uri(qualified):
            raise AmbiguousUriError(f"resource URI {qualified!r} has a dot segment next to an encoded path separator; refused as ambiguous")
    key = (scope, kind, qualified)
    route = _routes.get(key)
    if route is caching.MISSING:
        stamp = _routes.stamp()
        route = await database_sync_to_async(_lookup_or_error)(scope, kind, qualified)
        _routes.put(key, route, stamp)
    if isinstance(route, NotRoutableError):
        raise NotRoutableError(str(route))
    return route


def _load_scope(scope: str) -> PeerConfig | None:
    peer = Peer.objects.filter(name=scope, enabled=True).first()
    return peer_config(peer) if peer else None


async def peer_for_scope(scope: str) -> PeerConfig | None:
    """Return the enabled peer a per-peer endpoint serves, or None."""
    return await caching.cached(_scopes, scope, lambda: database_sync_to_async(_load_scope)(scope))
