"""The audit trail of forwarded calls, written off the response path, in batches.

`audit_record` builds the event in memory (a `PendingEvent`, a plain tuple: a model instance
costs ten times as much to build) and queues it; a writer task per worker saves what has
gathered with one prepared `INSERT` run over the batch (`executemany`; on PostgreSQL one `COPY`:
one trip to the database thread, one transaction, one commit) every FEDMCP_AUDIT_FLUSH_INTERVAL
seconds, or at once when FEDMCP_AUDIT_BATCH_SIZE events wait. A host never waits for the audit
insert. (Django's `bulk_create` built the SQL again for every row and field: 9-15% of a busy
worker.)

Nothing is dropped:

* the database unreachable (an outage, a restart): the batch goes back to the front of the
  queue and the writer tries again with a growing pause (up to 30 s), so calls served from
  the workers' caches during the outage are audited once it is back. The queue is bounded by
  FEDMCP_AUDIT_MAX_PENDING; past it the oldest events are logged in full and dropped;
* a batch the database refuses for another reason (a row it will not take) is retried one
  event at a time, and each event that still fails is logged in full.

Each event carries the time it was recorded, not the time it was written. `audit_flush`
writes everything recorded so far and returns when it is in the database (or, while the
database is unreachable, after one attempt, keeping the events queued); the worker's shutdown
(fedmcp_site/runtime/lifecycle.py `release_worker`) awaits it and logs in full what could not be
written, and tests and readers that need the rows now await it too. An event recorded even
later (a request that arrived on a kept-alive connection while the worker was being released)
is written by `audit_write_remaining`, the last thing the worker does before it exits.

A worker that is killed (SIGKILL, a crash, the OOM killer) loses what it had queued. So a call
that goes upstream first commits an intent row (`audit_intent`, an `AuditIntent`: the event's
fields known before the call), and its event deletes it in the transaction that writes it. The
intents are written with group commit: the calls that arrive while one insert runs share the
next, so an idle worker pays one insert per call and a busy one far less; the completed event
stays off the response path. The worker renews its intents' leases (`audit_upkeep`, every
third of FEDMCP_AUDIT_INTENT_LEASE); an intent whose lease has run out belongs to a worker that
died, and any worker's upkeep writes its event with the outcome `interrupted`. Every call the
upstream may have run has its row: how it ended, or that its worker ended first. While the
database is unreachable calls go on without intents (as they did before intents existed;
trying again after a growing pause), audited from memory as above.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import InterfaceError, OperationalError, connections, router, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.utils import timezone

from identity.call_digest import arguments_hash
from identity.hostauth.tokens import Identity
from identity.models import AuditEvent, AuditIntent

logger = logging.getLogger(__name__)

RETRY_PAUSE_MAX = 30.0
"""Seconds between attempts while the database is unreachable, at most."""


class PendingEvent(NamedTuple):
    """An audit event not written yet: `AuditEvent`'s fields (attribute names), nothing else."""

    at: datetime
    user_id: int | None
    username: str
    federated_issuer: str
    federated_subject: str
    client_id: str
    via: list[str]
    peer: str
    method: str
    name: str
    outcome: str
    error_code: int | None
    decision: str
    latency_ms: float
    arguments_hash: str = ""
    intent: str | None = None
    """The id of the call's `AuditIntent`, deleted when this event is written (None: it has none)."""

    def model(self) -> AuditEvent:
        """The unsaved `AuditEvent` with these values."""
        values = self._asdict()
        del values["intent"]
        return AuditEvent(**values)


