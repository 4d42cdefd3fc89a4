"""Nothing a worker audited is lost at shutdown, even a call that ended after the shutdown's flush.

Until the reactor drops them, connections a balancer keeps alive may bring requests while the
worker is being released. A call that started then and ended after `release_worker`'s flush was
recorded in memory and never written, without an error in the log. The after-shutdown hook
writes what is still queued, and logs in full what the database will not take.
"""

from __future__ import annotations

import asyncio
from unittest import mock

from django.db import OperationalError
from django.test import TransactionTestCase

from fedmcp_lib import observability
from fedmcp_site.runtime import lifecycle
from identity import audit
from identity.models import AuditEvent


def record(name: str) -> None:
    audit.audit_record(identity=None, peer="fixture", method="tools/call", name=name, error_code=None, latency_ms=1.0)


class AuditAtShutdownTests(TransactionTestCase):
    def tearDown(self) -> None:
        audit.audit_reset()

    async def test_a_call_that_ends_after_the_release_is_written_by_the_exit_hook(self) -> None:
        record("served")
        await lifecycle.release_worker()
        record("arrived-late")  # a request on a kept-alive connection, answered after the flush

        await asyncio.to_thread(lambda: None)  # (the hook runs on the reactor thread, loop stopped)
        lifecycle.write_remaining_audit()

        names = {name async for name in AuditEvent.objects.values_list("name", flat=True)}
        assert names == {"served", "arrived-late"}

    async def test_what_the_database_refuses_at_exit_is_logged_in_full(self) -> None:
        record("lost-to-an-outage")
        with mock.patch.object(audit, "_insert_rows", side_effect=OperationalError("database down")), \
                self.assertLogs("fedmcp_site.runtime.lifecycle", "ERROR") as logs:
            lifecycle.write_remaining_audit()
        assert any("audit event not written at shutdown" in line and "lost-to-an-outage" in line for line in logs.output)

    async def test_requests_that_start_while_the_worker_is_released_are_waited_for(self) -> None:
        finished = asyncio.Event()

        async def late_request() -> None:
            observability._in_flight.add(asyncio.current_task())  # type: ignore[arg-type]
            try:
                await asyncio.sleep(0.2)  # the upstream call
            finally:
                record("late-but-tracked")  # as forwarding does, whether it ended or was cancelled
                finished.set()

        async def first_request() -> None:
            observability._in_flight.add(asyncio.current_task())  # type: ignore[arg-type]
            try:
                await asyncio.sleep(0.05)
            finally:
                # As it ends, the next request arrives on the same kept-alive connection.
                asyncio.get_running_loop().create_task(late_request())
                await asyncio.sleep(0)

        first = asyncio.get_running_loop().create_task(first_request())
        await asyncio.sleep(0)
        await lifecycle.release_worker()

        assert first.done() and finished.is_set()
        names = {name async for name in AuditEvent.objects.values_list("name", flat=True)}
        assert "late-but-tracked" in names
