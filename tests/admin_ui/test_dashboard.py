"""The dashboard: staff only, per-peer traffic from the audit log, a JSON feed the page polls."""

from __future__ import annotations

from django.test import Client, TestCase

from console.selectors import percentile
from federation.models import Peer, PeerHealthCheck
from identity.models import AuditEvent
from tests.admin_ui.common import staff_client
from tests.base import HOST, persona


class DashboardTest(TestCase):
    def setUp(self) -> None:
        self.peer = Peer.objects.create(name="files", transport="streamable-http", url="http://127.0.0.1:9/mcp")
        PeerHealthCheck.objects.create(peer=self.peer, ok=True, latency_ms=2.0)
        for latency, outcome in ((10.0, "ok"), (20.0, "ok"), (30.0, "ok"), (400.0, "error")):
            AuditEvent.objects.create(username="alice", peer="files", method="tools/call", name="read", outcome=outcome, latency_ms=latency)

    def test_it_shows_each_peer_with_calls_errors_and_latency(self) -> None:
        data = staff_client().get("/admin/dashboard/data", {"minutes": 10}).json()

        row = next(p for p in data["peers"] if p["name"] == "files")
        assert (row["calls"], row["errors"], row["health"]) == (4, 1, "ok")
        assert row["error_rate"] == 0.25
        assert row["calls_per_minute"] == 0.4
        assert (row["latency_p50_ms"], row["latency_p95_ms"]) == (20.0, 400.0)
        assert sum(row["series"]) == 4 and sum(row["error_series"]) == 1 and len(row["series"]) == 10
        assert data["totals"]["pending_prompts"] >= 0

    def test_the_page_renders_for_staff_and_links_from_the_admin_index(self) -> None:
        client = staff_client()
        page = client.get("/admin/dashboard/")
        assert page.status_code == 200
        assert b'data-peer="files"' in page.content
        assert b"/admin/dashboard/" in client.get("/admin/").content

    def test_it_has_an_empty_state_without_peers(self) -> None:
        Peer.objects.all().delete()
        AuditEvent.objects.all().delete()
        page = staff_client().get("/admin/dashboard/")
        assert b'id="dash-empty"' in page.content
        assert staff_client().get("/admin/dashboard/data").json()["peers"] == []

    def test_it_refuses_anonymous_and_non_staff_users(self) -> None:
        anonymous = Client(headers={"host": HOST})
        assert anonymous.get("/admin/dashboard/").status_code == 302
        assert anonymous.get("/admin/dashboard/data").status_code == 302
        user = Client(headers={"host": HOST})
        user.force_login(persona("alice"))
        assert user.get("/admin/dashboard/data").status_code == 302

    def test_percentiles_use_the_nearest_rank(self) -> None:
        assert percentile([], 0.5) is None
        assert percentile([5.0], 0.95) == 5.0
        assert percentile([float(n) for n in range(1, 101)], 0.95) == 95.0


class DashboardSeparatesPeopleFromPeersTest(TestCase):
    """A 120 s consent timeout is the user's wait, not the peer's p95; refusals are not upstream errors."""

    def setUp(self) -> None:
        self.peer = Peer.objects.create(name="time", transport="streamable-http", url="http://127.0.0.1:9/mcp")

        def event(latency: float, outcome: str = "ok", decision: str = "", error_code: int | None = None) -> None:
            AuditEvent.objects.create(
                username="alice", peer="time", method="tools/call", name="now", outcome=outcome, latency_ms=latency,
                decision=decision, error_code=error_code,
            )

        event(12.4, decision="allow")
        event(18.6, decision="grant")
        event(120_168.0, "error", "timeout", -32018)  # nobody answered the consent prompt
        event(45_000.0, decision="approved")  # the user approved after 45 s; the peer answered quickly
        event(3.0, "error", "deny", -32017)  # a policy refused
        event(1.0, "error", "", -32016)  # rate limited
        event(2.0, "input", "ask")  # 2026-07-28: sent to the consent page
        event(30.0, "error", "allow", -32010)  # the upstream failed

    def row(self) -> dict:
        data = staff_client().get("/admin/dashboard/data").json()
        return next(p for p in data["peers"] if p["name"] == "time")

    def test_upstream_latency_leaves_out_the_time_people_took(self) -> None:
        row = self.row()

        assert (row["latency_p50_ms"], row["latency_p95_ms"]) == (19, 30)
        assert row["consent_wait_p95_ms"] == 120_168
        assert row["consent_waits"] == 2 and row["consent_asked"] == 1

    def test_refusals_are_counted_apart_from_upstream_errors(self) -> None:
        row = self.row()

        assert row["errors"] == 1  # only the upstream's own failure
        assert row["refused"] == 3 and row["refused_by"] == {"policy": 1, "rate limit": 1, "unanswered": 1}
        assert row["upstream_calls"] == 4 and row["calls"] == 8
        assert row["error_rate"] == 0.25

    def test_peer_cards_link_to_the_peer_and_numbers_are_rounded(self) -> None:
        page = staff_client().get("/admin/dashboard/").content.decode()

        assert f'href="/admin/federation/peer/{self.peer.pk}/change/"' in page
        assert "19 ms" in page and "18.6" not in page
