"""Upstream connections over Streamable HTTP, in either protocol era.

Era negotiation follows the spec's fallback rule: probe with `server/discover`; a server that
answers it with 2026-07-28 among its supported versions is modern; anything else gets the
`initialize` handshake. A server that refuses a version with the list of those it supports
(`data.supported`, on `-32022` or on an `initialize` error) is asked again in the newest
handshake version of that list the gateway speaks; a 2026-07-28 request refused with `-32022`
by a server whose list names 2026-07-28 is sent once more as it was (SEP-2575's retry).

A handshake-era call whose SSE stream ends before its answer, after the server gave its events
ids (SEP-1699 polling, or a dropped connection), is resumed: after the stream's `retry` delay,
`GET` with `Last-Event-ID` continues it, up to `MAX_RESUMES` times in a row.

A 2026-07-28 `tools/call` mirrors the arguments the tool declares with `x-mcp-header` into
`Mcp-Param-*` headers (SEP-2243); the declarations come from the catalog
(`UpstreamConnection.tool_headers`). The handshake era has no such headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from typing import Any

import httpx
from mcp.shared.inbound import encode_header_value, mcp_param_headers
from mcp_types.jsonrpc import UNSUPPORTED_PROTOCOL_VERSION
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, LATEST_HANDSHAKE_VERSION, LATEST_MODERN_VERSION

from federation.client import OutboundAddressError, check_url_allowed, checked_direct_context, describe_failure, outbound_client
from federation.tls import PeerTlsError
from federation.upstream.base import (
    JsonDict,
    OnMessage,
    ServerDescription,
    UpstreamConnection,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
    describe_discover,
    describe_initialize,
    error_reply,
    initialize_params,
    listen_filter,
    modern_meta,
    unrouted_request_reply,
)
from federation.upstream.lean_http import LeanHttpPool, LeanResponse, send_authorized
from federation.upstream.sockets import use_cheap_readability_check
from federation.upstream.sse_parser import iter_sse
from federation.upstream.wire import UpstreamMessageError, check_message, decode

logger = logging.getLogger(__name__)

ACCEPT = "application/json, text/event-stream"
NAME_PARAM = {
    "tools/call": "name", "prompts/get": "name", "resources/read": "uri",
    # SEP-2663 adds the task id of the tasks extension's methods.
    "tasks/get": "taskId", "tasks/update": "taskId", "tasks/cancel": "taskId",
}
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
MAX_RESUMES = 10
"""Resumptions of one call's stream (GET + Last-Event-ID) in a row before the call fails."""
GET_STREAM_OPEN_WAIT = 2.0
"""How long a new handshake-era session waits for its GET stream to open before its first request (seconds)."""
DEFAULT_RETRY_MS = 1000
"""Wait before resuming a stream whose server suggested no `retry` delay (milliseconds)."""
MAX_RETRY_MS = 30_000
"""Longest `retry` delay honoured; the call's own timeout bounds the whole exchange anyway."""


def speakable_handshake_version(supported: Any) -> str | None:
    """Return the newest handshake-era version in a server's `supported` list that the gateway speaks."""
    if not isinstance(supported, list):
        return None
    ours = [v for v in HANDSHAKE_PROTOCOL_VERSIONS if v in supported]
    return max(ours) if ours else None


def refused_version_we_speak(reply: JsonDict) -> bool:
    """Whether `reply` refuses the request's protocol version (-32022) while listing the one the gateway sends.

    A server answers so when it would not take the request as it came (SEP-2575); the request was
    not processed, so asking once more, exactly as the list says, is safe for any method.
    """
    error = reply.get("error")
    if not isinstance(error, dict) or error.get("code") != UNSUPPORTED_PROTOCOL_VERSION:
        return False
    data = error.get("data")
    supported = data.get("supported") if isinstance(data, dict) else None
    return isinstance(supported, list) and LATEST_MODERN_VERSION in supported


class SessionExpiredError(UpstreamError):
    """The upstream forgot our session (404); the request was not processed."""


