"""The one place that makes outbound HTTP clients.

Every outbound HTTP connection of the gateway goes through `outbound_client()`: explicit
timeouts, no redirects, TLS verified with the peer's own settings (federation/tls.py), and a
guard that refuses private, link-local and loopback addresses unless the operator allowed them
(`FEDERATION_ALLOW_PRIVATE_IPS`, `FEDERATION_ALLOW_LOOPBACK`). Tests replace upstreams at this
seam.

The guard runs twice: `check_url_allowed` resolves the URL's host before use, and every
connection resolves it again, checks every address and dials the checked address itself (httpx
through `_CheckedBackend`; WebSocket and the lean Streamable HTTP client,
federation/upstream/lean_http.py, through `open_checked_socket`). A name that resolves to a
public address at check time and to 127.0.0.1 or 169.254.169.254 a moment later (DNS
rebinding) is refused before a packet is sent there. Connections always go straight to the peer: egress
proxies from the environment (`HTTPS_PROXY`, `ALL_PROXY`) are not used (httpx ignores them once a
transport is given, and the guard must see the address it dials).

Credentials a peer needs (a peer gateway's client-credentials token) come from an
`AuthProvider` handed to `outbound_client`: its headers go on every request, and a 401 makes it
refresh and the request is sent once more.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections.abc import AsyncGenerator, Iterable
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpcore
import httpx
from django.conf import settings

from federation.tls import PeerTls, PeerTlsError, describe_tls_error, ssl_context

IDLE_REUSE_SECONDS = 4.0
"""How long after its last reply an idle upstream connection may carry a request (unless the server said).

