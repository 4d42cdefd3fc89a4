"""The audit CSV export never writes a live spreadsheet formula (issue 15, item 9: CSV injection).

Tool names, usernames, federated subjects and gateway paths in the audit log come from hosts,
upstreams and peer gateways. A cell that starts with `=`, `+`, `-`, `@`, a tab or a carriage
return is a formula to Excel, LibreOffice and Google Sheets; OWASP's advice is to prefix such
cells with a single quote, which the spreadsheet shows as text.
"""

from __future__ import annotations

import csv
import io

from django.test import TestCase

from identity.models import AuditEvent
from tests.admin_ui.common import staff_client

EXPORT = "/admin/identity/auditevent/export.csv"
FORMULAS = ("=HYPERLINK(\"http://evil.example\",\"x\")", "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(A1:A9)", "\tx=1", "\rx=1")


class AuditCsvInjectionTest(TestCase):
    def export(self) -> list[list[str]]:
        reply = staff_client().get(EXPORT)
        assert reply.status_code == 200
        return list(csv.reader(io.StringIO(b"".join(reply.streaming_content).decode(), newline="")))

    def test_the_audit_csv_export_escapes_cells_that_start_a_formula(self) -> None:
        for value in FORMULAS:
            AuditEvent.objects.create(
                username=value, federated_subject=value, via=[value, "b"], peer="files", method="tools/call",
                name=value, outcome="ok", latency_ms=1.0,
            )

        header, *rows = self.export()

        column = {name: i for i, name in enumerate(header)}
        cells = [(row[column[c]]) for row in rows for c in ("username", "federated_subject", "via", "name")]
        assert len(cells) == 4 * len(FORMULAS)
        assert all(cell.startswith("'") for cell in cells), cells
        assert sorted(row[column["name"]] for row in rows) == sorted("'" + value for value in FORMULAS)

    def test_numbers_and_plain_text_are_written_as_they_are(self) -> None:
        AuditEvent.objects.create(username="alice", peer="files", method="tools/call", name="read", outcome="error", error_code=-32010, latency_ms=-0.0)

        header, row = self.export()

        column = {name: i for i, name in enumerate(header)}
        assert (row[column["username"]], row[column["name"]], row[column["error_code"]]) == ("alice", "read", "-32010")
