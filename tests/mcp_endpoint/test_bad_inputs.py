"""Bad input on /mcp gets a precise answer: an HTTP status and, where there is a JSON body, a
JSON-RPC error code. Never a traceback.

`BAD_INPUTS` is the table; each row is one request and the answer it must get. The tests after
it cover what does not fit one row: the data of an unsupported-version error, an accepted
2025-03-26 batch, a body streamed past the size cap, DELETE then reuse, an internal failure,
and a dead upstream next to a working one in the same session.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal
from unittest import mock

from django.test import override_settings

from federation.models import CatalogKind
from mcp_endpoint import jsonrpc
from mcp_endpoint.dispatcher import METHODS, MethodSpec
from mcp_endpoint.methods import BOTH
from tests.base import (
    HANDSHAKE,
    HOST,
    MODERN,
    AsgiTestCase,
    FixturePeerTestCase,
    Headers,
    HttpExchange,
    McpClient,
    Reply,
    add_catalog_entry,
    http,
    modern_meta,
    register_peer,
    request,
)
from tests.e2e.harness import free_port

Era = Literal["none", "handshake", "modern"]


@dataclass(frozen=True)
class BadInput:
    """One request and the answer it must get.

    `era` says how the client is set up first: "none" sends the request as is, "handshake"
    initializes a session (at `version`) and sends its Mcp-Session-Id and MCP-Protocol-Version,
    "modern" sends MCP-Protocol-Version: 2026-07-28. `headers` are applied last (None removes
    one). `code` None means the answer is not a JSON-RPC error body.
    """

    name: str
    status: int
    code: int | None
    body: Any = field(default_factory=lambda: request("tools/list"))
    headers: Headers = field(default_factory=dict)
    era: Era = "none"
    version: str = HANDSHAKE
    method: str = "POST"
    settings: dict[str, Any] = field(default_factory=dict)


def modern(
    method: str, params: dict[str, Any] | None = None, meta: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A 2026-07-28 request body: params with the `_meta` envelope (or the given `meta`)."""
    return request(method, {**(params or {}), "_meta": modern_meta() if meta is None else meta})


def without(mapping: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if k != key}


SMALL_LIMIT = {"MCP_MAX_BODY_BYTES": 256}
PADDED = json.dumps(request("tools/list", {"cursor": "x" * 1024})).encode()

