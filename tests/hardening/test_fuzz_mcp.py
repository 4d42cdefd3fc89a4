"""State-aware property-based fuzzing of the MCP surface on every transport, in process (hypothesis).

Frames are fuzzed in each state a host can be in, because what the gateway reads first depends
on it (the Streamable HTTP consumer looks into params to pick an era before any session
exists; issue 15 found `params: "nope"` with no session header answered 500 while the old
fuzzer, which only ever posted inside an initialized session, reported 10,000 cases and 0
failures). The states (`STATES`, one test each):

* Streamable HTTP `/mcp`: no session header; an unknown session id; `initialize` itself; a
  handshake session of 2025-03-26 (batches allowed) and of 2025-11-25 (batches refused); the
  stateless 2026-07-28 era, with `MCP-Protocol-Version`, `Mcp-Method` and `Mcp-Name` headers
  that match the body or not;
* the same endpoint of one peer, `/peers/everything/mcp`, in a handshake session and stateless;
* legacy HTTP+SSE `POST /messages/` on an initialized session and on a stream never initialized;
* WebSocket `/ws` in a 2025-03-26 session (batches allowed) and before `initialize`.

Each frame is one of: a method of the method table (and notifications, and unknown methods)
with params of every JSON type (object, string, number, boolean, list, null, nested) and a
`_meta` of every type; adversarial bytes (malformed JSON, raw bytes, deep nesting, huge strings,
wrong types, unknown fields); a batch (for each era); a well-formed call that reaches routing
(the fixture server is registered as peer `everything`, so `tools/call everything__add` goes
upstream).

The property, per frame: no exception escapes, no 5xx, every wait is bounded (`CASE_TIMEOUT`),
every answer is a valid JSON-RPC response (`jsonrpc` "2.0", an id, exactly one of result and
error, an error with an integer code and a string message), every request carrying a string or
integer id is answered with that id, every error code is one of `ALLOWED_CODES` (-32603 means an
unexpected exception: a failure), a request whose params are not an object never gets a result,
states refuse what they must (no session: 400 -32600; unknown session: 404), and the gateway
still answers afterwards (on streams a ping after every frame, on Streamable HTTP a canary
session's ping after every `CANARY_EVERY` frames; a fresh session and /healthz after the run).

Budget: `FEDMCP_FUZZ_EXAMPLES` (total over the states; default 100 per state, derandomized,
for `make test`). `make harden` sets it to 10,000 and `FEDMCP_HARDEN_DIR=build/harden`, where
each state writes its figures (cases, failures, seconds, histogram of HTTP statuses and
JSON-RPC codes) to `fuzz-<state>.json`.

Not fuzzed here (long-lived by design, or they need a host answering server->client requests):
`subscriptions/listen`, the GET stream, and fixture tools that sample, elicit or sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from channels.db import database_sync_to_async
from django.db import connections
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from mcp_endpoint import jsonrpc
from mcp_endpoint.methods import ERAS as METHOD_TABLE
from tests.base import (
    ACCEPT,
    HANDSHAKE,
    HOST,
    MODERN,
    FixturePeerTestCase,
    McpClient,
    SseClient,
    bearer,
    http,
    mint_token,
    modern_meta,
    release_process_state,
    request,
    ws_communicator,
)

STATES = (
    "http_no_session", "http_unknown_session", "http_initialize", "http_handshake_2025_03_26", "http_handshake_2025_11_25",
    "http_stateless_2026", "peer_http_handshake", "peer_http_stateless_2026", "sse_messages", "sse_uninitialized",
    "websocket_2025_03_26", "websocket_uninitialized",
)
PER_STATE_DEFAULT = 100
"""Frames per state in `make test`: 1,200 in all, 2.5 times the old 480. At 200 per state the module
took 214 s on the 2-core machine shared with seven other test runs (12-17 s a state)."""
TOTAL_EXAMPLES = int(os.environ.get("FEDMCP_FUZZ_EXAMPLES", str(PER_STATE_DEFAULT * len(STATES))))
EXAMPLES = max(1, TOTAL_EXAMPLES // len(STATES))
HARDEN_DIR = os.environ.get("FEDMCP_HARDEN_DIR")
CASE_TIMEOUT = 30.0
"""Bound on one frame and its answers (the peer's call timeout is 20 s)."""
READ_TIMEOUT = 25.0
HUGE = 256 * 1024 if TOTAL_EXAMPLES <= 1000 else 1024 * 1024
"""The longest fuzzed string (the body cap is 4 MiB)."""

CANARY_EVERY = 5
"""On Streamable HTTP, a canary session pings after every this many frames (streams do after each)."""
ALLOWED_CODES = {
    value for name, value in vars(jsonrpc).items() if name.isupper() and isinstance(value, int)
} - {jsonrpc.INTERNAL_ERROR}
"""Every code the gateway defines except -32603, which means an unexpected exception (a bug)."""
ALLOWED_STATUSES = {200, 202, 400, 403, 404, 405, 406, 413, 415, 422, 429}

PEER = "everything"
SAFE_TOOLS = ("add", "whoami", "stats", "test_simple_text", "test_error_handling", "test_image_content", "test_tool_with_logging")
METHODS = (
    "initialize", "ping", "logging/setLevel", "resources/subscribe", "resources/unsubscribe",
    "server/discover", "tools/list", "tools/call", "resources/list", "resources/templates/list",
    "resources/read", "prompts/list", "prompts/get", "completion/complete",
    "notifications/initialized", "notifications/cancelled", "notifications/progress",
    "notifications/roots/list_changed", "sampling/createMessage", "rpc.discover", "", "tools/",
)

# --- strategies ---------------------------------------------------------------------------------

text = st.text(max_size=40)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), text,
)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4), max_leaves=12)
good_ids = st.one_of(st.integers(min_value=-(2**53), max_value=2**53), st.text(min_size=1, max_size=20))
ids = st.one_of(
    good_ids, good_ids, good_ids, good_ids, good_ids,
    text, st.none(), st.booleans(), st.floats(allow_nan=False, allow_infinity=False), st.lists(scalars, max_size=2), st.dictionaries(text, scalars, max_size=2),
)
known_methods = st.sampled_from(METHODS)
methods = st.one_of(known_methods, known_methods, known_methods, known_methods, known_methods, known_methods, text, json_values)
safe_tools = st.sampled_from([f"{PEER}__{t}" for t in SAFE_TOOLS])
tool_names = st.one_of(safe_tools, safe_tools, safe_tools, safe_tools, text, st.just(f"{PEER}__no_such_tool"), json_values)
resource_uris = st.one_of(st.just("fedmcp://everything/test://static-text"), st.just("fedmcp://nowhere/x"), text, json_values)


