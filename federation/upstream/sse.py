"""Upstream connections over the legacy HTTP+SSE transport (protocol 2024-11-05 style).

The client GETs the SSE URL and keeps that one stream open. The server's first event is
`endpoint`, whose data is the URI to POST messages to; every server message (responses,
notifications, server->client requests) then arrives on the stream as a `message` event, and
every client message is its own POST, answered 202. Handshake era only: the transport was
deprecated in 2025-03-26, before per-request envelopes existed.

There is one stream for every call in flight, so correlation is `SingleStreamConnection`'s, as
over stdio and WebSocket.

The stream and the POSTs go through the lean HTTP/1.1 client (lean_http.py: the checked sockets,
the peer's TLS settings, `send_authorized` for credentials, no redirects) wherever httpx would
have sent straight to the peer; with a client tests replaced, httpx sends. Either way a POST's
reply is read to at most `MAX_POST_REPLY_BYTES`, a non-2xx status fails the message (404 also
ends the session: the server forgot it), and when the stream ends or breaks the session is gone:
calls in flight fail with the reason and the pool opens a new connection for the next call.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

from federation.client import checked_direct_context, describe_failure, outbound_client
from federation.tls import PeerTlsError
from federation.upstream.base import (
    JsonDict,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from federation.upstream.lean_http import LeanHttpPool, LeanResponse, send_authorized, skip_body
from federation.upstream.single_stream import SingleStreamConnection
from federation.upstream.sse_parser import iter_sse

logger = logging.getLogger(__name__)

MAX_EVENT_BYTES = 64 * 1024 * 1024
MAX_POST_REPLY_BYTES = 64 * 1024
"""Bytes of a POST's reply read at most (it carries nothing); `aclose` deals with the rest of a longer one."""
SSE_READ_TIMEOUT = 300.0
"""Seconds of silence after which the stream counts as dead (SDK default; servers send keepalives)."""
DEFAULT_PORTS = {"http": 80, "https": 443}


def resolve_endpoint(sse_url: str, data: str) -> str:
    """Return the absolute POST URL an `endpoint` event names.

    Raises:
        UpstreamProtocolError: the endpoint is not on the SSE URL's origin. Following it would
            let an upstream point the gateway at any host (SSRF), past `check_url_allowed`.
    """
    target = urljoin(sse_url, data.strip())
    base, resolved = urlsplit(sse_url), urlsplit(target)
    try:
        same_origin = (
            resolved.scheme == base.scheme
            and resolved.hostname == base.hostname
            and (resolved.port or DEFAULT_PORTS.get(resolved.scheme)) == (base.port or DEFAULT_PORTS.get(base.scheme))
        )
    except ValueError:  # an unparsable port
        same_origin = False
    if not same_origin or resolved.username is not None or resolved.password is not None:
        raise UpstreamProtocolError("upstream named a message endpoint on another origin")
    return resolved._replace(fragment="").geturl()