BAD_INPUTS = [
    # --- the HTTP edge: before anything is parsed ----------------------------------------------
    BadInput("bad Host", 421, None, headers={"host": "evil.example"}),
    BadInput("bad Origin", 403, None, headers={"origin": "http://evil.example"}),
    BadInput("Origin that is not a URL", 403, None, headers={"origin": "null"}),
    BadInput("wrong Content-Type", 415, jsonrpc.INVALID_REQUEST, headers={"content-type": "text/plain"}),
    BadInput(
        "Accept without application/json",
        406,
        jsonrpc.INVALID_REQUEST,
        headers={"accept": "text/event-stream"},
    ),
    BadInput("PUT", 405, None, method="PUT"),
    BadInput(
        "declared body over the size cap",
        413,
        jsonrpc.INVALID_REQUEST,
        body=PADDED,
        headers={"content-length": str(len(PADDED))},
        settings=SMALL_LIMIT,
    ),
    BadInput(
        "undeclared body over the size cap", 413, jsonrpc.INVALID_REQUEST, body=PADDED, settings=SMALL_LIMIT
    ),
    BadInput("not JSON", 400, jsonrpc.PARSE_ERROR, body=b'{"jsonrpc": "2.0", "id": 1,'),
    BadInput("not UTF-8", 400, jsonrpc.PARSE_ERROR, body=b"\xff\xfe\xfa"),
    BadInput(
        "JSON nested too deeply to decode", 400, jsonrpc.PARSE_ERROR, body=b"[" * 100_000 + b"]" * 100_000
    ),
    # --- the handshake era -----------------------------------------------------------------------
    BadInput("request before initialize (no session id)", 400, jsonrpc.INVALID_REQUEST),
    BadInput(
        "unknown session id", 404, jsonrpc.INVALID_REQUEST, headers={"mcp-session-id": "no-such-session"}
    ),
    BadInput(
        "unknown MCP-Protocol-Version",
        400,
        jsonrpc.UNSUPPORTED_PROTOCOL_VERSION,
        era="handshake",
        headers={"mcp-protocol-version": "1999-01-01"},
    ),
    BadInput(
        "MCP-Protocol-Version other than the session's",
        400,
        jsonrpc.INVALID_REQUEST,
        era="handshake",
        headers={"mcp-protocol-version": "2025-06-18"},
    ),
    BadInput(
        "wrong jsonrpc version",
        400,
        jsonrpc.INVALID_REQUEST,
        era="handshake",
        body={"jsonrpc": "1.0", "id": 1, "method": "tools/list"},
    ),
    BadInput("not a JSON-RPC object", 400, jsonrpc.INVALID_REQUEST, era="handshake", body="tools/list"),
    BadInput(
        "null request id",
        200,
        jsonrpc.INVALID_REQUEST,
        era="handshake",
        body={"jsonrpc": "2.0", "id": None, "method": "tools/list"},
    ),
    BadInput(
        "unknown method", 200, jsonrpc.METHOD_NOT_FOUND, era="handshake", body=request("no/such/method")
    ),
    BadInput(
        "2026-only method", 200, jsonrpc.METHOD_NOT_FOUND, era="handshake", body=request("server/discover")
    ),
    BadInput(
        "tools/call without name",
        200,
        jsonrpc.INVALID_PARAMS,
        era="handshake",
        body=request("tools/call", {}),
    ),
    BadInput(
        "params not an object",
        200,
        jsonrpc.INVALID_PARAMS,
        era="handshake",
        body={"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": [1]},
    ),
    BadInput(
        "invalid cursor",
        200,
        jsonrpc.INVALID_PARAMS,
        era="handshake",
        body=request("tools/list", {"cursor": "%%%"}),
    ),
    BadInput(
        "unknown tool",
        200,
        jsonrpc.INVALID_PARAMS,
        era="handshake",
        body=request("tools/call", {"name": "nobody__nothing", "arguments": {}}),
    ),
    BadInput(
        "unknown resource",
        200,
        jsonrpc.RESOURCE_NOT_FOUND_LEGACY,
        era="handshake",
        body=request("resources/read", {"uri": "fedmcp://nobody/test://nothing"}),
    ),
    BadInput(
        "batch outside 2025-03-26",
        400,
        jsonrpc.INVALID_REQUEST,
        era="handshake",
        body=[request("tools/list")],
    ),
    BadInput(
        "empty batch in 2025-03-26",
        400,
        jsonrpc.INVALID_REQUEST,
        era="handshake",
        version="2025-03-26",
        body=[],
    ),
    # --- 2026-07-28 ------------------------------------------------------------------------------
    BadInput(
        "2026: wrong jsonrpc version",
        400,
        jsonrpc.INVALID_REQUEST,
        era="modern",
        body={**modern("tools/list"), "jsonrpc": "1.0"},
        headers={"mcp-method": "tools/list"},
    ),
    BadInput(
        "2026: a posted response",
        400,
        jsonrpc.INVALID_REQUEST,
        era="modern",
        body={"jsonrpc": "2.0", "id": 1, "result": {}},
    ),
    BadInput(
        "2026: unknown method",
        404,
        jsonrpc.METHOD_NOT_FOUND,
        era="modern",
        body=modern("no/such/method"),
        headers={"mcp-method": "no/such/method"},
    ),
    BadInput(
        "2026: handshake-only method",
        404,
        jsonrpc.METHOD_NOT_FOUND,
        era="modern",
        body=modern("ping"),
        headers={"mcp-method": "ping"},
    ),
    BadInput(
        "2026: Mcp-Method disagrees with the body",
        400,
        jsonrpc.HEADER_MISMATCH,
        era="modern",
        body=modern("tools/list"),
        headers={"mcp-method": "prompts/list"},
    ),
    BadInput(
        "2026: Mcp-Method missing", 400, jsonrpc.HEADER_MISMATCH, era="modern", body=modern("tools/list")
    ),
    BadInput(
        "2026: Mcp-Name missing for tools/call",
        400,
        jsonrpc.HEADER_MISMATCH,
        era="modern",
        body=modern("tools/call", {"name": "a__b"}),
        headers={"mcp-method": "tools/call"},
    ),
    BadInput(
        "2026: Mcp-Name disagrees with the body",
        400,
        jsonrpc.HEADER_MISMATCH,
        era="modern",
        body=modern("tools/call", {"name": "a__b"}),
        headers={"mcp-method": "tools/call", "mcp-name": "a__c"},
    ),
    BadInput(
        "2026: header version disagrees with _meta",
        400,
        jsonrpc.HEADER_MISMATCH,
        era="modern",
        body=modern(
            "tools/list", meta={**modern_meta(), "io.modelcontextprotocol/protocolVersion": HANDSHAKE}
        ),
        headers={"mcp-method": "tools/list"},
    ),
    BadInput(
        "2026: no _meta",
        400,
        jsonrpc.INVALID_PARAMS,
        era="modern",
        body=request("tools/list", {}),
        headers={"mcp-method": "tools/list"},
    ),
    BadInput(
        "2026: _meta without protocolVersion",
        400,
        jsonrpc.INVALID_PARAMS,
        era="modern",
        body=modern("tools/list", meta=without(modern_meta(), "io.modelcontextprotocol/protocolVersion")),
        headers={"mcp-method": "tools/list"},
    ),
    BadInput(
        "2026: _meta without clientCapabilities",
        400,
        jsonrpc.INVALID_PARAMS,
        era="modern",
        body=modern("tools/list", meta=without(modern_meta(), "io.modelcontextprotocol/clientCapabilities")),
        headers={"mcp-method": "tools/list"},
    ),
    BadInput(
        "2026: batch",
        400,
        jsonrpc.INVALID_REQUEST,
        era="modern",
        body=[modern("tools/list")],
        headers={"mcp-method": "tools/list"},
    ),
    BadInput(
        "2026: tools/call without name",
        400,
        jsonrpc.INVALID_PARAMS,
        era="modern",
        body=modern("tools/call", {}),
        headers={"mcp-method": "tools/call"},
    ),
    BadInput(
        "2026: unknown tool",
        400,
        jsonrpc.INVALID_PARAMS,
        era="modern",
        body=modern("tools/call", {"name": "nobody__nothing"}),
        headers={"mcp-method": "tools/call", "mcp-name": "nobody__nothing"},
    ),
    BadInput(
        "2026: unknown resource",
        400,
        jsonrpc.INVALID_PARAMS,
        era="modern",
        body=modern("resources/read", {"uri": "fedmcp://nobody/test://nothing"}),
        headers={"mcp-method": "resources/read", "mcp-name": "fedmcp://nobody/test://nothing"},
    ),
    BadInput(
        "2026: GET", 405, None, era="modern", method="GET", body=b"", headers={"accept": "text/event-stream"}
    ),
    BadInput("2026: DELETE", 405, None, era="modern", method="DELETE", body=b""),
]