def deep(depth: int, opener: str) -> str:
    closer = {"[": "]", "{\"a\":": "}"}[opener]
    return opener * depth + "1" + closer * depth


@st.composite
def params(draw: st.DrawFn, method: Any) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    found: dict[str, Any] = {}
    if method == "tools/call":
        found["name"] = draw(tool_names)
        found["arguments"] = draw(
            st.one_of(
                st.fixed_dictionaries({"a": st.integers(-100, 100), "b": st.integers(-100, 100)}),
                st.fixed_dictionaries({"a": st.integers(-(2**40), 2**40), "b": st.integers(-(2**40), 2**40)}),
                st.dictionaries(text, json_values, max_size=3),
                json_values,
            )
        )
    elif method in ("resources/read", "resources/subscribe", "resources/unsubscribe"):
        found["uri"] = draw(resource_uris)
    elif method == "prompts/get":
        found["name"] = draw(st.one_of(st.just(f"{PEER}__test_simple_prompt"), text))
        found["arguments"] = draw(st.dictionaries(text, json_values, max_size=3))
    elif method == "logging/setLevel":
        found["level"] = draw(st.one_of(st.sampled_from(["debug", "info", "error", "emergency"]), json_values))
    elif method == "initialize":
        found.update(
            protocolVersion=draw(st.one_of(st.sampled_from(["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25", MODERN]), text)),
            capabilities=draw(json_values),
            clientInfo=draw(json_values),
        )
    elif method == "notifications/cancelled":
        found["requestId"] = draw(ids)
    else:
        found.update(draw(st.dictionaries(text, json_values, max_size=3)))
    if draw(st.integers(0, 3)):
        found["_meta"] = modern_meta() if draw(st.integers(0, 4)) else draw(json_values)
    return found