Servers close idle keep-alive connections after 5 s by default (uvicorn, hypercorn, Node.js):
a request sent at that moment meets the close and fails ("Server disconnected without sending a
response"), and a POST is not retried. So a connection is reused only well inside that, as
undici (Node.js's fetch) does. The lean pool (federation/upstream/lean_http.py) also follows a
server's `Keep-Alive: timeout=N`; httpx's pool gets this as its keep-alive expiry."""


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
    await resolve_allowed(parts.hostname, parts.port or 0)


IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


async def resolve_allowed(host: str, port: int) -> list[tuple[IpAddress, tuple[Any, ...], int]]:
    """Resolve `host` and refuse it unless every address is allowed.

    Returns (address, socket address, family) for each, in the resolver's order.

    Raises:
        OutboundAddressError: the host does not resolve, or to an address the settings do not allow.
    """
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise OutboundAddressError(f"cannot resolve host {host!r}") from exc
    found = [(_ip_of(info[4]), info[4], info[0]) for info in infos]
    for ip, _, _ in found:
        _refuse_unless_allowed(host, ip, "resolves to")
    return found


def _refuse_unless_allowed(host: str, ip: IpAddress, verb: str) -> None:
    if not _address_allowed(ip):
        raise OutboundAddressError(
            f"{host} {verb} {ip}, a private or loopback address; "
            "set FEDERATION_ALLOW_PRIVATE_IPS / FEDERATION_ALLOW_LOOPBACK to allow it"
        )


def _ip_of(address: Any) -> IpAddress:
    """The IP of a socket address: (host, port) for IPv4, (host, port, flow, scope) for IPv6."""
    host = address[0] if isinstance(address, tuple) else str(address)
    return ipaddress.ip_address(host.split("%", 1)[0])


class _CheckedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, dialling only addresses the guard allows.

    httpcore hands the URL's host to `connect_tcp` and names it again for TLS (SNI and
    certificate check), so resolving here and dialling the checked IP pins the connection to
    what was checked: a name rebound to 127.0.0.1 or 169.254.169.254 after `check_url_allowed`
    gets no packet, let alone a request. The address reached is checked once more after the
    connect.
    """

    def __init__(self) -> None:
        self._backend = httpcore.AnyIOBackend()

    async def connect_tcp(
        self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            addresses = await resolve_allowed(host, port)
        except OutboundAddressError as exc:
            # httpx turns httpcore's ConnectError into its own; `describe_failure` finds the cause.
            raise httpcore.ConnectError(str(exc)) from exc
        failure: Exception = httpcore.ConnectError(f"cannot connect to {host}:{port}")
        for ip, _, _ in addresses:
            try:
                stream = await self._backend.connect_tcp(
                    str(ip), port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
                continue
            try:
                _refuse_unless_allowed(host, _ip_of(stream.get_extra_info("server_addr")), "connected to")
            except (OutboundAddressError, ValueError) as exc:
                await stream.aclose()
                raise httpcore.ConnectError(str(exc)) from exc
            return stream
        raise failure

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not outbound targets")

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


class _CheckedTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport over `_CheckedBackend`, with the peer's SSL context."""

    def __init__(self, *, context: ssl.SSLContext, limits: httpx.Limits) -> None:
        super().__init__(verify=context, limits=limits, trust_env=False)
        self.ssl_context = context
        # httpx takes no network backend: give its connection pool one (same settings as it builds).
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_CheckedBackend(),
        )


def checked_direct_context(client: httpx.AsyncClient, url: httpx.URL) -> ssl.SSLContext | None:
    """The peer's SSL context if `client` (from `outbound_client`) sends `url` straight to the peer.

    For clients of their own that connect like `outbound_client` (through `open_checked_socket`,
    TLS with this context). None when httpx must stay in charge: the client is not one
    `outbound_client` made (tests replace it).
    """
    transport = client._transport_for_url(url)
    return transport.ssl_context if isinstance(transport, _CheckedTransport) else None


async def open_checked_socket(host: str, port: int, *, timeout: float) -> socket.socket:
    """Resolve `host` once, refuse it unless every address is allowed, and connect to one of them.

    For clients that take a ready socket (WebSocket): they never resolve the name again, so the
    address connected to is one that was checked.

    Raises:
        OutboundAddressError: the host does not resolve, or to an address that is not allowed.
        OSError: no address accepted the connection (TimeoutError after `timeout`).
    """
    loop = asyncio.get_running_loop()
    failure: OSError = OSError(f"cannot connect to {host}:{port}")
    for _, address, family in await resolve_allowed(host, port):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, address)
        except OSError as exc:  # TimeoutError included
            sock.close()
            failure = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise failure


def _causes(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


SILENT_TLS_CLOSE = (
    "the peer closed the TLS connection without answering; a peer that requires a client certificate "
    "(mutual TLS) does this when it gets none it accepts"
)
"""Said of a TLS peer that hung up unanswered: with TLS 1.3 the client certificate is checked after
the client's handshake is done, and servers on asyncio (uvicorn) then close without an alert."""


def describe_failure(exc: BaseException, *, over_tls: bool | None = None) -> str:
    """Say why an outbound connection failed, for messages operators and hosts see.

    A refused address and a TLS failure are spelled out (what failed and what to configure);
    anything else is named by its exception type, as before (its text may hold internals).
    `over_tls` says the connection used TLS (derived from the request for httpx errors).
    """
    for cause in _causes(exc):
        if isinstance(cause, OutboundAddressError | PeerTlsError):
            return str(cause)
        if isinstance(cause, ssl.SSLError):
            return describe_tls_error(cause)
    if over_tls is None and isinstance(exc, httpx.RequestError):
        try:
            over_tls = exc.request.url.scheme == "https"
        except RuntimeError:  # no request attached
            over_tls = False
    # The peer hung up before any byte of a response: httpcore says "Server disconnected", a
    # write hits a broken pipe or reset, websockets meets EOF before the HTTP status line.
    closed_silently = (isinstance(exc, httpx.RemoteProtocolError) and str(exc).startswith("Server disconnected")) or any(
        isinstance(cause, EOFError | BrokenPipeError | ConnectionResetError) for cause in _causes(exc)
    )
    if over_tls and closed_silently:
        return SILENT_TLS_CLOSE
    return type(exc).__name__


def outbound_client(
    *, connect_timeout: float, read_timeout: float, auth: AuthProvider | None = None, tls: PeerTls | None = None
) -> httpx.AsyncClient:
    """Return a new AsyncClient for one upstream; the caller closes it (use `async with`).

    `tls` is the peer's CA bundle and client certificate (the default trust store without).

    Raises:
        PeerTlsError: the peer's TLS settings cannot be loaded.
    """
    timeout = httpx.Timeout(connect=connect_timeout, read=read_timeout, write=connect_timeout, pool=connect_timeout)
    context = ssl_context(tls or PeerTls())
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=IDLE_REUSE_SECONDS)
    return httpx.AsyncClient(
        auth=ProviderAuth(auth) if auth is not None else None,
        timeout=timeout,
        # Redirects stay off: a redirect could point anywhere, past `check_url_allowed`.
        follow_redirects=False,
        transport=_CheckedTransport(context=context, limits=limits),
        # Environment proxies are never mounted (`transport=` turns them off in httpx); kept
        # consistent in case a caller mounts one explicitly.
        verify=context,
        limits=limits,
        headers={"User-Agent": "fedmcp"},
    )
