"""The audit trail of forwarded calls, written off the response path, in batches.

`audit_record` builds the event in memory and queues it; a writer task per worker saves what
has gathered with one `bulk_create` (one trip to the database thread, one commit) every
FEDMCP_AUDIT_FLUSH_INTERVAL seconds, or at once when FEDMCP_AUDIT_BATCH_SIZE events wait.
A host never waits for the audit insert.

Nothing is dropped: a batch the database refuses is retried one event at a time, and each
event that still fails is logged in full. `audit_flush` writes everything recorded so far and
returns when it is in the database; the worker's shutdown (fedmcp_site/lifecycle.py
`release_worker`) awaits it, and so can tests and readers that need the rows now.
"""

from __future__ import annotations

import asyncio
import logging

from channels.db import database_sync_to_async
from django.conf import settings

from identity.models import AuditEvent
from identity.tokens import Identity

logger = logging.getLogger(__name__)


class _Writer:
    """The queue of unsaved events and the task that saves them, bound to one event loop."""

    def __init__(self) -> None:
        self.queue: list[AuditEvent] = []
        self.in_flight = 0
        self.saving: set[asyncio.Future[None]] = set()
        self.task: asyncio.Task[None] | None = None
        self.wake: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def pending(self) -> int:
        return len(self.queue) + self.in_flight

    def add(self, event: AuditEvent) -> None:
        self.queue.append(event)
        loop = asyncio.get_running_loop()
        if self.task is None or self.task.done() or self.loop is not loop:
            # (A new loop: a test or a command; a task on a closed loop never runs again.)
            self.loop = loop
            self.wake = asyncio.Event()
            self.task = loop.create_task(self._run())
        elif len(self.queue) >= batch_size():
            self.wake.set()  # type: ignore[union-attr]

    async def _run(self) -> None:
        while self.queue:
            if len(self.queue) < batch_size():
                # Let a batch gather; a full batch or a flush wakes the writer early.
                assert self.wake is not None
                try:
                    await asyncio.wait_for(self.wake.wait(), flush_interval())
                except TimeoutError:
                    pass
                self.wake.clear()
            await self.write_some()

    async def write_some(self) -> None:
        batch = self.queue[: batch_size()]
        del self.queue[: len(batch)]
        if not batch:
            return
        self.in_flight += len(batch)
        saving = asyncio.ensure_future(_save_batch(batch))
        self.saving.add(saving)

        def done(future: asyncio.Future[None]) -> None:
            self.in_flight -= len(batch)
            self.saving.discard(future)

        saving.add_done_callback(done)
        # Shielded: a writer cancelled at shutdown still finishes the batch it took.
        await asyncio.shield(saving)

    async def flush(self) -> None:
        taken = [f for f in self.saving if f.get_loop() is asyncio.get_running_loop()]
        while self.queue:
            await self.write_some()
        if taken:
            # Batches the writer took before this call may still be on their way.
            await asyncio.gather(*taken, return_exceptions=True)


_writer = _Writer()


def flush_interval() -> float:
    return float(getattr(settings, "FEDMCP_AUDIT_FLUSH_INTERVAL", 0.05))


def batch_size() -> int:
    return max(1, int(getattr(settings, "FEDMCP_AUDIT_BATCH_SIZE", 500)))


def audit_record(
    *,
    identity: Identity | None,
    peer: str,
    method: str,
    name: str,
    error_code: int | None,
    latency_ms: float,
    via: list[str] | tuple[str, ...] = (),
    decision: str = "",
) -> None:
    """Record one forwarded call (`error_code` None means it succeeded), without waiting."""
    event = AuditEvent(
        user_id=identity.user_id if identity else None,
        username=identity.username if identity else "",
        federated_issuer=identity.federated_issuer if identity else "",
        federated_subject=identity.federated_subject if identity else "",
        client_id=identity.client_id if identity else "",
        via=list(via or (identity.via if identity else ())),
        peer=peer,
        method=method,
        name=name[:2000],
        outcome="ok" if error_code is None else "error",
        error_code=error_code,
        decision=decision,
        latency_ms=round(latency_ms, 3),
    )
    _writer.add(event)


def audit_pending() -> int:
    """How many recorded events this worker has not finished writing."""
    return _writer.pending()


async def audit_flush() -> None:
    """Write every audit event recorded so far; return once they are in the database."""
    await _writer.flush()


@database_sync_to_async
def _save_batch(batch: list[AuditEvent]) -> None:
    try:
        AuditEvent.objects.bulk_create(batch)
        return
    except Exception:
        logger.exception("could not write %d audit events in one batch; writing them one by one", len(batch))
    for event in batch:
        try:
            event.pk = None
            event._state.adding = True
            event.save()
        except Exception:
            logger.exception("could not write the audit event %s", event)


def audit_reset() -> list[AuditEvent]:
    """Start over with an empty queue; return the events that were still waiting.

    For tests between cases: a finished case's event loop is gone, and its unwritten events
    belong to its own (rolled-back) database transaction.
    """
    global _writer
    waiting, _writer = _writer.queue, _Writer()
    return waiting