class _Writer:
    """The queue of unsaved events and the task that saves them, bound to one event loop."""

    def __init__(self) -> None:
        self.queue: list[PendingEvent] = []
        self.in_flight = 0
        self.saving: set[asyncio.Future[None]] = set()
        self.task: asyncio.Task[None] | None = None
        self.wake: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.failures = 0
        """Consecutive attempts that found the database unreachable."""

    def pending(self) -> int:
        return len(self.queue) + self.in_flight

    def add(self, event: PendingEvent) -> None:
        self.queue.append(event)
        excess = len(self.queue) - max_pending()
        if excess > 0:
            dropped = self.queue[:excess]
            del self.queue[:excess]
            for old in dropped:
                logger.error("audit queue full (FEDMCP_AUDIT_MAX_PENDING): dropping the oldest event %s", describe(old))
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
            if self.failures:
                # The database was unreachable: wait before trying again (a flush may not).
                await asyncio.sleep(min(RETRY_PAUSE_MAX, 0.25 * 2 ** min(self.failures, 8)))
            elif len(self.queue) < batch_size():
                # Let a batch gather; a full batch or a flush wakes the writer early.
                assert self.wake is not None
                try:
                    await asyncio.wait_for(self.wake.wait(), flush_interval())
                except TimeoutError:
                    pass
                self.wake.clear()
            await self.write_some()

    async def write_some(self) -> bool:
        """Write the next batch; return False if the database was unreachable (the batch is queued again)."""
        batch = self.queue[: batch_size()]
        del self.queue[: len(batch)]
        if not batch:
            return True
        self.in_flight += len(batch)
        saving = asyncio.ensure_future(_save_batch(batch))
        self.saving.add(saving)

        def done(future: asyncio.Future[list[PendingEvent]]) -> None:
            self.in_flight -= len(batch)
            self.saving.discard(future)
            unsaved = [] if future.cancelled() or future.exception() else future.result()
            _intents.finished(batch, unsaved)
            if unsaved:
                # Back to the front, in order, ahead of what was recorded meanwhile.
                self.queue[:0] = unsaved
                self.failures += 1
            else:
                self.failures = 0

        saving.add_done_callback(done)
        # Shielded: a writer cancelled at shutdown still finishes the batch it took.
        await asyncio.shield(saving)
        return not self.failures

    async def flush(self) -> None:
        taken = [f for f in self.saving if f.get_loop() is asyncio.get_running_loop()]
        if taken:
            # Batches the writer took before this call may still be on their way.
            await asyncio.gather(*taken, return_exceptions=True)
        attempts = len(self.queue) // batch_size() + 1
        while self.queue and attempts > 0:
            attempts -= 1
            if not await self.write_some():
                break  # the database is unreachable: the events stay queued for the writer
        if self.queue and (self.task is None or self.task.done()) and self.loop is asyncio.get_running_loop():
            self.task = self.loop.create_task(self._run())


_writer = _Writer()


# --- intents: a call's row is committed before its upstream is called ------------------------------


class Intent(NamedTuple):
    """A call about to be sent upstream (`audit_intent`): its id, and whether its row is committed."""

    id: str
    committed: asyncio.Future[bool]

    async def written(self) -> bool:
        """Wait until the intent row is committed; False if it could not be (the database is unreachable)."""
        # Shielded: a call cancelled meanwhile still completes the intent when it records its event.
        return await asyncio.shield(self.committed)


