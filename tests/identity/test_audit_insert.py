"""The audit writer's batch insert (one prepared statement per batch) against the real database.

The outage side (requeue, backoff, the queue bound) is tests/identity/test_audit_outage.py.
These run on whatever database the settings name: SQLite by default, PostgreSQL with
DATABASE_URL. They are `TransactionTestCase`s: the writer commits its own transaction, and an
async `TestCase` on PostgreSQL hands the database thread a closed connection.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model
from django.test import TransactionTestCase, override_settings
from django.utils import timezone

from identity import audit
from identity.hostauth.tokens import Identity
from identity.models import AuditEvent


def _identity(user_id: int | None, **overrides: Any) -> Identity:
    values: dict[str, Any] = {
        "token_id": 1, "user_id": user_id, "username": "alice", "application_id": 1, "client_id": "desktop-app",
        "scopes": frozenset({"mcp:tools"}), "expires": timezone.now() + timedelta(hours=1),
    }
    return Identity(**{**values, **overrides})


def _columns(event: AuditEvent) -> dict[str, Any]:
    return {f.attname: getattr(event, f.attname) for f in AuditEvent._meta.concrete_fields if not f.primary_key}


@override_settings(FEDMCP_AUDIT_FLUSH_INTERVAL=60)
class AuditInsertTests(TransactionTestCase):
    async def test_every_field_is_written_as_recorded(self) -> None:
        user = await get_user_model().objects.acreate(username="alice")
        before = timezone.now()
        audit.audit_record(
            identity=_identity(user.pk, federated_issuer="https://home.example", federated_subject="alice@home", via=("home", "hub")),
            peer="files", method="tools/call", name="read " + "é" * 10, error_code=-32001, latency_ms=12.34567, decision="grant",
        )
        audit.audit_record(identity=None, peer="files", method="resources/read", name="file:///a", error_code=None, latency_ms=0.5)
        expected = [_columns(event) for event in audit.audit_unwritten()]
        await audit.audit_flush()
        rows = await database_sync_to_async(lambda: [_columns(e) for e in AuditEvent.objects.order_by("pk")])()
        assert rows == expected
        assert rows[0]["via"] == ["home", "hub"]
        assert rows[0]["user_id"] == user.pk and rows[0]["error_code"] == -32001 and rows[0]["latency_ms"] == 12.346
        assert rows[0]["outcome"] == "error" and rows[1]["outcome"] == "ok" and rows[1]["user_id"] is None
        assert before <= rows[0]["at"] <= rows[1]["at"] <= timezone.now()
        assert rows[0]["at"].utcoffset() == timedelta(0)

    async def test_a_batch_larger_than_one_statement_of_placeholders_is_written_whole(self) -> None:
        with override_settings(FEDMCP_AUDIT_BATCH_SIZE=2000):
            for i in range(1500):
                audit.audit_record(identity=None, peer="files", method="tools/call", name=f"t{i}", error_code=None, latency_ms=1.0)
            await audit.audit_flush()
        assert audit.audit_pending() == 0
        assert await AuditEvent.objects.acount() == 1500


class AuditRefusedRowTests(TransactionTestCase):
    """A row the database refuses (for real, not mocked) does not cost the batch its other rows."""

    @override_settings(FEDMCP_AUDIT_FLUSH_INTERVAL=60)
    async def test_the_other_events_of_the_batch_are_written_and_the_refused_one_is_logged(self) -> None:
        audit.audit_record(identity=None, peer="files", method="tools/call", name="before", error_code=None, latency_ms=1.0)
        # latency_ms is NOT NULL: the database refuses this row (audit_record itself never builds one).
        audit._writer.add(audit.PendingEvent(timezone.now(), None, "", "", "", "", [], "files", "tools/call", "refused", "ok", None, "", None))  # type: ignore[arg-type]
        audit.audit_record(identity=None, peer="files", method="tools/call", name="after", error_code=None, latency_ms=1.0)
        with self.assertLogs("identity.audit", "ERROR") as logs:
            await audit.audit_flush()
        assert sorted([e.name async for e in AuditEvent.objects.all()]) == ["after", "before"]
        assert audit.audit_pending() == 0
        assert any("could not write the audit event" in line and "'name': 'refused'" in line for line in logs.output)
