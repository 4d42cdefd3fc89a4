"""The one place that makes outbound HTTP clients.

Every outbound HTTP connection of the gateway goes through `outbound_client()`: explicit
timeouts, no redirects, and a guard that refuses private, link-local and loopback addresses
unless the operator allowed them (`FEDERATION_ALLOW_PRIVATE_IPS`, `FEDERATION_ALLOW_LOOPBACK`).
Tests replace upstreams at this seam.

Credentials a peer needs (a peer gateway's client-credentials token) come from an
`AuthProvider` handed to `outbound_client`: its headers go on every request, and a 401 makes it
refresh and the request is sent once more.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncGenerator
from typing import Protocol
from urllib.parse import urlsplit

import httpx
from django.conf import settings


class OutboundAddressError(Exception):
    """The target address is not allowed for outbound calls."""


class AuthProvider(Protocol):
    """Supplies the credentials of one upstream (e.g. `Authorization: Bearer …`)."""

    async def headers(self) -> dict[str, str]:
        """Return the headers to add to each request.

        Raises:
            UpstreamError: no credentials can be obtained (e.g. the token endpoint refused).
        """

    async def refresh(self, rejected: dict[str, str]) -> None:
        """Forget credentials the upstream refused (`rejected` are the headers it got)."""


class ProviderAuth(httpx.Auth):
    """Adapts an `AuthProvider` to httpx: add its headers; on 401 refresh and retry once."""

    def __init__(self, provider: AuthProvider) -> None:
        self.provider = provider

    async def async_auth_flow(self, request: httpx.Request) -> AsyncGenerator[httpx.Request, httpx.Response]:
        sent = await self.provider.headers()
        request.headers.update(sent)
        response = yield request
        if response.status_code == 401:
            await self.provider.refresh(sent)
            request.headers.update(await self.provider.headers())
            yield request


def _address_allowed(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return bool(settings.FEDERATION_ALLOW_LOOPBACK)
    # `not is_global` also catches what `is_private` misses, e.g. 100.64.0.0/10 (shared address
    # space, where some clouds put their metadata service: 100.100.100.200).
    if ip.is_private or ip.is_link_local or ip.is_reserved or ip.is_multicast or ip.is_unspecified or not ip.is_global:
        return bool(settings.FEDERATION_ALLOW_PRIVATE_IPS)
    return True


async def check_url_allowed(url: str) -> None:
    """Resolve the URL's host and refuse it if any address is not allowed.

    Raises:
        OutboundAddressError: the scheme is not http(s)/ws(s), the host does not resolve, or it
            resolves to an address the settings do not allow.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
        raise OutboundAddressError(f"unsupported URL {url!r}: use http(s):// or ws(s):// with a host")
    host = parts.hostname
    try:
        ips = [ipaddress.ip_address(host)]
    except ValueError:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, parts.port or 0, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise OutboundAddressError(f"cannot resolve host {host!r}") from exc
        ips = [ipaddress.ip_address(info[4][0]) for info in infos]
    for ip in ips:
        if not _address_allowed(ip):
            raise OutboundAddressError(
                f"{host} resolves to {ip}, a private or loopback address; "
                "set FEDERATION_ALLOW_PRIVATE_IPS / FEDERATION_ALLOW_LOOPBACK to allow it"
            )


def outbound_client(*, connect_timeout: float, read_timeout: float, auth: AuthProvider | None = None) -> httpx.AsyncClient:
    """Return a new AsyncClient for one upstream; the caller closes it (use `async with`)."""
    timeout = httpx.Timeout(connect=connect_timeout, read=read_timeout, write=connect_timeout, pool=connect_timeout)
    return httpx.AsyncClient(
        auth=ProviderAuth(auth) if auth is not None else None,
        timeout=timeout,
        follow_redirects=False,
        limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
        headers={"User-Agent": "fedmcp"},
    )
