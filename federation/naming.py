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

Resource URIs are compared, routed, matched against policies, granted, audited and sent
upstream in one canonical form (`canonical_uri`), so two spellings of one URI are one resource.
"""

from __future__ import annotations

import re
from functools import lru_cache

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


# RFC 3986 Appendix B, with the scheme held to its §3.1 grammar (so a glob such as "*://x" has none).
_URI_RE = re.compile(r"(?:([A-Za-z][A-Za-z0-9+.-]*):)?(?://([^/?#]*))?([^?#]*)(?:\?([^#]*))?(?:#(.*))?", re.DOTALL)
_PERCENT_RE = re.compile(r"%([0-9A-Fa-f]{2})?")
_ESCAPE_OR_TEXT_RE = re.compile(r"%[0-9A-F]{2}|[^%]+|%")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# What some servers take for a path separator although RFC 3986 does not: encoded slashes and backslashes.
_LOOSE_SEPARATORS_RE = re.compile(r"/|%2F|\\|%5C")


def _normalise_percent(text: str) -> str:
    """Decode percent-encoded unreserved characters, upper-case the other escapes, escape stray '%'."""

    def one(match: re.Match[str]) -> str:
        hex_digits = match.group(1)
        if hex_digits is None:
            # Not an escape: a lenient server reads it as a literal '%', and so does "%25".
            return "%25"
        char = chr(int(hex_digits, 16))
        return char if char in _UNRESERVED else f"%{hex_digits.upper()}"

    return _PERCENT_RE.sub(one, text)


def _lower_outside_escapes(text: str) -> str:
    return _ESCAPE_OR_TEXT_RE.sub(lambda m: m.group(0) if m.group(0)[0] == "%" else m.group(0).lower(), text)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4; a rootless path ("a/../b") stays rootless."""
    rooted = path.startswith("/")
    segments: list[str] = []
    parts = (path[1:] if rooted else path).split("/")
    for index, segment in enumerate(parts):
        last = index == len(parts) - 1
        if segment == ".":
            if last:
                segments.append("")
        elif segment == "..":
            if segments:
                segments.pop()
            if last:
                segments.append("")
        else:
            segments.append(segment)
    return ("/" if rooted else "") + "/".join(segments)


@lru_cache(maxsize=4096)
def canonical_uri(uri: str) -> str:
    """Return the one form of `uri` that policies, the router, grants, audit and upstreams see.

    RFC 3986 §6.2.2 syntax-based normalisation: scheme and host in lower case, percent-encoding
    hex in upper case, percent-encoded unreserved characters decoded, dot segments removed
    (after decoding, so "%2E%2E" is a dot segment). Reserved characters stay as they are,
    encoded or not: "%2F" is never turned into a path separator. A '%' that starts no escape
    becomes "%25". In an aggregated URI (``fedmcp://<home>/<uri>``) the upstream's URI is
    canonicalised on its own. Idempotent; never fails.
    """
    match = _URI_RE.fullmatch(uri)
    assert match is not None  # every group is optional: the pattern matches any string
    scheme, authority, path, query, fragment = match.groups()
    if scheme is not None and scheme.lower() == "fedmcp" and authority is not None and path.startswith("/") and len(path) > 1:
        home = authority.lower()
        return f"fedmcp://{home}/{canonical_uri(uri.split('/', 3)[3])}"
    out = ""
    if scheme is not None:
        out += scheme.lower() + ":"
    if authority is not None:
        userinfo, at, host = authority.rpartition("@")
        # Only the host is case-insensitive (§3.2.2); user information is not.
        out += "//" + _normalise_percent(userinfo) + at + _lower_outside_escapes(_normalise_percent(host))
    path = _normalise_percent(path)
    if authority is not None or "/" in path:
        path = _remove_dot_segments(path)
    if authority is None and path.startswith("//"):
        path = "/." + path  # else read back as an authority (RFC 3986 §5.3 does the same)
    elif scheme is None and ":" in path.split("/", 1)[0]:
        path = "./" + path  # else read back as a scheme
    out += path
    if query is not None:
        out += "?" + _normalise_percent(query)
    if fragment is not None:
        out += "#" + _normalise_percent(fragment)
    return out


def is_ambiguous_uri(uri: str) -> bool:
    """Whether a canonical URI has a dot segment next to an encoded slash or a backslash.

    A server that decodes "%2F" (or treats "\\" as a separator) before removing dot segments
    would read another resource than the one policies saw ("a%2F..%2Fsecret" as "secret").
    """
    inner = split_uri(uri)
    match = _URI_RE.fullmatch(inner[1] if inner else uri)
    path = match.group(3) if match else uri
    return any(segment in (".", "..") for segment in _LOOSE_SEPARATORS_RE.split(path))


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
