"""Shared helpers for in-process tests: drive the ASGI app, speak MCP to it, register peers.

Async tests are `async def` methods on Django test case classes (plain pytest-django runs
them through `async_to_sync`, one fresh event loop per test). Tests that touch the database
from consumers subclass `AsgiTestCase`: consumers reach the ORM through
`database_sync_to_async`, so they need a `TransactionTestCase`. `AsgiTestCase` also closes
the per-process upstream pool and flushes the channel layer at the end of every async test,
inside that test's loop, so no stdio child, HTTP client or channel outlives its test.

Every MCP transport requires a bearer token. `AsgiTestCase.setUp` creates alice and mints her
a token with all MCP scopes; the helpers here (`http`, `HttpExchange` via `McpClient.headers`,
`McpClient`, `SseClient`, `ws_communicator`) send it unless told otherwise: pass `token=` for
another one, or the header `{"authorization": None}` to send none. Mint more with
`mint_token` (audience: the origin the in-process app sees, `AUDIENCE`).

Don't use `self.subTest` in async tests: a failing subtest is reported from the event loop's
thread, where pytest-timeout's signal timer cannot be cancelled and the report crashes. Make
one test per row instead (see tests/mcp_endpoint/test_bad_inputs.py), or collect the
mismatches and assert once.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.testing import ApplicationCommunicator, WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.test import TransactionTestCase
from mcp_types.version import LATEST_HANDSHAKE_VERSION, LATEST_MODERN_VERSION
from oauth2_provider.models import AccessToken, Application

from federation import naming
from federation.models import CatalogEntry, CatalogKind, Peer, Transport
from federation.pool import pool
from federation.services import peer_add, peer_sync_catalog
from fedmcp_site.asgi import application
from identity.hostauth import scopes
from identity.hostauth.tokens import token_create
from mcp_endpoint.auth import public_base_url

HOST = "127.0.0.1"
ORIGIN = f"http://{HOST}"
HANDSHAKE = LATEST_HANDSHAKE_VERSION
MODERN = LATEST_MODERN_VERSION
ACCEPT = "application/json, text/event-stream"
TIMEOUT = 5.0
"""Default bound on every wait for the app (seconds); upstream calls pass their own."""

JsonDict = dict[str, Any]
Headers = dict[str, str | None]
"""Request headers by name; a None value removes a default header."""


# --- personas and tokens -------------------------------------------------------------------------

ALICE = "alice"
"""The host user every helper acts as by default."""
BOB = "bob"
"""Another host user: owns nothing of alice's."""
MCP_SCOPE = " ".join(scopes.MCP_SCOPES)

_default_token: str | None = None
"""Alice's token for the running test (set by `AsgiTestCase.setUp`); helpers send it by default."""


async def verdict_of(step: Awaitable[Any]) -> Any:
    """What a pipeline step's verdict gives the host: its answer, or its refusal raised (as `Outcome.unwrap` raises it)."""
    verdict = await step
    if verdict.refusal is not None:
        raise verdict.refusal
    return verdict.answer


SHOWS_URLS: JsonDict = {"elicitation": {"url": {}}}
"""The client capability of a host that shows URL elicitations: consent sends it to /consent instead of refusing with the URL."""


def audience() -> str:
    """The origin the in-process app answers as (RFC 8707 audience of its tokens)."""
    return public_base_url(http_scope("POST", "/mcp", {"host": HOST}))


def persona(username: str) -> AbstractBaseUser:
    user, _ = get_user_model().objects.get_or_create(username=username)
    return user


def mint_token(
    username: str = ALICE,
    *,
    scope: str = MCP_SCOPE,
    expires_in: timedelta = timedelta(hours=1),
    resource: str | None = None,
    application: Application | None = None,
) -> str:
    """Mint an access token for `username` (created if needed); return the raw token.

    The audience is this app's origin unless `resource` names another; a negative `expires_in`
    gives an expired token. Sync ORM: call it from `setUp`, or through `amint_token`.
    """
    return token_create(
        user=persona(username),
        scope=scope,
        expires_in=expires_in,
        resource=resource or audience(),
        application=application,
    )


amint_token = database_sync_to_async(mint_token)


@database_sync_to_async
def revoke_token(raw: str) -> None:
    """Revoke an access token as DOT does (the row is deleted)."""
    checksum = hashlib.sha256(raw.encode()).hexdigest()
    AccessToken.objects.get(token_checksum=checksum).revoke()


def bearer(token: str | None = None) -> Headers:
    """The `Authorization` header for `token` (default: the running test's alice token)."""
    token = token or _default_token
    return {"authorization": f"Bearer {token}" if token else None}


# --- raw ASGI HTTP -------------------------------------------------------------------------------


