"""The audit log in the admin: read-only, filterable, exported as streamed CSV."""

from __future__ import annotations

import csv
import io

from django.test import TestCase

from identity.models import AuditEvent
from tests.admin_ui.common import staff_client

LIST = "/admin/identity/auditevent/"


class AuditAdminTest(TestCase):
    def setUp(self) -> None:
        self.ok = AuditEvent.objects.create(username="alice", peer="files", method="tools/call", name="read", outcome="ok", latency_ms=3.0)
        self.bad = AuditEvent.objects.create(username="bob", peer="time", method="prompts/get", name="p", outcome="error", error_code=-32010, latency_ms=9.0)
        self.client = staff_client()

    def test_it_lists_and_filters_events(self) -> None:
        page = self.client.get(LIST, {"outcome__exact": "error"})

        assert page.status_code == 200
        assert list(page.context["cl"].result_list) == [self.bad]

    def test_it_offers_no_add_change_or_delete(self) -> None:
        assert self.client.get(LIST + "add/").status_code == 403
        change = self.client.post(f"{LIST}{self.ok.pk}/change/", {"username": "mallory"})
        assert change.status_code == 403
        assert self.client.post(f"{LIST}{self.ok.pk}/delete/", {"post": "yes"}).status_code == 403
        actions = [name for name, _ in self.client.get(LIST).context["action_form"].fields["action"].choices]
        assert "delete_selected" not in actions and "export_csv" in actions
        assert AuditEvent.objects.get(pk=self.ok.pk).username == "alice"

    def test_the_csv_export_streams_the_selected_rows(self) -> None:
        reply = self.client.post(LIST, {"action": "export_csv", "_selected_action": [self.ok.pk, self.bad.pk]})

        assert reply.status_code == 200
        assert reply.streaming and reply["Content-Type"] == "text/csv"
        rows = list(csv.reader(io.StringIO(b"".join(reply.streaming_content).decode())))
        assert rows[0][:2] == ["at", "username"]
        assert [r[1] for r in rows[1:]] == ["alice", "bob"]

    def test_the_date_hierarchy_drills_down(self) -> None:
        at = self.ok.at
        page = self.client.get(LIST, {"at__year": at.year, "at__month": at.month, "at__day": at.day})
        assert page.status_code == 200
        assert len(page.context["cl"].result_list) == 2
