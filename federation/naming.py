"""How catalog names are namespaced on the aggregated endpoints.

The scheme (documented in docs/NAMING.md):

* tools and prompts: ``<home>__<name>``; resources and templates: ``fedmcp://<home>/<uri>``;
* the *home* says where a thing lives: ``<peer>`` for a peer of this gateway, or
  ``<gateway>.<peer>`` for a peer of another fedmcp gateway. Homes never contain ``__`` or
  ``/``, so the first ``__`` (or the first ``/`` after ``fedmcp://``) always splits a name back
  into its home and the upstream's own name, whatever characters that name has;
* a thing imported through a chain of gateways keeps the home of the gateway that owns it, so
  names never grow with hops: C's ``fixture__add`` is ``c.fixture__add`` on B and on A alike.

Names depend only on gateway, peer and upstream names, so they are stable across restarts.
Per-peer endpoints (``/peers/<name>/…``) use the peer's names unchanged.
"""

from __future__ import annotations

import re

from federation.models import PEER_NAME_WORD

SEPARATOR = "__"
URI_SCHEME = "fedmcp://"
_HOME_RE = re.compile(rf"{PEER_NAME_WORD}(\.{PEER_NAME_WORD})?")


def qualify_name(home: str, name: str) -> str:
    """Return the aggregated name of an upstream tool or prompt."""
    return f"{home}{SEPARATOR}{name}"


def split_name(qualified: str) -> tuple[str, str] | None:
    """Return (home, upstream name) for an aggregated tool/prompt name, or None if it is not one."""
    home, sep, name = qualified.partition(SEPARATOR)
    if not sep or not name or not _HOME_RE.fullmatch(home):
        return None
    return home, name


def qualify_uri(home: str, uri: str) -> str:
    """Return the aggregated URI (or URI template) of an upstream resource."""
    return f"{URI_SCHEME}{home}/{uri}"


def split_uri(qualified: str) -> tuple[str, str] | None:
    """Return (home, upstream uri) for an aggregated resource URI, or None if it is not one."""
    if not qualified.startswith(URI_SCHEME):
        return None
    home, sep, uri = qualified[len(URI_SCHEME) :].partition("/")
    if not sep or not uri or not _HOME_RE.fullmatch(home):
        return None
    return home, uri


def is_remote_home(home: str) -> bool:
    """Whether a home names a peer of another gateway (``gateway.peer``)."""
    return "." in home


def home_gateway(home: str) -> str | None:
    """Return the gateway part of a remote home, or None for a local one."""
    return home.split(".", 1)[0] if is_remote_home(home) else None


def import_home(remote_gateway: str, remote_home: str) -> str:
    """Return the home, on this gateway, of a thing a peer gateway lists under `remote_home`.

    The peer's own peers become ``<remote_gateway>.<peer>``; things it imported from further
    away already carry their owner's home and keep it.
    """
    return remote_home if is_remote_home(remote_home) else f"{remote_gateway}.{remote_home}"


def host_uri(peer_name: str, remote_gateway: str, upstream_uri: str) -> str:
    """Return the aggregated form of a URI a peer used (in resource contents, for example)."""
    if remote_gateway and (parts := split_uri(upstream_uri)) is not None:
        return qualify_uri(import_home(remote_gateway, parts[0]), parts[1])
    return qualify_uri(peer_name, upstream_uri)