@st.composite
def messages(draw: st.DrawFn) -> dict[str, Any]:
    """One JSON-RPC-looking object: a request, a notification posing as one, or a response."""
    method = draw(methods)
    message: dict[str, Any] = {}
    if draw(st.integers(0, 9)):
        message["jsonrpc"] = "2.0"
    else:
        message["jsonrpc"] = draw(json_values)
    shape = draw(st.sampled_from(["request", "request", "request", "notification", "response"]))
    if shape != "notification":
        message["id"] = draw(ids)
    if shape == "response":
        message[draw(st.sampled_from(["result", "error"]))] = draw(json_values)
    else:
        message["method"] = method
        if draw(st.integers(0, 3)):
            message["params"] = draw(params(method))
    for _ in range(draw(st.sampled_from([0, 0, 0, 0, 0, 1, 2]))):  # unknown fields
        message[draw(text)] = draw(json_values)
    return message


ROUTED = ("tools/call", "tools/call", "tools/call", "resources/read", "prompts/get", "completion/complete", "tools/list", "ping")


@st.composite
def valid_requests(draw: st.DrawFn) -> dict[str, Any]:
    """A well-formed request that reaches routing (and the fixture upstream), fuzzed only inside."""
    method = draw(st.sampled_from(ROUTED))
    body = {"jsonrpc": "2.0", "id": draw(good_ids), "method": method, "params": {}}
    if method == "tools/call":
        arguments = st.one_of(st.fixed_dictionaries({"a": st.integers(-100, 100), "b": st.integers(-100, 100)}), st.dictionaries(text, json_values, max_size=3))
        body["params"] = {"name": draw(safe_tools), "arguments": draw(arguments)}
    elif method == "resources/read":
        body["params"] = {"uri": draw(resource_uris)}
    elif method == "prompts/get":
        body["params"] = {"name": f"{PEER}__test_simple_prompt"}
    elif method == "completion/complete":
        body["params"] = {"ref": {"type": "ref/prompt", "name": f"{PEER}__test_prompt_with_arguments"}, "argument": {"name": "arg1", "value": draw(text)}}
    body["params"]["_meta"] = modern_meta()
    return body


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """The raw body of one POST (or one WebSocket text frame)."""
    kind = draw(st.sampled_from(["valid"] * 4 + ["message"] * 6 + ["batch", "raw", "deep", "huge", "scalar"]))
    if kind == "valid":
        return json.dumps(draw(valid_requests())).encode()
    if kind == "message":
        return json.dumps(draw(messages())).encode()
    if kind == "batch":  # interleaved and repeated ids
        return json.dumps(draw(st.lists(messages(), max_size=5))).encode()
    if kind == "raw":
        return draw(
            st.one_of(
                st.binary(max_size=200), st.text(max_size=200).map(str.encode), st.just(b'{"jsonrpc":"2.0","id":1,"method":"ping"'), st.just(b"\xef\xbb\xbf{}")
            )
        )
    if kind == "deep":
        depth = draw(st.integers(1, 100_000))
        inner = deep(depth, draw(st.sampled_from(["[", "{\"a\":"])))
        return ('{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"everything__add","arguments":' + inner + "}}").encode()
    if kind == "huge":
        size = draw(st.integers(0, HUGE))
        where = draw(st.sampled_from(["method", "id", "name", "argument", "unknown"]))
        blob = "é" * (size // 2) if draw(st.booleans()) else "x" * size
        message = request("tools/call", {"name": f"{PEER}__add", "arguments": {"a": 1, "b": 2}}, 7)
        if where == "method":
            message["method"] = blob
        elif where == "id":
            message["id"] = blob
        elif where == "name":
            message["params"]["name"] = blob
        elif where == "argument":
            message["params"]["arguments"]["a"] = blob
        else:
            message[blob[:100] or "k"] = blob
        return json.dumps(message).encode()
    return json.dumps(draw(json_values)).encode()


TABLE_METHODS = (*sorted(METHOD_TABLE), "notifications/initialized", "notifications/cancelled", "notifications/progress", "no/such/method")
"""Every method of the gateway's method table, the notifications it reads, and one it does not know."""
PARAM_SHAPES = ("object", "object", "object", "string", "number", "boolean", "list", "null", "nested", "absent")
meta_values = st.one_of(
    st.builds(modern_meta), st.builds(modern_meta),
    text, st.integers(), st.booleans(), st.none(), st.lists(scalars, max_size=3),
    st.fixed_dictionaries({
        "io.modelcontextprotocol/protocolVersion": st.one_of(st.just(MODERN), json_values),
        "io.modelcontextprotocol/clientCapabilities": json_values,
        "io.modelcontextprotocol/clientInfo": json_values,
    }),
    st.fixed_dictionaries({"progressToken": json_values}),
)
"""`_meta` values: the 2026-07-28 envelope, wrong types, and envelopes whose members have wrong types."""


@st.composite
def table_message(draw: st.DrawFn) -> dict[str, Any]:
    """A call of a method of the table, params of one JSON type, maybe a `_meta` of any type."""
    method = draw(st.sampled_from(TABLE_METHODS))
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if not method.startswith("notifications/") or not draw(st.integers(0, 3)):
        message["id"] = draw(good_ids)
    shape = draw(st.sampled_from(PARAM_SHAPES))
    if shape == "object":
        found = draw(params(method))
        found = found if isinstance(found, dict) else {}
        if draw(st.integers(0, 2)):
            found["_meta"] = draw(meta_values)
        message["params"] = found
    elif shape == "string":
        message["params"] = draw(st.one_of(st.just("nope"), text))
    elif shape == "number":
        message["params"] = draw(st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False)))
    elif shape == "boolean":
        message["params"] = draw(st.booleans())
    elif shape == "list":
        message["params"] = draw(st.lists(json_values, max_size=3))
    elif shape == "null":
        message["params"] = None
    elif shape == "nested":
        message["params"] = draw(st.recursive(st.lists(scalars, max_size=2), lambda inner: st.lists(inner, max_size=2), max_leaves=6))
    return message