class StreamableHttpConnection(UpstreamConnection):
    transport = "streamable-http"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client: httpx.AsyncClient | None = None
        # Requests that expect a reply go through the lean client when httpx would have sent them
        # straight to the peer (lean_http.py); the GET/listen streams, notifications, answers
        # and DELETE stay with httpx.
        self._lean: LeanHttpPool | None = None
        self._url: httpx.URL | str = self.peer.url
        self._session_id: str | None = None
        self._get_stream: asyncio.Task[None] | None = None
        self._reopen_lock = asyncio.Lock()
        self._background: set[asyncio.Task[Any]] = set()
        self._handshake_version = LATEST_HANDSHAKE_VERSION
        """The version `initialize` asks for: the latest, or the best of what the upstream listed."""
        self._call_keys = itertools.count()
        self._calls: dict[int, OnMessage] = {}
        """The host calls in flight, by a key of their own: a request on the GET stream goes to the only one."""
        self._answers: dict[Any, asyncio.Future[JsonDict]] = {}
        """Calls whose stream is being resumed, by request id: their answer may come on the GET stream."""

    # --- lifecycle -----------------------------------------------------------------------

    async def _open(self) -> None:
        try:
            await check_url_allowed(self.peer.url)
            self._client = use_cheap_readability_check(
                outbound_client(connect_timeout=self.peer.connect_timeout, read_timeout=self.peer.call_timeout, **self.client_options())
            )
        except (OutboundAddressError, PeerTlsError) as exc:
            raise UpstreamUnavailableError(f"peer '{self.peer.name}': {exc}") from exc
        # Parsed once: httpx re-parses (and re-quotes) a URL string on every request.
        self._url = httpx.URL(self.peer.url)
        context = checked_direct_context(self._client, self._url)
        if context is not None:
            self._lean = LeanHttpPool(
                self._url, ssl_context=context, connect_timeout=self.peer.connect_timeout, read_timeout=self.peer.call_timeout
            )
        try:
            async with asyncio.timeout(self.peer.connect_timeout):
                if self.requested_era in (None, "modern"):
                    description = await self._discover()
                    if description is not None:
                        self.era, self.description = "modern", description
                        if listen_filter(description.capabilities):
                            self._get_stream = asyncio.create_task(self._listen_modern())
                        return
                    if self.requested_era == "modern":
                        raise UpstreamProtocolError(
                            f"peer '{self.peer.name}' does not speak protocol {LATEST_MODERN_VERSION}"
                        )
                self.era = "legacy"
                await self._initialize()
        except TimeoutError as exc:
            await self._close()
            raise UpstreamTimeoutError(
                f"peer '{self.peer.name}' did not complete the handshake within {self.peer.connect_timeout:g}s"
            ) from exc
        except BaseException:
            await self._close()
            raise

    async def _discover(self) -> ServerDescription | None:
        body = {"jsonrpc": "2.0", "id": self.next_id(), "method": "server/discover", "params": {"_meta": modern_meta()}}
        headers = {"MCP-Protocol-Version": LATEST_MODERN_VERSION, "Mcp-Method": "server/discover"}
        try:
            reply = await self._post_and_collect(body, headers, None)
            if refused_version_we_speak(reply):
                # Refused with a list naming 2026-07-28: asked again in it, instead of falling
                # back to initialize (the suite's request-metadata scenario).
                logger.info("peer %s: refused server/discover's version but lists %s; asking again", self.peer.name, LATEST_MODERN_VERSION)
                reply = await self._post_and_collect({**body, "id": self.next_id()}, headers, None)
        except (UpstreamProtocolError, SessionExpiredError):
            return None
        except UpstreamUnavailableError as exc:
            # A legacy server may answer the probe with 4xx; only connection failures are fatal.
            if "HTTP 4" in str(exc):
                return None
            raise
        error = reply.get("error")
        if isinstance(error, dict) and isinstance(error.get("data"), dict):
            # An unsupported-version refusal (-32022) lists what the server speaks.
            self._handshake_version = speakable_handshake_version(error["data"].get("supported")) or self._handshake_version
        result = reply.get("result")
        return describe_discover(result) if isinstance(result, dict) else None

    async def _initialize(self) -> None:
        self._session_id = None
        body = {"jsonrpc": "2.0", "id": self.next_id(), "method": "initialize", "params": initialize_params(self._handshake_version)}
        reply = await self._post_and_collect(body, {}, None, capture_session=True)
        error = reply.get("error")
        data = error.get("data") if isinstance(error, dict) else None
        offered = speakable_handshake_version(data.get("supported")) if isinstance(data, dict) else None
        if offered is not None and offered != self._handshake_version:
            # Refused for its version, with a list to choose from (instead of a counter-offer).
            logger.info("peer %s: refused protocol %s; asking again with %s", self.peer.name, self._handshake_version, offered)
            self._handshake_version = offered
            body = {"jsonrpc": "2.0", "id": self.next_id(), "method": "initialize", "params": initialize_params(offered)}
            reply = await self._post_and_collect(body, {}, None, capture_session=True)
        if "error" in reply:
            error = reply["error"] if isinstance(reply["error"], dict) else {}
            raise UpstreamProtocolError(
                f"peer '{self.peer.name}' refused initialize: {error.get('message', 'error')}"
            )
        self.description = describe_initialize(reply.get("result") or {})
        await self._post_notification("notifications/initialized", None)
        if self._get_stream is None or self._get_stream.done():
            opened = asyncio.Event()
            self._get_stream = asyncio.create_task(self._listen_get_stream(opened))
            # Open before the first request, so nothing the server sends on it about that request
            # is lost, and a resumed call's GET is not mistaken for this one (the suite's sse-retry).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(opened.wait(), GET_STREAM_OPEN_WAIT)

    async def _close(self) -> None:
        for task in [self._get_stream, *self._background]:
            if task is not None:
                task.cancel()
        if self._client is not None:
            if self._session_id:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._client.delete(self.peer.url, headers=self._headers()), 2)
            await self._client.aclose()
            self._client = None
        if self._lean is not None:
            await self._lean.aclose()
            self._lean = None

    # --- requests --------------------------------------------------------------------------

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"Accept": ACCEPT, "Content-Type": "application/json"}
        if self.era == "legacy":
            if self._session_id:
                headers["Mcp-Session-Id"] = self._session_id
            if self.description.protocol_version:
                headers["MCP-Protocol-Version"] = self.description.protocol_version
        else:
            headers["MCP-Protocol-Version"] = LATEST_MODERN_VERSION
        if extra:
            headers.update(extra)
        return headers

    async def _send_request(
        self, method: str, params: JsonDict | None, on_message: OnMessage | None, timeout: float
    ) -> JsonDict:
        body: JsonDict = {"jsonrpc": "2.0", "id": self.next_id(), "method": method}
        if params is not None:
            body["params"] = params
        extra: dict[str, str] = {}
        if self.era == "modern":
            extra["Mcp-Method"] = method
            name_key = NAME_PARAM.get(method)
            if name_key and isinstance((params or {}).get(name_key), str):
                extra["Mcp-Name"] = encode_header_value(params[name_key])  # type: ignore[index]
            if method == "tools/call":
                extra.update(self._param_headers(params or {}))
        call_key = next(self._call_keys)
        if on_message is not None:
            self._calls[call_key] = on_message
        try:
            async with asyncio.timeout(timeout):
                try:
                    reply = await self._post_and_collect(body, extra, on_message)
                    if self.era == "modern" and refused_version_we_speak(reply):
                        # Not processed (SEP-2575): once more, with a fresh id.
                        body["id"] = self.next_id()
                        reply = await self._post_and_collect(body, extra, on_message)
                    return reply
                except SessionExpiredError:
                    # The upstream dropped our session; it never saw this request, so a fresh
                    # handshake and one resend are safe even for tools/call.
                    await self._reinitialize()
                    body["id"] = self.next_id()
                    return await self._post_and_collect(body, extra, on_message)
        except TimeoutError as exc:
            raise UpstreamTimeoutError(f"peer '{self.peer.name}' did not answer {method} within {timeout:g}s") from exc
        except asyncio.CancelledError:
            if self.era == "legacy":
                self._spawn(self._post_notification("notifications/cancelled", {"requestId": body["id"], "reason": "cancelled by host"}))
            raise
        finally:
            self._calls.pop(call_key, None)

    def _param_headers(self, params: JsonDict) -> dict[str, str]:
        """The `Mcp-Param-*` headers of a 2026-07-28 `tools/call` (SEP-2243): each argument the
        tool's schema declares with `x-mcp-header`, encoded as the spec says; a server that
        declares them checks them against the body (-32020 when one is missing)."""
        declared = self.tool_headers.get(params.get("name"))  # type: ignore[arg-type]
        arguments = params.get("arguments")
        if not declared or not isinstance(arguments, dict):
            return {}
        return mcp_param_headers(declared, arguments)

    async def _reinitialize(self) -> None:
        stale = self._session_id
        async with self._reopen_lock:
            if self._session_id == stale:
                logger.info("peer %s: upstream session expired, re-initializing", self.peer.name)
                await self._initialize()

    async def _send_notification(self, method: str, params: JsonDict | None) -> None:
        await self._post_notification(method, params)

    async def _post_notification(self, method: str, params: JsonDict | None) -> None:
        body: JsonDict = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            body["params"] = params
        extra = {"Mcp-Method": method} if self.era == "modern" else {}
        await self._post_raw(body, extra)

    async def _post_raw(self, body: JsonDict, extra: dict[str, str]) -> None:
        assert self._client is not None
        try:
            response = await self._client.post(self.peer.url, content=json.dumps(body), headers=self._headers(extra))
        except httpx.HTTPError as exc:
            logger.warning("peer %s: posting %s failed: %s", self.peer.name, body.get("method", "reply"), exc)
            return
        await response.aclose()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _post_and_collect(
        self,
        body: JsonDict,
        extra: dict[str, str],
        on_message: OnMessage | None,
        *,
        capture_session: bool = False,
    ) -> JsonDict:
        if self._client is None:
            raise UpstreamUnavailableError(f"connection to peer '{self.peer.name}' is closed")
        response: httpx.Response | LeanResponse
        try:
            if self._lean is not None:
                response = await self._lean_post(json.dumps(body).encode(), self._headers(extra))
            else:
                request = self._client.build_request("POST", self._url, content=json.dumps(body), headers=self._headers(extra))
                response = await self._client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeoutError(f"peer '{self.peer.name}' timed out") from exc
        except httpx.HTTPError as exc:
            raise UpstreamUnavailableError(f"cannot reach peer '{self.peer.name}': {describe_failure(exc, over_tls=self._url.scheme == 'https')}") from exc
        try:
            if response.status_code == 404 and self.era == "legacy" and self._session_id and not capture_session:
                raise SessionExpiredError(f"peer '{self.peer.name}' session expired")
            if capture_session:
                self._session_id = response.headers.get("mcp-session-id")
            content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type == "text/event-stream" and response.status_code == 200:
                return await self._collect_stream(response, body["id"], on_message)
            raw = await self._read_limited(response)
            if content_type == "application/json" and raw:
                message = decode(raw, peer=self.peer.name)
                if isinstance(message, dict) and ("result" in message or "error" in message):
                    return check_message(message, peer=self.peer.name)
            # Say what came instead: "answered HTTP 200" alone reads like success to a host.
            raise UpstreamUnavailableError(
                f"peer '{self.peer.name}' answered HTTP {response.status_code} with {content_type or 'no content type'}"
                " instead of a JSON-RPC response"
            )
        except httpx.TimeoutException as exc:
            raise UpstreamTimeoutError(f"peer '{self.peer.name}' timed out") from exc
        except httpx.HTTPError as exc:
            raise UpstreamUnavailableError(
                f"peer '{self.peer.name}' broke the connection: {describe_failure(exc, over_tls=self._url.scheme == 'https')}"
            ) from exc
        finally:
            await response.aclose()

    async def _lean_post(self, content: bytes, headers: dict[str, str]) -> LeanResponse:
        """POST through the lean client, with the peer's credentials as `ProviderAuth` adds them."""
        assert self._lean is not None
        return await send_authorized(self._lean, self.auth, "POST", content, headers)

    async def _read_limited(self, response: httpx.Response | LeanResponse) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                raise UpstreamProtocolError(f"peer '{self.peer.name}' sent a response larger than {MAX_RESPONSE_BYTES} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _collect_stream(self, response: httpx.Response | LeanResponse, request_id: Any, on_message: OnMessage | None) -> JsonDict:
        """Read a call's SSE stream to its answer, resuming it (handshake era) if it ends early.

        While resuming, the answer may also come on the standalone GET stream (a server that
        sends it on whichever GET arrives first); whichever brings it first ends the wait.
        `response` is closed by the caller; resumed streams are closed here.
        """
        last_id: str | None = None
        retry_ms = DEFAULT_RETRY_MS

        async def read(stream: httpx.Response | LeanResponse) -> JsonDict | None:
            """The answer from `stream`, or None when it ends first."""
            nonlocal last_id, retry_ms
            try:
                async for event in iter_sse(stream.aiter_lines(), max_event_bytes=MAX_RESPONSE_BYTES):
                    last_id = event.id if event.id else last_id
                    retry_ms = min(event.retry, MAX_RETRY_MS) if event.retry is not None else retry_ms
                    if event.event != "message" or not event.data:
                        continue  # a priming event (an id, empty data) or another kind
                    try:
                        message = check_message(decode(event.data, peer=self.peer.name), peer=self.peer.name)
                    except UpstreamMessageError as exc:
                        if exc.request_id == request_id:
                            raise  # the reply itself: the call fails (-32010)
                        logger.warning("peer %s: ignoring a message: %s", self.peer.name, exc)
                        continue
                    if "method" not in message and message.get("id") == request_id:
                        return message
                    await self._handle_incoming(message, on_message)
            except ValueError as exc:
                raise UpstreamProtocolError(f"peer '{self.peer.name}' sent an oversized event") from exc
            return None

        answered: asyncio.Future[JsonDict] = asyncio.get_running_loop().create_future()
        self._answers[request_id] = answered
        resumed: httpx.Response | None = None
        try:
            answer = await read(response)
            if answer is not None:
                return answer
            for _ in range(MAX_RESUMES):
                if answered.done():
                    return answered.result()
                # 2026-07-28 has no resumability (a closed stream is a cancellation), and a stream
                # whose events carried no id cannot be resumed.
                if self.era != "legacy" or not self.description.protocol_version or last_id is None:
                    break
                if resumed is not None:
                    await resumed.aclose()
                    resumed = None
                with contextlib.suppress(TimeoutError):
                    # The stream's retry delay, unless the answer comes on the GET stream meanwhile.
                    return await asyncio.wait_for(asyncio.shield(answered), retry_ms / 1000)
                resumed = await self._resume(last_id)
                reader = asyncio.ensure_future(read(resumed))
                try:
                    await asyncio.wait({reader, answered}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not reader.done():
                        reader.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await reader
                if answered.done():
                    return answered.result()
                if (answer := reader.result()) is not None:
                    return answer
        finally:
            self._answers.pop(request_id, None)
            if resumed is not None:
                await resumed.aclose()
        raise UpstreamUnavailableError(f"peer '{self.peer.name}' closed the stream before answering")

    async def _resume(self, last_id: str) -> httpx.Response:
        """Reopen a call's stream after the event `last_id` (GET + Last-Event-ID).

        Raises:
            UpstreamUnavailableError: the upstream cannot be reached or will not resume the stream.
        """
        assert self._client is not None
        logger.info("peer %s: resuming a call's stream after event %s", self.peer.name, last_id)
        headers = self._headers({"Accept": "text/event-stream", "Last-Event-ID": last_id})
        del headers["Content-Type"]
        try:
            response = await self._client.send(self._client.build_request("GET", self._url, headers=headers), stream=True)
        except httpx.HTTPError as exc:
            raise UpstreamUnavailableError(
                f"peer '{self.peer.name}' closed the stream before answering, and resuming it failed: "
                f"{describe_failure(exc, over_tls=self._url.scheme == 'https')}"
            ) from exc
        content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if response.status_code != 200 or content_type != "text/event-stream":
            await response.aclose()
            raise UpstreamUnavailableError(
                f"peer '{self.peer.name}' closed the stream before answering, and refused to resume it (HTTP {response.status_code})"
            )
        return response

    async def _handle_incoming(self, message: JsonDict, on_message: OnMessage | None) -> None:
        """Route a message the upstream sent on a request's stream or the GET stream."""
        if "method" not in message:
            waiting = self._answers.get(message.get("id"))
            if waiting is not None and not waiting.done():
                waiting.set_result(message)  # the answer of a call whose stream is being resumed
            return
        if "id" not in message:
            if on_message is not None:
                await on_message(message)
            else:
                await self._route_unrelated(message)
            return
        # A server->client request: answer it without blocking the stream it arrived on.
        self._spawn(self._answer(message, on_message))

    async def _answer(self, request: JsonDict, on_message: OnMessage | None) -> None:
        if on_message is None and len(self._calls) == 1:
            # Sent on the GET stream during the one host call in flight on this session: a
            # handshake-era session is one user's own (pool.py connection_owner), so this is
            # that call's host (servers that send requests on the GET stream, as the
            # TypeScript SDK does without a related request id).
            [on_message] = self._calls.values()
        if request.get("method") == "ping":
            reply: JsonDict | None = {"result": {}}
        elif on_message is None:
            reason = "ambiguous-host-call" if self._calls else "no-host-call"
            reply = unrouted_request_reply(self.peer.name, request.get("method"), reason)
        else:
            try:
                reply = await on_message(request)
            except Exception:
                logger.exception("peer %s: relaying %s failed", self.peer.name, request.get("method"))
                reply = error_reply(-32603, "the gateway could not relay this request to the host")
        if reply is None:
            reply = error_reply(-32603, "no answer from the host")
        await self._post_raw({"jsonrpc": "2.0", "id": request["id"], **reply}, {})

    async def _listen_get_stream(self, opened: asyncio.Event) -> None:
        """Read the upstream's standalone GET stream for notifications outside any request.

        `opened` is set once the server answered the first GET (or it failed).
        """
        assert self._client is not None
        headers = self._headers()
        headers["Accept"] = "text/event-stream"
        backoff = 1.0
        while not self.closed and self._client is not None:
            try:
                async with self._client.stream("GET", self.peer.url, headers=headers, timeout=httpx.Timeout(10, read=None)) as response:
                    opened.set()
                    if response.status_code != 200:
                        return  # 405: the server offers no GET stream.
                    backoff = 1.0
                    async for event in iter_sse(response.aiter_lines()):
                        if event.event == "message" and event.data:
                            message = self._unrelated(event.data)
                            if message is not None:
                                await self._handle_incoming(message, None)
            except asyncio.CancelledError:
                raise
            except (httpx.HTTPError, UpstreamError, ValueError) as exc:  # the stream broke or ran over its bounds
                logger.debug("peer %s: GET stream ended: %s", self.peer.name, exc)
            except Exception:
                # Not a broken stream: a bug. Said loudly, and the stream is opened again all the same.
                logger.exception("peer %s: reading the GET stream failed", self.peer.name)
            opened.set()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)
            headers = self._headers({"Accept": "text/event-stream"})


    async def _listen_modern(self) -> None:
        """Keep a subscriptions/listen stream open for the upstream's list_changed notifications."""
        assert self._client is not None
        backoff = 1.0
        while not self.closed and self._client is not None:
            body = {
                "jsonrpc": "2.0",
                "id": self.next_id(),
                "method": "subscriptions/listen",
                "params": {"_meta": modern_meta(), "notifications": listen_filter(self.description.capabilities)},
            }
            try:
                async with self._client.stream(
                    "POST", self.peer.url, content=json.dumps(body),
                    headers=self._headers({"Mcp-Method": "subscriptions/listen"}), timeout=httpx.Timeout(10, read=None),
                ) as response:
                    if response.status_code != 200:
                        return  # The upstream offers no listen stream.
                    backoff = 1.0
                    async for event in iter_sse(response.aiter_lines()):
                        message = self._unrelated(event.data) if event.data else None
                        if (
                            message is not None
                            and message.get("method", "").startswith("notifications/")
                            and message["method"] != "notifications/subscriptions/acknowledged"
                        ):
                            await self._route_unrelated(message)
            except asyncio.CancelledError:
                raise
            except (httpx.HTTPError, UpstreamError, ValueError) as exc:  # the stream broke or ran over its bounds
                logger.debug("peer %s: listen stream ended: %s", self.peer.name, exc)
            except Exception:
                # Not a broken stream: a bug. Said loudly, and the stream is opened again all the same.
                logger.exception("peer %s: reading the listen stream failed", self.peer.name)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    def _unrelated(self, data: str) -> JsonDict | None:
        """Parse a message of a stream that belongs to no call; a refused one is skipped."""
        try:
            return check_message(decode(data, peer=self.peer.name), peer=self.peer.name)
        except UpstreamMessageError as exc:
            logger.warning("peer %s: ignoring a message: %s", self.peer.name, exc)
            return None
