"""Edge checks shared by the HTTP transports: Host (421), Origin (403)."""

from __future__ import annotations

import functools
from urllib.parse import urlsplit

from django.conf import settings
from django.http.request import split_domain_port, validate_host


def header(scope: dict, name: bytes) -> str | None:
    """Return the first value of a request header (name in lower case), decoded as latin-1."""
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def host_allowed(host: str | None) -> bool:
    if not host:
        return False
    return _host_allowed(host, tuple(settings.ALLOWED_HOSTS))


@functools.lru_cache(maxsize=256)
def _host_allowed(host: str, allowed_hosts: tuple[str, ...]) -> bool:
    # Asked on every request, almost always about the same few Hosts (a few microseconds each).
    domain, _port = split_domain_port(host)
    return bool(domain) and validate_host(domain, allowed_hosts)


DEFAULT_PORTS = {"http": 80, "https": 443}
WEB_SCHEMES = {"ws": "http", "wss": "https"}

Origin = tuple[str, str, int]
"""(scheme, host, port): what makes two origins the same (RFC 6454), default ports filled in."""


def origin_of(url: str) -> Origin | None:
    """Return the origin of an http(s) URL or Origin header value, or None if it has none ("null")."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = WEB_SCHEMES.get(parts.scheme, parts.scheme)
    if scheme not in DEFAULT_PORTS or not parts.hostname or parts.username is not None or parts.password is not None:
        return None
    return scheme, parts.hostname.lower(), port or DEFAULT_PORTS[scheme]


def gateway_origins(scope: dict) -> set[Origin]:
    """This gateway's own origin as the request reached it: FEDMCP_PUBLIC_URL, and scheme + Host.

    Host is checked against ALLOWED_HOSTS before this is asked, and a browser sends the Host of
    the URL it calls: a page elsewhere (another port of the same host included) cannot make its
    Origin equal to it.
    """
    origins = set()
    if settings.FEDMCP_PUBLIC_URL:
        origins.add(origin_of(settings.FEDMCP_PUBLIC_URL))
    host = header(scope, b"host")
    if host:
        scheme = WEB_SCHEMES.get(scope.get("scheme", "http"), scope.get("scheme", "http"))
        origins.add(origin_of(f"{scheme}://{host}"))
    origins.discard(None)
    return origins  # type: ignore[return-value]


def origin_allowed(origin: str | None, scope: dict) -> bool:
    """An absent Origin is fine (non-browser clients); a present one must be the gateway's or listed.

    Scheme, host and port are all compared: `http://127.0.0.1:9999` is not the gateway on
    `127.0.0.1:8000`, whatever ALLOWED_HOSTS says about the host name.
    """
    if origin is None:
        return True
    asked = origin_of(origin)
    if asked is None:
        return False
    return asked in gateway_origins(scope) or asked in {origin_of(listed) for listed in settings.MCP_ALLOWED_ORIGINS}


def same_origin_browser_request(scope: dict) -> bool:
    """Whether a cookie-authenticated WebSocket handshake comes from the gateway's own pages.

    Browsers always send Origin on WebSocket handshakes, so here an absent one is refused, and
    FEDMCP_ALLOWED_ORIGINS (web apps acting as MCP hosts, with tokens) does not apply.
    """
    origin = header(scope, b"origin")
    asked = origin_of(origin) if origin is not None else None
    return asked is not None and host_allowed(header(scope, b"host")) and asked in gateway_origins(scope)


def check_request(scope: dict) -> tuple[int, str] | None:
    """Return (status, reason) if the request must be refused at the edge, else None."""
    if not host_allowed(header(scope, b"host")):
        return 421, "Misdirected Request: this gateway does not serve that Host"
    if not origin_allowed(header(scope, b"origin"), scope):
        return 403, "Forbidden: Origin not allowed"
    return None