async def send(case: BadInput) -> Reply:
    client = McpClient()
    if case.era == "handshake":
        await client.initialize(case.version)
    elif case.era == "modern":
        client.protocol_version = MODERN
    body = case.body if isinstance(case.body, bytes) else json.dumps(case.body).encode()
    return await http(case.method, client.path, body, client.headers(case.headers))


def answers_as_listed(case: BadInput) -> Any:
    """Return a test method checking that `case` gets its status and code, and no traceback."""

    async def test(self: AsgiTestCase) -> None:
        with override_settings(**case.settings):
            reply = await send(case)
        self.assertEqual(reply.status, case.status, reply.body)
        self.assertEqual(reply.error_code, case.code, reply.body)
        self.assertNotIn(b"Traceback", reply.body)

    test.__doc__ = f"{case.name}: {case.status} {case.code}"
    return test


def method_name(case: BadInput) -> str:
    return "test_" + re.sub(r"[^a-z0-9]+", "_", case.name.lower()).strip("_")


# One test per row, so each row passes or fails on its own and reports its name.
BadInputTableTests = type(
    "BadInputTableTests",
    (AsgiTestCase,),
    {"__module__": __name__, **{method_name(case): answers_as_listed(case) for case in BAD_INPUTS}},
)
assert len({method_name(case) for case in BAD_INPUTS}) == len(BAD_INPUTS), "row names must be unique"


