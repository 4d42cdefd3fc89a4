"""Every MCP transport refuses bad credentials the same way.

`REJECTIONS` is the table: one row per credential problem and transport, with the answer the
transport must give. The transports are Streamable HTTP in the handshake era (initialize, then
requests on the session) and in 2026-07-28 (stateless), legacy HTTP+SSE (the GET stream and the
POST to /messages/), and WebSocket.

* At the edge (the first request a host makes, or a POST to an open SSE session): no token, a
  token that is not a bearer token, an unknown, expired or foreign-audience token, or a token
  in the query string. HTTP answers 401 with an RFC 9728 challenge (400 for the query string);
  a WebSocket handshake is refused (close 1008 before accept, which daphne answers with 403).
* Inside a session the token opened: the token is revoked (HTTP 401; an open WebSocket gets
  -32014 and is closed 1008), another user or another client of the same user uses the
  session id (404, as if it did not exist), or the token lacks the method's scope (HTTP 403
  with `error="insufficient_scope"`; over SSE and WebSocket the JSON-RPC error -32013).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

from channels.testing import WebsocketCommunicator
from oauth2_provider.models import Application

from identity.hostauth import scopes
from mcp_endpoint import jsonrpc
from mcp_endpoint.consumers.websocket import WS_1008_POLICY_VIOLATION
from tests.base import (
    BOB,
    HANDSHAKE,
    HOST,
    MCP_SCOPE,
    MODERN,
    ORIGIN,
    TIMEOUT,
    AsgiTestCase,
    Headers,
    HttpExchange,
    McpClient,
    Reply,
    SseClient,
    amint_token,
    bearer,
    http,
    mint_token,
    modern_meta,
    request,
    revoke_token,
    ws_communicator,
)

JsonDict = dict[str, Any]
ABSENT = object()
"""In an expected challenge: the parameter must not be there."""
FOREIGN_AUDIENCE = "https://elsewhere.example"
TOOL = "nobody__nothing"
"""tools/call needs mcp:tools before the tool is even looked up: no peer is needed."""


@dataclass(frozen=True)
class Outcome:
    """What a transport answered.

    `status` is the HTTP status (None on WebSocket), `code` the JSON-RPC error code of the
    answer (None: no JSON-RPC error), `challenge` the parameters of `WWW-Authenticate: Bearer`.
    On WebSocket, `accepted` says whether the handshake was accepted and `close` is the close
    code the app sent (None: the socket stayed open).
    """

    status: int | None = None
    code: int | None = None
    challenge: dict[str, str] | None = None
    accepted: bool | None = None
    close: int | None = None


def challenge_params(value: str | None) -> dict[str, str] | None:
    if value is None:
        return None
    scheme, _, parameters = value.partition(" ")
    assert scheme == "Bearer", value
    return dict(re.findall(r'(\w+)="([^"]*)"', parameters))


def http_outcome(reply: Reply, code: int | None = None) -> Outcome:
    return Outcome(
        status=reply.status,
        code=code if code is not None else reply.error_code,
        challenge=challenge_params(reply.headers.get("www-authenticate")),
    )


def error_code(message: JsonDict) -> int | None:
    error = message.get("error")
    return error.get("code") if isinstance(error, dict) else None


# --- the transports ------------------------------------------------------------------------------


class Session(Protocol):
    async def send(self, method: str, params: JsonDict, headers: Headers) -> Outcome:
        """Send one request on the session with `headers` added; return the answer."""
        ...


class Transport:
    name = ""
    path = ""
    """The endpoint refused at the edge (its resource metadata URL names it)."""

    async def contact(self, headers: Headers, query: str) -> Outcome:
        """Make a host's first request with `headers` (and `query` in the URL)."""
        raise NotImplementedError

    def session(self, token: str) -> AbstractAsyncContextManager[Session]:
        """Open a session with `token`."""
        raise NotImplementedError


