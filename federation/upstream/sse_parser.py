"""A small, strict parser for text/event-stream bodies (WHATWG server-sent events)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass


@dataclass
class ServerSentEvent:
    event: str = "message"
    data: str = ""
    id: str | None = None
    retry: int | None = None


async def iter_sse(lines: AsyncIterator[str], *, max_event_bytes: int = 64 * 1024 * 1024) -> AsyncIterator[ServerSentEvent]:
    """Yield events from an async iterator of lines (without line terminators).

    Raises:
        ValueError: one event grew past `max_event_bytes` (a runaway or hostile upstream).
    """
    event = "message"
    data: list[str] = []
    size = 0
    event_id: str | None = None
    retry: int | None = None
    async for line in lines:
        if line == "":
            if data:
                yield ServerSentEvent(event=event, data="\n".join(data), id=event_id, retry=retry)
            event, data, size, retry = "message", [], 0, None
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            size += len(value)
            if size > max_event_bytes:
                raise ValueError("server-sent event too large")
            data.append(value)
        elif name == "event":
            event = value or "message"
        elif name == "id":
            event_id = value
        elif name == "retry" and value.isdigit():
            retry = int(value)
    if data:
        yield ServerSentEvent(event=event, data="\n".join(data), id=event_id, retry=retry)