class BadInputTests(AsgiTestCase):
    async def test_an_unsupported_version_lists_the_supported_ones(self) -> None:
        reply = await McpClient().post(
            request("tools/list", request_id=7), {"mcp-protocol-version": "1999-01-01"}
        )

        self.assertEqual(reply.status, 400)
        error = reply.json()["error"]
        self.assertEqual(error["code"], jsonrpc.UNSUPPORTED_PROTOCOL_VERSION)
        self.assertIn(MODERN, error["data"]["supported"])
        self.assertEqual(reply.json()["id"], 7)

    async def test_a_batch_in_2025_03_26_is_answered_with_an_array(self) -> None:
        client = McpClient()
        await client.initialize("2025-03-26")

        reply = await client.post(
            [
                request("tools/list", request_id=1),
                request("ping", request_id="two"),
                {
                    "jsonrpc": "2.0",
                    "method": "notifications/progress",
                    "params": {"progressToken": 1, "progress": 1},
                },
            ]
        )

        self.assertEqual(reply.status, 200)
        answers = reply.json()
        self.assertIsInstance(answers, list)
        self.assertEqual(sorted(str(a["id"]) for a in answers), ["1", "two"])
        self.assertTrue(all("result" in a for a in answers), answers)

    @override_settings(MCP_MAX_BODY_BYTES=256)
    async def test_a_body_streamed_past_the_cap_is_refused_with_413(self) -> None:
        headers = McpClient().headers()

        async with HttpExchange(
            "POST", "/mcp", headers, chunks=[b"[" * 200, b"1" * 200, b"]" * 200]
        ) as exchange:
            reply = await exchange.read_all()

        self.assertEqual(reply.status, 413)
        self.assertEqual(reply.error_code, jsonrpc.INVALID_REQUEST)

    async def test_delete_ends_the_session_and_its_stream_and_reuse_gets_404(self) -> None:
        client = McpClient()
        await client.initialize()
        stream_headers = client.headers({"accept": "text/event-stream"})

        async with HttpExchange("GET", "/mcp", stream_headers) as stream:
            self.assertEqual(await stream.start(), 200)
            self.assertEqual(stream.headers["content-type"], "text/event-stream")
            deleted = await http("DELETE", "/mcp", headers=client.headers())
            self.assertEqual(deleted.status, 200)
            self.assertIsNone(await stream.next_event())  # the stream ends with the session

        reused = await client.call("tools/list")
        self.assertEqual(reused.status, 404)
        self.assertEqual(reused.error_code, jsonrpc.INVALID_REQUEST)
        deleted_again = await http("DELETE", "/mcp", headers=client.headers())
        self.assertEqual(deleted_again.status, 404)

    async def test_an_unexpected_failure_is_answered_32603_without_details(self) -> None:
        async def explode(ctx: Any, params: Any) -> Any:
            raise RuntimeError("secret-internal-detail")

        client = McpClient()
        await client.initialize()
        with (
            mock.patch.dict(METHODS, {"tools/list": MethodSpec(explode, BOTH)}),
            self.assertLogs("mcp_endpoint", "ERROR"),
        ):
            reply = await client.call("tools/list")

        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.error_code, jsonrpc.INTERNAL_ERROR)
        self.assertNotIn(b"secret-internal-detail", reply.body)
        self.assertNotIn(b"Traceback", reply.body)


class UpstreamDownTests(FixturePeerTestCase):
    def setUp(self) -> None:
        super().setUp()
        # Nothing listens on a port we just bound and released: connections are refused.
        self.down = register_peer(
            "down", f"http://{HOST}:{free_port()}/mcp", sync=False, connect_timeout=2.0, call_timeout=2.0
        )
        add_catalog_entry(self.down, CatalogKind.TOOL, "echo")

    async def test_a_dead_upstream_gives_32010_while_a_live_one_answers_in_the_same_session(self) -> None:
        client = McpClient()
        await client.initialize()

        failed = await client.call(
            "tools/call", {"name": "down__echo", "arguments": {}}, timeout=self.down.connect_timeout + 5
        )
        worked = await client.call(
            "tools/call", {"name": "everything__add", "arguments": {"a": 2, "b": 3}}, timeout=20
        )

        self.assertEqual(failed.status, 200)
        self.assertEqual(failed.error_code, jsonrpc.UPSTREAM_ERROR)
        self.assertNotIn(b"Traceback", failed.body)
        self.assertEqual(worked.status, 200, worked.body)
        self.assertEqual(worked.json()["result"]["content"][0]["text"], "5")

    async def test_a_dead_upstream_gives_32010_in_2026_too(self) -> None:
        client = McpClient()

        reply = await client.call_modern(
            "tools/call",
            {"name": "down__echo", "arguments": {}},
            name="down__echo",
            timeout=self.down.connect_timeout + 5,
        )

        self.assertEqual(reply.error_code, jsonrpc.UPSTREAM_ERROR)
        self.assertNotIn(b"Traceback", reply.body)