@dataclass
class Reply:
    """One complete HTTP response from the app."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error_code(self) -> int | None:
        """The JSON-RPC error code of a JSON error body, or None."""
        if not self.headers.get("content-type", "").startswith("application/json") or not self.body:
            return None
        payload = self.json()
        error = payload.get("error") if isinstance(payload, dict) else None
        return error.get("code") if isinstance(error, dict) else None

    def events(self) -> list[JsonDict]:
        """Return the JSON-RPC messages of an SSE body, in order."""
        return [json.loads(data) for data in _sse_data(self.body.decode())]


def _sse_data(text: str) -> list[str]:
    found = []
    for block in text.split("\n\n"):
        lines = [line[5:].lstrip(" ") for line in block.split("\n") if line.startswith("data:")]
        if lines and any(lines):  # empty data (a priming event) is not an event to deliver
            found.append("\n".join(lines))
    return found


def _header_list(headers: Headers) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items() if v is not None]


def http_scope(method: str, path: str, headers: Headers) -> JsonDict:
    """An ASGI HTTP scope; `path` may carry a query string."""
    parts = urlsplit(path)
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": parts.path,
        "raw_path": parts.path.encode(),
        "query_string": parts.query.encode("latin-1"),
        "headers": _header_list(headers),
        "client": ("127.0.0.1", 50000),
        "server": (HOST, 80),
    }


class HttpExchange:
    """One in-flight request to the app, read as it streams (SSE); use `async with`.

    Leaving the block disconnects the client, as a closed browser tab or CLI would, and waits
    (bounded) for the consumer to stop.
    """

    def __init__(
        self,
        method: str,
        path: str,
        headers: Headers,
        body: bytes = b"",
        *,
        chunks: list[bytes] | None = None,
    ) -> None:
        self.communicator = ApplicationCommunicator(application, http_scope(method, path, headers))
        self.chunks = chunks if chunks is not None else [body]
        self.status = 0
        self.headers: dict[str, str] = {}
        self.finished = False
        self._buffer = ""

    async def __aenter__(self) -> HttpExchange:
        for index, chunk in enumerate(self.chunks):
            await self.communicator.send_input(
                {"type": "http.request", "body": chunk, "more_body": index < len(self.chunks) - 1}
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.communicator.send_input({"type": "http.disconnect"})
        await self.communicator.wait(TIMEOUT)

    async def start(self, timeout: float = TIMEOUT) -> int:
        """Wait for the response headers; return the status."""
        message = await self.communicator.receive_output(timeout)
        assert message["type"] == "http.response.start", message
        self.status = message["status"]
        self.headers = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in message.get("headers", [])
        }
        return self.status

    async def chunk(self, timeout: float = TIMEOUT) -> bytes:
        """Return the next body chunk (b"" with `finished` set once the response ends)."""
        message = await self.communicator.receive_output(timeout)
        assert message["type"] == "http.response.body", message
        self.finished = not message.get("more_body", False)
        return message.get("body", b"")

    async def read_all(self, timeout: float = TIMEOUT) -> Reply:
        if not self.status:
            await self.start(timeout)
        body = b""
        while not self.finished:
            body += await self.chunk(timeout)
        return Reply(self.status, self.headers, body)

    async def next_sse(self, timeout: float = TIMEOUT) -> tuple[str, str] | None:
        """Return the next SSE event as (event name, data), or None when the response ends.

        Blocks without data (keep-alive comments, priming events) are skipped.
        """
        while True:
            while "\n\n" not in self._buffer:
                if self.finished:
                    return None
                self._buffer += (await self.chunk(timeout)).decode()
            block, self._buffer = self._buffer.split("\n\n", 1)
            lines = block.split("\n")
            data = [line[5:].lstrip(" ") for line in lines if line.startswith("data:")]
            if any(data):
                names = [line[6:].strip() for line in lines if line.startswith("event:")]
                return (names[0] if names else "message"), "\n".join(data)

    async def next_event(self, timeout: float = TIMEOUT) -> JsonDict | None:
        """Return the next JSON-RPC message on an SSE response, or None when it ends."""
        event = await self.next_sse(timeout)
        return json.loads(event[1]) if event is not None else None


async def http(
    method: str,
    path: str = "/mcp",
    body: bytes = b"",
    headers: Headers | None = None,
    *,
    chunks: list[bytes] | None = None,
    timeout: float = TIMEOUT,
) -> Reply:
    """Send one HTTP request through the ASGI app and return the whole response.

    Host and alice's `Authorization` are sent unless `headers` replace them (None removes one).
    """
    async with HttpExchange(method, path, {"host": HOST, **bearer(), **(headers or {})}, body, chunks=chunks) as exchange:
        return await exchange.read_all(timeout)


# --- MCP over Streamable HTTP --------------------------------------------------------------------


def request(method: str, params: JsonDict | None = None, request_id: int | str = 1) -> JsonDict:
    message: JsonDict = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params is not None:
        message["params"] = params
    return message


def modern_meta(capabilities: JsonDict | None = None) -> JsonDict:
    return {
        "io.modelcontextprotocol/protocolVersion": MODERN,
        "io.modelcontextprotocol/clientCapabilities": capabilities or {},
        "io.modelcontextprotocol/clientInfo": {"name": "fedmcp-tests", "version": "0"},
    }


class McpClient:
    """A host speaking Streamable HTTP to the in-process app, in either protocol era.

    It sends `token` (default: the running test's alice token) on every request.
    """

    def __init__(self, path: str = "/mcp", *, token: str | None = None, capabilities: JsonDict | None = None) -> None:
        self.path = path
        self.token = token
        self.capabilities = capabilities or {}
        """What the host declares (at initialize, or in each 2026-07-28 envelope); none by default, as the SDK's clients."""
        self.session_id: str | None = None
        self.protocol_version: str | None = None
        self._ids = 0

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    def headers(self, extra: Headers | None = None) -> Headers:
        headers: Headers = {"host": HOST, "accept": ACCEPT, "content-type": "application/json", **bearer(self.token)}
        if self.session_id:
            headers["mcp-session-id"] = self.session_id
        if self.protocol_version:
            headers["mcp-protocol-version"] = self.protocol_version
        headers.update(extra or {})
        return headers

    async def post(self, message: Any, headers: Headers | None = None, *, timeout: float = TIMEOUT) -> Reply:
        """POST a JSON-RPC message (anything JSON) or raw bytes."""
        body = message if isinstance(message, bytes) else json.dumps(message).encode()
        return await http("POST", self.path, body, self.headers(headers), timeout=timeout)

    async def initialize(self, version: str = HANDSHAKE, capabilities: JsonDict | None = None) -> JsonDict:
        """Run the handshake; keep the session id and version for later requests."""
        params = {
            "protocolVersion": version,
            "capabilities": capabilities if capabilities is not None else self.capabilities,
            "clientInfo": {"name": "fedmcp-tests", "version": "0"},
        }
        reply = await self.post(request("initialize", params, self.next_id()))
        assert reply.status == 200, reply
        self.session_id = reply.headers["mcp-session-id"]
        result = reply.json()["result"]
        self.protocol_version = result["protocolVersion"]
        acknowledged = await self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        assert acknowledged.status == 202, acknowledged
        return result

    async def call(self, method: str, params: JsonDict | None = None, *, timeout: float = TIMEOUT) -> Reply:
        """Send a handshake-era request on this client's session."""
        return await self.post(request(method, params, self.next_id()), timeout=timeout)

    async def call_modern(
        self,
        method: str,
        params: JsonDict | None = None,
        *,
        name: str | None = None,
        headers: Headers | None = None,
        timeout: float = TIMEOUT,
    ) -> Reply:
        """Send a 2026-07-28 request: `_meta` envelope plus the routing headers."""
        body = request(method, {**(params or {}), "_meta": modern_meta(self.capabilities)}, self.next_id())
        routing: Headers = {"mcp-protocol-version": MODERN, "mcp-method": method}
        if name is not None:
            routing["mcp-name"] = name
        return await self.post(body, {**routing, **(headers or {})}, timeout=timeout)


# --- WebSocket -----------------------------------------------------------------------------------


def ws_communicator(
    path: str = "/ws",
    *,
    subprotocols: tuple[str, ...] = ("mcp",),
    origin: str | None = ORIGIN,
    token: str | None = None,
    headers: Headers | None = None,
) -> WebsocketCommunicator:
    """A WebSocket client of the app; the upgrade request carries `token` (default: alice's).

    `headers` are applied last; a None value removes one (e.g. `{"authorization": None}`).
    """
    merged: Headers = {"host": HOST, "origin": origin, **bearer(token), **(headers or {})}
    return WebsocketCommunicator(application, path, headers=_header_list(merged), subprotocols=list(subprotocols))


# --- MCP over legacy HTTP+SSE --------------------------------------------------------------------


class SseClient:
    """A 2024-11-05 host: GET /sse for the stream, POST each message to the endpoint it names.

    Use `async with SseClient() as client`: it opens the stream (with `token`, default alice's)
    and reads the `endpoint` event; leaving the block closes the stream.
    """

    def __init__(self, path: str = "/sse", *, token: str | None = None) -> None:
        self.path = path
        self.token = token
        self.endpoint = ""
        self._ids = 0
        self._exchange: HttpExchange | None = None

    def headers(self, extra: Headers | None = None) -> Headers:
        return {"host": HOST, "accept": "text/event-stream", **bearer(self.token), **(extra or {})}

    async def __aenter__(self) -> SseClient:
        self._exchange = HttpExchange("GET", self.path, self.headers())
        await self._exchange.__aenter__()
        try:
            status = await self._exchange.start()
            assert status == 200, status
            event = await self._exchange.next_sse()
            assert event is not None and event[0] == "endpoint", event
        except BaseException:
            await self._exchange.__aexit__()
            raise
        self.endpoint = event[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._exchange is not None
        await self._exchange.__aexit__(*exc)

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    async def post(self, message: JsonDict, headers: Headers | None = None, *, query: str = "") -> Reply:
        """POST one message to the endpoint (`query` is appended to its query string)."""
        extra: Headers = {"accept": None, "content-type": "application/json", **(headers or {})}
        return await http("POST", self.endpoint + query, json.dumps(message).encode(), self.headers(extra))

    async def reply_to(self, request_id: int | str, timeout: float = TIMEOUT) -> JsonDict:
        """Return the message on the stream that answers `request_id` (others are skipped)."""
        assert self._exchange is not None
        while True:
            message = await self._exchange.next_event(timeout)
            assert message is not None, "the stream ended"
            if message.get("id") == request_id and "method" not in message:
                return message

    async def initialize(self) -> JsonDict:
        params = {"protocolVersion": "2024-11-05", "capabilities": {}, "clientInfo": {"name": "fedmcp-tests", "version": "0"}}
        request_id = self.next_id()
        posted = await self.post(request("initialize", params, request_id))
        assert posted.status == 202, posted
        answer = await self.reply_to(request_id)
        acknowledged = await self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        assert acknowledged.status == 202, acknowledged
        return answer["result"]


# --- test case classes ---------------------------------------------------------------------------


async def release_process_state() -> None:
    """Close upstream connections and forget channel-layer state bound to the current loop."""
    await pool.close()
    layer = get_channel_layer()
    if layer is not None and hasattr(layer, "flush"):
        await layer.flush()


def _releasing(test: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    @functools.wraps(test)
    async def run(*args: Any, **kwargs: Any) -> None:
        try:
            await test(*args, **kwargs)
        finally:
            await release_process_state()

    return run


class AsgiTestCase(TransactionTestCase):
    """Base for tests that drive the ASGI app or upstream connections with a database.

    `self.alice` and her token `self.token` (all MCP scopes) exist in every test; the helpers
    send that token unless given another.
    """

    alice: AbstractBaseUser
    token: str

    def setUp(self) -> None:
        global _default_token
        super().setUp()
        self.alice = persona(ALICE)
        self.token = _default_token = mint_token(ALICE)

    def tearDown(self) -> None:
        global _default_token
        _default_token = None
        super().tearDown()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The pool and the channel layer are per-process singletons bound to the running loop,
        # and each async test gets its own loop: release them in that loop, whatever happened.
        for name, value in list(vars(cls).items()):
            if name.startswith("test") and inspect.iscoroutinefunction(value):
                setattr(cls, name, _releasing(value))


def register_peer(name: str, url: str, *, sync: bool = True, **fields: Any) -> Peer:
    """Create a peer (Streamable HTTP unless `transport` says otherwise) and (by default) store its catalog; fails if the sync fails."""
    peer = peer_add(name=name, url=url, **{"transport": Transport.STREAMABLE_HTTP, **fields})
    if sync:
        report = async_to_sync(peer_sync_catalog)(peer=peer)
        assert report.ok, report.errors
        peer.refresh_from_db()
    return peer


NAME_FIELDS = {CatalogKind.RESOURCE: "uri", CatalogKind.RESOURCE_TEMPLATE: "uriTemplate"}


def add_catalog_entry(peer: Peer, kind: str, upstream_name: str, *, enabled: bool = True) -> CatalogEntry:
    """Store one catalog item of a local peer by hand, named as a sync would name it."""
    if kind in NAME_FIELDS:
        name, payload = naming.qualify_uri(peer.name, upstream_name), {NAME_FIELDS[kind]: upstream_name}
    else:
        name, payload = naming.qualify_name(peer.name, upstream_name), {"name": upstream_name}
    if kind == CatalogKind.TOOL:
        payload["inputSchema"] = {"type": "object"}
    return CatalogEntry.objects.create(
        peer=peer,
        kind=kind,
        upstream_name=upstream_name,
        name=name,
        home=peer.name,
        payload=payload,
        enabled=enabled,
    )


@pytest.mark.usefixtures("everything_on_class")
class FixturePeerTestCase(AsgiTestCase):
    """An `AsgiTestCase` with the fixture server registered as peer `everything` (catalog synced).

    The server process is shared by the whole test session (see `tests/conftest.py`).
    """

    everything_url: str
    peer_name = "everything"

    def setUp(self) -> None:
        super().setUp()
        self.peer = register_peer(
            self.peer_name, self.everything_url, connect_timeout=10.0, call_timeout=20.0
        )