@st.composite
def table_frames(draw: st.DrawFn) -> bytes:
    """One table call, or a batch of them (every era gets batches: only 2025-03-26 takes them)."""
    if draw(st.integers(0, 5)):
        return json.dumps(draw(table_message())).encode()
    return json.dumps(draw(st.lists(table_message(), min_size=1, max_size=4))).encode()


def any_frames() -> st.SearchStrategy[bytes]:
    return st.one_of(table_frames(), table_frames(), frames())


VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25", MODERN)
well_formed_initialize = st.fixed_dictionaries(
    {
        "protocolVersion": st.one_of(st.sampled_from(VERSIONS), text),
        "capabilities": st.one_of(
            st.just({}), st.dictionaries(st.sampled_from(["roots", "sampling", "elicitation", "experimental"]), st.one_of(st.just({}), json_values), max_size=3)
        ),
        "clientInfo": st.fixed_dictionaries({"name": text, "version": text}),
    },
    optional={"_meta": meta_values},
)
"""Initialize params that pass validation, so sessions of every version are opened too."""


def initialize_frames() -> st.SearchStrategy[bytes]:
    """Mostly `initialize` requests (well formed, or with fuzzed params); sometimes anything else."""
    initialize = st.builds(
        lambda request_id, found: json.dumps({"jsonrpc": "2.0", "id": request_id, "method": "initialize", "params": found}).encode(),
        good_ids,
        st.one_of(well_formed_initialize, well_formed_initialize, params("initialize"), json_values),
    )
    return st.one_of(initialize, initialize, table_frames(), frames())


Case = tuple[bytes, dict[str, str | None]]


def header_value(value: Any) -> str | None:
    return value if isinstance(value, str) and value.isascii() and value.isprintable() and len(value) < 1000 else None


@st.composite
def stateless_cases(draw: st.DrawFn) -> Case:
    """A frame with 2026-07-28 routing headers that match its body, or not."""
    body = draw(st.one_of(any_frames(), st.builds(lambda m: json.dumps(m).encode(), valid_requests())))
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        payload = None
    method = payload.get("method") if isinstance(payload, dict) else None
    found = payload.get("params") if isinstance(payload, dict) else None
    name = (found.get("name") or found.get("uri")) if isinstance(found, dict) else None
    headers: dict[str, str | None] = {"mcp-protocol-version": draw(st.sampled_from([MODERN, MODERN, MODERN, MODERN, "2025-11-25", "1999-01-01"]))}
    choice = draw(st.sampled_from(["match", "match", "match", "other", "absent"]))
    headers["mcp-method"] = header_value(method) if choice == "match" else ("tools/list" if choice == "other" else None)
    choice = draw(st.sampled_from(["match", "match", "other", "absent"]))
    headers["mcp-name"] = header_value(name) if choice == "match" else (f"{PEER}__whoami" if choice == "other" else None)
    return body, headers


