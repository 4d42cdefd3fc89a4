"""A small HTTP/1.1 keep-alive client for the upstream hot paths.

httpx's layers (auth flow, cookies, redirects, anyio cancel scopes, httpcore's pool bookkeeping)
cost ~0.6 ms of CPU per upstream call, the largest single part of a busy worker. This client
does only what the hot paths need, over asyncio streams: a Streamable HTTP POST (JSON or SSE
reply), and the legacy HTTP+SSE transport's POSTs to its message endpoint and its GET stream.

* Connections are made by `federation.client.open_checked_socket` (resolve, refuse any address
  the guard does not allow, dial the checked address: the DNS-rebinding guard is unchanged) and
  wrapped in TLS with the peer's own `SSLContext` (its CA bundle and client certificate), the
  server name checked against the URL's host.
* Idle connections are kept and reused, the most recently used first; one that became readable
  while idle (the server closed it, or sent something unasked) is discarded before use, as
  httpcore does, and so is one idle past `IDLE_REUSE_SECONDS` (4 s, or the server's
  `Keep-Alive: timeout` less a second): servers close idle connections after 5 s by default, and
  a request sent just then is lost. `max_idle` of them are kept while they may be reused; the
  ones a burst opened beyond that are closed once unused for `SURPLUS_IDLE_SECONDS`, not the
  moment they come back (closing them at once made a worker under steady load above `max_idle`
  concurrent calls open and close connections continually).
  A request is never retried on another connection: a POST is not idempotent.
* Replies: `Content-Length`, `chunked`, or read to EOF; a connection goes back to the pool only
  when its reply was read to the end and neither side said `Connection: close`.
* Timeouts: connect, and each write and each read, like httpx's; errors are httpx's own
  exception types (`httpx.ConnectTimeout`, `ReadTimeout`, `RemoteProtocolError`, ...) so callers
  and `describe_failure` treat both clients alike.
* Cancellation (a host's cancel, the caller's deadline) closes the connection in use.

* Redirects are never followed (a 3xx is a reply like any other), as `outbound_client` does.
* A peer's credentials are added by `send_authorized` as `federation.client.ProviderAuth` adds
  them to httpx requests: on every request, and on 401 refreshed and sent once more.

The caller uses it only where httpx would have sent straight to the peer through the checked
transport (see `federation.client.checked_direct_context`): with a client that tests replaced,
httpx stays in charge.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import re
import ssl
from collections.abc import AsyncIterator
from typing import Any

import httpx

from federation.client import IDLE_REUSE_SECONDS, AuthProvider, OutboundAddressError, open_checked_socket
from federation.upstream.sockets import _readable

MAX_HEADER_BYTES = 64 * 1024
READ_CHUNK = 64 * 1024
DRAIN_BYTES = 64 * 1024
MAX_LINE_CHARS = 64 * 1024 * 1024
_LINE_END = re.compile("\r\n|\r|\n")


class LeanResponse:
    """A reply being read: status, headers (lower-case names), and its body once."""

    def __init__(self, pool: LeanHttpPool, conn: _Connection, status: int, headers: dict[str, str], keep_alive: bool) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self.status_code = status
        self.headers = headers
        self._keep_alive = keep_alive
        self._done = False
        self._body: AsyncIterator[bytes] | None = None
        if headers.get("content-encoding", "identity").lower() not in ("identity", ""):
            # Asked for identity (Accept-Encoding); a compressed body would be read as garbage.
            raise httpx.RemoteProtocolError(f"unasked Content-Encoding {headers['content-encoding']!r}")
        if status in (204, 304) or 100 <= status < 200:
            self._length: int | None = 0
            self._chunked = False
            self._done = True
        else:
            coding = headers.get("transfer-encoding")
            if coding is not None and coding.strip().lower() != "chunked":
                raise httpx.RemoteProtocolError(f"unsupported Transfer-Encoding {coding!r}")
            self._chunked = coding is not None
            length = headers.get("content-length")
            if self._chunked:
                self._length = None
            elif length is not None:
                if not length.strip().isdigit():
                    raise httpx.RemoteProtocolError(f"bad Content-Length {length!r}")
                self._length = int(length)
                # An empty body (a 202 to a POST) is read already: the connection is free at once.
                self._done = self._length == 0
            else:
                self._length = None
                self._keep_alive = False  # Read to EOF: the connection ends with the body.

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The body's bytes, from where the last reader stopped (one body reader per response)."""
        if self._conn is None or self._done:
            return
        if self._body is None:
            self._body = self._read_body(self._conn)
        async for data in self._body:
            yield data

    async def _read_body(self, conn: _Connection) -> AsyncIterator[bytes]:
        if self._chunked:
            while True:
                line = await conn.readline()
                size_text = line.split(b";", 1)[0].strip()
                if not size_text or size_text.strip(b"0123456789abcdefABCDEF"):
                    raise httpx.RemoteProtocolError("malformed chunk size")
                size = int(size_text, 16)
                if size == 0:
                    while (await conn.readline()) not in (b"\r\n", b"\n"):
                        pass  # Trailers: ignored.
                    break
                while size:
                    data = await conn.read(min(size, READ_CHUNK))
                    if not data:
                        raise httpx.RemoteProtocolError("peer closed the connection in the middle of a chunk")
                    size -= len(data)
                    yield data
                if (await conn.readline()) not in (b"\r\n", b"\n"):
                    raise httpx.RemoteProtocolError("chunk without its line end")
        elif self._length is not None:
            left = self._length
            while left:
                data = await conn.read(min(left, READ_CHUNK))
                if not data:
                    raise httpx.RemoteProtocolError("peer closed the connection before the end of the body")
                left -= len(data)
                yield data
        else:
            while data := await conn.read(READ_CHUNK):
                yield data
        self._done = True

    async def aiter_lines(self) -> AsyncIterator[str]:
        """The body's lines without their terminators (\\r\\n, \\n or \\r), as text."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        buffer = ""
        async for data in self.aiter_bytes():
            buffer += decoder.decode(data)
            # A "\r" at the very end may be the first half of "\r\n": keep it for the next chunk.
            carry = "\r" if buffer.endswith("\r") else ""
            lines = _LINE_END.split(buffer[: len(buffer) - len(carry)])
            buffer = lines.pop() + carry
            if len(buffer) > MAX_LINE_CHARS:
                raise httpx.RemoteProtocolError("a line of the reply is too long")
            for line in lines:
                yield line
        buffer += decoder.decode(b"", final=True)
        if buffer:
            lines = _LINE_END.split(buffer)
            if lines[-1] == "":
                lines.pop()
            for line in lines:
                yield line

    async def aclose(self) -> None:
        """Give the connection back when the reply was read to its end, else close or drain it.

        A reply whose caller stopped early (the JSON-RPC response came on an event stream that
        the server ends right after) is read to its end in the background, for at most
        `drain_timeout` seconds and `DRAIN_BYTES`; its connection is then reused, else closed.
        A pool whose `drain_timeout` is 0 closes such a connection at once.
        """
        conn = self._conn
        if conn is None:
            return
        if self._done and self._keep_alive:
            self._conn = None
            self._pool._release(conn)
        elif self._keep_alive and not self._pool.closed and self._pool.drain_timeout > 0:
            self._pool._drain_later(self)
        else:
            self._conn = None
            self._pool._discard(conn)

    async def _drain(self, timeout: float) -> None:
        conn = self._conn
        assert conn is not None
        try:
            async with asyncio.timeout(timeout):
                size = 0
                async for data in self.aiter_bytes():
                    size += len(data)
                    if size > DRAIN_BYTES:
                        break
        except BaseException:
            self._done = False
            raise
        finally:
            self._conn = None
            if self._done:
                self._pool._release(conn)
            else:
                self._pool._discard(conn)


SURPLUS_IDLE_SECONDS = 5.0
"""How long an idle connection beyond a pool's `max_idle` is kept (httpx's keep-alive expiry)."""

KEEP_ALIVE_MARGIN_SECONDS = 1.0
MAX_IDLE_REUSE_SECONDS = 600.0
_KEEP_ALIVE_TIMEOUT = re.compile(r"(?:^|[,;\s])timeout\s*=\s*(\d+)", re.IGNORECASE)


def reuse_window(headers: dict[str, str]) -> float:
    """Seconds an idle connection may be reused after a reply with these (lower-case) headers.

    IDLE_REUSE_SECONDS, or the server's own `Keep-Alive: timeout=N` less KEEP_ALIVE_MARGIN_SECONDS.
    """
    hint = headers.get("keep-alive")
    match = _KEEP_ALIVE_TIMEOUT.search(hint) if hint else None
    if match is None:
        return IDLE_REUSE_SECONDS
    return min(MAX_IDLE_REUSE_SECONDS, max(0.0, int(match[1]) - KEEP_ALIVE_MARGIN_SECONDS))


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, read_timeout: float, write_timeout: float) -> None:
        self.reader = reader
        self.writer = writer
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.socket = writer.get_extra_info("socket")
        self.reused = False
        self.started = False  # a byte of the current reply arrived
        self.idle_since = 0.0  # loop time it was last put back in the pool
        self.reusable_for = IDLE_REUSE_SECONDS  # seconds after idle_since (`reuse_window` of its last reply)

    def stale(self) -> bool:
        """True if the idle connection cannot carry a request: closed, or data came unasked."""
        # The loop usually moved a close or stray bytes into the reader already; else poll the socket.
        if self.writer.is_closing() or self.reader.at_eof() or len(self.reader._buffer):  # type: ignore[attr-defined]
            return True
        return _readable(self.socket)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        try:
            if self.writer.transport.get_write_buffer_size() == 0:
                # Sent at once (the usual case): drain cannot wait, so no write timer is set.
                await self.writer.drain()
                return
            async with asyncio.timeout(self.write_timeout):
                await self.writer.drain()
        except TimeoutError as exc:
            raise httpx.WriteTimeout("timed out writing the request") from exc
        except OSError as exc:
            raise httpx.WriteError(str(exc) or type(exc).__name__) from exc

    async def _bounded(self, operation: Any, ready: bool) -> Any:
        """Await a read; `ready` says the reader has what it needs already (no read timer then)."""
        try:
            if ready:
                return await operation
            async with asyncio.timeout(self.read_timeout):
                return await operation
        except TimeoutError as exc:
            raise httpx.ReadTimeout("timed out waiting for the peer") from exc
        except asyncio.IncompleteReadError as exc:
            if not exc.partial and not self.started:
                raise httpx.RemoteProtocolError("Server disconnected without sending a response.") from exc
            raise httpx.RemoteProtocolError("peer closed the connection in the middle of the reply") from exc
        except asyncio.LimitOverrunError as exc:
            raise httpx.RemoteProtocolError("reply line or headers too long") from exc
        except OSError as exc:  # ssl.SSLError included
            raise httpx.ReadError(str(exc) or type(exc).__name__) from exc

    # A timer per read costs more than the rest of the read; a read the buffered bytes already
    # answer cannot wait, so it goes without (the reply's body usually came with its head).

    async def readline(self) -> bytes:
        return await self._bounded(self.reader.readuntil(b"\n"), b"\n" in self.reader._buffer)  # type: ignore[attr-defined]

    async def read(self, size: int) -> bytes:
        return await self._bounded(self.reader.read(size), bool(self.reader._buffer))  # type: ignore[attr-defined]

    async def read_head(self) -> bytes:
        head = await self._bounded(self.reader.readuntil(b"\r\n\r\n"), b"\r\n\r\n" in self.reader._buffer)  # type: ignore[attr-defined]
        self.started = True
        return head

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class LeanHttpPool:
    """Keep-alive connections to one origin (scheme, host, port), for requests to one URL.

    `drain_timeout` 0 closes a connection whose reply was not read to its end (for event streams
    that never end); `max_idle` 0 keeps no connection for reuse.
    """

    def __init__(
        self, url: httpx.URL, *, ssl_context: ssl.SSLContext | None, connect_timeout: float, read_timeout: float,
        max_idle: int = 20, max_connections: int = 100, user_agent: str = "fedmcp", drain_timeout: float = 2.0,
    ) -> None:
        if url.scheme not in ("http", "https"):
            raise ValueError(f"not an http(s) URL: {url}")
        self.url = url
        self.host = url.host
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.ssl_context = ssl_context if url.scheme == "https" else None
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
        # As httpx's pool: at most `max_connections` in use; a request waits up to the connect
        # timeout for one (httpx.PoolTimeout). A slot is held until the reply is closed or drained.
        self._slots = asyncio.Semaphore(max_connections)
        self.drain_timeout = drain_timeout
        self._draining: set[asyncio.Task[None]] = set()
        target = url.raw_path.decode("ascii")
        # The head of every request after its method, up to the per-request headers.
        self._head = f" {target} HTTP/1.1\r\nHost: {url.netloc.decode('ascii')}\r\nUser-Agent: {user_agent}\r\n"
        self._idle: list[_Connection] = []
        self.opened = 0  # connections made (tests and diagnostics)
        self.closed = False

    async def post(self, body: bytes, headers: dict[str, str]) -> LeanResponse:
        """Send one POST and return its reply with the body unread; the caller `aclose()`s it.

        Raises:
            httpx.HTTPError: the connection failed, timed out, or the reply was not HTTP/1.1.
        """
        return await self.request("POST", body, headers)

    async def request(self, method: str, body: bytes | None, headers: dict[str, str]) -> LeanResponse:
        """Send one request (`body` None: none, as for GET) and return its reply with the body unread.

        The caller `aclose()`s the reply. Nothing is retried.

        Raises:
            httpx.HTTPError: the connection failed, timed out, or the reply was not HTTP/1.1.
        """
        for name, value in headers.items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
                raise httpx.LocalProtocolError(f"illegal header {name!r}")
        length = "\r\n" if body is None else f"Content-Length: {len(body)}\r\n\r\n"
        head = "".join([method, self._head, *(f"{name}: {value}\r\n" for name, value in headers.items()), length])
        try:
            request = head.encode("latin-1") + (body or b"")
        except UnicodeEncodeError as exc:
            raise httpx.LocalProtocolError("a header value is not Latin-1 text") from exc
        if self._slots.locked():
            try:
                async with asyncio.timeout(self.connect_timeout):
                    await self._slots.acquire()
            except TimeoutError as exc:
                raise httpx.PoolTimeout(f"all connections to {self.host}:{self.port} stayed busy") from exc
        else:
            await self._slots.acquire()  # a free slot is taken at once: no timer needed
        try:
            conn = await self._acquire()
        except BaseException:
            self._slots.release()
            raise
        try:
            await conn.write(request)
            status, reply_headers, keep_alive = await self._read_head(conn)
            conn.reusable_for = reuse_window(reply_headers)
            return LeanResponse(self, conn, status, reply_headers, keep_alive)
        except BaseException:
            self._discard(conn)
            raise

    async def _read_head(self, conn: _Connection) -> tuple[int, dict[str, str], bool]:
        conn.started = False
        while True:
            head = await conn.read_head()
            if len(head) > MAX_HEADER_BYTES:
                raise httpx.RemoteProtocolError("reply headers too large")
            lines = head.decode("latin-1").split("\r\n")
            version, _, rest = lines[0].partition(" ")
            code = rest[:3]
            if version not in ("HTTP/1.1", "HTTP/1.0") or not code.isdigit():
                raise httpx.RemoteProtocolError(f"not an HTTP/1.x reply: {lines[0][:80]!r}")
            status = int(code)
            headers: dict[str, str] = {}
            for line in lines[1:]:
                if not line:
                    continue
                name, sep, value = line.partition(":")
                if not sep or not name or name != name.strip():
                    raise httpx.RemoteProtocolError("malformed reply header")
                key = name.lower()
                value = value.strip()
                headers[key] = f"{headers[key]}, {value}" if key in headers else value
            if 100 <= status < 200 and status != 101:
                continue  # 100 Continue, 103 Early Hints: the real reply follows.
            connection = headers.get("connection", "").lower()
            keep_alive = version == "HTTP/1.1" and "close" not in connection and status != 101
            return status, headers, keep_alive

    async def _acquire(self) -> _Connection:
        if self.closed:
            raise httpx.ConnectError("the connection pool is closed")
        now = asyncio.get_running_loop().time() if self._idle else 0.0
        while self._idle:
            conn = self._idle.pop()
            if now - conn.idle_since >= conn.reusable_for or conn.stale():
                conn.close()
                continue
            conn.reused = True
            return conn
        return await self._connect()

    async def _connect(self) -> _Connection:
        try:
            async with asyncio.timeout(self.connect_timeout):
                sock = await open_checked_socket(self.host, self.port, timeout=self.connect_timeout)
                try:
                    reader, writer = await asyncio.open_connection(
                        sock=sock, limit=MAX_HEADER_BYTES, ssl=self.ssl_context,
                        server_hostname=self.host if self.ssl_context is not None else None,
                        ssl_handshake_timeout=self.connect_timeout if self.ssl_context is not None else None,
                    )
                except BaseException:
                    sock.close()
                    raise
        except OutboundAddressError as exc:
            raise httpx.ConnectError(str(exc)) from exc
        except TimeoutError as exc:
            raise httpx.ConnectTimeout(f"cannot connect to {self.host}:{self.port} in time") from exc
        except OSError as exc:  # ssl.SSLError included: describe_failure explains it from the cause
            raise httpx.ConnectError(str(exc) or type(exc).__name__) from exc
        self.opened += 1
        return _Connection(reader, writer, self.read_timeout, self.connect_timeout)

    def _drain_later(self, response: LeanResponse) -> None:
        task = asyncio.create_task(self._drain_quietly(response))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def _drain_quietly(self, response: LeanResponse) -> None:
        with contextlib.suppress(Exception):  # any failure already closed the connection
            await response._drain(self.drain_timeout)

    def _release(self, conn: _Connection) -> None:
        """A connection in use is free again (its reply read to the end)."""
        if self.closed or not self.max_idle:
            conn.close()
        else:
            idle = self._idle
            conn.idle_since = now = asyncio.get_running_loop().time()
            idle.append(conn)
            # The least recently used are at the front: close those past their reuse window and,
            # beyond `max_idle`, those unused for SURPLUS_IDLE_SECONDS.
            while idle and (
                now - idle[0].idle_since >= idle[0].reusable_for
                or (len(idle) > self.max_idle and now - idle[0].idle_since > SURPLUS_IDLE_SECONDS)
            ):
                idle.pop(0).close()
        self._slots.release()

    def _discard(self, conn: _Connection) -> None:
        """A connection in use ends (failure, cancellation, a reply not read to its end)."""
        conn.close()
        self._slots.release()

    async def aclose(self) -> None:
        self.closed = True
        for task in list(self._draining):
            task.cancel()
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


async def skip_body(response: LeanResponse | httpx.Response, limit: int) -> None:
    """Read a reply's body and drop it, stopping after `limit` bytes (the caller closes the reply).

    Raises:
        httpx.HTTPError: the body broke off or timed out.
    """
    size = 0
    async for data in response.aiter_bytes():
        size += len(data)
        if size > limit:
            break


async def send_authorized(
    pool: LeanHttpPool, auth: AuthProvider | None, method: str, body: bytes | None, headers: dict[str, str]
) -> LeanResponse:
    """Send one request with the peer's credentials, as `ProviderAuth` does for httpx.

    The provider's headers go on the request; a 401 makes it forget them (`refresh`) and the
    request is sent once more with the new ones. The refusal's body is read first (up to
    `DRAIN_BYTES`) so its connection can carry the second request. `Accept-Encoding: identity`
    is added: this client decodes no compressed bodies.

    Raises:
        httpx.HTTPError: the connection failed or timed out.
        UpstreamError: the provider has no credentials (from `AuthProvider.headers`).
    """
    headers["Accept-Encoding"] = "identity"
    if auth is None:
        return await pool.request(method, body, headers)
    sent = await auth.headers()
    response = await pool.request(method, body, {**headers, **sent})
    if response.status_code != 401:
        return response
    try:
        await skip_body(response, DRAIN_BYTES)
    finally:
        await response.aclose()
    await auth.refresh(sent)
    return await pool.request(method, body, {**headers, **await auth.headers()})
