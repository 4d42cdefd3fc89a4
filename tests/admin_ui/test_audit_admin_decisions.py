"""The audit log in the admin by consent decision: filter, columns, and a CSV export of the current filters."""

from __future__ import annotations

import csv
import io
from datetime import timedelta

from django.contrib.auth import get_user_model
from django.test import TestCase

from identity.models import AuditEvent
from tests.admin_ui.common import staff_client
from tests.api.common import ApiTestCase

LIST = "/admin/identity/auditevent/"
EXPORT = LIST + "export.csv"


def rows_of(reply: object) -> list[list[str]]:
    body = b"".join(reply.streaming_content).decode()  # type: ignore[attr-defined]
    return list(csv.reader(io.StringIO(body)))


class AuditDecisionAdminTest(TestCase):
    def setUp(self) -> None:
        alice = get_user_model().objects.create_user("alice")
        event = AuditEvent.objects.create
        self.sampled = event(
            user=alice, username="alice", peer="web", method="sampling/createMessage", name="summarize", outcome="ok", decision="approved", latency_ms=900.0
        )
        self.refused = event(
            username="bob", peer="web", method="sampling/createMessage", name="summarize", outcome="error", error_code=-32017, decision="denied", latency_ms=4.0
        )
        self.tool = event(user=alice, username="alice", peer="files", method="tools/call", name="read", outcome="ok", decision="allow", latency_ms=3.0)
        self.listed = event(username="alice", peer="files", method="tools/list", name="", outcome="ok", decision="", latency_ms=1.0)
        self.client = staff_client()

    def test_the_list_shows_the_decision_and_filters_by_it(self) -> None:
        page = self.client.get(LIST, {"decision": "denied"})

        assert page.status_code == 200
        assert list(page.context["cl"].result_list) == [self.refused]
        assert "decision" in page.context["cl"].list_display
        none = self.client.get(LIST, {"decision": "none"})
        assert list(none.context["cl"].result_list) == [self.listed]

    def test_it_filters_by_the_distributed_consent_words(self) -> None:
        deferred = AuditEvent.objects.create(
            federated_issuer="https://a.example", federated_subject="alice", peer="web", method="sampling/createMessage",
            name="summarize", outcome="ok", decision="home", latency_ms=2.0,
        )

        page = self.client.get(LIST, {"decision": "home"})

        assert list(page.context["cl"].result_list) == [deferred]
        assert {"home", "ask-home", "rejected"} <= {value for value, _ in page.context["cl"].filter_specs[0].lookup_choices}

    def test_it_filters_by_method_peer_and_user(self) -> None:
        page = self.client.get(LIST, {"method__exact": "sampling/createMessage", "peer__exact": "web", "user__id__exact": self.sampled.user_id})

        assert list(page.context["cl"].result_list) == [self.sampled]

    def test_the_export_link_carries_the_current_filters(self) -> None:
        page = self.client.get(LIST, {"decision": "approved"})

        assert b'href="/admin/identity/auditevent/export.csv?decision=approved"' in page.content

    def test_the_export_honours_the_filters_and_has_the_decision_column(self) -> None:
        reply = self.client.get(EXPORT, {"method__exact": "sampling/createMessage"})

        assert reply.status_code == 200 and reply["Content-Type"] == "text/csv"
        rows = rows_of(reply)
        column = rows[0].index("decision")
        assert [(r[1], r[column]) for r in rows[1:]] == [("alice", "approved"), ("bob", "denied")]

    def test_the_export_honours_search_and_the_date_drill_down(self) -> None:
        at = self.sampled.at
        reply = self.client.get(EXPORT, {"q": "bob", "at__year": at.year, "at__month": at.month, "at__day": at.day})
        assert [r[1] for r in rows_of(reply)[1:]] == ["bob"]
        tomorrow = at + timedelta(days=1)
        empty = self.client.get(EXPORT, {"at__year": tomorrow.year, "at__month": tomorrow.month, "at__day": tomorrow.day})
        assert len(rows_of(empty)) == 1  # the header only

    def test_the_selected_rows_action_exports_the_decision_too(self) -> None:
        reply = self.client.post(LIST, {"action": "export_csv", "_selected_action": [self.tool.pk]})

        rows = rows_of(reply)
        assert rows[1][rows[0].index("decision")] == "allow"

    def test_a_bad_filter_is_a_clear_400_and_the_export_needs_staff(self) -> None:
        assert self.client.get(EXPORT, {"no_such_field": "1"}).status_code == 400
        self.client.logout()
        assert self.client.get(EXPORT).status_code == 302  # to the admin login
        assert AuditEvent.objects.count() == 4


class AuditDecisionApiAndDashboardTest(ApiTestCase):
    def setUp(self) -> None:
        super().setUp()
        AuditEvent.objects.create(username="alice", peer="files", method="tools/call", name="read", outcome="ok", decision="allow", latency_ms=2.0)
        AuditEvent.objects.create(
            username="alice", peer="files", method="sampling/createMessage", name="read",
            outcome="error", error_code=-32017, decision="denied", latency_ms=60_000.0,
        )

    def test_the_api_shows_and_filters_the_decision(self) -> None:
        results = self.api.get("/api/audit/", {"decision": "denied"}).json()["results"]

        assert [(e["method"], e["decision"]) for e in results] == [("sampling/createMessage", "denied")]

    def test_the_dashboard_counts_calls_not_upstream_sampling_requests(self) -> None:
        data = staff_client().get("/admin/dashboard/data", {"minutes": 10}).json()

        # ApiTestCase's two calls (one failed) and ours; the slow, refused sampling request is left out.
        row = next(p for p in data["peers"] if p["name"] == "files")
        assert (row["calls"], row["errors"]) == (3, 1)
        assert row["latency_p95_ms"] < 60_000.0
