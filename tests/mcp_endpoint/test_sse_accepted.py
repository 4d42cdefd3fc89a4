"""Legacy SSE: every request accepted with 202 gets an answer or an error on its stream.

The stream's side (`SessionEvents`): another worker announces the requests it accepted for
this stream (`mcp.accepted`) and renews them while it works; one whose lease runs out without a
reply is answered -32603 `worker_lost` by the stream itself. Leases are fractions of a second
here, and ordering, not timing, shows what did not happen: an error for a request that was
answered would arrive before the error of a request announced later with a longer lease.

The POST's side, through the ASGI app: a POST for a stream this process does not hold is
refused (HTTP 503) when the channel layer cannot take the announcement (a Redis layer on a port
nothing listens on); a request cancelled by the worker's shutdown is answered `worker_shutdown`.
The killed worker itself is tests/e2e/test_sse_no_silent_loss.py.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from unittest import mock

from asgiref.sync import sync_to_async
from channels_redis.core import RedisChannelLayer

from fedmcp_lib import observability
from identity.hostauth.tokens import Identity, authenticate
from mcp_endpoint import jsonrpc, sessions
from mcp_endpoint.consumers.sse import LAYER_UNAVAILABLE_REASON, SHUTDOWN_REASON
from mcp_endpoint.sessions import session_group
from mcp_endpoint.streams import WORKER_LOST_REASON
from tests.base import FixturePeerTestCase, SseClient, audience, http, request
from tests.e2e.harness import free_port
from tests.mcp_endpoint.test_session_streams import HELLO, WAIT, StreamTestCase


def reply(request_id: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "result": {"content": []}}


class AcceptedElsewhereTests(StreamTestCase):
    async def announce(self, kind: str, *ids: Any, lease: float = 0.2) -> None:
        await self.layer.group_send(session_group("s-1"), {"type": kind, "ids": list(ids), "lease": lease})

    async def from_layer(self, message: dict[str, Any]) -> None:
        await self.layer.group_send(session_group("s-1"), {"type": "mcp.message", "message": message})

    async def test_a_request_whose_worker_goes_silent_is_answered_worker_lost(self) -> None:
        async with self.events() as events:
            stream = events.__aiter__()
            await self.announce("mcp.accepted", 7, "x")

            answers = [await asyncio.wait_for(anext(stream), WAIT) for _ in range(2)]

            assert sorted(json.dumps(a["id"]) for a in answers) == ['"x"', "7"]
            assert all(a["error"]["code"] == jsonrpc.INTERNAL_ERROR and a["error"]["data"] == {"reason": WORKER_LOST_REASON} for a in answers)
            await stream.aclose()

    async def test_a_reply_in_time_is_passed_on_and_no_error_follows_for_it(self) -> None:
        async with self.events() as events:
            stream = events.__aiter__()
            await self.announce("mcp.accepted", 1, lease=0.1)
            await self.from_layer(reply(1))
            assert await asyncio.wait_for(anext(stream), WAIT) == reply(1)
            await self.announce("mcp.accepted", 2, lease=0.4)

            assert (await asyncio.wait_for(anext(stream), WAIT))["id"] == 2
            await stream.aclose()

    async def test_renewals_keep_a_request_waiting_for_its_reply(self) -> None:
        async with self.events() as events:
            stream = events.__aiter__()
            await self.announce("mcp.accepted", 1, lease=0.1)
            await self.announce("mcp.renewed", 1, lease=30)
            await self.announce("mcp.accepted", 2, lease=0.3)

            assert (await asyncio.wait_for(anext(stream), WAIT))["error"]["data"] == {"reason": WORKER_LOST_REASON}
            await self.from_layer(reply(1))
            assert await asyncio.wait_for(anext(stream), WAIT) == reply(1)
            await stream.aclose()

    async def test_a_renewal_that_crossed_the_reply_does_not_bring_the_request_back(self) -> None:
        async with self.events() as events:
            stream = events.__aiter__()
            await self.announce("mcp.accepted", 1, lease=30)
            await self.from_layer(reply(1))
            await self.announce("mcp.renewed", 1, lease=0.05)
            await self.announce("mcp.accepted", 2, lease=0.4)

            assert await asyncio.wait_for(anext(stream), WAIT) == reply(1)
            assert (await asyncio.wait_for(anext(stream), WAIT))["id"] == 2
            await stream.aclose()

    async def test_a_request_the_host_cancelled_is_not_answered(self) -> None:
        async with self.events() as events:
            stream = events.__aiter__()
            await self.announce("mcp.accepted", 1, lease=0.1)
            await self.layer.group_send(session_group("s-1"), {"type": "mcp.settled", "ids": [1]})
            await self.announce("mcp.accepted", 2, lease=0.4)

            assert (await asyncio.wait_for(anext(stream), WAIT))["id"] == 2
            await stream.aclose()

    async def test_a_reply_after_the_worker_lost_error_is_dropped(self) -> None:
        async with self.events() as events:
            stream = events.__aiter__()
            await self.announce("mcp.accepted", 1, lease=0.05)
            assert (await asyncio.wait_for(anext(stream), WAIT))["error"]["data"] == {"reason": WORKER_LOST_REASON}
            await self.from_layer(reply(1))
            await self.from_layer(HELLO)

            assert await asyncio.wait_for(anext(stream), WAIT) == HELLO
            await stream.aclose()


def unreachable_redis_layer() -> RedisChannelLayer:
    """A real Redis channel layer whose server is down (nothing listens on its port)."""
    return RedisChannelLayer(hosts=[{"address": f"redis://127.0.0.1:{free_port()}", "socket_connect_timeout": 2.0}])


class SsePostTests(FixturePeerTestCase):
    async def test_with_the_channel_layer_down_a_post_for_a_stream_on_another_worker_is_refused_at_once(self) -> None:
        identity = await self.identity()
        session = await sessions.session_create(transport="sse", scope="", identity=identity)  # its stream is on "another worker"
        body = json.dumps(request("tools/call", {"name": "everything__add", "arguments": {"a": 1, "b": 2}}, 5)).encode()
        headers = {"content-type": "application/json"}

        # The roads to other workers' streams (the rest of the process keeps its in-memory layer).
        with mock.patch("mcp_endpoint.streams.get_channel_layer", return_value=unreachable_redis_layer()):
            posted = await http("POST", f"/messages/?session_id={session.id}", body, headers)

        assert posted.status == 503, posted
        answer = posted.json()
        assert answer["id"] == 5 and answer["error"]["code"] == jsonrpc.INTERNAL_ERROR
        assert answer["error"]["data"]["reason"] == LAYER_UNAVAILABLE_REASON
        assert posted.headers["retry-after"] == "5"

    async def test_a_request_cancelled_by_the_workers_shutdown_is_answered_worker_shutdown(self) -> None:
        async with SseClient() as client:
            await client.initialize()
            params = {"name": "everything__slow_echo", "arguments": {"text": "x", "delay_ms": 20000}, "_meta": {"progressToken": "p"}}
            assert (await client.post(request("tools/call", params, "slow"))).status == 202
            progress = await client._exchange.next_event(20)  # type: ignore[union-attr]
            assert progress is not None and progress["method"] == "notifications/progress"  # the call runs upstream

            # What the shutdown does (fedmcp_site/runtime/lifecycle.py release_worker).
            for task in observability.in_flight_tasks():
                task.cancel()

            answer = await client.reply_to("slow", timeout=20)
        assert answer["error"]["code"] == jsonrpc.INTERNAL_ERROR and answer["error"]["data"] == {"reason": SHUTDOWN_REASON}

    async def identity(self) -> Identity:
        return await authenticate(self.token, await sync_to_async(audience)())