def plain(strategy: st.SearchStrategy[bytes]) -> st.SearchStrategy[Case]:
    return strategy.map(lambda body: (body, {}))


# --- checking answers ---------------------------------------------------------------------------


def loads(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def expected_ids(body: bytes) -> list[Any]:
    """The ids the gateway must answer: string or integer ids of objects that have a method."""
    payload = loads(body)
    items = payload if isinstance(payload, list) else [payload]
    found = []
    for item in items:
        if isinstance(item, dict) and "method" in item and "result" not in item and "error" not in item:
            ident = item.get("id")
            if isinstance(ident, (str, int)) and not isinstance(ident, bool) and ident != "":
                found.append(ident)
    return found if not isinstance(payload, list) or payload else []


def ids_with_bad_params(body: bytes) -> list[Any]:
    """Ids of requests whose params are present but not an object (unique in their frame): never a result."""
    payload = loads(body)
    items = [i for i in (payload if isinstance(payload, list) else [payload]) if isinstance(i, dict)]
    counts = Counter(json.dumps(i.get("id")) for i in items)
    return [
        item["id"] for item in items
        if "method" in item and item.get("params") is not None and not isinstance(item["params"], dict)
        and jsonrpc.is_valid_id(item.get("id")) and counts[json.dumps(item["id"])] == 1
    ]


def has_modern_envelope(payload: Any) -> bool:
    found = payload.get("params") if isinstance(payload, dict) else None
    meta = found.get("_meta") if isinstance(found, dict) else None
    return isinstance(meta, dict) and "io.modelcontextprotocol/protocolVersion" in meta


def is_batch(body: bytes) -> bool:
    return body.lstrip().startswith(b"[")


def flatten(payload: Any) -> list[dict[str, Any]]:
    items = payload if isinstance(payload, list) else [payload]
    return [item for item in items if isinstance(item, dict)]


class Figures:
    """What one state's run saw; written to FEDMCP_HARDEN_DIR when set."""

    def __init__(self, state: str) -> None:
        self.state = state
        self.cases = 0
        self.failures: list[str] = []
        self.statuses: Counter[str] = Counter()
        self.codes: Counter[str] = Counter()
        self.started = time.monotonic()

    def write(self, *, healthy: bool) -> None:
        if not HARDEN_DIR:
            return
        folder = Path(HARDEN_DIR)
        folder.mkdir(parents=True, exist_ok=True)
        figures = {
            "state": self.state,
            "cases": self.cases,
            "failures": len(self.failures),
            "failure_samples": self.failures[:5],
            "seconds": round(time.monotonic() - self.started, 1),
            "healthy_after": healthy,
            "http_statuses": dict(sorted(self.statuses.items())),
            "jsonrpc_codes": dict(sorted(self.codes.items())),
        }
        (folder / f"fuzz-{self.state}.json").write_text(json.dumps(figures, indent=2) + "\n")


class Problem(AssertionError):
    pass


def check_shape(message: dict[str, Any]) -> None:
    """A valid JSON-RPC message: a response with an id and exactly one of result and error, or a method call."""
    if message.get("jsonrpc") != "2.0":
        raise Problem(f"not JSON-RPC 2.0: {message!r}"[:500])
    if "method" in message:
        if not isinstance(message["method"], str):
            raise Problem(f"a method that is not a string: {message!r}"[:500])
        return
    if "id" not in message or ("result" in message) == ("error" in message):
        raise Problem(f"not a JSON-RPC response: {message!r}"[:500])
    error = message.get("error")
    if error is not None and not (
        isinstance(error, dict) and isinstance(error.get("code"), int) and not isinstance(error["code"], bool) and isinstance(error.get("message"), str)
    ):
        raise Problem(f"a malformed error object: {message!r}"[:500])


def check_messages(found: list[dict[str, Any]], wanted: list[Any], figures: Figures, batch: bool = False, body: bytes = b"") -> None:
    rejected_whole = any(  # a batch refused as a whole (batches exist only in 2025-03-26)
        m.get("id") is None and isinstance(m.get("error"), dict) and m["error"].get("code") == jsonrpc.INVALID_REQUEST
        for m in found
    )
    if rejected_whole and batch:
        wanted = []
    answered = set()
    for message in found:
        check_shape(message)
        error = message.get("error")
        if isinstance(error, dict):
            code = error.get("code")
            figures.codes[str(code)] += 1
            if code not in ALLOWED_CODES:
                raise Problem(f"error code {code!r} not allowed: {message!r}"[:500])
        elif "result" in message:
            figures.codes["result"] += 1
        if "method" not in message and "id" in message:
            answered.add(json.dumps(message["id"]))
    missing = [ident for ident in wanted if json.dumps(ident) not in answered]
    if missing:
        raise Problem(f"ids {missing!r} were not answered; got {found!r}"[:500])
    bad = {json.dumps(ident) for ident in ids_with_bad_params(body)}
    for message in found:
        if "result" in message and "method" not in message and json.dumps(message.get("id")) in bad:
            raise Problem(f"a request whose params are not an object got a result: {message!r}"[:500])


# --- the states -----------------------------------------------------------------------------------


async def cancel_the_rest() -> None:
    """Cancel what the app left running in this loop (stream listeners), and wait for them."""
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class LoopThread:
    """One event loop for a whole fuzz run, in its own thread, so hypothesis stays synchronous."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, Any], timeout: float = CASE_TIMEOUT) -> Any:
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise Problem(f"no answer within {timeout:g}s (hang)") from None

    def close(self) -> None:
        try:
            self.run(release_process_state())
            self.run(cancel_the_rest())
            # Outside async_to_sync, the consumers' database work ran on asgiref's one shared
            # thread, as in a daphne worker, which keeps its connection. Close it here: left open,
            # it keeps PostgreSQL from dropping the test database at the end of the run.
            self.run(database_sync_to_async(connections.close_all)())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def http_reply_messages(reply: Any, figures: Figures) -> list[dict[str, Any]]:
    figures.statuses[str(reply.status)] += 1
    if reply.status >= 500 or reply.status not in ALLOWED_STATUSES:
        raise Problem(f"HTTP {reply.status}: {reply.body[:300]!r}")
    content_type = reply.headers.get("content-type", "")
    if not reply.body:
        return []
    if content_type.startswith("text/event-stream"):
        return [m for event in reply.events() for m in flatten(event)]
    if content_type.startswith("application/json"):
        return flatten(reply.json())
    return []


class HttpState:
    """Streamable HTTP frames POSTed to `path` in one state.

    `session`: "none" (no session header), "unknown" (an id no session has), "handshake" (an
    initialized session of `version`), or "stateless" (2026-07-28: headers drawn per frame). A
    canary session on the same path must still answer a ping after every frame.
    """

    def __init__(self, name: str, *, path: str = "/mcp", session: str, version: str = HANDSHAKE, strategy: st.SearchStrategy[Case] | None = None) -> None:
        self.name = name
        self.path = path
        self.session = session
        self.version = version
        self.strategy = strategy if strategy is not None else (stateless_cases() if session == "stateless" else plain(any_frames()))

    async def open(self) -> None:
        self.client = McpClient(self.path)
        if self.session == "handshake":
            await self.client.initialize(self.version)
        elif self.session == "unknown":
            self.client.session_id = "no-such-session-" + Sentinel.next()
        self.canary = McpClient(self.path)
        await self.canary.initialize()
        self.cases = 0

    async def case(self, body: bytes, headers: dict[str, str | None], figures: Figures) -> None:
        reply = await self.client.post(body, headers, timeout=READ_TIMEOUT)
        found = http_reply_messages(reply, figures)
        check_messages(found, expected_ids(body) if reply.status == 200 else [], figures, is_batch(body), body)
        self.expect(body, reply, found)
        self.cases += 1
        if self.cases % CANARY_EVERY:
            return
        ping = await self.canary.call("ping", timeout=READ_TIMEOUT)
        if ping.status != 200 or "result" not in ping.json():
            raise Problem(f"the gateway stopped answering: ping got HTTP {ping.status} {ping.body[:200]!r}")

    def expect(self, body: bytes, reply: Any, found: list[dict[str, Any]]) -> None:
        """What the state itself requires of the answer."""
        payload = loads(body)
        if payload is None or (isinstance(payload, dict) and payload.get("method") == "initialize"):
            return
        codes = {m["error"].get("code") for m in found if isinstance(m.get("error"), dict)}
        if self.session == "none" and not has_modern_envelope(payload) and (reply.status, codes) != (400, {jsonrpc.INVALID_REQUEST}):
            raise Problem(f"without a session: HTTP {reply.status} {codes}, not 400 -32600: {reply.body[:200]!r}")
        if self.session == "unknown" and (reply.status, codes) != (404, {jsonrpc.INVALID_REQUEST}):
            raise Problem(f"with an unknown session: HTTP {reply.status} {codes}, not 404 -32600: {reply.body[:200]!r}")

    async def close(self) -> None:
        pass


class Sentinel:
    """Read a stream until a `ping` sent after the fuzzed frame, and the frame's ids, are answered."""

    counter = 0

    @classmethod
    def next(cls) -> str:
        cls.counter += 1
        return f"sentinel-{cls.counter}"


async def read_until(receive: Callable[[], Coroutine[Any, Any, Any]], wanted: list[Any], sentinel: str, batch: bool) -> list[dict[str, Any]]:
    pending = {json.dumps(w) for w in wanted} | {json.dumps(sentinel)}
    found: list[dict[str, Any]] = []
    deadline = time.monotonic() + READ_TIMEOUT
    while pending:
        if time.monotonic() > deadline:
            raise Problem(f"ids {sorted(pending)} not answered within {READ_TIMEOUT:g}s; got {found!r}"[:500])
        for message in flatten(await receive()):
            if message.get("id") == sentinel:
                pending.discard(json.dumps(sentinel))
                continue
            found.append(message)
            if "method" not in message and "id" in message:
                pending.discard(json.dumps(message["id"]))
            if message.get("id") is None and isinstance(message.get("error"), dict) and batch:
                pending &= {json.dumps(sentinel)}  # a batch refused as a whole
    return found


def initializes(body: bytes) -> bool:
    """Whether a frame may have initialized the session (the state then changed: start it again)."""
    return b'"initialize"' in body


class SseState:
    """Legacy HTTP+SSE: frames POSTed to the stream's endpoint; answers read on the stream."""

    strategy = plain(any_frames())

    def __init__(self, name: str, *, initialized: bool) -> None:
        self.name = name
        self.initialized = initialized

    async def open(self) -> None:
        self.client = SseClient()
        await self.client.__aenter__()
        if self.initialized:
            await self.client.initialize()

    async def case(self, body: bytes, headers: dict[str, str | None], figures: Figures) -> None:
        extra = self.client.headers({"accept": None, "content-type": "application/json"})
        reply = await http("POST", self.client.endpoint, body, extra, timeout=READ_TIMEOUT)
        found = http_reply_messages(reply, figures)
        wanted = expected_ids(body) if reply.status == 202 else []
        sentinel = Sentinel.next()
        posted = await self.client.post(request("ping", None, sentinel))
        if posted.status != 202:
            raise Problem(f"the gateway stopped answering: ping got HTTP {posted.status}")
        exchange = self.client._exchange
        assert exchange is not None
        found += await read_until(lambda: exchange.next_event(READ_TIMEOUT), wanted, sentinel, is_batch(body))
        check_messages(found, wanted, figures, is_batch(body), body)
        if not self.initialized and initializes(body):
            await self.close()
            await self.open()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.__aexit__(None, None, None)


class WebSocketState:
    """WebSocket frames on one socket, initialized in `version` or not at all."""

    strategy = plain(any_frames())

    def __init__(self, name: str, *, version: str | None) -> None:
        self.name = name
        self.version = version

    async def open(self) -> None:
        self.socket = ws_communicator()
        connected, _ = await self.socket.connect(5)
        assert connected
        if self.version is not None:
            hello = {"protocolVersion": self.version, "capabilities": {}, "clientInfo": {"name": "fuzz", "version": "0"}}
            await self.socket.send_json_to(request("initialize", hello, "init"))
            answer = await self.socket.receive_json_from(5)
            assert "result" in answer, answer
            await self.socket.send_json_to({"jsonrpc": "2.0", "method": "notifications/initialized"})

    async def case(self, body: bytes, headers: dict[str, str | None], figures: Figures) -> None:
        try:
            frame = body.decode()
        except UnicodeDecodeError:
            frame = body.decode("latin-1")
        await self.socket.send_input({"type": "websocket.receive", "text": frame})  # may be empty
        sentinel = Sentinel.next()
        await self.socket.send_json_to(request("ping", None, sentinel))
        wanted = expected_ids(frame.encode())
        figures.statuses["ws"] += 1

        async def receive() -> Any:
            try:
                output = await self.socket.receive_output(READ_TIMEOUT)
            except TimeoutError:
                raise Problem(f"nothing received within {READ_TIMEOUT:g}s") from None
            if output["type"] == "websocket.close":
                raise Problem(f"the socket was closed: {output!r}")
            return json.loads(output["text"])

        check_messages(await read_until(receive, wanted, sentinel, is_batch(body)), wanted, figures, is_batch(body), frame.encode())
        if self.version is None and initializes(body):
            await self.close()
            await self.open()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.socket.disconnect()


async def healthy() -> bool:
    """A fresh session still works end to end, and /healthz answers.

    It is another user's: the fuzzed user may hold FEDMCP_MAX_SESSIONS_PER_USER sessions by now
    (every fuzzed `initialize` opens one), and is then refused a new one, as designed.
    """
    client = McpClient(token=await database_sync_to_async(mint_token)("fuzz-check"))
    await client.initialize()
    listed = await client.call("tools/list")
    called = await client.call("tools/call", {"name": f"{PEER}__add", "arguments": {"a": 2, "b": 3}}, timeout=READ_TIMEOUT)
    health = await http("GET", "/healthz", headers={"host": HOST, "accept": ACCEPT, **bearer()})
    return (
        listed.status == 200
        and "result" in flatten(listed.json() if listed.body.startswith(b"{") else listed.events())[0]
        and called.status == 200
        and health.status == 200
    )


PROFILE = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=TOTAL_EXAMPLES <= 1000 * len(STATES) // 4,
    phases=(Phase.explicit, Phase.generate, Phase.shrink),
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)


