"""Resolve host-facing names to a peer and the upstream's own name.

A request can only reach the peer that listed the thing it names: a tool or prompt must be in
that peer's catalog, a resource URI must be listed or match one of that peer's templates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from channels.db import database_sync_to_async

from federation import naming
from federation.models import CatalogEntry, CatalogKind, Peer
from federation.upstream.base import PeerConfig


class NotRoutableError(Exception):
    """The name does not belong to any enabled peer's catalog (message is safe for hosts)."""


@dataclass(frozen=True)
class Route:
    peer: PeerConfig
    upstream_name: str
    entry_payload: dict | None = None


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


def _peer_for(scope: str, qualified: str, split: object) -> tuple[str, str] | None:
    if scope:
        return scope, qualified
    return split(qualified)  # type: ignore[operator]


def _lookup(scope: str, kind: str, qualified: str) -> Route:
    splitter = naming.split_uri if kind == CatalogKind.RESOURCE else naming.split_name
    parts = _peer_for(scope, qualified, splitter)
    noun = {"tool": "tool", "prompt": "prompt", "resource": "resource"}[kind]
    if parts is None:
        raise NotRoutableError(f"unknown {noun} {qualified!r}")
    peer_name, upstream = parts
    try:
        peer = Peer.objects.get(name=peer_name, enabled=True)
    except Peer.DoesNotExist as exc:
        raise NotRoutableError(f"unknown {noun} {qualified!r}") from exc
    entry = CatalogEntry.objects.filter(peer=peer, kind=kind, upstream_name=upstream, enabled=True).first()
    if entry is not None:
        return Route(PeerConfig.from_peer(peer), upstream, entry.payload)
    if kind == CatalogKind.RESOURCE:
        templates = CatalogEntry.objects.filter(peer=peer, kind=CatalogKind.RESOURCE_TEMPLATE, enabled=True)
        for template in templates.values_list("upstream_name", flat=True):
            if template_regex(template).match(upstream):
                return Route(PeerConfig.from_peer(peer), upstream)
    raise NotRoutableError(f"unknown {noun} {qualified!r}")


async def resolve(scope: str, kind: str, qualified: str) -> Route:
    """Return the route for a tool name, prompt name or resource URI.

    Raises:
        NotRoutableError: no enabled peer listed it.
    """
    return await database_sync_to_async(_lookup)(scope, kind, qualified)


async def peer_for_scope(scope: str) -> PeerConfig | None:
    """Return the enabled peer a per-peer endpoint serves, or None."""

    def load() -> PeerConfig | None:
        peer = Peer.objects.filter(name=scope, enabled=True).first()
        return PeerConfig.from_peer(peer) if peer else None

    return await database_sync_to_async(load)()
