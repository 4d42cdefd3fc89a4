"""The admin says fedmcp, with readable names for its sections and models."""

from __future__ import annotations

from django.test import TestCase

from tests.admin_ui.common import staff_client


class BrandingTest(TestCase):
    def test_the_index_is_fedmcp_with_readable_names(self) -> None:
        page = staff_client().get("/admin/").content.decode()

        assert "<title>Operator console | fedmcp admin</title>" in page
        assert "Django administration" not in page
        for shown in ("Catalog entries", "Peers and catalog", "Identity, consent and audit", "MCP sessions"):
            assert shown in page, shown
        for wrong in ("Catalog entrys", "MCP_ENDPOINT", "Mcp sessions"):
            assert wrong not in page, wrong
        assert 'id="fedmcp-playground-link"' in page