class FuzzTests(FixturePeerTestCase):
    """One test per state; each runs EXAMPLES frames on one connection/session."""

    def fuzz(self, state: Any) -> None:
        runner = LoopThread()
        figures = Figures(state.name)
        ok = False
        try:
            runner.run(state.open())

            @PROFILE
            @given(state.strategy)
            def property_holds(case: Case) -> None:
                body, headers = case
                figures.cases += 1
                try:
                    runner.run(state.case(body, headers, figures))
                except Exception as error:
                    figures.failures.append(f"{type(error).__name__}: {error} <- {body[:200]!r} {headers!r}"[:700])
                    # Start the next example on a clean connection, so shrinking replays alike.
                    runner.run(state.close())
                    runner.run(state.open())
                    raise

            property_holds()
            runner.run(state.close())
            ok = runner.run(healthy())
            self.assertTrue(ok, "the worker is not healthy after fuzzing")
        finally:
            figures.write(healthy=ok)
            runner.close()

    # --- Streamable HTTP /mcp --------------------------------------------------------------------

    def test_http_no_session(self) -> None:
        self.fuzz(HttpState("http_no_session", session="none"))

    def test_http_unknown_session(self) -> None:
        self.fuzz(HttpState("http_unknown_session", session="unknown"))

    def test_http_initialize(self) -> None:
        self.fuzz(HttpState("http_initialize", session="none", strategy=plain(initialize_frames())))

    def test_http_handshake_2025_03_26(self) -> None:
        self.fuzz(HttpState("http_handshake_2025_03_26", session="handshake", version="2025-03-26"))

    def test_http_handshake_2025_11_25(self) -> None:
        self.fuzz(HttpState("http_handshake_2025_11_25", session="handshake", version="2025-11-25"))

    def test_http_stateless_2026(self) -> None:
        self.fuzz(HttpState("http_stateless_2026", session="stateless"))

    # --- one peer's endpoint ---------------------------------------------------------------------

    def test_peer_http_handshake(self) -> None:
        self.fuzz(HttpState("peer_http_handshake", path=f"/peers/{PEER}/mcp", session="handshake"))

    def test_peer_http_stateless_2026(self) -> None:
        self.fuzz(HttpState("peer_http_stateless_2026", path=f"/peers/{PEER}/mcp", session="stateless"))

    # --- legacy HTTP+SSE and WebSocket -----------------------------------------------------------

    def test_sse_messages(self) -> None:
        self.fuzz(SseState("sse_messages", initialized=True))

    def test_sse_uninitialized(self) -> None:
        self.fuzz(SseState("sse_uninitialized", initialized=False))

    def test_websocket_2025_03_26(self) -> None:
        self.fuzz(WebSocketState("websocket_2025_03_26", version="2025-03-26"))

    def test_websocket_uninitialized(self) -> None:
        self.fuzz(WebSocketState("websocket_uninitialized", version=None))
