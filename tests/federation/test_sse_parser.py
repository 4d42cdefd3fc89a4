"""The text/event-stream parser used on upstream responses and streams."""

from __future__ import annotations

from collections.abc import AsyncIterator

from django.test import SimpleTestCase

from federation.upstream.sse_parser import ServerSentEvent, iter_sse


async def lines_of(text: str) -> AsyncIterator[str]:
    for line in text.split("\n"):
        yield line


async def parse(text: str, **kwargs: int) -> list[ServerSentEvent]:
    return [event async for event in iter_sse(lines_of(text), **kwargs)]


class SseParserTests(SimpleTestCase):
    async def test_it_reads_one_event_per_blank_line(self) -> None:
        events = await parse('event: message\ndata: {"a":1}\n\ndata: {"b":2}\n\n')

        self.assertEqual(events, [ServerSentEvent(data='{"a":1}'), ServerSentEvent(data='{"b":2}')])

    async def test_it_joins_data_lines_with_newlines(self) -> None:
        events = await parse("data: first\ndata: second\ndata:third\n\n")

        self.assertEqual([e.data for e in events], ["first\nsecond\nthird"])

    async def test_only_one_leading_space_is_removed(self) -> None:
        events = await parse("data:  indented\n\n")

        self.assertEqual(events[0].data, " indented")

    async def test_it_skips_comments_and_events_without_data(self) -> None:
        events = await parse(": stream open\n\n: keepalive\n\nevent: ping\n\nid: 7\n\ndata: x\n\n")

        self.assertEqual([e.data for e in events], ["x"])

    async def test_it_keeps_the_event_name_id_and_retry(self) -> None:
        events = await parse("event: endpoint\nid: 42\nretry: 3000\ndata: /messages/?s=1\n\ndata: next\n\n")

        self.assertEqual(
            events[0], ServerSentEvent(event="endpoint", data="/messages/?s=1", id="42", retry=3000)
        )
        # The event name and retry belong to one event; the last event id carries on.
        self.assertEqual(events[1], ServerSentEvent(event="message", data="next", id="42", retry=None))

    async def test_it_ignores_a_retry_that_is_not_a_number_and_unknown_fields(self) -> None:
        events = await parse("retry: soon\nfoo: bar\ndata: x\n\n")

        self.assertEqual(events, [ServerSentEvent(data="x")])

    async def test_an_empty_event_name_means_message(self) -> None:
        events = await parse("event:\ndata: x\n\n")

        self.assertEqual(events[0].event, "message")

    async def test_a_field_without_a_colon_has_an_empty_value(self) -> None:
        events = await parse("data\n\n")

        self.assertEqual(events, [ServerSentEvent(data="")])

    async def test_it_yields_a_last_event_that_has_no_blank_line_after_it(self) -> None:
        events = await parse("data: cut short")

        self.assertEqual([e.data for e in events], ["cut short"])

    async def test_it_refuses_an_event_larger_than_the_limit(self) -> None:
        with self.assertRaises(ValueError):
            await parse("data: " + "x" * 60 + "\ndata: " + "y" * 60 + "\n\n", max_event_bytes=100)

    async def test_the_limit_applies_per_event(self) -> None:
        events = await parse(("data: " + "x" * 60 + "\n\n") * 5, max_event_bytes=100)

        self.assertEqual(len(events), 5)