class _Intents:
    """Intent rows to write, as few trips to the database as the calls allow, and those to renew.

    Group commit: the calls that arrive while one batch is being written go in the next, so a
    busy worker pays one insert for many calls and an idle one a single insert per call.
    """

    def __init__(self) -> None:
        self.queue: dict[str, dict[str, Any]] = {}
        self.waiters: dict[str, asyncio.Future[bool]] = {}
        self.live: set[str] = set()
        """Intents of this worker whose event is not written yet: the upkeep renews their leases."""
        self.task: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.failures = 0
        self.skip_until = 0.0

    def add(self, intent_id: str, event: dict[str, Any]) -> Intent:
        loop = asyncio.get_running_loop()
        committed: asyncio.Future[bool] = loop.create_future()
        if loop.time() < self.skip_until:
            # The database was just found unreachable: the call goes on, audited in memory as
            # before intents existed (the outage path of the module docstring), not each one
            # waiting for a connect timeout.
            committed.set_result(False)
            return Intent(intent_id, committed)
        self.queue[intent_id] = event
        self.waiters[intent_id] = committed
        self.live.add(intent_id)
        if self.task is None or self.task.done() or self.loop is not loop:
            self.loop = loop
            self.task = loop.create_task(self._run())
        return Intent(intent_id, committed)

    async def _run(self) -> None:
        assert self.loop is not None
        while self.queue:
            batch, self.queue = self.queue, {}
            try:
                await _insert_intents(batch)
                written = True
                self.failures = 0
            except (OperationalError, InterfaceError) as exc:
                written = False
                self.failures += 1
                self.skip_until = self.loop.time() + min(RETRY_PAUSE_MAX, 0.25 * 2 ** min(self.failures, 8))
                logger.warning("database unreachable: %d calls go upstream without an audit intent (%s)", len(batch), exc)
            except Exception:
                written = False
                logger.exception("could not write %d audit intents; their calls go upstream without one", len(batch))
            for intent_id in batch:
                if not written:
                    self.live.discard(intent_id)
                waiter = self.waiters.pop(intent_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(written)

    def complete(self, intent: Intent | None) -> str | None:
        """The intent id the call's event deletes when written (None: no row was or will be written)."""
        if intent is None:
            return None
        if self.queue.pop(intent.id, None) is not None:
            # Never sent to the database (the call ended first, cancelled): nothing to delete.
            self.live.discard(intent.id)
            waiter = self.waiters.pop(intent.id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(False)
            return None
        return intent.id

    def finished(self, batch: list[PendingEvent], unsaved: list[PendingEvent]) -> None:
        """Events of `batch` not in `unsaved` were written, and their intents deleted: stop renewing them."""
        left = {event.intent for event in unsaved}
        for event in batch:
            if event.intent is not None and event.intent not in left:
                self.live.discard(event.intent)


_intents = _Intents()


def intent_lease() -> float:
    return float(getattr(settings, "FEDMCP_AUDIT_INTENT_LEASE", 60.0))


def audit_intent(
    *,
    identity: Identity | None,
    peer: str,
    method: str,
    name: str,
    via: list[str] | tuple[str, ...] = (),
    decision: str = "",
    arguments: Any = None,
) -> Intent:
    """Start writing the intent row of a call about to be sent upstream; await `written()` before sending it.

    Its event (`audit_record(intent=…)`) deletes it in the same transaction. If the worker ends
    first, the row outlives its lease and `audit_upkeep` writes the event as `interrupted`.
    """
    who, via = _who(identity, via)
    event = PendingEvent(
        timezone.now(), *who, via, peer, method, name[:2000], AuditEvent.Outcome.INTERRUPTED.value, None, decision, 0.0,
        "" if arguments is None else arguments_hash(arguments),
    )._asdict()
    del event["intent"]
    event["at"] = event["at"].isoformat()
    return _intents.add(uuid.uuid4().hex, event)


@database_sync_to_async
def _insert_intents(batch: dict[str, dict[str, Any]]) -> None:
    """Insert the intent rows of `batch` (id -> event fields) in one transaction (sync: the database thread).

    Raises:
        DatabaseError: as the driver raised it (OperationalError/InterfaceError: unreachable).
    """
    alias = router.db_for_write(AuditIntent)
    connection = connections[alias]
    meta = AuditIntent._meta
    fields = [meta.get_field("id"), meta.get_field("lease_until"), meta.get_field("event")]
    quote = connection.ops.quote_name
    sql = "INSERT INTO {} ({}) VALUES (%s, %s, %s)".format(quote(meta.db_table), ", ".join(quote(f.column) for f in fields))
    lease_until = timezone.now() + timedelta(seconds=intent_lease())
    rows = [
        [field.get_db_prep_save(value, connection=connection) for field, value in zip(fields, (intent_id, lease_until, event), strict=True)]
        for intent_id, event in batch.items()
    ]
    with transaction.atomic(using=alias, savepoint=False), connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            # Committed without waiting for the WAL to reach disk (~1 ms on a VM, on every call):
            # the row is in the server, visible to every worker, the moment the commit returns, so
            # a killed *worker* loses nothing; only a crash of PostgreSQL itself could lose the
            # last few intents (the calls' events are written normally, in their batches).
            cursor.execute("SET LOCAL synchronous_commit TO OFF")
        cursor.executemany(sql, rows)


def _delete_intents(intent_ids: list[str], connection: BaseDatabaseWrapper, cursor: Any) -> None:
    field = AuditIntent._meta.get_field("id")
    quote = connection.ops.quote_name
    for start in range(0, len(intent_ids), 500):
        chunk = intent_ids[start : start + 500]
        cursor.execute(
            "DELETE FROM {} WHERE {} IN ({})".format(quote(AuditIntent._meta.db_table), quote(field.column), ", ".join(["%s"] * len(chunk))),
            [field.get_db_prep_value(intent_id, connection) for intent_id in chunk],
        )


def audit_intent_live() -> int:
    """How many of this worker's intents wait for their event (their leases are renewed)."""
    return len(_intents.live)


async def audit_upkeep() -> dict[str, int]:
    """Renew the leases of this worker's intents; write the events of intents whose lease ran out as `interrupted`.

    Returns how many rows each step changed (for tests and the log).
    """
    return await _upkeep(list(_intents.live))


@database_sync_to_async
def _upkeep(live: list[str]) -> dict[str, int]:
    now = timezone.now()
    renewed = 0
    for start in range(0, len(live), 500):
        renewed += AuditIntent.objects.filter(pk__in=live[start : start + 500]).update(lease_until=now + timedelta(seconds=intent_lease()))
    interrupted = 0
    user_model = AuditEvent._meta.get_field("user").related_model
    for intent in AuditIntent.objects.lease_expired().order_by("lease_until")[:1000]:
        with transaction.atomic():
            # Another worker's upkeep may have taken it: only the one whose delete found it writes the event.
            if not AuditIntent.objects.filter(pk=intent.pk).delete()[0]:
                continue
            event = PendingEvent(**{**intent.event, "at": datetime.fromisoformat(intent.event["at"])})
            # The time from the call's start until it was found interrupted (its real length is unknown).
            event = event._replace(latency_ms=round((now - event.at).total_seconds() * 1000, 3))
            if event.user_id is not None and not user_model._default_manager.filter(pk=event.user_id).exists():
                event = event._replace(user_id=None)  # the user was deleted meanwhile (the FK is SET_NULL)
            event.model().save()
            logger.warning("audit: call interrupted by the end of its worker: %s", describe(event))
            interrupted += 1
    return {"renewed": renewed, "interrupted": interrupted}


async def _upkeep_loop() -> None:
    while True:
        try:
            await audit_upkeep()
        except asyncio.CancelledError:
            raise
        except (OperationalError, InterfaceError):
            logger.warning("audit upkeep skipped: database unreachable", exc_info=True)
        except Exception:
            logger.exception("audit upkeep failed")
        await asyncio.sleep(intent_lease() / 3)


_upkeep_started: set[int] = set()


def ensure_audit_upkeep() -> None:
    """Start this worker's audit upkeep (at once: intents a killed worker left are found), once per event loop."""
    loop = asyncio.get_running_loop()
    if id(loop) not in _upkeep_started:
        _upkeep_started.add(id(loop))
        loop.create_task(_upkeep_loop())


def flush_interval() -> float:
    return float(getattr(settings, "FEDMCP_AUDIT_FLUSH_INTERVAL", 0.05))


def batch_size() -> int:
    return max(1, int(getattr(settings, "FEDMCP_AUDIT_BATCH_SIZE", 500)))


def max_pending() -> int:
    return max(1, int(getattr(settings, "FEDMCP_AUDIT_MAX_PENDING", 100_000)))


def describe(event: AuditEvent | PendingEvent) -> str:
    """An event in full, for the log, when it cannot be written."""
    return repr({
        "at": event.at.isoformat() if event.at else None, "user": event.username, "federated": f"{event.federated_subject}@{event.federated_issuer}",
        "client": event.client_id, "via": event.via, "peer": event.peer, "method": event.method, "name": event.name,
        "outcome": event.outcome, "error_code": event.error_code, "decision": event.decision, "latency_ms": event.latency_ms,
        "arguments_hash": event.arguments_hash,
    })


def _who(identity: Identity | None, via: list[str] | tuple[str, ...]) -> tuple[tuple[Any, ...], list[str]]:
    if identity is None:
        return (None, "", "", "", ""), list(via)
    who = (identity.user_id, identity.username, identity.federated_issuer, identity.federated_subject, identity.client_id)
    return who, list(via or identity.via)


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
    input_required: bool = False,
    arguments: Any = None,
    intent: Intent | None = None,
) -> None:
    """Record one forwarded call, without waiting.

    The outcome: `error` with `error_code`; else `input` when the host was answered
    `input_required` (the call has not run, or not finished: it waits for the host's retry);
    else `ok`. `arguments`: those of a tool call or prompt, recorded as their digest (the one
    consent approvals are bound to), never in clear. `intent`: the call's `audit_intent`, which
    this event completes.
    """
    who, via = _who(identity, via)
    _writer.add(PendingEvent(
        timezone.now(), *who, via, peer, method, name[:2000],
        _outcome(error_code, input_required), error_code, decision, round(latency_ms, 3),
        "" if arguments is None else arguments_hash(arguments), _intents.complete(intent),
    ))


def _outcome(error_code: int | None, input_required: bool) -> str:
    if error_code is not None:
        return AuditEvent.Outcome.ERROR.value
    return (AuditEvent.Outcome.INPUT if input_required else AuditEvent.Outcome.OK).value


def audit_pending() -> int:
    """How many recorded events this worker has not finished writing."""
    return _writer.pending()


async def audit_flush() -> None:
    """Write every audit event recorded so far; return once they are in the database.

    While the database is unreachable it returns after one attempt; the events stay queued
    (`audit_pending`) and the writer keeps trying.
    """
    await _writer.flush()


@database_sync_to_async
def _save_batch(batch: list[PendingEvent]) -> list[PendingEvent]:
    """Write `batch`; return the events not written because the database is unreachable."""
    try:
        _insert_rows(batch)
        return []
    except (OperationalError, InterfaceError) as exc:
        logger.warning("database unreachable: %d audit events wait for it (%s)", len(batch), exc)
        return batch
    except Exception:
        logger.exception("could not write %d audit events in one batch; writing them one by one", len(batch))
    for index, event in enumerate(batch):
        try:
            with transaction.atomic():
                event.model().save()
                if event.intent is not None:
                    AuditIntent.objects.filter(pk=event.intent).delete()
        except (OperationalError, InterfaceError) as exc:
            logger.warning("database unreachable: %d audit events wait for it (%s)", len(batch) - index, exc)
            return batch[index:]
        except Exception:
            logger.exception("could not write the audit event %s", describe(event))
    return []


class _Insert:
    """The prepared INSERT (and PostgreSQL's COPY) of audit rows for one database connection's vendor, built once."""

    def __init__(self, connection: BaseDatabaseWrapper) -> None:
        fields = [f for f in AuditEvent._meta.concrete_fields if not f.primary_key]
        missing = [f.attname for f in fields if f.attname not in PendingEvent._fields]
        if missing:
            raise TypeError(f"PendingEvent lacks AuditEvent fields {missing}: audit rows would be written without them")
        quote = connection.ops.quote_name
        self.sql = "INSERT INTO {} ({}) VALUES ({})".format(
            quote(AuditEvent._meta.db_table), ", ".join(quote(f.column) for f in fields), ", ".join(["%s"] * len(fields))
        )
        self.copy_sql = "COPY {} ({}) FROM STDIN".format(quote(AuditEvent._meta.db_table), ", ".join(quote(f.column) for f in fields))
        self.index = [PendingEvent._fields.index(f.attname) for f in fields]
        # Values are already what the drivers take (str, int, float, None), but for the time and
        # the JSON list: those go through the backend's own adapters, as bulk_create would take
        # them (the fields' prep steps before those only check and warn about other kinds of value).
        self.converted: list[tuple[int, Any]] = [
            (position, field) for position, field in enumerate(fields)
            if field.get_internal_type() not in ("CharField", "IntegerField", "FloatField", "ForeignKey")
        ]

    def rows(self, batch: list[PendingEvent], connection: BaseDatabaseWrapper) -> list[list[Any]]:
        ops = connection.ops
        adapters = []
        for position, field in self.converted:
            kind = field.get_internal_type()
            if kind == "DateTimeField":
                adapters.append((position, ops.adapt_datetimefield_value))
            elif kind == "JSONField":
                adapters.append((position, functools.partial(_adapt_json, ops, field.encoder)))
            else:
                adapters.append((position, functools.partial(field.get_db_prep_save, connection=connection)))
        rows = []
        index = self.index
        for event in batch:
            row = [event[i] for i in index]
            for position, adapt in adapters:
                row[position] = adapt(row[position])
            rows.append(row)
        return rows


def _adapt_json(ops: Any, encoder: Any, value: Any) -> Any:
    return ops.adapt_json_value(value, encoder)


_inserts: dict[str, _Insert] = {}


def _insert_rows(batch: list[PendingEvent]) -> None:
    """Insert `batch` in one transaction (sync: the database thread).

    One prepared `INSERT` through `executemany`, or on PostgreSQL one `COPY … FROM STDIN`.

    Raises:
        DatabaseError: as the driver raised it (OperationalError/InterfaceError: unreachable).
    """
    alias = router.db_for_write(AuditEvent)
    connection = connections[alias]
    insert = _inserts.get(connection.vendor)
    if insert is None:
        insert = _inserts[connection.vendor] = _Insert(connection)
    rows = insert.rows(batch, connection)
    with transaction.atomic(using=alias, savepoint=False), connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            # COPY, not executemany: psycopg's pipelined executemany kept the event loop from
            # running for most of each flush (a sequential call every ~60 ms waited ~10 ms).
            with connection.wrap_database_errors, cursor.cursor.copy(insert.copy_sql) as copy:
                for row in rows:
                    copy.write_row(row)
        else:
            cursor.executemany(insert.sql, rows)
        intent_ids = [event.intent for event in batch if event.intent is not None]
        if intent_ids:
            # In the events' transaction: a call has its event or its intent, never both, never neither.
            _delete_intents(intent_ids, connection, cursor)


def audit_write_remaining() -> list[PendingEvent]:
    """Write every queued event now, synchronously; return those the database would not take.

    For the very end of a worker's life, after its event loop has stopped serving (call it from
    a thread of its own: the ORM refuses to run in the event loop's thread). Batches the writer
    task took are not touched; the shutdown's `audit_flush` waited for them.
    """
    unwritten: list[PendingEvent] = []
    while _writer.queue:
        batch = _writer.queue[: batch_size()]
        del _writer.queue[: len(batch)]
        left = _save_batch.func(batch)  # type: ignore[attr-defined]  # the sync function under database_sync_to_async
        if left:
            unwritten.extend(left)
            unwritten.extend(_writer.queue)
            _writer.queue.clear()
    return unwritten


def audit_unwritten() -> list[AuditEvent]:
    """The events still queued (after a flush: those the database could not take), unsaved."""
    return [event.model() for event in _writer.queue]


def audit_reset() -> list[AuditEvent]:
    """Start over with an empty queue; return the events that were still waiting.

    For tests between cases: a finished case's event loop is gone, and its unwritten events
    belong to its own (rolled-back) database transaction.
    """
    global _writer, _intents
    waiting, _writer, _intents = _writer.queue, _Writer(), _Intents()
    return [event.model() for event in waiting]
