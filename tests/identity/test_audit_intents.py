"""Audit intents: a call sent upstream is accounted for even if its worker dies mid-call.

A worker that is killed forgets its in-memory state; here that is `audit_reset()` (a new
`_Intents`, nothing renewed any more), and the intents it wrote stay in the database. Leases
are made to run out at once with a negative FEDMCP_AUDIT_INTENT_LEASE instead of waiting.
The pipeline side (the intent committed before the exchange step) is
tests/mcp_endpoint/pipeline/test_audit_intent.py; real killed workers are tests/e2e/test_audit_durable.py.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from unittest import mock

from django.contrib.auth import get_user_model
from django.db import OperationalError
from django.test import TransactionTestCase, override_settings
from django.utils import timezone

from identity import audit
from identity.call_digest import arguments_hash
from identity.hostauth.tokens import Identity
from identity.models import AuditEvent, AuditIntent

EXPIRED = override_settings(FEDMCP_AUDIT_INTENT_LEASE=-1)
"""Intents written under it have a lease that has already run out."""


def _identity(user_id: int | None) -> Identity:
    return Identity(
        token_id=1, user_id=user_id, username="alice", application_id=1, client_id="desktop-app",
        scopes=frozenset({"mcp:tools"}), expires=timezone.now() + timedelta(hours=1), via=("home",),
    )


def intend(name: str, identity: Identity | None = None, **extra: Any) -> audit.Intent:
    return audit.audit_intent(identity=identity, peer="files", method="tools/call", name=name, decision="allow", **extra)


def complete(intent: audit.Intent, name: str) -> None:
    audit.audit_record(identity=None, peer="files", method="tools/call", name=name, error_code=None, latency_ms=1.0, intent=intent)


@override_settings(FEDMCP_AUDIT_FLUSH_INTERVAL=60)
class AuditIntentTests(TransactionTestCase):
    async def test_an_intent_is_committed_when_written_and_deleted_with_its_event(self) -> None:
        intent = intend("read")
        assert await intent.written() is True
        assert [str(i.pk.hex) async for i in AuditIntent.objects.all()] == [intent.id]

        complete(intent, "read")
        await audit.audit_flush()

        assert await AuditIntent.objects.acount() == 0
        assert [(e.name, e.outcome) async for e in AuditEvent.objects.all()] == [("read", "ok")]

    async def test_a_call_that_ends_before_its_intent_is_sent_leaves_no_intent(self) -> None:
        intent = intend("cancelled early")
        complete(intent, "cancelled early")  # cancelled before the writer took the intent

        assert await intent.written() is False
        await audit.audit_flush()
        assert await AuditIntent.objects.acount() == 0
        assert await AuditEvent.objects.acount() == 1

    async def test_the_intent_of_a_dead_worker_becomes_an_interrupted_event_with_what_was_known(self) -> None:
        user = await get_user_model().objects.acreate(username="alice")
        with EXPIRED:
            intent = intend("write", _identity(user.pk), arguments={"path": "/tmp/x"})
            assert await intent.written() is True
        audit.audit_reset()  # the worker is gone: nobody renews its intents

        report = await audit.audit_upkeep()

        assert report == {"renewed": 0, "interrupted": 1}
        assert await AuditIntent.objects.acount() == 0
        event = await AuditEvent.objects.aget()
        assert (event.user_id, event.username, event.client_id, event.via) == (user.pk, "alice", "desktop-app", ["home"])
        assert (event.peer, event.method, event.name, event.decision) == ("files", "tools/call", "write", "allow")
        assert (event.outcome, event.error_code) == (AuditEvent.Outcome.INTERRUPTED, None)
        assert event.arguments_hash == arguments_hash({"path": "/tmp/x"})
        assert event.latency_ms >= 0

    async def test_a_live_workers_intents_are_renewed_not_interrupted(self) -> None:
        with EXPIRED:
            intent = intend("long call")
            await intent.written()

        report = await audit.audit_upkeep()

        assert report == {"renewed": 1, "interrupted": 0}
        assert (await AuditIntent.objects.aget()).lease_until > timezone.now()
        complete(intent, "long call")
        await audit.audit_flush()
        assert [e.outcome async for e in AuditEvent.objects.all()] == ["ok"]
        assert await AuditIntent.objects.acount() == 0

    async def test_an_interrupted_call_is_written_once_by_upkeeps_that_run_again(self) -> None:
        with EXPIRED:
            await intend("once").written()
        audit.audit_reset()

        first, second = await audit.audit_upkeep(), await audit.audit_upkeep()

        assert (first["interrupted"], second["interrupted"]) == (1, 0)
        assert await AuditEvent.objects.acount() == 1

    async def test_an_interrupted_call_of_a_user_deleted_since_keeps_the_name_without_the_link(self) -> None:
        user = await get_user_model().objects.acreate(username="alice")
        with EXPIRED:
            await intend("gone", _identity(user.pk)).written()
        audit.audit_reset()
        await user.adelete()

        await audit.audit_upkeep()

        event = await AuditEvent.objects.aget()
        assert (event.user_id, event.username, event.outcome) == (None, "alice", "interrupted")

    async def test_with_the_database_unreachable_calls_go_on_without_intents_and_stop_trying_for_a_while(self) -> None:
        with mock.patch.object(audit, "_insert_intents", side_effect=OperationalError("connection refused")) as insert:
            assert await intend("during the outage").written() is False
            assert await intend("right after").written() is False
        assert insert.call_count == 1  # the second call did not wait for another attempt
        assert audit.audit_intent_live() == 0