class SseConnection(SingleStreamConnection):
    transport = "sse"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client: httpx.AsyncClient | None = None
        self._endpoint: str | None = None
        # Where httpx would send straight to the peer, the lean client (lean_http.py) carries the
        # stream and the POSTs instead: httpx cost ~0.65 ms of CPU per call here. Where httpx must
        # stay in charge (`checked_direct_context`: a client tests replaced), both stay None.
        self._stream_pool: LeanHttpPool | None = None
        self._post_pool: LeanHttpPool | None = None
        self._over_tls = urlsplit(self.peer.url).scheme == "https"

    # --- lifecycle -----------------------------------------------------------------------

    async def _open(self) -> None:
        await self._check_remote("HTTP+SSE")
        try:
            self._client = outbound_client(
                connect_timeout=self.peer.connect_timeout, read_timeout=self.peer.call_timeout, **self.client_options()
            )
        except PeerTlsError as exc:
            raise UpstreamUnavailableError(f"peer '{self.peer.name}': {exc}") from exc
        url = httpx.URL(self.peer.url)
        context = checked_direct_context(self._client, url)
        if context is not None:
            # One connection that is never reused: it carries the stream until either side ends it.
            self._stream_pool = LeanHttpPool(
                url, ssl_context=context, connect_timeout=self.peer.connect_timeout, read_timeout=SSE_READ_TIMEOUT,
                max_idle=0, max_connections=1, drain_timeout=0,
            )
        endpoint: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._alive = True
        self._reader = asyncio.create_task(self._read_stream(endpoint))
        async with self._handshaking(self._shutdown):
            target = await endpoint
            url = httpx.URL(target)
            context = checked_direct_context(self._client, url)
            if context is not None:
                self._post_pool = LeanHttpPool(
                    url, ssl_context=context, connect_timeout=self.peer.connect_timeout, read_timeout=self.peer.call_timeout
                )
            self._endpoint = target
            await self._handshake()

    async def _release(self) -> None:
        # Only now: the stream's response must be closed before the client is.
        for pool in (self._stream_pool, self._post_pool):
            if pool is not None:
                await pool.aclose()
        self._stream_pool = self._post_pool = None
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    # --- wire ------------------------------------------------------------------------------

    async def _open_stream(self) -> httpx.Response | LeanResponse:
        """GET the SSE URL; return the reply with its body (the stream) unread.

        Raises:
            httpx.HTTPError: the request failed.
            UpstreamError: the peer's credentials cannot be had.
        """
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-store"}
        if self._stream_pool is not None:
            return await send_authorized(self._stream_pool, self.auth, "GET", None, headers)
        assert self._client is not None
        timeout = httpx.Timeout(
            connect=self.peer.connect_timeout, read=SSE_READ_TIMEOUT, write=self.peer.connect_timeout, pool=self.peer.connect_timeout
        )
        return await self._client.send(self._client.build_request("GET", self.peer.url, headers=headers, timeout=timeout), stream=True)

    async def _read_stream(self, endpoint: asyncio.Future[str]) -> None:
        """Read the SSE stream until it ends; then the session is gone and the connection dies."""
        reason = f"peer '{self.peer.name}' closed the event stream"
        failure: UpstreamError | None = None
        opened = False
        try:
            response = await self._open_stream()
            opened = True
            try:
                content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
                if response.status_code != 200 or content_type != "text/event-stream":
                    raise UpstreamUnavailableError(f"peer '{self.peer.name}' answered HTTP {response.status_code} without an event stream")
                async for event in iter_sse(response.aiter_lines(), max_event_bytes=MAX_EVENT_BYTES):
                    if event.event == "endpoint":
                        if not endpoint.done():
                            endpoint.set_result(resolve_endpoint(self.peer.url, event.data))
                    elif event.event == "message" and event.data:
                        await self._on_frame(event.data)
            finally:
                await response.aclose()
        except asyncio.CancelledError:
            raise
        except UpstreamError as exc:
            reason, failure = str(exc), exc
        except httpx.HTTPError as exc:
            cause = describe_failure(exc, over_tls=self._over_tls)
            if opened:
                reason = f"peer '{self.peer.name}' broke the event stream: {cause}"
            else:
                reason = f"cannot reach peer '{self.peer.name}': {cause}"
        except ValueError:  # an oversized event or undecodable text
            reason = f"peer '{self.peer.name}' sent an invalid event stream"
        except Exception:
            logger.exception("peer %s: event stream failed", self.peer.name)
        self._die(reason)
        if not endpoint.done():
            endpoint.set_exception(failure or UpstreamUnavailableError(reason))

    async def _write(self, message: JsonDict) -> None:
        """POST one message to the endpoint.

        Raises:
            UpstreamUnavailableError: the POST failed or was not accepted.
            UpstreamTimeoutError: the upstream did not answer the POST in time.
        """
        endpoint = self._endpoint
        if self._client is None or endpoint is None or not self._alive:
            raise UpstreamUnavailableError(f"connection to peer '{self.peer.name}' is closed")
        content = json.dumps(message, separators=(",", ":")).encode()
        try:
            response = await self._post(endpoint, content)
            try:
                # The answer comes on the stream; the reply's body ("Accepted") only frees the connection.
                await skip_body(response, MAX_POST_REPLY_BYTES)
            finally:
                await response.aclose()
        except httpx.TimeoutException as exc:
            raise UpstreamTimeoutError(f"peer '{self.peer.name}' timed out") from exc
        except httpx.HTTPError as exc:
            raise UpstreamUnavailableError(f"cannot reach peer '{self.peer.name}': {describe_failure(exc, over_tls=self._over_tls)}") from exc
        if not 200 <= response.status_code < 300:
            if response.status_code == 404:
                # The server forgot our session; only a new stream gets a new one.
                self._die(f"peer '{self.peer.name}' no longer knows this session")
            raise UpstreamUnavailableError(f"peer '{self.peer.name}' answered HTTP {response.status_code}")

    async def _post(self, endpoint: str, content: bytes) -> httpx.Response | LeanResponse:
        """POST `content` to the endpoint; return the reply with its body unread.

        Raises:
            httpx.HTTPError: the request failed.
            UpstreamError: the peer's credentials cannot be had.
        """
        headers = {"Content-Type": "application/json"}
        if self._post_pool is not None:
            return await send_authorized(self._post_pool, self.auth, "POST", content, headers)
        assert self._client is not None
        return await self._client.send(self._client.build_request("POST", endpoint, content=content, headers=headers), stream=True)

