"""The audit writer while the database is unreachable: events wait, in order, with their own time.

The end-to-end side (a real worker whose PostgreSQL is cut) is tests/e2e/test_db_outage.py;
here the database's refusal is simulated at the batch insert (`audit._insert_rows`) and `save`.

These are `TransactionTestCase`s, as in test_audit_insert.py: the writer saves through
`database_sync_to_async`, which runs `close_old_connections()` on the test's own thread; inside
a `TestCase`'s transaction that closes the test's connection (autocommit is off), and every later
query fails with "the connection is closed" on PostgreSQL (SQLite ignores closing an in-memory
database, which hid it).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from unittest import mock

from django.db import OperationalError
from django.test import TransactionTestCase, override_settings
from django.utils import timezone

from identity import audit
from identity.models import AuditEvent

UNREACHABLE = OperationalError("connection refused")


def record(*names: str) -> None:
    for name in names:
        audit.audit_record(identity=None, peer="files", method="tools/call", name=name, error_code=None, latency_ms=1.0)


@override_settings(FEDMCP_AUDIT_FLUSH_INTERVAL=60)
class AuditOutageTests(TransactionTestCase):
    async def test_events_wait_for_the_database_and_keep_their_order_and_time(self) -> None:
        before = timezone.now()
        with mock.patch.object(audit, "_insert_rows", side_effect=UNREACHABLE):
            record("first", "second")
            await audit.audit_flush()  # one attempt, then it returns: nothing is lost, nothing hangs
            assert audit.audit_pending() == 2
            record("third")
            await audit.audit_flush()
            assert audit.audit_pending() == 3
        await audit.audit_flush()
        assert audit.audit_pending() == 0
        rows = [e async for e in AuditEvent.objects.order_by("pk")]
        assert [e.name for e in rows] == ["first", "second", "third"]
        # Stamped when recorded, not when finally written.
        assert all(before <= e.at <= before + timedelta(seconds=30) for e in rows)

    async def test_a_one_by_one_retry_stops_at_the_outage_and_keeps_the_rest(self) -> None:
        real_save = AuditEvent.save
        saved: list[str] = []

        def save(event: AuditEvent, *args: object, **kwargs: object) -> None:
            if event.name == "b":
                raise UNREACHABLE
            saved.append(event.name)
            real_save(event, *args, **kwargs)

        with mock.patch.object(audit, "_insert_rows", side_effect=RuntimeError("a row it will not take")), \
                mock.patch.object(AuditEvent, "save", save):
            record("a", "b", "c")
            await audit.audit_flush()
        assert saved == ["a"]
        assert [e.name for e in audit.audit_unwritten()] == ["b", "c"]
        await audit.audit_flush()
        assert sorted([e.name async for e in AuditEvent.objects.all()]) == ["a", "b", "c"]

    @override_settings(FEDMCP_AUDIT_FLUSH_INTERVAL=0.01)
    async def test_the_writer_retries_by_itself_once_the_database_is_back(self) -> None:
        calls = 0
        real = audit._insert_rows

        def flaky(batch: list[audit.PendingEvent]) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise UNREACHABLE
            real(batch)

        with mock.patch.object(audit, "_insert_rows", side_effect=flaky), \
                mock.patch.object(audit, "RETRY_PAUSE_MAX", 0.05):
            record("x")
            for _ in range(200):  # bounded: about 10 s at most
                if await AuditEvent.objects.acount() == 1:
                    break
                await asyncio.sleep(0.05)
        assert await AuditEvent.objects.acount() == 1
        assert calls >= 2

    @override_settings(FEDMCP_AUDIT_MAX_PENDING=3)
    async def test_the_queue_is_bounded_and_says_what_it_drops(self) -> None:
        with mock.patch.object(audit, "_insert_rows", side_effect=UNREACHABLE), \
                self.assertLogs("identity.audit", "ERROR") as logs:
            record("1", "2", "3", "4", "5")
        assert [e.name for e in audit.audit_unwritten()] == ["3", "4", "5"]
        assert sum("dropping the oldest event" in line for line in logs.output) == 2
        assert "'name': '1'" in logs.output[0]
