"""How catalog names are namespaced on the aggregated endpoints.

The scheme (documented in docs/NAMING.md):

* tools and prompts: ``<peer>__<name>`` — peer names never contain ``__`` so the first ``__``
  always separates the peer from the upstream's own name (which may contain anything);
* resources and resource templates: ``fedmcp://<peer>/<upstream uri>`` — the upstream URI follows
  the first ``/`` after the peer name verbatim, so templates still expand correctly.

Names depend only on the peer's name and the upstream's name, so they are stable across
restarts and refreshes. Per-peer endpoints (``/peers/<name>/…``) use upstream names unchanged.
"""

from __future__ import annotations

import re

from federation.models import PEER_NAME_PATTERN

SEPARATOR = "__"
URI_SCHEME = "fedmcp://"
_PEER_RE = re.compile(PEER_NAME_PATTERN)


def qualify_name(peer: str, name: str) -> str:
    """Return the aggregated name of an upstream tool or prompt."""
    return f"{peer}{SEPARATOR}{name}"


def split_name(qualified: str) -> tuple[str, str] | None:
    """Return (peer, upstream name) for an aggregated tool/prompt name, or None if it is not one."""
    peer, sep, name = qualified.partition(SEPARATOR)
    if not sep or not name or not _PEER_RE.match(peer):
        return None
    return peer, name


def qualify_uri(peer: str, uri: str) -> str:
    """Return the aggregated URI (or URI template) of an upstream resource."""
    return f"{URI_SCHEME}{peer}/{uri}"


def split_uri(qualified: str) -> tuple[str, str] | None:
    """Return (peer, upstream uri) for an aggregated resource URI, or None if it is not one."""
    if not qualified.startswith(URI_SCHEME):
        return None
    peer, sep, uri = qualified[len(URI_SCHEME) :].partition("/")
    if not sep or not uri or not _PEER_RE.match(peer):
        return None
    return peer, uri