class StreamableHttpHandshake(Transport):
    name, path = "http_handshake", "/mcp"

    async def contact(self, headers: Headers, query: str) -> Outcome:
        client = McpClient()
        body = request("initialize", {"protocolVersion": HANDSHAKE, "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}})
        return http_outcome(await http("POST", f"/mcp{query}", json.dumps(body).encode(), client.headers(headers)))

    @asynccontextmanager
    async def session(self, token: str) -> AsyncIterator[Session]:
        client = McpClient(token=token)
        await client.initialize()

        class Open:
            async def send(self, method: str, params: JsonDict, headers: Headers) -> Outcome:
                return http_outcome(await client.post(request(method, params, client.next_id()), headers))

        yield Open()


class StreamableHttpModern(Transport):
    name, path = "http_2026", "/mcp"

    @staticmethod
    def _headers(method: str, params: JsonDict, headers: Headers) -> Headers:
        routing: Headers = {"mcp-protocol-version": MODERN, "mcp-method": method}
        if "name" in params:
            routing["mcp-name"] = params["name"]
        return McpClient().headers({**routing, **headers})

    async def contact(self, headers: Headers, query: str) -> Outcome:
        body = request("tools/list", {"_meta": modern_meta()})
        return http_outcome(await http("POST", f"/mcp{query}", json.dumps(body).encode(), self._headers("tools/list", {}, headers)))

    @asynccontextmanager
    async def session(self, token: str) -> AsyncIterator[Session]:
        transport = self

        class Stateless:
            async def send(self, method: str, params: JsonDict, headers: Headers) -> Outcome:
                body = request(method, {**params, "_meta": modern_meta()})
                merged = transport._headers(method, params, {**bearer(token), **headers})
                return http_outcome(await http("POST", "/mcp", json.dumps(body).encode(), merged))

        yield Stateless()


class SseStream(Transport):
    """GET /sse: refusals at the edge only (a session is used through POSTs, see `SseMessages`)."""

    name, path = "sse_get", "/sse"

    async def contact(self, headers: Headers, query: str) -> Outcome:
        merged: Headers = {"host": HOST, "accept": "text/event-stream", **bearer(), **headers}
        async with HttpExchange("GET", f"/sse{query}", merged) as exchange:
            if await exchange.start() == 200:
                return Outcome(status=200)
            return http_outcome(await exchange.read_all())


class SseMessages(Transport):
    """POST /messages/?session_id=…: alice's stream is open; the POST carries the credentials."""

    name, path = "sse_post", "/messages"

    async def contact(self, headers: Headers, query: str) -> Outcome:
        async with SseClient() as client:
            reply = await client.post(request("ping"), headers, query=query.replace("?", "&"))
        return http_outcome(reply)

    @asynccontextmanager
    async def session(self, token: str) -> AsyncIterator[Session]:
        async with SseClient(token=token) as client:
            await client.initialize()

            class Open:
                async def send(self, method: str, params: JsonDict, headers: Headers) -> Outcome:
                    request_id = client.next_id()
                    reply = await client.post(request(method, params, request_id), headers)
                    if reply.status != 202:
                        return http_outcome(reply)
                    # Accepted: the answer travels on the stream.
                    return http_outcome(reply, error_code(await client.reply_to(request_id)))

            yield Open()


class WebSocket(Transport):
    name, path = "websocket", "/ws"

    async def contact(self, headers: Headers, query: str) -> Outcome:
        socket = ws_communicator(f"/ws{query}", headers=headers)
        accepted, detail = await socket.connect(TIMEOUT)
        await socket.disconnect()
        return Outcome(accepted=accepted, close=None if accepted else detail)

    @asynccontextmanager
    async def session(self, token: str) -> AsyncIterator[Session]:
        socket = ws_communicator(token=token)
        accepted, _ = await socket.connect(TIMEOUT)
        assert accepted
        try:
            params = {"protocolVersion": HANDSHAKE, "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}
            await socket.send_json_to(request("initialize", params, "init"))
            assert "result" in await socket.receive_json_from(TIMEOUT)
            await socket.send_json_to({"jsonrpc": "2.0", "method": "notifications/initialized"})
            # Its answer means the notification was handled (with the token still valid).
            await socket.send_json_to(request("ping", request_id="settled"))
            assert (await socket.receive_json_from(TIMEOUT))["id"] == "settled"
            yield WebSocketSession(socket)
        finally:
            await socket.disconnect()


@dataclass
class WebSocketSession:
    socket: WebsocketCommunicator
    ids: int = 0

    async def send(self, method: str, params: JsonDict, headers: Headers) -> Outcome:
        assert not headers, "a WebSocket sends headers on the upgrade request only"
        self.ids += 1
        await self.socket.send_json_to(request(method, params, self.ids))
        answer = await self.socket.receive_json_from(TIMEOUT)
        assert answer.get("id") == self.ids, answer
        # A ping tells an open socket (its answer comes next) from a closed one (the close does).
        await self.socket.send_json_to(request("ping", request_id="probe"))
        after = await self.socket.receive_output(TIMEOUT)
        close = after["code"] if after["type"] == "websocket.close" else None
        return Outcome(code=error_code(answer), accepted=True, close=close)


TRANSPORTS: dict[str, Transport] = {
    t.name: t for t in (StreamableHttpHandshake(), StreamableHttpModern(), SseStream(), SseMessages(), WebSocket())
}


# --- the table -----------------------------------------------------------------------------------


Credentials = Callable[["TokensTestCase"], Headers]


def bearer_of(attribute: str) -> Credentials:
    return lambda test: {"authorization": f"Bearer {getattr(test, attribute)}"}


@dataclass(frozen=True)
class EdgeCase:
    """Credentials refused before the request reaches the transport."""

    name: str
    headers: Credentials
    status: int
    challenge: dict[str, object] = field(default_factory=dict)
    query: Callable[[TokensTestCase], str] = lambda test: ""


def unauthorized(error: object) -> dict[str, object]:
    """A 401 challenge: `error` (or ABSENT), and always the MCP scopes."""
    return {"error": error, "scope": MCP_SCOPE}


EDGE_CASES = [
    # RFC 6750 §3.1: a request without credentials gets a challenge without an error code.
    EdgeCase("no token", lambda test: {"authorization": None}, 401, unauthorized(ABSENT)),
    EdgeCase("not a bearer token", lambda test: {"authorization": "Basic YWxpY2U6c2VjcmV0"}, 401, unauthorized(ABSENT)),
    EdgeCase("unknown token", lambda test: {"authorization": "Bearer not-a-token"}, 401, unauthorized("invalid_token")),
    EdgeCase("expired token", bearer_of("expired"), 401, unauthorized("invalid_token")),
    EdgeCase("token for another audience", bearer_of("elsewhere"), 401, unauthorized("invalid_token")),
    EdgeCase(
        "token in the query string",
        lambda test: {"authorization": None},
        400,
        query=lambda test: f"?access_token={test.token}",
    ),
]


@dataclass(frozen=True)
class SessionCase:
    """A session opened with one token, then a request with a problem.

    `opener` names the token that opens the session; `sender` gives the request's credentials
    ({} keeps the opener's). `expected` maps transport name to the answer; transports not
    listed have no such case (no session id on the wire).
    """

    name: str
    opener: str
    sender: Credentials
    method: str
    params: JsonDict
    expected: dict[str, Outcome]
    revoke: bool = False


SESSION_NOT_FOUND = Outcome(status=404, code=jsonrpc.INVALID_REQUEST)
REVOKED = Outcome(status=401, challenge={"error": "invalid_token"})
MISSING_TOOLS_SCOPE = Outcome(
    status=403, code=jsonrpc.INSUFFICIENT_SCOPE, challenge={"error": "insufficient_scope", "scope": scopes.TOOLS}
)

SESSION_CASES = [
    SessionCase(
        "revoked token",
        "to_revoke",
        lambda test: {},
        "tools/list",
        {},
        {
            "http_handshake": REVOKED,
            "http_2026": REVOKED,
            "sse_post": REVOKED,
            "websocket": Outcome(code=jsonrpc.TOKEN_REVOKED, accepted=True, close=WS_1008_POLICY_VIOLATION),
        },
        revoke=True,
    ),
    SessionCase(
        "another user's session id",
        "token",
        bearer_of("bob_token"),
        "tools/list",
        {},
        {"http_handshake": SESSION_NOT_FOUND, "sse_post": SESSION_NOT_FOUND},
    ),
    SessionCase(
        "another client's session id",
        "token",
        bearer_of("other_client_token"),
        "tools/list",
        {},
        {"http_handshake": SESSION_NOT_FOUND, "sse_post": SESSION_NOT_FOUND},
    ),
    SessionCase(
        "insufficient scope",
        "prompts_only",
        lambda test: {},
        "tools/call",
        {"name": TOOL, "arguments": {}},
        {
            "http_handshake": MISSING_TOOLS_SCOPE,
            "http_2026": MISSING_TOOLS_SCOPE,
            "sse_post": Outcome(status=202, code=jsonrpc.INSUFFICIENT_SCOPE),
            "websocket": Outcome(code=jsonrpc.INSUFFICIENT_SCOPE, accepted=True, close=None),
        },
    ),
]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def matches(actual: Outcome, expected: Outcome) -> list[str]:
    """Return what differs; `expected.challenge` lists only the parameters that must match."""
    problems = [
        f"{name}: {getattr(actual, name)!r} != {getattr(expected, name)!r}"
        for name in ("status", "code", "accepted", "close")
        if getattr(actual, name) != getattr(expected, name)
    ]
    for key, value in (expected.challenge or {}).items():
        found = (actual.challenge or {}).get(key, ABSENT)
        if found != value:
            problems.append(f"challenge {key}: {found!r} != {'absent' if value is ABSENT else repr(value)}")
    return problems


def edge_test(case: EdgeCase, transport: Transport) -> Callable[[TokensTestCase], Awaitable[None]]:
    if transport.name == "websocket":
        expected = Outcome(accepted=False, close=WS_1008_POLICY_VIOLATION)
    else:
        challenge = dict(case.challenge)
        if challenge:
            challenge["resource_metadata"] = f"{ORIGIN}/.well-known/oauth-protected-resource{transport.path}"
        expected = Outcome(status=case.status, challenge=challenge)

    async def test(self: TokensTestCase) -> None:
        actual = await transport.contact(case.headers(self), case.query(self))
        self.assertEqual(matches(actual, expected), [], actual)

    test.__doc__ = f"{transport.name}: {case.name}"
    return test


def session_test(case: SessionCase, transport: Transport, expected: Outcome) -> Callable[[TokensTestCase], Awaitable[None]]:
    async def test(self: TokensTestCase) -> None:
        token = getattr(self, case.opener)
        async with transport.session(token) as session:
            if case.revoke:
                await revoke_token(token)
            actual = await session.send(case.method, case.params, case.sender(self))
        self.assertEqual(matches(actual, expected), [], actual)

    test.__doc__ = f"{transport.name}: {case.name}"
    return test


class TokensTestCase(AsgiTestCase):
    """Alice's own `self.token`, and the other tokens the rows use."""

    def setUp(self) -> None:
        super().setUp()
        self.bob_token = mint_token(BOB)
        self.expired = mint_token(expires_in=timedelta(seconds=-1))
        self.elsewhere = mint_token(resource=FOREIGN_AUDIENCE)
        self.prompts_only = mint_token(scope=scopes.PROMPTS)
        self.to_revoke = mint_token()
        other_client = Application.objects.create(
            name="another host",
            client_type=Application.CLIENT_PUBLIC,
            authorization_grant_type=Application.GRANT_AUTHORIZATION_CODE,
            redirect_uris="http://127.0.0.1/callback",
        )
        self.other_client_token = mint_token(application=other_client)


ROWS: dict[str, Callable[[Any], Awaitable[None]]] = {}
for edge_case in EDGE_CASES:
    for each in TRANSPORTS.values():
        ROWS[f"test_{slug(edge_case.name)}__{each.name}"] = edge_test(edge_case, each)
for session_case in SESSION_CASES:
    for transport_name, outcome in session_case.expected.items():
        ROWS[f"test_{slug(session_case.name)}__{transport_name}"] = session_test(session_case, TRANSPORTS[transport_name], outcome)

# One test per row, so each row passes or fails on its own and reports its name.
AuthRejectionTests = type("AuthRejectionTests", (TokensTestCase,), {"__module__": __name__, **ROWS})


class ScopeTests(AsgiTestCase):
    async def test_a_token_with_only_mcp_prompts_may_list_prompts(self) -> None:
        client = McpClient(token=await amint_token(scope=scopes.PROMPTS))
        await client.initialize()

        reply = await client.call("prompts/list")

        self.assertEqual(reply.status, 200, reply.body)
        self.assertIn("prompts", reply.json()["result"])
