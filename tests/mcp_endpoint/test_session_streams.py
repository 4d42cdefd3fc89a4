"""Session streams: what reaches them, by which road, and when they send keepalives.

A legacy SSE stream or a WebSocket is its session's only stream: while this process holds it,
messages produced here go straight to it, not through the channel layer. Every other road
(another worker's group_send, catalog events, a Streamable HTTP GET stream) still goes through
the layer. The SSE tests at the end check the transport built on it: answers on the stream,
and a cancelled request that gets no answer.
"""

from __future__ import annotations

import asyncio
import json
import threading
from unittest import mock

from django.test import SimpleTestCase

from federation.events import CATALOG_GROUP
from fedmcp_lib.layers import InMemoryChannelLayer
from mcp_endpoint import streams
from mcp_endpoint.sessions import session_group
from mcp_endpoint.streams import SessionEvents, close_session_streams, send_to_session
from tests.base import FixturePeerTestCase, SseClient, request

WAIT = 2.0
HELLO = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "hello"}}


class CountingLayer(InMemoryChannelLayer):
    """The embedded layer, counting the group_sends it was asked for."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.group_sends: list[str] = []

    async def group_send(self, group: str, message: dict) -> None:  # type: ignore[override]
        self.group_sends.append(group)
        await super().group_send(group, message)


class FlakyLayer(CountingLayer):
    """Fails its first `failures` reads, as a channel layer whose Redis restarts does."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.joins: list[str] = []

    async def receive(self, channel: str) -> dict:  # type: ignore[override]
        if self.failures:
            self.failures -= 1
            raise ConnectionError("the channel layer went away")
        return await super().receive(channel)

    async def group_add(self, group: str, channel: str) -> None:
        self.joins.append(group)
        await super().group_add(group, channel)


class StreamTestCase(SimpleTestCase):
    layer: InMemoryChannelLayer

    def setUp(self) -> None:
        self.layer = CountingLayer()
        patcher = mock.patch("mcp_endpoint.streams.get_channel_layer", side_effect=lambda: self.layer)
        patcher.start()
        self.addCleanup(patcher.stop)

    def events(self, session_id: str = "s-1", *, keepalive: float = 30.0, sole: bool = True) -> SessionEvents:
        return SessionEvents(session_id, "", keepalive=keepalive, sole=sole)


