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


def origin_allowed(origin: str | None) -> bool:
    """An absent Origin is fine (non-browser clients); a present one must be ours or listed."""
    if origin is None:
        return True
    if origin in settings.MCP_ALLOWED_ORIGINS:
        return True
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    hostname = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    return validate_host(hostname, settings.ALLOWED_HOSTS)


def check_request(scope: dict) -> tuple[int, str] | None:
    """Return (status, reason) if the request must be refused at the edge, else None."""
    if not host_allowed(header(scope, b"host")):
        return 421, "Misdirected Request: this gateway does not serve that Host"
    if not origin_allowed(header(scope, b"origin")):
        return 403, "Forbidden: Origin not allowed"
    return None
