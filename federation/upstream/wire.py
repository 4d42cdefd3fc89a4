"""The one parser for what upstream servers send, on every transport.

An upstream is outside the gateway's trust. Python's `json` recurses once per nesting level, so
one reply nested 50,000 deep raised `RecursionError` in the stdio reader, which died while the
child lived on: every later call to that peer timed out, for every user. Every transport
(stdio, Streamable HTTP and its event streams, legacy HTTP+SSE, WebSocket) therefore decodes
through `decode` and `check_message`:

1. the size is checked (`FEDMCP_UPSTREAM_MAX_MESSAGE_BYTES`);
2. the nesting depth is measured by a linear scan of the brackets outside strings, which never
   recurses (`FEDMCP_UPSTREAM_MAX_DEPTH`, 128 by default as serde_json's limit; the gateway
   re-encodes what it forwards, which recurses as deep again);
3. only then `json.loads` runs;
4. the envelope is checked: a method is a string, params an object, an id a string or an
   integer. Readers route messages by these fields (an id that is a list is not even hashable).

A refused message raises `UpstreamMessageError`, which carries the id of the call it answers
when that id can be read from the message's top level (`request_id`): the transport then fails
that one call (-32010 to its host) and goes on reading; the connection stays healthy.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

from django.conf import settings

from federation.upstream.base import JsonDict, UpstreamProtocolError

DEFAULT_MAX_DEPTH = 128
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = [0] * 256
_STEP[ord("[")] = _STEP[ord("{")] = 1
_STEP[ord("]")] = _STEP[ord("}")] = -1

ID_SCAN_BYTES = 64 * 1024
"""How much of a refused message's head is searched for its top-level id (the tail is tried too)."""
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"\s*:?|[\[\]{}]', re.DOTALL)
_ID_VALUE = re.compile(rb'\s*(-?(?:0|[1-9][0-9]{0,17})(?![0-9.eE])|"[^"\\]{0,256}")')
_TRAILING_ID = re.compile(rb'[,{]\s*"id"\s*:\s*(-?(?:0|[1-9][0-9]{0,17})|"[^"\\]{0,256}")\s*\}\s*$')


class UpstreamMessageError(UpstreamProtocolError):
    """An upstream message was refused; `request_id` names the call it answered, when known."""

    def __init__(self, description: str, request_id: int | str | None = None) -> None:
        super().__init__(description)
        self.request_id = request_id


def max_depth() -> int:
    return getattr(settings, "FEDMCP_UPSTREAM_MAX_DEPTH", DEFAULT_MAX_DEPTH)


def max_message_bytes() -> int:
    return getattr(settings, "FEDMCP_UPSTREAM_MAX_MESSAGE_BYTES", DEFAULT_MAX_MESSAGE_BYTES)


def is_valid_id(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def nesting_depth(data: bytes) -> int:
    """Return how deep arrays and objects nest in `data`, without recursion.

    Strings are cut out first (their brackets do not count), then only the brackets are kept;
    both run in C. Most messages have fewer brackets than any limit and stop there.
    """
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    openers = brackets.count(b"[") + brackets.count(b"{")
    if openers <= 1:
        return openers
    return max(accumulate(map(_STEP.__getitem__, brackets)))


def find_request_id(head: bytes, tail: bytes | None = None) -> int | str | None:
    """Return the top-level "id" of a message that could not be decoded, if it can be read.

    `head` is the message, or its start when `tail` is its end. Searches the head
    (`ID_SCAN_BYTES` of it: where the id usually is), then, where the head search did not reach
    the end, the message's last bytes (`... ,"id":7}`). Best effort: None when neither names a
    string or integer id.
    """
    depth = 0
    for token in _TOKEN.finditer(head, 0, ID_SCAN_BYTES):
        text = token.group()
        first = text[0]
        if first == 0x22:  # a string: a key when a colon follows
            if depth == 1 and text.endswith(b":") and text[:-1].rstrip() == b'"id"':
                value = _ID_VALUE.match(head, token.end())
                return _id_of(value.group(1)) if value else None
        elif first in b"[{":
            depth += 1
        else:
            depth -= 1
            if depth <= 0:
                return None
    if tail is None and len(head) <= ID_SCAN_BYTES:
        return None
    trailing = _TRAILING_ID.search((head if tail is None else tail)[-400:])
    return _id_of(trailing.group(1)) if trailing else None


def _id_of(raw: bytes) -> int | str | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if is_valid_id(value) else None


def decode(raw: bytes | str, *, peer: str) -> Any:
    """Decode one upstream message within the size and depth bounds.

    Raises:
        UpstreamMessageError: too large, nested too deeply, or not JSON.
    """
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    limit = max_message_bytes()
    if len(data) > limit:
        raise UpstreamMessageError(f"peer '{peer}' sent a message larger than {limit} bytes", find_request_id(data))
    depth, allowed = nesting_depth(data), max_depth()
    if depth > allowed:
        raise UpstreamMessageError(f"peer '{peer}' sent a message nested deeper than {allowed} levels", find_request_id(data))
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise UpstreamMessageError(f"peer '{peer}' sent malformed JSON", find_request_id(data)) from exc


def check_message(value: Any, *, peer: str) -> JsonDict:
    """Return `value` if it is a JSON-RPC message readers can route.

    Raises:
        UpstreamMessageError: not an object, or a method, params or id of the wrong type.
    """
    if not isinstance(value, dict):
        raise UpstreamMessageError(f"peer '{peer}' sent a JSON-RPC message that is not an object")
    request_id = value.get("id")
    known_id = request_id if is_valid_id(request_id) else None
    if "method" in value:
        if not isinstance(value["method"], str):
            raise UpstreamMessageError(f"peer '{peer}' sent a message whose method is not a string")
        if "id" in value and known_id is None:
            raise UpstreamMessageError(f"peer '{peer}' sent a request whose id is not a string or an integer")
        if value.get("params") is not None and not isinstance(value["params"], dict):
            raise UpstreamMessageError(f"peer '{peer}' sent {value['method'][:100]} with params that are not an object")
        return value
    if known_id is None:
        raise UpstreamMessageError(f"peer '{peer}' sent a response whose id is not a string or an integer")
    if "result" not in value and "error" not in value:
        raise UpstreamMessageError(f"peer '{peer}' sent a response with neither result nor error", known_id)
    if "error" in value and not isinstance(value["error"], dict):
        raise UpstreamMessageError(f"peer '{peer}' sent an error that is not an object", known_id)
    return value

