"""The shared parser of upstream messages (federation/upstream/wire.py), case by case."""

from __future__ import annotations

import pytest

from federation.upstream.wire import UpstreamMessageError, check_message, decode, find_request_id, nesting_depth


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        (b"1", 0),
        (b"[]", 1),
        (b'{"a":[1,{"b":[]}]}', 4),
        (b'{"a":"[[[[{{{{"}', 1),
        (b'{"a":"\\"[[[[\\\\"}', 1),
        (b"[" * 50_000 + b"]" * 50_000, 50_000),
        (b"[" + b"[]," * 1000 + b"[]]", 2),
    ],
)
def test_nesting_depth_counts_brackets_outside_strings(text: bytes, depth: int) -> None:
    assert nesting_depth(text) == depth


def test_a_deep_message_is_refused_without_recursion_and_names_its_call() -> None:
    deep = b'{"jsonrpc":"2.0","id":"call-7","result":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(UpstreamMessageError) as caught:
        decode(deep, peer="p")
    assert caught.value.request_id == "call-7"
    assert "nested deeper than 128 levels" in str(caught.value)


@pytest.mark.parametrize(
    ("text", "request_id"),
    [
        (b'{"jsonrpc":"2.0","id":12,"result":[[[', 12),
        (b'{"result":{"id":5,"x":[[[]]]},"id":6}', 6),
        (b'{"result":{"id":5,"x":' + b"[" * 70_000 + b"]" * 70_000 + b'},"id":6}', 6),
        (b'{"result":{"id":5}', None),
        (b'{"a":"\\"id\\":3","result":[[', None),
        (b'{"id":[1],"result":[[', None),
        (b'{"id":true}', None),
    ],
)
def test_only_a_top_level_string_or_integer_id_is_recovered(text: bytes, request_id: object) -> None:
    assert find_request_id(text) == request_id


def test_a_large_flat_message_with_brackets_in_strings_is_accepted_whole() -> None:
    # Half a million shallow objects whose strings hold brackets: the depth scan must neither
    # count the brackets inside strings nor refuse the message. (How fast it scans is for a
    # benchmark, not a test.)
    message = b'{"jsonrpc":"2.0","id":1,"result":{"items":[' + b",".join([b'{"k":"v[]{}"}'] * 500_000) + b"]}}"
    decoded = decode(message, peer="p")
    assert decoded["id"] == 1
    assert len(decoded["result"]["items"]) == 500_000


@pytest.mark.parametrize(
    "message",
    [
        [],
        {"jsonrpc": "2.0", "method": 5},
        {"jsonrpc": "2.0", "method": "notifications/progress", "params": "nope"},
        {"jsonrpc": "2.0", "id": [1], "method": "ping"},
        {"jsonrpc": "2.0", "id": [1], "result": {}},
        {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "x"}},
        {"jsonrpc": "2.0", "id": 1, "error": "boom"},
        {"jsonrpc": "2.0", "id": 1},
    ],
)
def test_messages_readers_cannot_route_are_refused(message: object) -> None:
    with pytest.raises(UpstreamMessageError):
        check_message(message, peer="p")
