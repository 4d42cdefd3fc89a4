"""No host session stays open for ever, and closed ones do not pile up.

* A WebSocket or SSE session is leased by the worker holding its connection; once the lease is
  not renewed (the worker was killed), any worker's upkeep closes it.
* A Streamable HTTP session nobody uses is closed after the idle timeout, without a request.
* A DELETE the database could not record is recorded by the upkeep once it is back, for the
  session's owner only.
* Closed rows are deleted after FEDMCP_SESSION_RETENTION.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta
from unittest import mock

from django.db import OperationalError
from django.test import override_settings
from django.utils import timezone

from mcp_endpoint import sessions
from mcp_endpoint.models import McpSession
from tests.base import BOB, AsgiTestCase, McpClient, amint_token, http, ws_communicator


@contextlib.contextmanager
def database_down() -> Iterator[None]:
    """The database refuses the session look-up and the close (the token check still passes)."""
    down = OperationalError("database down")
    with mock.patch.object(sessions, "_session_load", side_effect=down), mock.patch.object(sessions, "session_close", side_effect=down):
        yield


async def row(session_id: str) -> McpSession:
    return await McpSession.objects.aget(pk=session_id)


async def only_session(transport: str) -> McpSession:
    return await McpSession.objects.filter(transport=transport).alatest("created_at")


class LeaseTests(AsgiTestCase):
    async def test_an_open_websocket_session_is_leased_and_renewed_by_its_worker(self) -> None:
        ws = ws_communicator()
        connected, _ = await ws.connect()
        assert connected
        try:
            session = await only_session("websocket")
            assert session.lease_until is not None and session.lease_until > timezone.now()
            # Even a lease about to run out is renewed by the upkeep of the worker holding it.
            await McpSession.objects.filter(pk=session.pk).aupdate(lease_until=timezone.now() - timedelta(seconds=1))
            report = await sessions.session_upkeep()
            assert report["renewed"] >= 1
            assert (await row(session.pk)).closed_at is None
        finally:
            await ws.disconnect()
        assert (await row(session.pk)).closed_at is not None

    async def test_a_session_whose_worker_died_is_closed_when_its_lease_runs_out(self) -> None:
        ws = ws_communicator()
        connected, _ = await ws.connect()
        assert connected
        session = await only_session("websocket")
        # The worker holding it is SIGKILLed: nobody renews the lease, nobody closes the session.
        sessions._held.discard(session.pk)
        await McpSession.objects.filter(pk=session.pk).aupdate(lease_until=timezone.now() - timedelta(seconds=1))

        report = await sessions.session_upkeep()

        assert report["expired"] == 1
        assert (await row(session.pk)).closed_at is not None
        await ws.disconnect()

    async def test_a_close_the_database_refused_is_left_to_the_lease(self) -> None:
        ws = ws_communicator()
        connected, _ = await ws.connect()
        assert connected
        session = await only_session("websocket")
        with mock.patch.object(sessions, "session_close", side_effect=OperationalError("database down")):
            await ws.disconnect()
        assert (await row(session.pk)).closed_at is None
        assert session.pk not in sessions._held  # no longer renewed

        with override_settings(MCP_SESSION_LEASE=0):
            await McpSession.objects.filter(pk=session.pk).aupdate(lease_until=timezone.now() - timedelta(seconds=1))
            await sessions.session_upkeep()
        assert (await row(session.pk)).closed_at is not None

    async def test_a_draining_worker_closes_the_sessions_it_holds(self) -> None:
        ws = ws_communicator()
        connected, _ = await ws.connect()
        assert connected
        session = await only_session("websocket")

        await sessions.close_held_sessions()

        assert (await row(session.pk)).closed_at is not None
        await ws.disconnect()


class StreamableHttpSessionTests(AsgiTestCase):
    async def test_an_idle_session_is_closed_by_the_upkeep_without_any_request(self) -> None:
        client = McpClient()
        await client.initialize()
        session = await only_session("streamable-http")
        assert session.lease_until is None
        await McpSession.objects.filter(pk=session.pk).aupdate(last_seen_at=timezone.now() - timedelta(days=2))

        report = await sessions.session_upkeep()

        assert report["idle"] == 1
        assert (await row(session.pk)).closed_at is not None

    async def test_a_delete_during_a_database_outage_is_recorded_when_it_is_back(self) -> None:
        client = McpClient()
        await client.initialize()
        session = await only_session("streamable-http")
        with database_down():
            reply = await http("DELETE", "/mcp", headers=client.headers())
        assert reply.status == 503
        assert (await row(session.pk)).closed_at is None

        await sessions.session_upkeep()

        assert (await row(session.pk)).closed_at is not None

    async def test_a_failed_delete_by_someone_else_closes_nothing(self) -> None:
        client = McpClient()
        await client.initialize()
        alices = await only_session("streamable-http")
        # A second session of alice's this worker never served (not in its cache).
        session = await McpSession.objects.acreate(transport="streamable-http", user_id=alices.user_id, client_id=alices.client_id)
        intruder = await amint_token(BOB)
        with database_down():
            reply = await http("DELETE", "/mcp", headers={
                **client.headers(), "mcp-session-id": session.pk, "authorization": f"Bearer {intruder}",
            })
        assert reply.status == 503

        await sessions.session_upkeep()

        assert (await row(session.pk)).closed_at is None


@override_settings(MCP_SESSION_RETENTION=7 * 24 * 3600)
class RetentionTests(AsgiTestCase):
    async def test_closed_sessions_are_deleted_after_the_retention_period(self) -> None:
        now = timezone.now()
        old = await McpSession.objects.acreate(transport="websocket", closed_at=now - timedelta(days=8))
        recent = await McpSession.objects.acreate(transport="websocket", closed_at=now - timedelta(days=6))
        live = await McpSession.objects.acreate(transport="streamable-http")

        report = await sessions.session_upkeep()

        assert report["pruned"] >= 1
        remaining = {pk async for pk in McpSession.objects.values_list("pk", flat=True)}
        assert old.pk not in remaining and {recent.pk, live.pk} <= remaining