class DeliveryTests(StreamTestCase):
    async def test_a_message_for_a_sole_stream_held_here_does_not_touch_the_layer(self) -> None:
        async with self.events() as events:
            stream = events.__aiter__()
            await send_to_session("s-1", HELLO)
            self.assertEqual(await asyncio.wait_for(anext(stream), WAIT), HELLO)
            await stream.aclose()
        self.assertEqual(self.layer.group_sends, [])

    async def test_the_message_delivered_here_is_the_one_sent(self) -> None:
        # No copy on this road: the stream writes what the sender built (senders build fresh messages).
        async with self.events() as events:
            stream = events.__aiter__()
            message = {"jsonrpc": "2.0", "id": 1, "result": {}}
            await send_to_session("s-1", message)
            self.assertIs(await asyncio.wait_for(anext(stream), WAIT), message)
            await stream.aclose()

    async def test_a_stream_that_is_not_its_sessions_only_one_is_reached_through_the_layer(self) -> None:
        # Streamable HTTP GET streams: another worker may hold one for the same session.
        async with self.events(sole=False) as events:
            stream = events.__aiter__()
            await send_to_session("s-1", HELLO)
            self.assertEqual(await asyncio.wait_for(anext(stream), WAIT), HELLO)
            await stream.aclose()
        self.assertEqual(self.layer.group_sends, [session_group("s-1")])

    async def test_messages_from_other_workers_still_arrive_in_order_with_local_ones(self) -> None:
        async with self.events() as events:
            stream = events.__aiter__()
            # Another worker's message arrives through the session's group.
            await self.layer.group_send(session_group("s-1"), {"type": "mcp.message", "message": {"n": 1}})
            self.assertEqual(await asyncio.wait_for(anext(stream), WAIT), {"n": 1})
            await send_to_session("s-1", {"n": 2})
            await self.layer.group_send(session_group("s-1"), {"type": "mcp.message", "message": {"n": 3}})
            await send_to_session("s-1", {"n": 4})
            received = [await asyncio.wait_for(anext(stream), WAIT) for _ in range(3)]
            self.assertEqual(sorted(m["n"] for m in received), [2, 3, 4])
            self.assertLess(received.index({"n": 2}), received.index({"n": 4}))
            await stream.aclose()

    async def test_catalog_events_still_arrive_through_the_layer(self) -> None:
        async with self.events() as events:
            stream = events.__aiter__()
            await self.layer.group_send(CATALOG_GROUP, {"type": "catalog.changed", "peer": "p", "kinds": ["tool"]})
            self.assertEqual(await asyncio.wait_for(anext(stream), WAIT), {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
            await stream.aclose()

    async def test_close_ends_a_stream_held_here(self) -> None:
        async with self.events() as events:
            stream = events.__aiter__()
            await send_to_session("s-1", HELLO)
            await close_session_streams("s-1")
            self.assertEqual(await asyncio.wait_for(anext(stream), WAIT), HELLO)
            with self.assertRaises(StopAsyncIteration):
                await asyncio.wait_for(anext(stream), WAIT)
        self.assertEqual(self.layer.group_sends, [])

    async def test_after_the_stream_closes_messages_go_to_the_layer(self) -> None:
        async with self.events():
            pass
        self.assertNotIn("s-1", streams._held_here)
        await send_to_session("s-1", HELLO)  # nobody listens: the layer keeps it until it expires
        self.assertEqual(self.layer.group_sends, [session_group("s-1")])

    async def test_a_sender_on_another_event_loop_goes_through_the_layer(self) -> None:
        async with self.events() as events:
            answers: list[bool] = []

            def elsewhere() -> None:
                async def deliver() -> None:
                    answers.append(events.deliver({"type": "mcp.message", "message": HELLO}))

                asyncio.run(deliver())

            thread = threading.Thread(target=elsewhere)
            thread.start()
            thread.join(WAIT)
            self.assertEqual(answers, [False])
            self.assertFalse(events._inbox)

    async def test_a_full_inbox_drops_what_does_not_fit_and_says_so(self) -> None:
        with mock.patch.object(streams, "INBOX_CAPACITY", 3):
            async with self.events() as events:
                with self.assertLogs("mcp_endpoint.streams", "WARNING") as logs:
                    for n in range(5):
                        await send_to_session("s-1", {"n": n})
                stream = events.__aiter__()
                self.assertEqual([await asyncio.wait_for(anext(stream), WAIT) for _ in range(3)], [{"n": 0}, {"n": 1}, {"n": 2}])
                await stream.aclose()
        self.assertEqual(len(logs.records), 2)
        self.assertIn("s-1", logs.output[0])

    async def test_a_failing_layer_is_read_again_and_the_stream_goes_on(self) -> None:
        self.layer = layer = FlakyLayer(failures=3)
        with mock.patch.object(streams, "LAYER_RETRY_SECONDS", 0.05), self.assertLogs("mcp_endpoint.streams", "WARNING") as logs:
            async with self.events() as events:
                stream = events.__aiter__()
                await send_to_session("s-1", {"n": 1})  # this process's messages go on meanwhile
                self.assertEqual(await asyncio.wait_for(anext(stream), WAIT), {"n": 1})
                while layer.failures:
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.1)
                await layer.group_send(session_group("s-1"), {"type": "mcp.message", "message": {"n": 2}})
                self.assertEqual(await asyncio.wait_for(anext(stream), WAIT), {"n": 2})
                await stream.aclose()
        self.assertEqual(len(logs.records), 2, logs.output)  # the first failure (not each retry), then the recovery
        self.assertIn("retrying", logs.output[0])
        self.assertIn("readable again after 3", logs.output[1])
        # Joined when the stream opened, and again before each read after a failure (a restarted Redis forgot them).
        self.assertEqual(layer.joins.count(session_group("s-1")), 4)


class KeepaliveTests(StreamTestCase):
    async def test_silence_gets_a_keepalive_and_messages_postpone_it(self) -> None:
        loop = asyncio.get_running_loop()
        async with self.events(keepalive=0.3) as events:
            stream = events.__aiter__()
            started = loop.time()
            for n in range(6):  # a message every 0.1 s for 0.6 s: never 0.3 s of silence
                await send_to_session("s-1", {"n": n})
                self.assertEqual(await asyncio.wait_for(anext(stream), WAIT), {"n": n})
                await asyncio.sleep(0.1)
            self.assertIsNone(await asyncio.wait_for(anext(stream), WAIT))
            quiet = loop.time() - started
            self.assertGreaterEqual(quiet, 0.6)
            before = loop.time()
            self.assertIsNone(await asyncio.wait_for(anext(stream), WAIT))
            self.assertAlmostEqual(loop.time() - before, 0.3, delta=0.15)
            await stream.aclose()

    async def test_leaving_stops_the_timer_and_the_reader(self) -> None:
        async with self.events(keepalive=0.05) as events:
            pass
        self.assertTrue(events._timer.cancelled())  # type: ignore[union-attr]
        await asyncio.sleep(0)
        self.assertTrue(events._reader.done())  # type: ignore[union-attr]


class SseTransportTests(FixturePeerTestCase):
    async def test_a_call_is_answered_on_the_stream(self) -> None:
        async with SseClient() as client:
            await client.initialize()
            posted = await client.post(request("tools/call", {"name": "everything__add", "arguments": {"a": 2, "b": 3}}, 10))
            self.assertEqual(posted.status, 202)
            answer = await client.reply_to(10, timeout=20)
        self.assertEqual(answer["result"]["content"][0]["text"], "5")

    async def test_a_cancelled_request_gets_no_answer_and_the_upstream_stops(self) -> None:
        async with SseClient() as client:
            await client.initialize()
            before = await self.cancelled_on_upstream(client)
            params = {"name": "everything__slow_echo", "arguments": {"text": "x", "delay_ms": 20000}, "_meta": {"progressToken": "slow"}}
            self.assertEqual((await client.post(request("tools/call", params, "slow-1"))).status, 202)
            seen = [await self.next_message(client)]
            self.assertEqual(seen[0]["method"], "notifications/progress")  # the call reached the upstream
            cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": "slow-1", "reason": "test"}}
            self.assertEqual((await client.post(cancel)).status, 202)
            for _ in range(100):
                if await self.cancelled_on_upstream(client, seen) > before:
                    break
                await asyncio.sleep(0.1)
            else:
                self.fail("the upstream call was not cancelled")
            self.assertFalse([m for m in seen if m.get("id") == "slow-1"], f"a cancelled request must get no response: {seen}")

    async def cancelled_on_upstream(self, client: SseClient, seen: list | None = None) -> int:
        request_id = client.next_id()
        await client.post(request("tools/call", {"name": "everything__stats", "arguments": {}}, request_id))
        while True:
            message = await self.next_message(client)
            if message.get("id") == request_id and "method" not in message:
                return json.loads(message["result"]["content"][0]["text"])["slow_echo_cancelled"]
            if seen is not None:
                seen.append(message)

    async def next_message(self, client: SseClient) -> dict:
        message = await client._exchange.next_event(20)  # type: ignore[union-attr]
        assert message is not None, "the stream ended"
        return message
